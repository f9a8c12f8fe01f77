//! Writing reports to disk: the SR, SC and SEG this module builds, and a
//! job's plain outputs (result.json; map.npy and candidates.npy for one
//! slice, maps.npz for a volume: [`write_outputs`]).
//!
//! Input: what a job computed ([`ReportSource`]), its model, the job's seed
//! and creation time. Output: Part-10 files under the job's `results/`
//! directory, each written to a temporary name, fsynced, renamed, and the
//! directory fsynced, and the [`ReportFile`]s that the job stage hands to the
//! outbox.
//!
//! Invariants: a file is either absent or complete under its final name; a
//! rebuild with the same seed and creation time writes the same instances.
//! Failure modes: [`WriteError`], an I/O or encoding failure (transient: the
//! job may be run again), or a source header that cannot be read.

use std::path::{Path, PathBuf};

use ndarray::ArrayView3;
use serde::Serialize;

use super::DeviceInfo;
use crate::biomarkers::Measurement;
use crate::inference::Model;

/// Writing a job's outputs failed: the directory and the cause.
#[derive(Debug, thiserror::Error)]
#[error("writing outputs: {0}")]
pub struct WriteError(String);

/// What a job computed that its reports are made of.
pub struct ReportSource<'a> {
    pub measurement: &'a Measurement,
    /// HU of the slices the model saw, `[S,R,C]`.
    pub hu: ArrayView3<'a, f32>,
    /// Source file and SOP Instance UID of each of those slices.
    pub slices: &'a [(PathBuf, String)],
}

/// A DICOM object this node made and keeps under `results/`.
#[derive(Debug, Clone)]
pub struct ReportFile {
    pub path: PathBuf,
    /// Which output it is, for each destination's `send` filter.
    pub kind: crate::config::OutputKind,
    pub sop_class_uid: crate::dicom::Uid,
    pub sop_instance_uid: crate::dicom::Uid,
}

