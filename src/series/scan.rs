//! `biomarker-node route --config F PATH...`: routing without a node.
//!
//! Groups the DICOM files under the given paths into series by
//! SeriesInstanceUID, and prints for every series which routes match and,
//! for each route that does not, the condition that failed. Files that are
//! not DICOM, media directories (DICOMDIR) and objects without the
//! identifiers ingest requires are skipped with a note: ingest would never
//! have spooled them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use serde::Serialize;

use super::{RouteTable, SeriesFacts};
use crate::dicom::header::InstanceHeader;
use crate::dicom::read::{open_dicom, ReadDepth};

/// Media Storage Directory Storage (PS3.10 8.6): a DICOMDIR.
const MEDIA_DIRECTORY: &str = "1.2.840.10008.1.3.10";

/// One line of `--json` output: one (series, route) pair.
#[derive(Debug, Serialize)]
pub struct RouteReport<'a> {
    pub series_instance_uid: &'a str,
    pub instances: usize,
    pub route: &'a str,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<&'a super::RouteMatch>,
    /// For a non-match: the failed condition's key path within the route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

/// A file or path the dry run did not use, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub path: PathBuf,
    pub reason: String,
}

/// One line per note, but files in one directory skipped for the same
/// reason become one line (a series without UIDs is 20 identical notes).
pub fn summarize(notes: &[Note]) -> Vec<String> {
    let mut groups: BTreeMap<(PathBuf, &str), Vec<&Path>> = BTreeMap::new();
    for n in notes {
        let dir = n.path.parent().map(Path::to_owned).unwrap_or_default();
        groups.entry((dir, n.reason.as_str())).or_default().push(&n.path);
    }
    groups
        .into_iter()
        .map(|((dir, reason), paths)| match paths.as_slice() {
            [one] => format!("{}: {reason}", one.display()),
            many => format!("{}: {} files: {reason}", dir.display(), many.len()),
        })
        .collect()
}

/// A series found on disk.
pub struct FoundSeries {
    pub uid: String,
    pub instances: Vec<(PathBuf, InstanceHeader)>,
}

/// Walk `paths` and group files into series; `notes` collects what was
/// skipped and why.
pub fn collect(paths: &[PathBuf], notes: &mut Vec<Note>) -> Vec<FoundSeries> {
    let mut files = Vec::new();
    for p in paths {
        walk(p, &mut files, notes);
    }
    files.sort();
    files.dedup();
    let mut series: BTreeMap<String, Vec<(PathBuf, InstanceHeader)>> = BTreeMap::new();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in files {
        let obj = match open_dicom(&f, ReadDepth::Header) {
            Ok(o) => o,
            Err(e) if e.is_not_dicom() => {
                notes.push(note(&f, "skipped, not a DICOM file".into()));
                continue;
            }
            Err(e) => {
                let reason = e.to_string();
                let prefix = format!("{}: ", f.display());
                let reason = reason.strip_prefix(&prefix).unwrap_or(&reason);
                notes.push(note(&f, format!("skipped, {reason}")));
                continue;
            }
        };
        let media_class = obj.meta().media_storage_sop_class_uid().trim_end_matches(['\0', ' ']);
        if media_class == MEDIA_DIRECTORY || obj.element_opt(tags::DIRECTORY_RECORD_SEQUENCE).ok().flatten().is_some() {
            notes.push(note(&f, "skipped, a DICOMDIR (media directory), not a storage object".into()));
            continue;
        }
        match InstanceHeader::from_dataset(&obj) {
            Ok(h) if seen.contains_key(h.sop_instance_uid.as_str()) => notes.push(note(
                &f,
                format!(
                    "skipped, same SOP Instance UID as {} (ingest keeps the first copy)",
                    seen[h.sop_instance_uid.as_str()].display()
                ),
            )),
            Ok(h) => series
                .entry(h.series_instance_uid.to_string())
                .or_default()
                .push((f.clone(), {
                    seen.insert(h.sop_instance_uid.to_string(), f);
                    h
                })),
            Err(e) => notes.push(note(&f, format!("skipped, {e}: ingest would refuse it"))),
        }
    }
    series
        .into_iter()
        .map(|(uid, instances)| FoundSeries { uid, instances })
        .collect()
}

fn note(path: &Path, reason: String) -> Note {
    Note {
        path: path.to_owned(),
        reason,
    }
}

fn walk(p: &Path, out: &mut Vec<PathBuf>, notes: &mut Vec<Note>) {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => match std::fs::read_dir(p) {
            Ok(rd) => {
                for e in rd.flatten() {
                    walk(&e.path(), out, notes);
                }
            }
            Err(e) => notes.push(note(p, format!("cannot list: {e}"))),
        },
        Ok(m) if m.is_file() => out.push(p.to_owned()),
        Ok(_) => notes.push(note(p, "skipped, not a regular file".into())),
        Err(e) => notes.push(note(p, e.to_string())),
    }
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
    let found = collect(paths, &mut notes);
    for n in summarize(&notes) {
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
            show(super::Derived::Modality),
            show(super::Derived::SopClass),
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
