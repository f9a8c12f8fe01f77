//! Start-up repair of the index from the spool, which is the truth.
//!
//! The index runs with `synchronous=NORMAL` and the tracker can die between
//! ingest's fsync and the index commit, so after a crash the spool may hold
//! files the index lacks, and the index may name files a later stage (or an
//! operator) removed. This walk reconciles the two; it never deletes a spool
//! file.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{InsertOutcome, SeriesError, SeriesIndex, StoredInstance};
use crate::dicom::header::InstanceHeader;
use crate::dicom::Uid;

/// What [`recover`] did, for the start-up log and for tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Spool files that were not in the index and now are.
    pub indexed: usize,
    /// Spool files whose SOP Instance UID the index has under another path.
    pub duplicates: usize,
    /// Index rows dropped because their file is gone.
    pub removed: usize,
    /// Spool files that could not be read as DICOM; left in place.
    pub unreadable: usize,
    /// Series still receiving: the tracker gives each a fresh quiet period.
    pub receiving: Vec<Uid>,
}

/// Reconciles `index` with `spool_root/<study>/<series>/<sop>.dcm`.
///
/// Files found on disk but not indexed are read up to Pixel Data and
/// inserted as if just stored (association 0, no calling AE); rows whose file
/// is gone are dropped. Unreadable files are logged and skipped so one bad
/// file cannot keep the node down; errors of the index itself, or of listing
/// the spool, fail the recovery.
pub fn recover(
    index: &mut SeriesIndex,
    spool_root: &Path,
    now: SystemTime,
) -> Result<Recovery, SeriesError> {
    let _span = tracing::info_span!("recover", spool = %spool_root.display()).entered();
    let on_disk = spool_files(spool_root)?;
    let indexed: HashMap<PathBuf, String> = index
        .indexed_paths()?
        .into_iter()
        .map(|(sop, path)| (path, sop))
        .collect();

    let gone: Vec<String> = indexed
        .iter()
        .filter(|(path, _)| !on_disk.contains(*path))
        .map(|(_, sop)| sop.clone())
        .collect();
    let mut report = Recovery {
        removed: index.remove_instances(&gone)?,
        ..Recovery::default()
    };

    let mut missing: Vec<&PathBuf> = on_disk
        .iter()
        .filter(|p| !indexed.contains_key(*p))
        .collect();
    // Sorted so series are rebuilt in a stable order, which keeps logs diffable.
    missing.sort();
    for rel in missing {
        let inst = match read_stored(spool_root, rel) {
            Ok(inst) => inst,
            Err(why) => {
                tracing::warn!(path = %rel.display(), %why, "unreadable spool file left in place");
                report.unreadable += 1;
                continue;
            }
        };
        match index.insert_instance(&inst, now)? {
            InsertOutcome::Duplicate => {
                tracing::warn!(
                    path = %rel.display(),
                    sop = %inst.header.sop_instance_uid,
                    "spool file repeats an indexed SOP instance; first copy kept"
                );
                report.duplicates += 1;
            }
            InsertOutcome::New | InsertOutcome::Reopened => report.indexed += 1,
        }
    }
    report.receiving = index.receiving_series()?;
    tracing::info!(
        indexed = report.indexed,
        removed = report.removed,
        unreadable = report.unreadable,
        duplicates = report.duplicates,
        receiving = report.receiving.len(),
        "series index recovered from spool"
    );
    Ok(report)
}