/// Identity of the node as the SR's device observer.
pub fn device_info(ae_title: &str) -> DeviceInfo {
    DeviceInfo {
        uid: super::result_uid(ae_title, "device"),
        name: ae_title.to_owned(),
        manufacturer: "biomarker-node".into(),
        serial_number: ae_title.to_owned(),
        software_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Build the TID 1500 SR, the overlay SCs and the SEG for a result and
/// write them durably (fsync'd file and directory) as `sr.dcm`, `sc-NN.dcm`,
/// `seg.dcm` under
/// `dir`. `seed` and `created` fix the UIDs and dates, so a rebuild after a
/// crash writes the very same instances.
pub fn write_reports(
    a: &ReportSource<'_>,
    model: &Model,
    seed: &str,
    created: time::OffsetDateTime,
    device: DeviceInfo,
    dir: &Path,
) -> Result<Vec<ReportFile>, WriteError> {
    use crate::dicom::read::{open_dicom, ReadDepth};
    use super::{build_sc, build_seg, build_sr_with_seg, ReportContext, ScOptions, SourceInstance};
    let out = |e: &dyn std::fmt::Display| WriteError(format!("{}: {e}", dir.display()));
    let first = a.slices.first().ok_or_else(|| out(&"no source slices"))?;
    let source = open_dicom(&first.0, ReadDepth::Header).map_err(|e| out(&e))?.into_inner();
    let text = |tag| {
        source
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
            .unwrap_or_default()
    };
    let sop_class = crate::dicom::Uid::parse(&text(dicom_dictionary_std::tags::SOP_CLASS_UID)).map_err(|e| out(&e))?;
    let series = crate::dicom::Uid::parse(&text(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)).map_err(|e| out(&e))?;
    let source_refs = a
        .slices
        .iter()
        .map(|(_, uid)| {
            Ok(SourceInstance {
                sop_class_uid: sop_class.clone(),
                sop_instance_uid: crate::dicom::Uid::parse(uid).map_err(|e| out(&e))?,
            })
        })
        .collect::<Result<Vec<_>, WriteError>>()?;
    let ctx = ReportContext {
        source,
        source_refs,
        series_instance_uid: series,
        seed: seed.to_owned(),
        device,
        created,
    };
    let card = &model.card;
    use crate::config::OutputKind;
    // A series without plane geometry (no Frame of Reference, say) still
    // gets its SR and SC; only the SEG, which cannot place its frames, is
    // left out, and the log says why.
    let seg = if a.measurement.map.is_empty() {
        None
    } else {
        let headers = a
            .slices
            .iter()
            .map(|(p, _)| open_dicom(p, ReadDepth::Header).map(|o| o.into_inner()).map_err(|e| out(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        match super::SegGeometry::from_headers(&headers)
            .and_then(|g| build_seg(&ctx, card, a.measurement, &g))
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(series = %ctx.series_instance_uid, error = %e, "no SEG for this result");
                None
            }
        }
    };
    let sr = build_sr_with_seg(&ctx, card, a.measurement, seg.as_ref().map(|s| &s.1)).map_err(|e| out(&e))?;
    let scs = build_sc(&ctx, card, a.measurement, a.hu, &ScOptions::for_card(card)).map_err(|e| out(&e))?;
    std::fs::create_dir_all(dir).map_err(|e| out(&e))?;
    let mut files = Vec::new();
    let objects = std::iter::once(("sr.dcm".to_owned(), OutputKind::Sr, sr))
        .chain(scs.into_iter().enumerate().map(|(i, o)| (format!("sc-{i:02}.dcm"), OutputKind::Sc, o)))
        .chain(seg.map(|(o, _)| ("seg.dcm".to_owned(), OutputKind::Seg, o)));
    for (name, kind, obj) in objects {
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        obj.write_to_file(&tmp).map_err(|e| out(&e))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| out(&e))?;
        std::fs::rename(&tmp, &path).map_err(|e| out(&e))?;
        let meta = obj.meta();
        files.push(ReportFile {
            path,
            kind,
            sop_class_uid: crate::dicom::Uid::parse(meta.media_storage_sop_class_uid()).map_err(|e| out(&e))?,
            sop_instance_uid: crate::dicom::Uid::parse(meta.media_storage_sop_instance_uid()).map_err(|e| out(&e))?,
        });
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| out(&e))?;
    Ok(files)
}

/// Write a job's outputs under `dir`: result.json (`result` under
/// `"result"`, with the measurement and the source instances), and the map
/// and candidates, `[S,R,C]`: for one slice map.npy (f32) and candidates.npy
/// (u8); for a volume (more than one slice) `maps.npz` holding `map` (u8,
/// [`quantised`]) and `candidates` (u8), deflated.
pub fn write_outputs(result: &impl Serialize, a: &ReportSource<'_>, dir: &Path) -> Result<(), WriteError> {
    let out = |e: &dyn std::fmt::Display| WriteError(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| out(&e))?;
    let json = serde_json::json!({
        "result": result,
        "measurement": a.measurement,
        "source_instances": a.slices.iter().map(|(_, uid)| uid).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("result.json"), serde_json::to_vec_pretty(&json).map_err(|e| out(&e))?)
        .map_err(|e| out(&e))?;
    let m = a.measurement;
    if m.map.is_empty() {
        return Ok(());
    }
    if m.map.dim().0 == 1 {
        crate::npy::write(&dir.join("map.npy"), m.map.shape(), m.map.iter().copied()).map_err(|e| out(&e))?;
        crate::npy::write(&dir.join("candidates.npy"), m.candidates.shape(), m.candidates.iter().map(|&c| c as u8))
            .map_err(|e| out(&e))?;
        return Ok(());
    }
    // A volume: its float map is 1 MB a slice (633 MB for 604 slices), and
    // only its values inside the candidates mean anything (the value, the
    // SEG and the SC read nothing else). Stored as the FRACTIONAL SEG stores
    // it, deflated: 2.4 MB for a 151-slice liver volume instead of 198 MB.
    if m.map.dim() != m.candidates.dim() {
        return Err(out(&format!("map {:?} and candidates {:?} differ in shape", m.map.dim(), m.candidates.dim())));
    }
    let mut npz = crate::npy::NpzWriter::create(&dir.join("maps.npz")).map_err(|e| out(&e))?;
    let q = m.map.iter().zip(m.candidates.iter()).map(|(&v, &c)| quantised(v, c));
    npz.add("map", m.map.shape(), q).map_err(|e| out(&e))?;
    npz.add("candidates", m.candidates.shape(), m.candidates.iter().map(|&c| c as u8)).map_err(|e| out(&e))?;
    npz.finish().map_err(|e| out(&e))
}

/// A volume's map value as `maps.npz` keeps it: `round(clip(v, 0, 1) * 255)`
/// inside the candidates, 0 outside (the FRACTIONAL SEG's encoding).
fn quantised(v: f32, candidate: bool) -> u8 {
    if candidate {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    } else {
        0
    }
}
