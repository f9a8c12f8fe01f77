//! Retention: deletes spooled instances of series that have no work left.
//!
//! **Input.** The series index, the job store, the outbox and the
//! `retention` config. **Output.** Spool files deleted; their index rows
//! kept and flagged (`instances.purged_at`, `series.purged_at`,
//! `series.purged_instances`), one log line and the
//! `biomarker_node_retention_purged_*` metrics per series.
//!
//! **Policies.** `after_days`: a series whose last activity (completion, job
//! end, report delivery) is older than this. `max_spool_gb`: while the
//! spooled instances total more than this, series whose work is done, oldest
//! activity first. Both may be set; a sweep applies age first.
//!
//! **Invariants.**
//! - Never a series with pending work: state `receiving` or `complete`
//!   (routing has not taken it yet), a job `pending` or `running`, or a
//!   report `pending` or `sending` in the outbox. Dead letters and dismissed
//!   items do not count: a retry re-sends the report files under
//!   `results/`, which retention never touches. Jobs are checked again just
//!   before a series' files go.
//! - Files first, index second: a crash in between leaves rows whose files
//!   are gone, which start-up recovery drops, never a flagged row whose file
//!   is still there (recovery would index that file as new and re-open the
//!   series).
//! - Only the files the index names are deleted; directories stay, so an
//!   instance arriving for the same series meanwhile is never caught out.
//!
//! **Failures.** An unreadable store skips the sweep (logged; the next one
//! tries again). A file that cannot be deleted (other than already gone)
//! stays indexed and is tried at the next sweep.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::dicom::Uid;
use crate::job::{Job, JobStore};
use crate::outbox::{ItemState, OutboxItem, OutboxStore};
use crate::series::SeriesIndex;
use crate::store::rfc3339;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Series(#[from] crate::series::SeriesError),
    #[error(transparent)]
    Jobs(#[from] crate::job::JobStoreError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
}

const DAY: f64 = 86_400.0;

pub struct Retention {
    pub config: RetentionConfig,
    pub index_path: PathBuf,
    pub spool_root: PathBuf,
    pub jobs: Arc<dyn JobStore>,
    pub outbox: Arc<dyn OutboxStore>,
}

/// What one sweep deleted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Swept {
    /// Series UIDs, in the order they were purged.
    pub series: Vec<String>,
    pub instances: u64,
    pub bytes: u64,
}

/// The series a report file belongs to: results are kept as
/// `<results>/<series>/<route>/g<generation>/<file>`.
fn series_of_report(path: &Path) -> Option<String> {
    let series = path.parent()?.parent()?.parent()?.file_name()?;
    Some(series.to_str()?.to_owned())
}

fn busy_job(j: &Job) -> bool {
    !j.state.is_finished()
}

/// Per series: whether work is pending, and the latest activity seen in the
/// job store and the outbox.
#[derive(Debug, Default)]
struct Work {
    busy: bool,
    last: Option<String>,
}

impl Work {
    fn saw(&mut self, t: Option<String>) {
        if let Some(t) = t {
            if self.last.as_ref().is_none_or(|l| *l < t) {
                self.last = Some(t);
            }
        }
    }
}

fn work_by_series(jobs: &[Job], items: &[OutboxItem]) -> HashMap<String, Work> {
    let mut work: HashMap<String, Work> = HashMap::new();
    let mut report_series: HashMap<String, String> = HashMap::new();
    for j in jobs {
        let w = work.entry(j.key.series_instance_uid.clone()).or_default();
        w.busy |= busy_job(j);
        w.saw(j.finished_at.clone());
        for r in j.typed_result().into_iter().flat_map(|r| r.reports) {
            report_series.insert(r.sop_instance_uid, j.key.series_instance_uid.clone());
        }
    }
    for item in items {
        let mut owners: HashSet<String> = HashSet::new();
        owners.extend(report_series.get(&item.sop_instance_uid).cloned());
        owners.extend(series_of_report(&item.path));
        for s in owners {
            let w = work.entry(s).or_default();
            w.busy |= matches!(item.state, ItemState::Pending | ItemState::Sending);
            w.saw(item.delivered_at.map(rfc3339));
        }
    }
    work
}

