//! The Part 10 files this node writes, as a round trip: a source header made
//! of arbitrary elements (what a modality sent us: the report copies its
//! patient and study attributes) and an arbitrary measurement → the SR and
//! SC builders → `write_all`, the bytes `report::write::write_reports` puts on
//! disk → our Part 10 reader (`outbox::part10::inspect`, what the outbox
//! sends from) and dicom-object → the same object.
//!
//! A builder may refuse its input (an `Err`); what it returns must be
//! writable, and must read back equal, with every copied source attribute
//! unchanged.
#![no_main]
use std::sync::OnceLock;

use biomarker_node::biomarkers::{Lesion, LesionResult, Measurement, RiskCategory};
use biomarker_node::dicom::Uid;
use biomarker_node::inference::card::ModelCard;
use biomarker_node::report::{build_sc, build_sr, DeviceInfo, ReportContext, ScOptions, SourceInstance};
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::header::Header;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use ndarray::Array3;

#[path = "common.rs"]
mod common;

const AREA_CARD: &str = r#"
name: pma-fuzz
version: "1.2.0"
task: pma
onnx: x.onnx
sha256: "00"
input: {size: [8, 8], hu_clip: [-250.0, 250.0], scale: {subtract: 0.0, divide: 250.0}, slices: single}
candidates: {hu_min: -29.0, hu_max: 150.0, min_area_mm2: 0.0}
aggregation: {kind: area, unit_scale: 0.01}
biomarker:
  concept: {scheme: SCT, value: "42798000", meaning: Area}
  unit: {ucum: cm2, meaning: square centimeter}
  finding_site: {scheme: SCT, value: "60005003", meaning: Pectoralis major muscle}
"#;

const CAC_CARD: &str = r#"
name: cac-fuzz
version: "0.3.1"
task: cac
onnx: x.onnx
sha256: "00"
input: {size: [8, 8], hu_clip: [-200.0, 1300.0], scale: {subtract: 0.0, divide: 1000.0}, slices: all}
candidates: {hu_min: 130.0, min_area_mm2: 1.0}
aggregation: {kind: agatston, lesion_threshold: 0.5}
biomarker:
  concept: {scheme: 99BMN, value: CAC-AGATSTON, meaning: Coronary artery calcium score (Agatston)}
  unit: {ucum: "{Agatston}", meaning: Agatston score}
  finding_site: {scheme: SCT, value: "41801008", meaning: Coronary artery}
"#;

fn cards() -> &'static [ModelCard; 2] {
    static CARDS: OnceLock<[ModelCard; 2]> = OnceLock::new();
    CARDS.get_or_init(|| [AREA_CARD, CAC_CARD].map(|y| serde_yaml::from_str(y).expect("fixture card parses")))
}

/// What the SC builder reads from the source besides what every report
/// copies ([`COPIED`]); element tags are drawn from both.
const READ_BESIDES: &[(Tag, VR)] = &[
    (tags::BODY_PART_EXAMINED, VR::CS),
    (tags::PIXEL_SPACING, VR::DS),
    (tags::SPECIFIC_CHARACTER_SET, VR::CS),
    (tags::SERIES_DESCRIPTION, VR::LO),
    (tags::MODALITY, VR::CS),
];

/// Copied verbatim (after trimming) into every report.
const COPIED: &[(Tag, VR)] = &[
    (tags::PATIENT_NAME, VR::PN),
    (tags::PATIENT_ID, VR::LO),
    (tags::PATIENT_BIRTH_DATE, VR::DA),
    (tags::PATIENT_SEX, VR::CS),
    (tags::STUDY_DATE, VR::DA),
    (tags::STUDY_TIME, VR::TM),
    (tags::ACCESSION_NUMBER, VR::SH),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    (tags::STUDY_ID, VR::SH),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO),
    (tags::STUDY_DESCRIPTION, VR::LO),
    (tags::STUDY_INSTANCE_UID, VR::UI),
];

const ANY_VR: &[VR] = &[
    VR::AE, VR::AS, VR::CS, VR::DA, VR::DS, VR::DT, VR::IS, VR::LO, VR::LT, VR::PN, VR::SH, VR::ST,
    VR::TM, VR::UC, VR::UI, VR::UR, VR::UT, VR::US, VR::UL, VR::SS, VR::SL, VR::FL, VR::FD, VR::OB,
    VR::OW,
];

/// Up to this many bytes in one generated value: past 64 KiB, so a value
/// too long for a 16-bit length field is in reach of a small input.
const MAX_VALUE: usize = 200_000;

fn text(u: &mut Unstructured) -> Result<String> {
    let s: String = u.arbitrary()?;
    // A repeat count lets a few input bytes stand for a long value.
    let times = match u.int_in_range(0u8..=7)? {
        0..=4 => 1,
        5 => 40,
        6 => 2_000,
        _ => 70_000,
    };
    let times = times.min(MAX_VALUE / s.len().max(1)).max(1);
    Ok(s.repeat(times))
}

