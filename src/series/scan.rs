//! Series found on disk: walk paths, read each file's header, and group the
//! files into series by SeriesInstanceUID, as ingest would have.
//!
//! Input: files and directories (walked recursively). Output: one
//! [`FoundSeries`] per SeriesInstanceUID, its instances with their headers,
//! in path order, and a [`Note`] for every file not used.
//! Invariants: a file is used only if ingest would have spooled it: files
//! that are not DICOM, media directories (DICOMDIR) and objects without the
//! identifiers ingest requires are skipped with a note, and a second copy
//! of a SOP instance is skipped (ingest keeps the first). Only headers are
//! read, never pixel data.
//! Failures: none are fatal; every unreadable path becomes a note.
//!
//! Used by `route` (the routing dry run), `analyze` and the HTTP route test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;

use crate::dicom::header::InstanceHeader;
use crate::dicom::read::{open_dicom, ReadDepth};

/// Media Storage Directory Storage (PS3.10 8.6): a DICOMDIR.
const MEDIA_DIRECTORY: &str = "1.2.840.10008.1.3.10";

/// A file or path the scan did not use, and why.
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