impl Retention {
    /// One sweep, blocking. `now` is a parameter so tests can age series.
    pub fn sweep(&self, now: SystemTime) -> Result<Swept, RetentionError> {
        let mut swept = Swept::default();
        if !self.config.enabled() {
            return Ok(swept);
        }
        let mut index = SeriesIndex::open(&self.index_path)?;
        let spooled = index.spooled_series()?;
        let work = work_by_series(&self.jobs.list()?, &self.outbox.list()?);
        let mut total: u64 = spooled.iter().map(|s| s.bytes).sum();
        // Oldest activity first; the age policy and the size cap both want it.
        let mut candidates: Vec<(String, &crate::series::SpooledSeries)> = spooled
            .iter()
            .filter(|s| !s.state.before_routing())
            .filter_map(|s| {
                let w = work.get(s.series_instance_uid.as_str());
                if w.is_some_and(|w| w.busy) {
                    return None;
                }
                let mut last = s.last_activity.clone();
                if let Some(t) = w.and_then(|w| w.last.clone()) {
                    last = last.max(t);
                }
                Some((last, s))
            })
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        let mut purged: HashSet<&str> = HashSet::new();
        if let Some(days) = self.config.after_days {
            let cutoff = rfc3339(now.checked_sub(Duration::from_secs_f64(days * DAY)).unwrap_or(SystemTime::UNIX_EPOCH));
            for (last, s) in &candidates {
                if *last > cutoff {
                    break;
                }
                if let Some((n, bytes)) = self.purge(&mut index, &s.series_instance_uid, "age", now)? {
                    total = total.saturating_sub(bytes);
                    purged.insert(s.series_instance_uid.as_str());
                    swept.series.push(s.series_instance_uid.to_string());
                    swept.instances += n;
                    swept.bytes += bytes;
                }
            }
        }
        if let Some(gb) = self.config.max_spool_gb {
            let cap = (gb * 1e9) as u64;
            for (_, s) in &candidates {
                if total <= cap {
                    break;
                }
                if purged.contains(s.series_instance_uid.as_str()) {
                    continue;
                }
                if let Some((n, bytes)) = self.purge(&mut index, &s.series_instance_uid, "size", now)? {
                    total = total.saturating_sub(bytes);
                    swept.series.push(s.series_instance_uid.to_string());
                    swept.instances += n;
                    swept.bytes += bytes;
                }
            }
            if total > cap {
                tracing::warn!(
                    spool_bytes = total,
                    cap_bytes = cap,
                    "spool is above retention.max_spool_gb; the rest has work pending"
                );
            }
        }
        Ok(swept)
    }

