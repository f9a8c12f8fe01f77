//! `biomarker-node route --config F PATH...`: routing without a node.
//!
//! Groups the DICOM files under the given paths into series (the scan of
//! [`crate::series::scan`]), and prints for every series which routes match
//! and, for each route that does not, the condition that failed. For each
//! match it also says whether the model's input guard
//! ([`crate::inference::guard`]) would refuse the series and why: the header
//! checks always, the pixel checks (HU calibration, level) with
//! `--guard-pixels`, which decodes the series ([`crate::job::verdict`], as
//! the HTTP API's route tester). When a route's condition reached
//! `covers: liver`, the HU finding (levels, shares, verdict) is printed under
//! the series line, whatever the route's outcome.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::inference::ModelCard;
use crate::job::verdict::{guard_verdict, GuardVerdict};
use crate::routing::{Derived, RouteMatch, RouteTable, SeriesFacts};
use crate::series::scan;

/// `biomarker-node route`: check the config, then the dry run on stdout.
pub fn route(config: &Path, json: bool, guard_pixels: bool, paths: &[PathBuf]) -> anyhow::Result<()> {
    let (cfg, table) = crate::node::check::checked(config)?;
    // The cards only (no ONNX Runtime): a card that does not load shows as
    // unchecked, as its jobs would fail anyway.
    let cards = cfg.models.iter().filter_map(|(name, m)| Some((name.clone(), ModelCard::load(&m.card).ok()?))).collect();
    let guards = Guards { cards, pixels: guard_pixels };
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    run(&table, &guards, paths, json, &mut stdout.lock(), &mut stderr.lock())?;
    Ok(())
}

/// The model cards whose input guards the dry run applies.
#[derive(Default)]
pub struct Guards {
    pub cards: std::collections::HashMap<String, ModelCard>,
    /// Also the pixel checks (decodes the series).
    pub pixels: bool,
}

impl Guards {
    fn verdict(&self, m: &RouteMatch, files: &[PathBuf]) -> GuardVerdict {
        guard_verdict(self.cards.get(&m.model), m.slices.as_ref(), files, self.pixels)
    }
}

/// One line of `--json` output: one (series, route) pair.
#[derive(Debug, Serialize)]
pub struct RouteReport<'a> {
    pub series_instance_uid: &'a str,
    pub instances: usize,
    pub route: &'a str,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<&'a RouteMatch>,
    /// For a non-match: the failed condition's key path within the route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// For a match: what the model's input guard says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardVerdict>,
    /// When a route asked `covers: liver`: what the HU check found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liver_coverage: Option<String>,
}

