//! `biomarker-node route --config F PATH...`: routing without a node.
//!
//! Groups the DICOM files under the given paths into series (the scan of
//! [`crate::series::scan`]), and prints for every series which routes match
//! and, for each route that does not, the condition that failed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::routing::{Derived, RouteMatch, RouteTable, SeriesFacts};
use crate::series::scan;

/// `biomarker-node route`: check the config, then the dry run on stdout.
pub fn route(config: &Path, json: bool, paths: &[PathBuf]) -> anyhow::Result<()> {
    let (_, table) = crate::node::check::checked(config)?;
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    run(&table, paths, json, &mut stdout.lock(), &mut stderr.lock())?;
    Ok(())
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
}

/// Run the dry run and write the report. Notes go to `err` in JSON mode so
/// that `out` stays one JSON object per line.
pub fn run(
    table: &RouteTable,
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
        run(&table, &[root.join("head-philips")], true, &mut out, &mut err).unwrap();
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
