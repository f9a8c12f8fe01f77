//! Fixtures and external checkers for the report tests.
//!
//! External tools (dciodvfy, dsrdump, python3 + highdicom) are skipped with
//! a message when missing, unless `CI` is set: then a missing tool fails.

use std::path::Path;
use std::process::Command;

use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ndarray::{s, Array3};

use super::{DeviceInfo, ReportContext, SourceInstance};
use crate::biomarkers::{Lesion, LesionResult, Measurement, RiskCategory};
use crate::dicom::Uid;
use crate::inference::card::ModelCard;

pub const REAL_CT: &str = "../shared/realct/chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm";

pub fn card(yaml: &str) -> ModelCard {
    serde_yaml::from_str(yaml).expect("fixture card parses")
}

pub const AREA_CARD: &str = r#"
name: pma-test
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

pub const CAC_CARD: &str = r#"
name: cac-test
version: "0.3.1"
task: cac
onnx: x.onnx
sha256: "00"
input: {size: [8, 8], hu_clip: [-200.0, 1300.0], scale: {subtract: 0.0, divide: 1000.0}, slices: all}
candidates: {hu_min: 130.0, min_area_mm2: 1.0}
aggregation: {kind: agatston, lesion_threshold: 0.5}
biomarker:
  concept: {scheme: SCT, value: "450360000", meaning: Coronary artery calcium score}
  unit: {ucum: "{Agatston}", meaning: Agatston score}
  finding_site: {scheme: SCT, value: "41801008", meaning: Coronary artery}
"#;

pub fn device() -> DeviceInfo {
    DeviceInfo {
        uid: Uid::parse("2.25.1234567890").unwrap(),
        name: "BMNODE".into(),
        manufacturer: "biomarker-node project".into(),
        serial_number: "0001".into(),
        software_version: "0.1.0".into(),
    }
}

fn created() -> time::OffsetDateTime {
    time::macros::datetime!(2026-11-27 04:30:15 UTC)
}

/// The real CT slice's header when the shared data is there, else a
/// synthetic one (never under CI: see `crate::test_data`).
pub fn real_or_synthetic_source() -> InMemDicomObject {
    let Some(p) = crate::test_data::require(Path::new(env!("CARGO_MANIFEST_DIR")).join(REAL_CT), "real CT slice")
    else {
        return synthetic_source("Doe^Jane");
    };
    match dicom_object::open_file(&p)
        .map(|f| f.into_inner())
        .or_else(|e| dataset_after_meta(&p).ok_or(e))
    {
        Ok(mut o) => {
            o.remove_element(tags::PIXEL_DATA);
            o
        }
        Err(e) => {
            assert!(!crate::test_data::in_ci(), "{} not usable under CI: {e}", p.display());
            eprintln!("{} not usable ({e}); synthetic source", p.display());
            synthetic_source("Doe^Jane")
        }
    }
}

/// dicom-rs 0.10.1 rejects this file's meta group (its Source AE Title is
/// 18 bytes); the data set itself is fine: skip the group by its length and
/// read it as implicit VR little endian, as the file name says.
fn dataset_after_meta(p: &Path) -> Option<InMemDicomObject> {
    let bytes = std::fs::read(p).ok()?;
    if bytes.get(128..132)? != b"DICM" {
        return None;
    }
    let group_len = u32::from_le_bytes(bytes.get(140..144)?.try_into().ok()?) as usize;
    let start = 144 + group_len;
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    InMemDicomObject::read_dataset_with_ts(bytes.get(start..)?, &ts).ok()
}

