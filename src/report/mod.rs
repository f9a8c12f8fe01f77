//! Results back to the PACS: one TID 1500 Structured Report, a few
//! Secondary Capture overlays and one Segmentation per biomarker measurement.
//!
//! Input: a [`ReportContext`] (the source series' header, the instances the
//! measurement used, who we are, a seed and the job's creation time), the
//! model card and the [`Measurement`](crate::biomarkers::Measurement).
//! Output: `FileDicomObject`s; [`write`] puts them on disk (fsynced, under
//! the job's `results/` directory), and the job stage then hands those files
//! to the outbox, which only reads them.
//!
//! Invariants:
//! - Every UID we mint is [`result_uid`]`(ctx.seed, kind)`: the same job
//!   (series, route, model version, generation) re-creates byte-identical
//!   instances after a retry or a restart, so a PACS sees a re-send of the
//!   same SOP Instance, never a second report. For that, `ctx.created` must
//!   be the job's persisted creation time, not `now()` at render time.
//! - Everything the report says about the patient and the study is copied
//!   from the source header; the SR, the SC and the SEG go into the source
//!   study, each in its own new series (9901 SR, 9902 SC, 9903 SEG). The
//!   SEG uses the source's Frame of Reference; the SR's measurement group
//!   references its segment (TID 1411).
//! - Values are checked where they enter (codes, numbers, text, UIDs):
//!   a bad model card or a NaN fails here, as a permanent error, rather than
//!   as a C-STORE the PACS rejects.
//!
//! Failure modes: [`ReportError`]; every variant is permanent (re-running
//! the job gives the same error), see [`ReportError::is_retryable`]. I/O
//! errors arise only in [`write`] ([`write::WriteError`]).
//!
//! Layout, after highdicom: [`content`] has one type per SR content item,
//! [`codes`] the fixed coded concepts, [`tid1500`] one type per template,
//! [`sr`] the SR IOD, [`sc`] the Secondary Capture IOD, [`seg`] the
//! Segmentation IOD, [`overlay`] and
//! [`font`] the pixel rendering.

pub mod codes;
pub mod content;
pub mod font;
pub mod overlay;
pub mod sc;
pub mod seg;
pub mod sr;
pub mod tid1500;
pub mod write;

#[cfg(test)]
pub(crate) mod testutil;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::dicom::{Uid, UidError};

pub use sc::{build_sc, ScOptions};
pub use seg::{build_seg, node_mask, SegGeometry, SegReference};
pub use sr::{build_sr, build_sr_with_seg};