fn element(u: &mut Unstructured) -> Result<DataElement<InMemDicomObject>> {
    let (tag, vr) = if u.ratio(7u8, 8)? {
        // One draw over COPIED then READ_BESIDES, as `choose` over one list.
        let i = u.choose_index(COPIED.len() + READ_BESIDES.len())?;
        *COPIED.iter().chain(READ_BESIDES).nth(i).expect("index below the total")
    } else {
        (Tag(u.arbitrary()?, u.arbitrary()?), *u.choose(ANY_VR)?)
    };
    // Mostly the dictionary VR; sometimes what a careless sender wrote.
    let vr = if u.ratio(1u8, 8)? { *u.choose(ANY_VR)? } else { vr };
    let value = match vr {
        VR::US => PrimitiveValue::U16(u.arbitrary::<Vec<u16>>()?.into()),
        VR::UL => PrimitiveValue::U32(u.arbitrary::<Vec<u32>>()?.into()),
        VR::SS => PrimitiveValue::I16(u.arbitrary::<Vec<i16>>()?.into()),
        VR::SL => PrimitiveValue::I32(u.arbitrary::<Vec<i32>>()?.into()),
        VR::FL => PrimitiveValue::F32(u.arbitrary::<Vec<f32>>()?.into()),
        VR::FD => PrimitiveValue::F64(u.arbitrary::<Vec<f64>>()?.into()),
        VR::OB | VR::OW => PrimitiveValue::U8(u.arbitrary::<Vec<u8>>()?.into()),
        _ => PrimitiveValue::from(text(u)?),
    };
    Ok(DataElement::new(tag, vr, value))
}

/// The header of a plausible CT slice; the fuzzer overwrites and adds.
fn base_source() -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.10.1484.99.1.1"),
        DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.10.1484.99.1"),
        DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.10.1484.99.1.2"),
        DataElement::new(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
        DataElement::new(tags::PATIENT_ID, VR::LO, "P-0001"),
        DataElement::new(tags::MODALITY, VR::CS, "CT"),
        DataElement::new(tags::PIXEL_SPACING, VR::DS, "0.7\\0.7"),
    ])
}

fn device() -> DeviceInfo {
    DeviceInfo {
        uid: Uid::parse("2.25.1234567890").expect("valid UID"),
        name: "BMNODE".into(),
        manufacturer: "biomarker-node project".into(),
        serial_number: "0001".into(),
        software_version: "0.1.0".into(),
    }
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mut source = base_source();
    for _ in 0..u.int_in_range(0u8..=12)? {
        source.put(element(u)?);
    }
    let card_index = u.choose_index(2)?;
    let card = &cards()[card_index];
    let (n, rows, cols) = (u.int_in_range(1usize..=3)?, u.int_in_range(1usize..=24)?, u.int_in_range(1usize..=24)?);
    let len = n * rows * cols;
    let mut hu = Vec::with_capacity(len);
    for _ in 0..len {
        hu.push(f32::from(u.arbitrary::<i16>()?));
    }
    let hu = Array3::from_shape_vec((n, rows, cols), hu).expect("length is n*rows*cols");
    let map = hu.mapv(|v| ((v + 1024.0) / 2048.0).clamp(0.0, 1.0));
    let candidates = hu.mapv(|v| v > 130.0);
    let mut lesions = Vec::new();
    for _ in 0..u.int_in_range(0u8..=3)? {
        lesions.push(LesionResult {
            lesion: Lesion {
                slice: u.int_in_range(0..=n - 1)?,
                label: u.arbitrary()?,
                n_pixels: u.arbitrary()?,
                area_mm2: u.arbitrary()?,
                peak_hu: u.arbitrary()?,
                weight: u.arbitrary()?,
                score: u.arbitrary()?,
            },
            mean_map: u.arbitrary()?,
            counted: u.arbitrary()?,
            excluded: None,
        });
    }
    let value: f64 = u.arbitrary()?;
    let m = Measurement {
        value,
        unit: card.biomarker.unit.ucum.clone(),
        risk_category: card_index.eq(&1).then(|| RiskCategory::from_score(value)),
        lesions,
        map,
        candidates,
        model: if u.ratio(1u8, 4)? { text(u)? } else { card.name.clone() },
        model_version: if u.ratio(1u8, 4)? { text(u)? } else { card.version.clone() },
        execution_provider: "cpu",
        volume: None,
    };
    let seed = if u.ratio(1u8, 4)? { text(u)? } else { "1.2.3|route|1.0|1".into() };
    let series = Uid::parse("1.2.826.0.1.3680043.10.1484.99.1.2").expect("valid UID");
    let sop_class = Uid::parse("1.2.840.10008.5.1.4.1.1.2").expect("valid UID");
    let source_refs = (0..n)
        .map(|i| SourceInstance {
            sop_class_uid: sop_class.clone(),
            sop_instance_uid: Uid::parse(&format!("1.2.826.0.1.3680043.10.1484.99.1.1.{i}")).expect("valid UID"),
        })
        .collect();
    let ctx = ReportContext {
        source,
        source_refs,
        series_instance_uid: series,
        seed,
        device: device(),
        created: time::macros::datetime!(2026-11-27 04:30:15 UTC),
    };
    if let Ok(sr) = build_sr(&ctx, card, &m) {
        round_trip(&sr, &ctx.source, "sr");
    }
    if u.arbitrary()? {
        if let Ok(scs) = build_sc(&ctx, card, &m, hu.view(), &ScOptions::for_card(card)) {
            for sc in &scs {
                round_trip(sc, &ctx.source, "sc");
            }
        }
    }
    Ok(())
}