pub fn synthetic_source(patient: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
        DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1484.99.1.1",
        ),
        DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1484.99.1",
        ),
        DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1484.99.1.2",
        ),
        DataElement::new(tags::PATIENT_NAME, VR::PN, patient),
        DataElement::new(tags::PATIENT_ID, VR::LO, "P-0001"),
        DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, "19500101"),
        DataElement::new(tags::PATIENT_SEX, VR::CS, "F"),
        DataElement::new(tags::STUDY_DATE, VR::DA, "20260101"),
        DataElement::new(tags::STUDY_TIME, VR::TM, "101010"),
        DataElement::new(tags::ACCESSION_NUMBER, VR::SH, "ACC1"),
        DataElement::new(tags::STUDY_ID, VR::SH, "S1"),
        DataElement::new(tags::MODALITY, VR::CS, "CT"),
        DataElement::new(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
        DataElement::new(tags::PIXEL_SPACING, VR::DS, "0.7\\0.7"),
    ])
}

fn refs(source: &InMemDicomObject, n: usize) -> (Uid, Vec<SourceInstance>) {
    let get = |t| Uid::parse(&source.element(t).unwrap().to_str().unwrap()).unwrap();
    let class = get(tags::SOP_CLASS_UID);
    let first = get(tags::SOP_INSTANCE_UID);
    let mut v = vec![SourceInstance {
        sop_class_uid: class.clone(),
        sop_instance_uid: first.clone(),
    }];
    for i in 1..n {
        v.push(SourceInstance {
            sop_class_uid: class.clone(),
            sop_instance_uid: Uid::parse(&format!("{}.{i}", first.as_str())).unwrap(),
        });
    }
    (get(tags::SERIES_INSTANCE_UID), v)
}

pub fn context(source: InMemDicomObject, n_slices: usize, seed: &str) -> ReportContext {
    let (series, source_refs) = refs(&source, n_slices);
    ReportContext {
        source,
        source_refs,
        series_instance_uid: series,
        seed: seed.into(),
        device: device(),
        created: created(),
    }
}

/// A phantom-like axial slice: air outside an elliptic body, fat rim, muscle
/// blocks in front (the "pectoralis"), lungs, a bright spine and two small
/// calcifications near the heart.
pub fn phantom_hu(rows: usize, cols: usize) -> ndarray::Array2<f32> {
    let mut hu = ndarray::Array2::<f32>::from_elem((rows, cols), -1000.0);
    let (cy, cx) = (rows as f32 / 2.0, cols as f32 / 2.0);
    for r in 0..rows {
        for c in 0..cols {
            let (y, x) = (
                (r as f32 - cy) / (rows as f32 * 0.36),
                (c as f32 - cx) / (cols as f32 * 0.45),
            );
            let d = x * x + y * y;
            if d < 1.0 {
                hu[[r, c]] = if d > 0.8 { -100.0 } else { 40.0 };
                // lungs
                for sx in [-0.45f32, 0.45] {
                    let (ly, lx) = ((y + 0.05) / 0.6, (x - sx) / 0.32);
                    if ly * ly + lx * lx < 1.0 {
                        hu[[r, c]] = -850.0;
                    }
                }
                // spine
                let (sy, sxx) = ((y - 0.7) / 0.15, x / 0.12);
                if sy * sy + sxx * sxx < 1.0 {
                    hu[[r, c]] = 700.0;
                }
            }
        }
    }
    hu
}

/// Pectoralis-like muscle band on the anterior chest wall of the phantom.
pub fn muscle_mask(rows: usize, cols: usize) -> ndarray::Array2<bool> {
    let mut m = ndarray::Array2::from_elem((rows, cols), false);
    let (r0, r1) = (rows * 22 / 100, rows * 28 / 100);
    for c in cols * 22 / 100..cols * 78 / 100 {
        if c > cols * 45 / 100 && c < cols * 55 / 100 {
            continue; // sternum gap
        }
        for r in r0..r1 {
            m[[r, c]] = true;
        }
    }
    m
}