/// Run the dry run and write the report. Notes go to `err` in JSON mode so
/// that `out` stays one JSON object per line.
pub fn run(
    table: &RouteTable,
    guards: &Guards,
    paths: &[PathBuf],
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<()> {
    let mut notes = Vec::new();
    let found = scan::collect(paths, &mut notes);
    for n in scan::summarize(&notes) {
        if json {
            writeln!(err, "note: {n}")?;
        } else {
            writeln!(out, "note: {n}")?;
        }
    }
    if found.is_empty() {
        writeln!(err, "no series found under the given paths")?;
    }
    for s in &found {
        let facts = match SeriesFacts::load(&s.instances) {
            Ok(f) => f,
            Err(e) => {
                writeln!(err, "series {}: cannot read its first instance: {e}", s.uid)?;
                continue;
            }
        };
        let outcomes = table.evaluate(&facts);
        let files: Vec<PathBuf> = s.instances.iter().map(|(p, _)| p.clone()).collect();
        // Computed only when a route's evaluation reached `covers: liver`.
        let coverage = facts.liver_coverage_if_computed().map(|c| match c {
            Ok(c) => c.to_string(),
            Err(e) => format!("liver coverage not judged: {e}"),
        });
        if json {
            for o in &outcomes {
                let report = RouteReport {
                    series_instance_uid: &s.uid,
                    instances: s.instances.len(),
                    route: &o.route,
                    matched: o.matched.is_some(),
                    job: o.matched.as_ref(),
                    failed_at: o.matched.is_none().then_some(o.verdict.at.as_str()),
                    reason: o.matched.is_none().then_some(o.verdict.why.as_str()),
                    guard: o.matched.as_ref().map(|m| guards.verdict(m, &files)),
                    liver_coverage: coverage.clone(),
                };
                writeln!(out, "{}", serde_json::to_string(&report).map_err(std::io::Error::other)?)?;
            }
            continue;
        }
        let show = |d| facts.derived(d).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        writeln!(
            out,
            "series {}: {} instance(s), {}, {}",
            s.uid,
            s.instances.len(),
            show(Derived::Modality),
            show(Derived::SopClass),
        )?;
        if let Some(c) = &coverage {
            writeln!(out, "  anatomy (HU): {c}")?;
        }
        let n = outcomes.iter().filter(|o| o.matched.is_some()).count();
        for o in &outcomes {
            match &o.matched {
                Some(m) => {
                    let slices = m.slices.as_ref().map(|s| format!(", slices: {s}")).unwrap_or_default();
                    writeln!(
                        out,
                        "  MATCH    {} → model {}, send to [{}]{slices}",
                        o.route,
                        m.model,
                        m.send_to.join(", ")
                    )?;
                    let g = guards.verdict(m, &files);
                    match (g.verdict, &g.reason) {
                        ("refused", Some(r)) => writeln!(out, "           guard ({}): would be {r}", g.checks)?,
                        ("pass", _) => writeln!(out, "           guard ({}): passes", g.checks)?,
                        (_, Some(r)) => writeln!(out, "           guard: not checked: {r}")?,
                        _ => writeln!(out, "           guard: not checked (the card states no validated input)")?,
                    }
                }
                None => writeln!(out, "  no match {}: {}: {}", o.route, o.verdict.at, o.verdict.why)?,
            }
        }
        writeln!(out, "  {n} job(s)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_one_line_per_series_and_route() {
        let Some(root) = crate::test_data::realct() else { return };
        let (_d, table) = crate::routing::tests::default_table();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run(&table, &Guards::default(), &[root.join("head-philips")], true, &mut out, &mut err).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 3 series × 4 routes, none matching.
        assert_eq!(lines.len(), 12);
        assert!(lines.iter().all(|l| l["matched"] == false && l["reason"].is_string()));
        let err = String::from_utf8(err).unwrap();
        assert!(err.contains("DICOMDIR"), "{err}");
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;
    use crate::volume::SliceSelection;

    fn guards(pixels: bool) -> Guards {
        let card = ModelCard::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pma.yaml")).unwrap();
        Guards { cards: [("pma".to_owned(), card)].into(), pixels }
    }

    fn pma_match() -> RouteMatch {
        RouteMatch {
            route: "pma-any".into(),
            model: "pma".into(),
            send_to: vec![],
            slices: Some(SliceSelection::AboveAorticArch),
        }
    }

    fn dcm(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("DIRFILE"))
            .collect();
        v.sort();
        v
    }

    /// The route tester shows the guard's verdict: a head CT and a localizer
    /// are refused from their headers; a card without the section is unchecked.
    #[test]
    fn the_route_tester_shows_what_the_guard_would_refuse() {
        let Some(root) = crate::test_data::realct() else { return };
        let g = guards(false);
        let head = g.verdict(&pma_match(), &dcm(&root.join("head-philips/S2010")));
        assert_eq!((head.verdict, head.check.as_deref()), ("refused", Some("body_part")), "{head:?}");
        assert!(head.reason.unwrap().contains("BRAIN"));
        let loc = g.verdict(&pma_match(), &dcm(&root.join("head-philips/S1000")));
        assert_eq!((loc.verdict, loc.check.as_deref()), ("refused", Some("image_type")), "{loc:?}");
        let none = Guards::default().verdict(&pma_match(), &dcm(&root.join("head-philips/S2010")));
        assert_eq!(none.verdict, "unchecked");
        // The real chest volume passes, header and pixels (the slice above the arch).
        let lidc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/realct-labelled/chest-lidc0001/ct");
        if lidc.is_dir() {
            let v = guards(true).verdict(&pma_match(), &dcm(&lidc));
            assert_eq!(v.verdict, "pass", "{v:?}");
        }
    }
}