    /// Deletes the spooled files of one series and records it. `None` when
    /// the series turned busy since the sweep looked, or nothing was deleted.
    fn purge(
        &self,
        index: &mut SeriesIndex,
        series: &Uid,
        policy: &str,
        now: SystemTime,
    ) -> Result<Option<(u64, u64)>, RetentionError> {
        // A re-run may have been triggered since the sweep read the store.
        if self.jobs.for_series(series.as_str())?.iter().any(busy_job) {
            return Ok(None);
        }
        let mut deleted = Vec::new();
        let mut bytes = 0u64;
        for (sop, rel) in index.spooled_instances(series)? {
            let path = self.spool_root.join(&rel);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(series_instance_uid = %series, sop_instance_uid = %sop, error = %e, "cannot delete a spooled instance; tried again at the next sweep");
                    continue;
                }
            }
            bytes += size;
            deleted.push(sop);
        }
        if deleted.is_empty() {
            return Ok(None);
        }
        let n = index.mark_purged(series, &deleted, now)? as u64;
        crate::telemetry::SeriesPurged {
            series_instance_uid: series.as_str(),
            policy,
            instances: n,
            bytes,
        }
        .emit();
        Ok(Some((n, bytes)))
    }

    /// The periodic sweep in `serve`: at start, then every `interval_s`.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let interval = Duration::from_secs_f64(this.config.interval_s);
        tracing::info!(
            after_days = ?this.config.after_days,
            max_spool_gb = ?this.config.max_spool_gb,
            interval_s = this.config.interval_s,
            "retention enabled"
        );
        loop {
            let me = this.clone();
            match tokio::task::spawn_blocking(move || me.sweep(SystemTime::now())).await {
                Ok(Ok(s)) if !s.series.is_empty() => {
                    tracing::info!(series = s.series.len(), instances = s.instances, bytes = s.bytes, "retention sweep done");
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "retention sweep failed; the next one tries again"),
                Err(e) => tracing::error!(error = %e, "retention sweep panicked; the next one tries again"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::header::InstanceHeader;
    use crate::job::{JobKey, SqliteJobStore};
    use crate::outbox::{NewItem, SqliteOutboxStore};
    use crate::series::{CompletionReason, InsertOutcome, SeriesState, StoredInstance};

    const STUDY: &str = "1.2.826.0.1.9";
    const FILE_BYTES: usize = 1000;

    fn uid(s: &str) -> Uid {
        Uid::parse(s).unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        index_path: PathBuf,
        spool: PathBuf,
        jobs: Arc<SqliteJobStore>,
        outbox: Arc<SqliteOutboxStore>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let index_path = dir.path().join("index.sqlite");
            SeriesIndex::open(&index_path).unwrap();
            Fixture {
                jobs: Arc::new(SqliteJobStore::open(&index_path).unwrap()),
                outbox: Arc::new(SqliteOutboxStore::open(&dir.path().join("outbox.sqlite")).unwrap()),
                spool: dir.path().join("spool"),
                index_path,
                dir,
            }
        }

        fn rel(series: &str) -> PathBuf {
            PathBuf::from(format!("{STUDY}/{series}/{series}.1.dcm"))
        }

        fn stored(&self, series: &str) -> StoredInstance {
            let rel = Self::rel(series);
            let path = self.spool.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, vec![0u8; FILE_BYTES]).unwrap();
            StoredInstance {
                header: InstanceHeader {
                    sop_class_uid: uid("1.2.840.10008.5.1.4.1.1.2"),
                    sop_instance_uid: uid(&format!("{series}.1")),
                    study_instance_uid: uid(STUDY),
                    series_instance_uid: uid(series),
                    modality: Some("CT".into()),
                    instance_number: Some(1),
                    acquisition_number: None,
                    images_in_acquisition: None,
                    number_of_frames: None,
                    image_type: vec![],
                    series_description: None,
                    geometry: None,
                },
                rel_path: rel,
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                size_bytes: FILE_BYTES as u64,
                association_id: 1,
                calling_ae: "T".into(),
            }
        }

        /// A one-instance series in `state`; with `job`, one job in that
        /// state whose report (if `report` is given) is an outbox item.
        fn series(&self, series: &str, state: SeriesState, job: Option<&str>, report: Option<&str>) {
            let mut ix = SeriesIndex::open(&self.index_path).unwrap();
            ix.insert_instance(&self.stored(series), SystemTime::now()).unwrap();
            if state == SeriesState::Receiving {
                return;
            }
            let ev = ix.pending_completion(&uid(series), CompletionReason::QuietTimer).unwrap().unwrap();
            ix.mark_complete(&ev, SystemTime::now()).unwrap();
            if state != SeriesState::Complete {
                ix.set_state(&uid(series), state).unwrap();
            }
            let Some(job_state) = job else { return };
            let key = JobKey {
                series_instance_uid: series.into(),
                route: "r".into(),
                model: "m".into(),
                model_version: "1".into(),
                generation: 1,
            };
            let route = crate::job::ResolvedRoute { route: "r".into(), model: "m".into(), send_to: vec![], slices: None, shadow: false };
            let id = self.jobs.enqueue(&key, &route).unwrap().unwrap();
            if job_state == "pending" {
                return;
            }
            let j = self.jobs.claim().unwrap().unwrap();
            assert_eq!(j.id, id);
            let sop = format!("{series}.99");
            self.jobs
                .finish(id, crate::job::Outcome::Done(&serde_json::json!({"reports": [{"sop_instance_uid": sop}]})))
                .unwrap();
            let Some(item_state) = report else { return };
            let path = self.dir.path().join(format!("results/{series}/r/g1/sr.dcm"));
            let e = self
                .outbox
                .enqueue(
                    &NewItem {
                        destination: format!("d{series}"),
                        path,
                        sop_class_uid: uid("1.2.840.10008.5.1.4.1.1.88.34"),
                        sop_instance_uid: uid(&sop),
                    },
                    SystemTime::now(),
                )
                .unwrap();
            if item_state == "pending" {
                return;
            }
            let claimed = self.outbox.claim_due(SystemTime::now(), &[], 100).unwrap();
            assert!(claimed.iter().any(|i| i.id == e.id()));
            for i in claimed.iter().filter(|i| i.id != e.id()) {
                self.outbox.unclaim(i.id).unwrap();
            }
            match item_state {
                "delivered" => self.outbox.mark_delivered(e.id(), SystemTime::now(), None).unwrap(),
                "dead" => self.outbox.mark_dead(e.id(), "refused").unwrap(),
                other => panic!("{other}"),
            }
        }

        /// A = done and delivered, D = done with a dead letter: deletable.
        /// B: job pending, C: report pending, E: receiving, F: not routed yet.
        fn populate(&self) {
            self.series("1.2.1", SeriesState::Analyzed, Some("done"), Some("delivered"));
            self.series("1.2.3", SeriesState::Analyzed, Some("done"), Some("pending"));
            self.series("1.2.4", SeriesState::Analyzed, Some("done"), Some("dead"));
            self.series("1.2.5", SeriesState::Receiving, None, None);
            self.series("1.2.6", SeriesState::Complete, None, None);
            // Last: `claim` takes the oldest pending job.
            self.series("1.2.2", SeriesState::Routed, Some("pending"), None);
        }

        fn retention(&self, after_days: Option<f64>, max_spool_gb: Option<f64>) -> Retention {
            Retention {
                config: RetentionConfig { after_days, max_spool_gb, interval_s: 1.0 },
                index_path: self.index_path.clone(),
                spool_root: self.spool.clone(),
                jobs: self.jobs.clone(),
                outbox: self.outbox.clone(),
            }
        }

        fn on_disk(&self, series: &str) -> bool {
            self.spool.join(Self::rel(series)).exists()
        }
    }

    const ALL: [&str; 6] = ["1.2.1", "1.2.2", "1.2.3", "1.2.4", "1.2.5", "1.2.6"];

    #[test]
    fn age_policy_deletes_only_series_without_pending_work() {
        let f = Fixture::new();
        f.populate();
        let r = f.retention(Some(1.0), None);
        // Nothing is a day old yet.
        assert_eq!(r.sweep(SystemTime::now()).unwrap(), Swept::default());
        assert!(ALL.iter().all(|s| f.on_disk(s)));

        let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
        let swept = r.sweep(later).unwrap();
        let mut got = swept.series.clone();
        got.sort();
        assert_eq!(got, vec!["1.2.1", "1.2.4"]);
        assert_eq!((swept.instances, swept.bytes), (2, 2 * FILE_BYTES as u64));
        for s in ALL {
            assert_eq!(f.on_disk(s), !got.iter().any(|g| g == s), "{s}");
        }
        // The record stays; a second sweep finds nothing left to do.
        let ix = SeriesIndex::open(&f.index_path).unwrap();
        let rows = ix.list_series().unwrap();
        let a = rows.iter().find(|r| r.series_instance_uid.as_str() == "1.2.1").unwrap();
        assert_eq!((a.state.as_str(), a.instances, a.purged_instances), ("analyzed", 1, 1));
        assert!(a.purged_at.is_some());
        let b = rows.iter().find(|r| r.series_instance_uid.as_str() == "1.2.2").unwrap();
        assert_eq!((b.purged_at.as_deref(), b.purged_instances), (None, 0));
        assert!(ix.series_instances(&uid("1.2.1")).unwrap().is_empty());
        assert_eq!(r.sweep(later).unwrap(), Swept::default());
    }

    #[test]
    fn size_cap_deletes_oldest_done_series_until_under_the_cap() {
        let f = Fixture::new();
        f.populate();
        // Six files of 1000 bytes; a cap of 5500 bytes needs one deletion.
        let r = f.retention(None, Some(5.5e-6));
        let swept = r.sweep(SystemTime::now()).unwrap();
        assert_eq!(swept.series, vec!["1.2.1"], "oldest deletable first");
        assert!(!f.on_disk("1.2.1") && f.on_disk("1.2.4"));
        // A cap of 0 takes every deletable series and nothing with work pending.
        let swept = f.retention(None, Some(0.0)).sweep(SystemTime::now()).unwrap();
        assert_eq!(swept.series, vec!["1.2.4"]);
        for s in ["1.2.2", "1.2.3", "1.2.5", "1.2.6"] {
            assert!(f.on_disk(s), "{s} has work pending and must stay");
        }
    }

    #[test]
    fn an_instance_sent_again_after_deletion_is_stored_as_new() {
        let f = Fixture::new();
        f.populate();
        f.retention(None, Some(0.0)).sweep(SystemTime::now()).unwrap();
        let mut ix = SeriesIndex::open(&f.index_path).unwrap();
        let sop = uid("1.2.1.1");
        // Ingest asks before it writes: a purged instance is not a duplicate.
        assert!(!ix.contains_instance(&sop).unwrap());
        assert_eq!(ix.insert_instance(&f.stored("1.2.1"), SystemTime::now()).unwrap(), InsertOutcome::Reopened);
        assert!(ix.contains_instance(&sop).unwrap());
        assert_eq!(ix.series_instances(&uid("1.2.1")).unwrap().len(), 1);
        let row = ix.list_series().unwrap().into_iter().find(|r| r.series_instance_uid == uid("1.2.1")).unwrap();
        assert_eq!((row.state.as_str(), row.generation, row.instances), ("receiving", 2, 1));
    }

    #[test]
    fn off_by_default() {
        let f = Fixture::new();
        f.populate();
        let r = Retention { config: RetentionConfig::default(), ..f.retention(None, None) };
        assert!(!r.config.enabled());
        assert_eq!(r.sweep(SystemTime::now() + Duration::from_secs(1000 * 86_400)).unwrap(), Swept::default());
    }
}