pub fn area_measurement(n: usize, rows: usize, cols: usize) -> (Array3<f32>, Measurement) {
    let mut hu = Array3::<f32>::zeros((n, rows, cols));
    let mut map = Array3::<f32>::zeros((n, rows, cols));
    let mut cand = Array3::from_elem((n, rows, cols), false);
    let slice = phantom_hu(rows, cols);
    let muscle = muscle_mask(rows, cols);
    for i in 0..n {
        hu.slice_mut(s![i, .., ..]).assign(&slice);
        for ((r, c), &m) in muscle.indexed_iter() {
            if m {
                hu[[i, r, c]] = 45.0;
                cand[[i, r, c]] = true;
                // map is high inside the band and bleeds a bit outside
                map[[i, r, c]] = 0.9;
                if r > 1 {
                    map[[i, r - 2, c]] = map[[i, r - 2, c]].max(0.3);
                }
            }
        }
    }
    let m = Measurement {
        value: 23.456,
        unit: "cm2".into(),
        risk_category: None,
        lesions: vec![],
        map,
        candidates: cand,
        model: "pma-test".into(),
        model_version: "1.2.0".into(),
        execution_provider: "cpu",
        volume: None,
    };
    (hu, m)
}

pub fn cac_measurement(n: usize, rows: usize, cols: usize) -> (Array3<f32>, Measurement) {
    let mut hu = Array3::<f32>::zeros((n, rows, cols));
    let slice = phantom_hu(rows, cols);
    let mut map = Array3::<f32>::zeros((n, rows, cols));
    let mut cand = Array3::from_elem((n, rows, cols), false);
    let mut lesions = vec![];
    for i in 0..n {
        hu.slice_mut(s![i, .., ..]).assign(&slice);
    }
    // lesions on slices 1 and 3 only, in the mediastinum between the lungs
    let size = (rows / 40).max(3);
    for (k, &(sl, r, c)) in [
        (1usize, rows * 40 / 100, cols * 47 / 100),
        (3, rows * 46 / 100, cols * 51 / 100),
    ]
    .iter()
    .enumerate()
    {
        if sl >= n {
            continue;
        }
        // the map spills a little around the lesion, weaker
        let halo = size / 2 + 1;
        for rr in r.saturating_sub(halo)..(r + size + halo).min(rows) {
            for cc in c.saturating_sub(halo)..(c + size + halo).min(cols) {
                map[[sl, rr, cc]] = 0.35;
            }
        }
        for dr in 0..size {
            for dc in 0..size + 1 {
                hu[[sl, r + dr, c + dc]] = 450.0;
                cand[[sl, r + dr, c + dc]] = true;
                map[[sl, r + dr, c + dc]] = 0.85;
            }
        }
        lesions.push(LesionResult {
            lesion: Lesion {
                slice: sl,
                label: 1,
                n_pixels: 20,
                area_mm2: 10.0,
                peak_hu: 450.0,
                weight: 4,
                score: 61.75,
            },
            mean_map: 0.8,
            counted: k < 2,
            excluded: None,
        });
    }
    let m = Measurement {
        value: 123.5,
        unit: "{Agatston}".into(),
        risk_category: Some(RiskCategory::from_score(123.5)),
        lesions,
        map,
        candidates: cand,
        model: "cac-test".into(),
        model_version: "0.3.1".into(),
        execution_provider: "cpu",
        volume: None,
    };
    (hu, m)
}

pub fn area_fixture() -> (ReportContext, ModelCard, Measurement) {
    let (_, m) = area_measurement(1, 32, 32);
    (
        context(real_or_synthetic_source(), 1, "1.2.3|pma|1.2.0|0"),
        card(AREA_CARD),
        m,
    )
}

pub fn cac_fixture() -> (ReportContext, ModelCard, Measurement) {
    let (_, m) = cac_measurement(4, 32, 32);
    (
        context(synthetic_source("Müller^Jörg"), 4, "1.2.3|cac|0.3.1|0"),
        card(CAC_CARD),
        m,
    )
}

/// Whether a tool can be run; when not: fail under CI, else say so.
fn available(program: &str, probe: &[&str]) -> bool {
    let ok = Command::new(program).args(probe).output().is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{program} is required under CI");
        }
        eprintln!("SKIP: {program} not found");
    }
    ok
}

