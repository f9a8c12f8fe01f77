//! Parity with the Python pipeline on `models/golden/` (tolerances from
//! models/golden/README.md): Rust must reproduce HU, candidates, model
//! input, map and value from the DICOM files and the card alone.

use std::path::PathBuf;

use super::measure::model_input;
use super::{init_for_tests, measure, Model, RuntimeOptions};
use crate::biomarkers::{candidate_mask, PixelGeometry};
use crate::npy::read_f64;
use crate::volume::Volume;

/// `models/`, or another models folder (with its `golden/`) for checking a
/// new training run before it is shipped.
fn models_dir() -> PathBuf {
    crate::test_data::models_dir()
}

const TASKS: [&str; 4] = ["pma", "sfa", "liver", "cac"];

fn cases() -> Vec<(String, PathBuf)> {
    let root = models_dir().join("golden");
    let mut out = Vec::new();
    for task in TASKS {
        let Ok(rd) = std::fs::read_dir(root.join(task)) else { continue };
        for e in rd.flatten() {
            if e.path().join("value.json").is_file() {
                out.push((task.to_owned(), e.path()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn rust_reproduces_the_python_golden_set() {
    let root = models_dir();
    // Under CI every model must be there; elsewhere the ones present are checked.
    let shipped: Vec<&str> =
        TASKS.into_iter().filter(|t| crate::test_data::model_card(t).is_some()).collect();
    let cases = cases();
    for t in &shipped {
        assert!(cases.iter().any(|(task, _)| task == t), "model {t} is shipped without a golden case");
    }
    if cases.is_empty() || !init_for_tests() {
        return;
    }
    for (task, dir) in cases {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("value.json")).unwrap()).unwrap();
        let model = Model::load(&root.join(format!("{task}.yaml")), &RuntimeOptions::default()).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("dicom"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let vol = Volume::from_files(&files).unwrap();
        let hu_ref = read_f64(&dir.join("hu.npy")).unwrap();
        assert_eq!(hu_ref.shape(), vol.hu.shape(), "{task}: hu shape");
        let hu_diff = hu_ref.iter().zip(vol.hu.iter()).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
        assert_eq!(hu_diff, 0.0, "{task} {}: HU must match exactly", dir.display());

        let card = &model.card;
        let area = vol.pixel_spacing[0] * vol.pixel_spacing[1];
        if !card.is_agatston() {
            let cand = candidate_mask(vol.hu.view(), &card.candidates, area);
            let cref = read_f64(&dir.join("candidates.npy")).unwrap();
            let mism = cref.iter().zip(cand.iter()).filter(|(a, b)| (**a != 0.0) != **b).count();
            assert_eq!(mism, 0, "{task}: candidate pixels differ");
        }

        let xref = read_f64(&dir.join("input.npy")).unwrap();
        let x = model_input(card, vol.hu.view());
        let dx = xref.iter().zip(x.iter()).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
        assert!(dx <= 1e-5, "{task}: model input differs by {dx}");
        let map = model.run(x).unwrap();
        let mref = read_f64(&dir.join("map.npy")).unwrap();
        let dm = mref.iter().zip(map.iter()).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
        assert!(dm <= 1e-4, "{task}: map differs by {dm}");

        let thickness = doc["slice_thickness_mm"].as_f64().unwrap_or(1.0);
        let m = measure(
            &model,
            vol.hu.view(),
            PixelGeometry { pixel_spacing: vol.pixel_spacing, slice_thickness_mm: thickness },
        )
        .unwrap();
        let want = doc["value"].as_f64().unwrap();
        let tol = if want == 0.0 { 1e-6 } else { want.abs() * 1e-4 };
        assert!((m.value - want).abs() <= tol, "{task} {}: value {} vs python {want}", dir.display(), m.value);
        if card.is_agatston() {
            assert_eq!(m.risk_category.map(|r| r.as_str()), doc["risk_category"].as_str(), "{task}: category");
            let lesions = doc["lesions"].as_array().unwrap();
            assert_eq!(m.lesions.len(), lesions.len(), "{task}: lesion count");
            for (r, p) in m.lesions.iter().zip(lesions) {
                assert_eq!(r.lesion.n_pixels as u64, p["n_pixels"].as_u64().unwrap());
                assert_eq!(r.lesion.weight as u64, p["weight"].as_u64().unwrap());
                assert!((r.mean_map - p["mean_map"].as_f64().unwrap()).abs() <= 1e-4);
            }
        }
        eprintln!("golden {task} {}: value {} (python {want}), map max diff {dm:.2e}", dir.display(), m.value);
    }
}

/// Every encoding of the real chest slice gives the same PMA and SFA:
/// identical for lossless syntaxes, within 2% for lossy ones.
#[test]
fn chest_slice_encodings_agree() {
    let Some(realct) = crate::test_data::realct() else { return };
    let dir = realct.join("chest-slice-encodings");
    let root = models_dir();
    let tasks: Vec<&str> = ["pma", "sfa"].into_iter().filter(|t| crate::test_data::model_card(t).is_some()).collect();
    if tasks.is_empty() || !init_for_tests() {
        return;
    }
    const LOSSY: [&str; 3] = ["1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91"];
    const UNDECODABLE: [&str; 2] = ["1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"];
    for task in tasks {
        let model = Model::load(&root.join(format!("{task}.yaml")), &RuntimeOptions::default()).unwrap();
        let reference = {
            let v = Volume::from_files(&[dir.join("CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm")]).unwrap();
            let g = PixelGeometry { pixel_spacing: v.pixel_spacing, slice_thickness_mm: 5.0 };
            measure(&model, v.hu.view(), g).unwrap().value
        };
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if UNDECODABLE.iter().any(|t| name.ends_with(&format!("{t}.dcm"))) {
                assert!(Volume::from_files(std::slice::from_ref(&p)).is_err(), "{name} should be refused");
                continue;
            }
            let v = Volume::from_files(std::slice::from_ref(&p)).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name.ends_with("1.2.840.10008.1.2.4.50.dcm") {
                // 8-bit baseline JPEG: this file stores HU in steps of ~32, which
                // analysis refuses (crate::job::run::MAX_HU_STEP).
                assert!(crate::job::run::hu_step_too_coarse(v.hu_step), "{name}: step {}", v.hu_step);
                continue;
            }
            assert!(!crate::job::run::hu_step_too_coarse(v.hu_step), "{name}: step {}", v.hu_step);
            let g = PixelGeometry { pixel_spacing: v.pixel_spacing, slice_thickness_mm: 5.0 };
            let value = measure(&model, v.hu.view(), g).unwrap().value;
            let rel = (value - reference).abs() / reference.abs().max(1e-9);
            eprintln!("{task} {name}: {value:.4} (rel diff {rel:.2e})");
            if LOSSY.iter().any(|t| name.ends_with(&format!("{t}.dcm"))) {
                assert!(rel <= 0.02, "{task} {name}: lossy value {value} vs {reference}");
            } else {
                assert_eq!(value, reference, "{task} {name}: lossless must be identical");
            }
        }
    }
}
