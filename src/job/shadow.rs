//! How a candidate model version agrees with the active one on live
//! traffic: the shadow runs (jobs with [`ResolvedRoute::shadow`]) paired
//! with the active runs of the same series, route and generation.
//!
//! Input: the job store's jobs. Output: an [`Agreement`]: n, Pearson r, the
//! bias (mean of candidate − active), the 95% limits of agreement (bias ±
//! 1.96 SD of the differences, Bland and Altman 1986), every pair (for the
//! plot) and the pairs that disagree most, with both jobs' ids (their
//! overlays are `/api/jobs/{id}/overlay.png`).
//!
//! Invariants: only jobs that are `done` on both sides count; a refused or
//! failed run on either side is no pair. Statistics that need more pairs
//! than there are (r and the SD need two, and r a spread on both sides) are
//! `None`, never NaN. Pure: no I/O.
//!
//! [`ResolvedRoute::shadow`]: super::ResolvedRoute::shadow

use std::collections::HashMap;

use serde::Serialize;

use super::{Job, JobState};

/// How many of the most discordant pairs the agreement lists.
pub const WORST: usize = 10;

/// The statistics of paired values (active, candidate).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    /// Pearson's r between the active and the candidate values.
    pub r: Option<f64>,
    /// Mean of candidate − active.
    pub bias: Option<f64>,
    /// Sample standard deviation of candidate − active.
    pub sd: Option<f64>,
    /// bias − 1.96 SD, bias + 1.96 SD.
    pub limits_of_agreement: Option<[f64; 2]>,
}

/// The statistics of `pairs` of (active, candidate) values.
pub fn stats(pairs: &[(f64, f64)]) -> Stats {
    let n = pairs.len();
    if n == 0 {
        return Stats::default();
    }
    let nf = n as f64;
    let diffs: Vec<f64> = pairs.iter().map(|(a, c)| c - a).collect();
    let bias = diffs.iter().sum::<f64>() / nf;
    let sd = (n > 1).then(|| (diffs.iter().map(|d| (d - bias).powi(2)).sum::<f64>() / (nf - 1.0)).sqrt());
    let (ma, mc) = (pairs.iter().map(|p| p.0).sum::<f64>() / nf, pairs.iter().map(|p| p.1).sum::<f64>() / nf);
    let (mut saa, mut scc, mut sac) = (0.0, 0.0, 0.0);
    for (a, c) in pairs {
        saa += (a - ma).powi(2);
        scc += (c - mc).powi(2);
        sac += (a - ma) * (c - mc);
    }
    let r = (n > 1 && saa > 0.0 && scc > 0.0).then(|| sac / (saa * scc).sqrt());
    Stats {
        n,
        r,
        bias: Some(bias),
        sd,
        limits_of_agreement: sd.map(|sd| [bias - 1.96 * sd, bias + 1.96 * sd]),
    }
}

/// One series measured by both versions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pair {
    pub series_instance_uid: String,
    pub route: String,
    pub generation: u32,
    pub active_version: String,
    pub active_value: f64,
    pub active_job: i64,
    pub candidate_value: f64,
    pub candidate_job: i64,
    /// candidate − active.
    pub difference: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    pub model: String,
    pub candidate_version: String,
    pub unit: Option<String>,
    #[serde(flatten)]
    pub stats: Stats,
    /// Shadow runs of this version that have not finished yet.
    pub pending: usize,
    /// Shadow runs that ended failed or refused (no pair).
    pub unpaired: usize,
    /// The [`WORST`] pairs with the largest |difference|, largest first.
    pub worst: Vec<Pair>,
    /// Every pair, oldest first (the Bland-Altman plot's points).
    pub pairs: Vec<Pair>,
}

fn value(j: &Job) -> Option<f64> {
    j.result.as_ref()?.get("value")?.as_f64()
}

fn is_shadow(j: &Job) -> bool {
    j.resolved.as_ref().is_some_and(|r| r.shadow)
}

/// The versions of `model` that ran in shadow, newest first (by the last
/// job of each).
pub fn shadow_versions(jobs: &[Job], model: &str) -> Vec<String> {
    let mut last: HashMap<&str, i64> = HashMap::new();
    for j in jobs.iter().filter(|j| is_shadow(j) && j.key.model == model) {
        let e = last.entry(&j.key.model_version).or_insert(j.id);
        *e = (*e).max(j.id);
    }
    let mut v: Vec<(&str, i64)> = last.into_iter().collect();
    v.sort_by_key(|(_, id)| -id);
    v.into_iter().map(|(s, _)| s.to_owned()).collect()
}