/// dciodvfy reports no line with "Error"; warnings are printed.
pub fn dciodvfy_clean(path: &Path) {
    if !available("dciodvfy", &[]) {
        return;
    }
    let out = Command::new("dciodvfy").arg(path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
    for l in text.lines().filter(|l| !l.contains("Error")) {
        eprintln!("dciodvfy {}: {l}", path.display());
    }
    assert!(errors.is_empty(), "dciodvfy errors:\n{}", errors.join("\n"));
}

/// dsrdump output (codes shown), or None when dsrdump is missing.
pub fn dsrdump(path: &Path) -> Option<String> {
    if !available("dsrdump", &["--version"]) {
        return None;
    }
    let out = Command::new("dsrdump")
        .args(["+Pc", "-Ec"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dsrdump failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("E:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(text)
}

const READBACK: &str = r#"
import sys, highdicom as hd
sr = hd.sr.srread(sys.argv[1])
groups = sr.content.get_image_measurement_groups()
main = [g for g in groups if not g.tracking_identifier.startswith("Lesion")]
assert len(main) == 1, [g.tracking_identifier for g in groups]
assert len(groups) == 1 + int(sys.argv[5]), len(groups)
groups = main
assert groups[0].tracking_uid, "tracking UID"
ms = [m for m in groups[0].get_measurements() if m.name.value == sys.argv[2]]
assert len(ms) == 1, [m.name for m in groups[0].get_measurements()]
assert abs(ms[0].value - float(sys.argv[3])) < 1e-9, ms[0].value
assert ms[0].unit.value == sys.argv[4], ms[0].unit
if len(sys.argv) > 6:
    ev = [e.value.value for e in groups[0].get_qualitative_evaluations()]
    assert ev == [sys.argv[6]], ev
print("highdicom ok", ms[0].name.meaning, ms[0].value, ms[0].unit.value)
"#;

/// highdicom reads the SR back and finds the measurement with its unit.
pub fn highdicom_readback(
    path: &Path,
    concept: &str,
    value: f64,
    unit: &str,
    lesion_groups: usize,
    evaluation: Option<&str>,
) {
    let probe = Command::new("python3")
        .args(["-c", "import highdicom"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        if std::env::var_os("CI").is_some() {
            panic!("python3 with highdicom is required under CI");
        }
        eprintln!("SKIP: highdicom not importable");
        return;
    }
    let out = Command::new("python3")
        .args(["-c", READBACK])
        .arg(path)
        .arg(concept)
        .arg(value.to_string())
        .arg(unit)
        .arg(lesion_groups.to_string())
        .args(evaluation)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "highdicom readback failed:\n{text}");
    eprintln!("{}", text.trim());
}

const RGB_CHECK: &str = r#"
import sys, pydicom
ds = pydicom.dcmread(sys.argv[1])
a = ds.pixel_array
assert a.shape == (int(sys.argv[2]), int(sys.argv[3]), 3), a.shape
assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
assert a.max() > 0
print("pydicom ok", a.shape, ds.SOPClassUID.name)
"#;

/// pydicom decodes the SC pixels as an RGB image of the expected size.
pub fn pydicom_rgb(path: &Path, rows: usize, cols: usize) {
    let probe = Command::new("python3")
        .args(["-c", "import pydicom, numpy"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        if std::env::var_os("CI").is_some() {
            panic!("python3 with pydicom and numpy is required under CI");
        }
        eprintln!("SKIP: pydicom not importable");
        return;
    }
    let out = Command::new("python3")
        .args(["-c", RGB_CHECK])
        .arg(path)
        .arg(rows.to_string())
        .arg(cols.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pydicom check failed:\n{text}");
    eprintln!("{}", text.trim());
}

/// With `REPORT_OUT=<dir>`, keep a copy of a test output for people.
pub fn keep(path: &Path, name: &str) {
    if let Some(dir) = std::env::var_os("REPORT_OUT") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(path, Path::new(&dir).join(name));
    }
}