fn round_trip(obj: &FileDicomObject<InMemDicomObject>, source: &InMemDicomObject, what: &str) {
    let mut bytes = Vec::new();
    obj.write_all(&mut bytes)
        .unwrap_or_else(|e| panic!("{what}: the builder returned an object our writer cannot write: {}", biomarker_node::error_chain(&e)));
    let path = common::scratch(&format!("{what}.dcm"));
    std::fs::write(&path, &bytes).expect("scratch file is writable");
    let info = biomarker_node::outbox::part10::inspect(&path)
        .unwrap_or_else(|e| panic!("{what}: our Part 10 reader refuses our own file: {e}"));
    let meta = obj.meta();
    assert_eq!(info.sop_instance_uid.trim_end_matches('\0'), meta.media_storage_sop_instance_uid().trim_end_matches('\0'));
    assert_eq!(info.transfer_syntax.trim_end_matches('\0'), meta.transfer_syntax().trim_end_matches('\0'));
    assert_eq!(info.file_len, bytes.len() as u64);
    let back = dicom_object::from_reader(&bytes[128..])
        .unwrap_or_else(|e| panic!("{what}: dicom-object cannot read what we wrote: {e}"));
    // The outbox sends the bytes after the meta group as the dataset.
    let ds = InMemDicomObject::read_dataset_with_ts(
        &bytes[info.dataset_offset as usize..],
        &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .unwrap_or_else(|e| panic!("{what}: the dataset after inspect's offset does not parse: {e}"));
    same(obj, &back, what);
    same(obj, &ds, what);
    for &(tag, vr) in COPIED {
        // PS3.5 6.1.2.3: only these VRs take the declared character set;
        // the node leaves out a non-ASCII value of any other.
        let declared = matches!(vr, VR::PN | VR::LO | VR::SH);
        let want = source_text(source, tag).filter(|v| declared || v.is_ascii()).map(|v| values(&v));
        let got = source_text(&back, tag).map(|v| values(&v));
        if tag == tags::STUDY_INSTANCE_UID || want.is_some() {
            assert_eq!(got, want, "{what}: copied attribute {tag} changed on the way");
        }
    }
}

/// A text value as dicom-rs reads it back: split at backslashes, each value
/// without its trailing NUL and space padding. A value built in memory (the
/// fuzzer's source) can hold "A\0\\B"; no file can, since reading trims
/// every value.
fn values(s: &str) -> Vec<String> {
    s.trim_end_matches(['\0', ' '])
        .split('\\')
        .map(|v| v.trim_end_matches(['\0', ' ']).to_owned())
        .collect()
}

fn source_text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok()??.to_str().ok()?;
    let v = v.trim_end_matches(['\0', ' ']).trim_start();
    (!v.is_empty()).then(|| v.to_owned())
}

/// Element-by-element equality, modulo the padding the encoding adds.
fn same(a: &InMemDicomObject, b: &InMemDicomObject, at: &str) {
    let tags_a: Vec<Tag> = a.iter().map(|e| e.tag()).collect();
    let tags_b: Vec<Tag> = b.iter().map(|e| e.tag()).collect();
    assert_eq!(tags_a, tags_b, "{at}: the element lists differ");
    for ea in a.iter() {
        let eb = b.element(ea.tag()).expect("same tag list");
        let here = format!("{at}/{}", ea.tag());
        assert_eq!(ea.vr(), eb.vr(), "{here}: VR changed");
        match (ea.value(), eb.value()) {
            (Value::Sequence(sa), Value::Sequence(sb)) => {
                assert_eq!(sa.items().len(), sb.items().len(), "{here}: item count changed");
                for (i, (ia, ib)) in sa.items().iter().zip(sb.items()).enumerate() {
                    same(ia, ib, &format!("{here}[{i}]"));
                }
            }
            (Value::Primitive(pa), Value::Primitive(pb)) => {
                let trim = |s: std::borrow::Cow<str>| values(&s);
                match (pa, pb) {
                    (PrimitiveValue::Str(_) | PrimitiveValue::Strs(_), _)
                    | (_, PrimitiveValue::Str(_) | PrimitiveValue::Strs(_)) => {
                        assert_eq!(trim(pa.to_str()), trim(pb.to_str()), "{here}: text changed")
                    }
                    (PrimitiveValue::Empty, _) | (_, PrimitiveValue::Empty) => {
                        assert_eq!(pa.to_bytes().len(), pb.to_bytes().len(), "{here}: emptiness changed")
                    }
                    _ => assert_eq!(pa.to_bytes(), pb.to_bytes(), "{here}: binary value changed"),
                }
            }
            (va, vb) => panic!("{here}: value kind changed: {va:?} vs {vb:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