/// Paths, relative to `root`, of every `*/*/*.dcm` regular file.
fn spool_files(root: &Path) -> Result<HashSet<PathBuf>, SeriesError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SeriesError::Io { path, source }
    };
    let mut out = HashSet::new();
    let Some(studies) = read_dir_opt(root).map_err(io(root))? else {
        tracing::info!("spool does not exist yet; nothing to recover");
        return Ok(out);
    };
    for study in studies {
        let study = study.map_err(io(root))?;
        if !study.file_type().map_err(io(&study.path()))?.is_dir() {
            continue;
        }
        let Some(series_dirs) = read_dir_opt(&study.path()).map_err(io(&study.path()))? else {
            continue;
        };
        for series in series_dirs {
            let series = series.map_err(io(&study.path()))?;
            if !series.file_type().map_err(io(&series.path()))?.is_dir() {
                continue;
            }
            let Some(files) = read_dir_opt(&series.path()).map_err(io(&series.path()))? else {
                continue;
            };
            for file in files {
                let file = file.map_err(io(&series.path()))?;
                let name = PathBuf::from(file.file_name());
                if name.extension().is_some_and(|e| e == "dcm")
                    && file.file_type().map_err(io(&file.path()))?.is_file()
                {
                    out.insert(
                        PathBuf::from(study.file_name())
                            .join(series.file_name())
                            .join(name),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// `read_dir`, with a directory removed under our feet meaning "empty".
fn read_dir_opt(p: &Path) -> std::io::Result<Option<std::fs::ReadDir>> {
    match std::fs::read_dir(p) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Rebuilds what ingest would have handed over for this file.
fn read_stored(root: &Path, rel: &Path) -> Result<StoredInstance, String> {
    let path = root.join(rel);
    let size_bytes = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(&path)
        .map_err(|e| e.to_string())?;
    let header = InstanceHeader::from_dataset(&obj).map_err(|e| e.to_string())?;
    Ok(StoredInstance {
        header,
        rel_path: rel.to_owned(),
        transfer_syntax: obj
            .meta()
            .transfer_syntax()
            .trim_end_matches(['\0', ' '])
            .to_owned(),
        size_bytes,
        association_id: 0,
        calling_ae: String::new(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dicom_core::{dicom_value, DataElement, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::meta::FileMetaTableBuilder;
    use dicom_object::InMemDicomObject;

    pub(crate) const STUDY: &str = "1.2.826.0.1.99";

    /// Writes a minimal CT slice into the spool where ingest would, and
    /// returns its relative path.
    pub(crate) fn write_ct(spool: &Path, series: &str, i: u32, z: f64) -> PathBuf {
        let sop = format!("{series}.{i}");
        let z = format!("{z}");
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, sop.as_str()),
            DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, STUDY),
            DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, series),
            DataElement::new(tags::MODALITY, VR::CS, "CT"),
            DataElement::new(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
            DataElement::new(tags::INSTANCE_NUMBER, VR::IS, i.to_string().as_str()),
            DataElement::new(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                dicom_value!(Strs, ["-200", "-200", z.as_str()]),
            ),
            DataElement::new(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                dicom_value!(Strs, ["1", "0", "0", "0", "1", "0"]),
            ),
            DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, [2])),
            DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, [2])),
            DataElement::new(tags::PIXEL_DATA, VR::OW, dicom_value!(U16, [0, 1, 2, 3])),
        ]);
        let file = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))
            .unwrap();
        let rel = PathBuf::from(STUDY).join(series).join(format!("{sop}.dcm"));
        std::fs::create_dir_all(spool.join(&rel).parent().unwrap()).unwrap();
        file.write_to_file(spool.join(&rel)).unwrap();
        rel
    }

    #[test]
    fn indexes_new_files_drops_gone_rows_skips_junk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let mut ix = SeriesIndex::open(&dir.path().join("index.sqlite")).unwrap();
        // Nothing there yet.
        assert_eq!(
            recover(&mut ix, &spool, SystemTime::now()).unwrap(),
            Recovery::default()
        );

        let a = write_ct(&spool, "1.2.3", 1, 0.0);
        write_ct(&spool, "1.2.3", 2, 2.5);
        std::fs::write(
            spool.join(STUDY).join("1.2.3").join("junk.dcm"),
            b"not dicom",
        )
        .unwrap();
        std::fs::write(spool.join(STUDY).join("1.2.3").join("note.txt"), b"ignored").unwrap();
        let r = recover(&mut ix, &spool, SystemTime::now()).unwrap();
        assert_eq!((r.indexed, r.unreadable, r.removed), (2, 1, 0));
        assert_eq!(r.receiving, vec![Uid::parse("1.2.3").unwrap()]);
        let inst = ix.series_instances(&Uid::parse("1.2.3").unwrap()).unwrap();
        assert_eq!(inst.len(), 2);
        let (path, h) = &inst[0];
        assert_eq!(path, &a);
        assert_eq!(h.geometry.as_ref().unwrap().position, [-200.0, -200.0, 0.0]);

        // Idempotent, and a vanished file loses its row.
        std::fs::remove_file(spool.join(&a)).unwrap();
        let r = recover(&mut ix, &spool, SystemTime::now()).unwrap();
        assert_eq!((r.indexed, r.unreadable, r.removed), (0, 1, 1));
        assert_eq!(ix.list_series().unwrap()[0].instances, 1);
    }
}