/// How `candidate` (a version of `model` that ran in shadow) agrees with the
/// active runs beside it.
pub fn agreement(jobs: &[Job], model: &str, candidate: &str) -> Agreement {
    let key = |j: &'_ Job| -> (String, String, u32) {
        (j.key.series_instance_uid.clone(), j.key.route.clone(), j.key.generation)
    };
    let mut active: HashMap<(String, String, u32), &Job> = HashMap::new();
    for j in jobs.iter().filter(|j| !is_shadow(j) && j.key.model == model && j.state == JobState::Done) {
        // The last one wins should a key repeat (it cannot for one version).
        let e = active.entry(key(j)).or_insert(j);
        if j.id > e.id {
            *e = j;
        }
    }
    let mut shadow: Vec<&Job> =
        jobs.iter().filter(|j| is_shadow(j) && j.key.model == model && j.key.model_version == candidate).collect();
    shadow.sort_by_key(|j| j.id);
    let (mut pending, mut unpaired, mut unit) = (0, 0, None);
    let mut pairs = Vec::new();
    for s in shadow {
        if !s.state.is_finished() {
            pending += 1;
            continue;
        }
        let Some(cv) = value(s).filter(|_| s.state == JobState::Done) else {
            unpaired += 1;
            continue;
        };
        let Some(a) = active.get(&key(s)) else {
            // The active run is still pending, or it did not finish well.
            unpaired += 1;
            continue;
        };
        let Some(av) = value(a) else {
            unpaired += 1;
            continue;
        };
        if unit.is_none() {
            unit = s.result.as_ref().and_then(|r| r.get("unit")).and_then(|u| u.as_str()).map(str::to_owned);
        }
        pairs.push(Pair {
            series_instance_uid: s.key.series_instance_uid.clone(),
            route: s.key.route.clone(),
            generation: s.key.generation,
            active_version: a.key.model_version.clone(),
            active_value: av,
            active_job: a.id,
            candidate_value: cv,
            candidate_job: s.id,
            difference: cv - av,
        });
    }
    let values: Vec<(f64, f64)> = pairs.iter().map(|p| (p.active_value, p.candidate_value)).collect();
    let mut worst = pairs.clone();
    worst.sort_by(|a, b| b.difference.abs().total_cmp(&a.difference.abs()));
    worst.truncate(WORST);
    Agreement {
        model: model.to_owned(),
        candidate_version: candidate.to_owned(),
        unit,
        stats: stats(&values),
        pending,
        unpaired,
        worst,
        pairs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobKey, ResolvedRoute};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    /// Hand-computed: differences 0.5, 0.5, −0.5, 1.0; mean 0.375; squared
    /// deviations sum 1.1875, over n−1 = 3 is 0.3958333, SD 0.6291529;
    /// limits 0.375 ± 1.2331397. r = 5.25 / √(5 × 6.6875) = 0.9079092.
    #[test]
    fn agreement_statistics_match_hand_computed_values() {
        let s = stats(&[(1.0, 1.5), (2.0, 2.5), (3.0, 2.5), (4.0, 5.0)]);
        assert_eq!(s.n, 4);
        assert!(close(s.bias.unwrap(), 0.375), "{s:?}");
        assert!(close(s.sd.unwrap(), 0.6291529), "{s:?}");
        let [lo, hi] = s.limits_of_agreement.unwrap();
        assert!(close(lo, 0.375 - 1.2331397) && close(hi, 0.375 + 1.2331397), "{s:?}");
        assert!(close(s.r.unwrap(), 0.9079092), "{s:?}");
    }

    #[test]
    fn too_few_pairs_give_no_statistic_rather_than_nan() {
        assert_eq!(stats(&[]), Stats::default());
        let one = stats(&[(1.0, 3.0)]);
        assert_eq!((one.n, one.bias, one.sd, one.r, one.limits_of_agreement), (1, Some(2.0), None, None, None));
        // Identical actives: no spread, no r; the bias and SD still hold.
        let flat = stats(&[(1.0, 1.0), (1.0, 2.0)]);
        assert_eq!(flat.r, None);
        assert!(close(flat.bias.unwrap(), 0.5) && flat.sd.is_some());
    }

    fn job(id: i64, series: &str, version: &str, shadow: bool, state: JobState, value: Option<f64>) -> Job {
        Job {
            id,
            key: JobKey {
                series_instance_uid: series.into(),
                route: "r".into(),
                model: "pma".into(),
                model_version: version.into(),
                generation: 1,
            },
            state,
            attempts: 1,
            error: None,
            result: value.map(|v| serde_json::json!({"value": v, "unit": "cm2"})),
            created_at: String::new(),
            started_at: None,
            finished_at: None,
            resolved: Some(ResolvedRoute {
                route: "r".into(),
                model: "pma".into(),
                send_to: vec![],
                slices: None,
                shadow,
            }),
        }
    }

    #[test]
    fn shadow_runs_pair_with_the_active_run_of_their_series() {
        let jobs = vec![
            job(1, "1.1", "1", false, JobState::Done, Some(10.0)),
            job(2, "1.1", "2", true, JobState::Done, Some(12.0)),
            job(3, "1.2", "1", false, JobState::Done, Some(20.0)),
            job(4, "1.2", "2", true, JobState::Done, Some(19.0)),
            // refused by the candidate: no pair
            job(5, "1.3", "1", false, JobState::Done, Some(5.0)),
            job(6, "1.3", "2", true, JobState::Refused, None),
            // still running
            job(7, "1.4", "2", true, JobState::Running, None),
            // another candidate version is not this one's
            job(8, "1.1", "3", true, JobState::Done, Some(99.0)),
        ];
        let a = agreement(&jobs, "pma", "2");
        assert_eq!((a.stats.n, a.pending, a.unpaired), (2, 1, 1));
        assert_eq!(a.unit.as_deref(), Some("cm2"));
        assert!(close(a.stats.bias.unwrap(), 0.5));
        assert_eq!(a.worst[0].series_instance_uid, "1.1");
        assert_eq!((a.worst[0].active_job, a.worst[0].candidate_job), (1, 2));
        assert_eq!(shadow_versions(&jobs, "pma"), vec!["3".to_owned(), "2".to_owned()]);
    }
}