/// Why a report could not be built. Every variant is the input's fault and
/// permanent: retrying the same job gives the same error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A coded concept breaks PS3.3 8.8 (empty part, too long, a backslash).
    #[error("code {field}: {reason}")]
    InvalidCode { field: &'static str, reason: String },
    /// A numeric value that DICOM cannot carry (NaN, infinite).
    #[error("{what} is not a finite number: {value}")]
    NonFinite { what: &'static str, value: f64 },
    /// A text value that is empty or too long for its VR.
    #[error("{what}: {reason}")]
    InvalidText { what: &'static str, reason: String },
    /// The source header lacks an attribute the report must copy.
    #[error("source dataset: {attribute} is missing or empty")]
    MissingSource { attribute: &'static str },
    /// A source attribute the report copies is too long for any element
    /// of its VR in our output (explicit VR LE: a 16-bit length), so the
    /// report could not be written. Copied attributes name the patient and
    /// study: shortening one would file the report under someone else.
    #[error("source dataset: {attribute} is {bytes} bytes, more than a {vr} element can hold ({max})")]
    SourceTooLong {
        attribute: &'static str,
        vr: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("{what} is not a valid UID: {source}")]
    BadUid {
        what: &'static str,
        source: UidError,
    },
    /// No source instances: nothing to reference, nothing to report on.
    #[error("no source instances to reference")]
    NoSources,
    /// Arrays that should describe the same volume do not.
    #[error("shape mismatch: {what}")]
    Shape { what: String },
    /// dicom-rs refused to build the file meta group.
    #[error("cannot build file meta information: {0}")]
    Meta(String),
}

impl ReportError {
    /// None of these go away on retry; the job should fail permanently.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A UID that is the same every time the same result is rebuilt.
///
/// `"2.25." + decimal(u128 of the first 16 bytes of sha256(seed "|" kind))`.
/// 2.25 is the ISO/IEC 9834-8 UUID arc (PS3.5 B.2); 128 hash bits give the
/// same collision resistance as a random UUID. At most 44 characters.
///
/// `kind` names the thing ("sr-instance", "sc-series", "sc-instance-3", ...)
/// so one seed yields distinct UIDs.
pub fn result_uid(seed: &str, kind: &str) -> Uid {
    let mut h = Sha256::new();
    h.update(seed.as_bytes());
    h.update(b"|");
    h.update(kind.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    let n = u128::from_be_bytes(first);
    Uid::parse(&format!("2.25.{n}")).expect("2.25.<u128> is at most 44 digits and dots")
}

/// One instance the measurement was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInstance {
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
}

/// Who made the report: this node, as the SR's device observer (TID 1004)
/// and in the Contributing Equipment Sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Device Observer UID (121012) and Device UID (0018,1002): stable per
    /// installation.
    pub uid: Uid,
    /// Device Observer Name (121013), e.g. the node's AE title.
    pub name: String,
    /// Manufacturer (0008,0070) and Device Observer Manufacturer (121014).
    pub manufacturer: String,
    /// Device Serial Number (0018,1000): the Enhanced General Equipment
    /// module (Type 1 there) wants one.
    pub serial_number: String,
    /// Software Versions (0018,1020) of the node itself.
    pub software_version: String,
}

/// Everything about one result that is not the measurement itself.
#[derive(Debug, Clone)]
pub struct ReportContext {
    /// Header of the first source instance (pixel data not needed): patient
    /// and study attributes are copied from it.
    pub source: InMemDicomObject,
    /// Every instance the measurement used, in slice order (the order of the
    /// measurement's first axis).
    pub source_refs: Vec<SourceInstance>,
    /// The source series (for the evidence and source image references).
    pub series_instance_uid: Uid,
    /// Stable per result, e.g. `"<series>|<route>|<model_version>|<generation>"`.
    pub seed: String,
    pub device: DeviceInfo,
    /// When the result was made; use the job's persisted creation time so a
    /// rebuild is identical.
    pub created: OffsetDateTime,
}

impl ReportContext {
    pub(crate) fn uid(&self, kind: &str) -> Uid {
        result_uid(&self.seed, kind)
    }

    pub(crate) fn check(&self) -> Result<(), ReportError> {
        if self.source_refs.is_empty() {
            return Err(ReportError::NoSources);
        }
        if self.seed.is_empty() {
            return Err(ReportError::InvalidText {
                what: "seed",
                reason: "empty".into(),
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Dataset helpers shared by the SR and SC builders.

pub(crate) fn str_elem(tag: Tag, vr: VR, value: impl Into<String>) -> InMemElement {
    let v: String = value.into();
    if v.is_empty() {
        DataElement::new(tag, vr, PrimitiveValue::Empty)
    } else {
        DataElement::new(tag, vr, PrimitiveValue::from(v))
    }
}

pub(crate) fn seq_elem(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// The dataset as a Part 10 object: explicit VR little endian, our
/// implementation UID, as every report object the node writes.
pub(crate) fn with_meta(o: InMemDicomObject) -> Result<dicom_object::FileDicomObject<InMemDicomObject>, ReportError> {
    o.with_meta(
        dicom_object::meta::FileMetaTableBuilder::new()
            .transfer_syntax(sr::EXPLICIT_VR_LITTLE_ENDIAN)
            .implementation_class_uid(crate::dicom::IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(crate::dicom::IMPLEMENTATION_VERSION),
    )
    .map_err(|e| ReportError::Meta(e.to_string()))
}

/// A reference to one instance (the SOP Class/Instance UID pair of PS3.3
/// 10.8), the item of every Referenced/Source Image and evidence sequence.
pub(crate) fn sop_ref(sop_class_uid: &str, sop_instance_uid: &str) -> InMemDicomObject {
    let mut r = InMemDicomObject::new_empty();
    r.put(str_elem(tags::REFERENCED_SOP_CLASS_UID, VR::UI, sop_class_uid));
    r.put(str_elem(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, sop_instance_uid));
    r
}

/// The Source Image Sequence item of a derived image (SC overlay, SEG frame):
/// the slice it was computed from, for image processing (CID 7202).
pub(crate) fn source_image_ref(sop_class_uid: &str, sop_instance_uid: &str) -> InMemDicomObject {
    let mut r = sop_ref(sop_class_uid, sop_instance_uid);
    r.put(seq_elem(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![codes::SOURCE_FOR_PROCESSING.to_item()]));
    r
}

pub(crate) fn da(t: OffsetDateTime) -> String {
    format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day())
}

pub(crate) fn tm(t: OffsetDateTime) -> String {
    format!("{:02}{:02}{:02}", t.hour(), t.minute(), t.second())
}

/// A source text attribute, decoded, with its padding trimmed.
pub(crate) fn source_text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok()??.to_str().ok()?;
    let v = v.trim_end_matches(['\0', ' ']).trim_start();
    (!v.is_empty()).then(|| v.to_owned())
}

/// The longest value an explicit VR element with a 16-bit length field can
/// carry: 65535, less the byte that pads a value to an even length.
pub(crate) const MAX_SHORT_VALUE: usize = 65534;

/// [`source_text`] for a value we copy into an element of `vr` (every VR we
/// copy has a 16-bit length in explicit VR LE). Our output is UTF-8
/// (ISO_IR 192), so the limit is on the UTF-8 bytes. Found by the
/// `part10_roundtrip` fuzz target: a 70 kB PatientName was copied, and the
/// finished report then failed to write.
pub(crate) fn copied_text(obj: &InMemDicomObject, tag: Tag, vr: VR) -> Result<Option<String>, ReportError> {
    let Some(v) = source_text(obj, tag) else { return Ok(None) };
    if v.len() > MAX_SHORT_VALUE {
        use dicom_core::dictionary::DataDictionary;
        return Err(ReportError::SourceTooLong {
            attribute: dicom_dictionary_std::StandardDataDictionary
                .by_tag(tag)
                .map(|e| e.alias)
                .unwrap_or("an attribute"),
            vr: vr.to_string(),
            bytes: v.len(),
            max: MAX_SHORT_VALUE,
        });
    }
    // Only these VRs take the declared character set (PS3.5 6.1.2.3); the
    // others (DA, TM, CS, DS, ...) are ASCII whatever it says. dicom-rs
    // writes a non-ASCII character of such a value as one Latin-1 byte, in
    // a file that declares UTF-8, and reads it back as an escape (also a
    // `part10_roundtrip` finding): the value cannot be carried, so it is
    // left out, as when the source lacks it.
    let declared_charset = matches!(vr, VR::PN | VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC);
    if !declared_charset && !v.is_ascii() {
        return Ok(None);
    }
    Ok(Some(v))
}

/// Patient (C.7.1.1) and General Study (C.7.2.1) modules, copied from the
/// source. Type 2 attributes are written empty when the source lacks them.
/// General Series (PS3.3 C.7.3.1) for a series this node creates in the
/// source study; SR and SC differ only in these values.
pub(crate) fn put_series(
    o: &mut InMemDicomObject,
    modality: &str,
    series_uid: &Uid,
    number: i32,
    created: OffsetDateTime,
    description: &str,
) {
    o.put(str_elem(tags::MODALITY, VR::CS, modality));
    o.put(str_elem(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()));
    o.put(str_elem(tags::SERIES_NUMBER, VR::IS, number.to_string()));
    o.put(str_elem(tags::SERIES_DATE, VR::DA, da(created)));
    o.put(str_elem(tags::SERIES_TIME, VR::TM, tm(created)));
    o.put(str_elem(tags::SERIES_DESCRIPTION, VR::LO, description));
}

pub(crate) fn put_patient_and_study(
    obj: &mut InMemDicomObject,
    source: &InMemDicomObject,
) -> Result<Uid, ReportError> {
    let study_raw =
        source_text(source, tags::STUDY_INSTANCE_UID).ok_or(ReportError::MissingSource {
            attribute: "StudyInstanceUID",
        })?;
    let study = Uid::parse(&study_raw).map_err(|source| ReportError::BadUid {
        what: "StudyInstanceUID",
        source,
    })?;
    let copy: [(Tag, VR); 9] = [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
    ];
    for (tag, vr) in copy {
        obj.put(str_elem(
            tag,
            vr,
            copied_text(source, tag, vr)?.unwrap_or_default(),
        ));
    }
    // Optional, but PACS worklists show them; copied when present.
    for (tag, vr) in [
        (tags::ISSUER_OF_PATIENT_ID, VR::LO),
        (tags::STUDY_DESCRIPTION, VR::LO),
    ] {
        if let Some(v) = copied_text(source, tag, vr)? {
            obj.put(str_elem(tag, vr, v));
        }
    }
    obj.put(str_elem(tags::STUDY_INSTANCE_UID, VR::UI, study.as_str()));
    Ok(study)
}

/// SOP Common (C.12.1) basics and the Contributing Equipment Sequence naming
/// the algorithm, with Purpose of Reference (109102, DCM, "Processing
/// Equipment") from CID 7005. CID 7005 has no "Processing Algorithm" concept
/// (109105 is "Frame Extracting Equipment"), so 109102 is the fitting one.
pub(crate) fn put_sop_common(
    obj: &mut InMemDicomObject,
    ctx: &ReportContext,
    sop_class: &str,
    sop_instance: &Uid,
    algorithm: (&str, &str),
) {
    obj.put(str_elem(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
    obj.put(str_elem(tags::SOP_CLASS_UID, VR::UI, sop_class));
    obj.put(str_elem(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        sop_instance.as_str(),
    ));
    obj.put(str_elem(
        tags::INSTANCE_CREATION_DATE,
        VR::DA,
        da(ctx.created),
    ));
    obj.put(str_elem(
        tags::INSTANCE_CREATION_TIME,
        VR::TM,
        tm(ctx.created),
    ));

    let mut eq = InMemDicomObject::new_empty();
    eq.put(seq_elem(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![codes::PROCESSING_EQUIPMENT.to_item()],
    ));
    eq.put(str_elem(
        tags::MANUFACTURER,
        VR::LO,
        ctx.device.manufacturer.clone(),
    ));
    eq.put(str_elem(tags::MANUFACTURER_MODEL_NAME, VR::LO, algorithm.0));
    eq.put(str_elem(tags::SOFTWARE_VERSIONS, VR::LO, algorithm.1));
    eq.put(str_elem(
        tags::CONTRIBUTION_DATE_TIME,
        VR::DT,
        format!("{}{}", da(ctx.created), tm(ctx.created)),
    ));
    eq.put(str_elem(
        tags::CONTRIBUTION_DESCRIPTION,
        VR::ST,
        format!("Biomarker model {} version {}", algorithm.0, algorithm.1),
    ));
    obj.put(seq_elem(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, vec![eq]));
}

/// General Equipment (C.7.5.1) and Enhanced General Equipment (C.7.5.2):
/// this node made the instance.
pub(crate) fn put_equipment(obj: &mut InMemDicomObject, ctx: &ReportContext) {
    obj.put(str_elem(
        tags::MANUFACTURER,
        VR::LO,
        ctx.device.manufacturer.clone(),
    ));
    obj.put(str_elem(
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        "biomarker-node",
    ));
    obj.put(str_elem(
        tags::DEVICE_SERIAL_NUMBER,
        VR::LO,
        ctx.device.serial_number.clone(),
    ));
    obj.put(str_elem(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        ctx.device.software_version.clone(),
    ));
}

/// Check a value against a VR's length limit (PS3.5 6.2) and its character
/// rules for the VRs we fill from outside data.
pub(crate) fn check_text(what: &'static str, v: &str, max_chars: usize) -> Result<(), ReportError> {
    if v.trim().is_empty() {
        return Err(ReportError::InvalidText {
            what,
            reason: "empty".into(),
        });
    }
    if v.chars().count() > max_chars {
        return Err(ReportError::InvalidText {
            what,
            reason: format!("longer than {max_chars} characters"),
        });
    }
    if v.contains('\\') || v.chars().any(|c| c.is_control()) {
        return Err(ReportError::InvalidText {
            what,
            reason: "contains a backslash or a control character".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_uid_is_stable_distinct_and_valid() {
        let a = result_uid("1.2.3|cac|1.0|0", "sr-instance");
        assert_eq!(a, result_uid("1.2.3|cac|1.0|0", "sr-instance"));
        assert_ne!(a, result_uid("1.2.3|cac|1.0|0", "sr-series"));
        assert_ne!(a, result_uid("1.2.3|cac|1.0|1", "sr-instance"));
        assert!(a.as_str().starts_with("2.25."));
        assert!(a.as_str().len() <= 44);
        // no leading zero after the arc (PS3.5 9.1)
        let n = &a.as_str()[5..];
        assert!(!n.starts_with('0') || n == "0");
        // pinned: sha256("s|k")[..16] as a big-endian u128
        let d = Sha256::digest(b"s|k");
        let want = u128::from_be_bytes(d[..16].try_into().unwrap());
        assert_eq!(result_uid("s", "k").as_str(), format!("2.25.{want}"));
    }

    #[test]
    fn text_checks_reject_empty_long_and_backslash() {
        assert!(check_text("x", "ok", 4).is_ok());
        assert!(check_text("x", "", 4).is_err());
        assert!(check_text("x", "toolong", 4).is_err());
        assert!(check_text("x", "a\\b", 4).is_err());
    }
}
