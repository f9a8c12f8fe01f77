//! Phantom tests. Small matrices (`size`) keep debug-build runs short; the
//! geometry scales its pixel spacing so the anatomy is the same.

use std::path::Path;

use dicom_dictionary_std::tags;

use super::*;
use crate::biomarkers::agatston::{self, LesionRule, RiskCategory};
use ndarray::Array3;

fn read_series(dir: &Path) -> (Vec<i16>, usize) {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    let mut hu = Vec::new();
    let mut last_z = f64::MIN;
    for (k, f) in files.iter().enumerate() {
        let o = dicom_object::open_file(f).unwrap();
        let inst: i32 = o.element(tags::INSTANCE_NUMBER).unwrap().to_int().unwrap();
        assert_eq!(inst, k as i32 + 1);
        let z = o.element(tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap()[2];
        assert!(z > last_z, "slices ascend in z");
        last_z = z;
        let slope = o.element(tags::RESCALE_SLOPE).unwrap().to_float64().unwrap();
        let icpt = o.element(tags::RESCALE_INTERCEPT).unwrap().to_float64().unwrap();
        let signed: u16 = o.element(tags::PIXEL_REPRESENTATION).unwrap().to_int().unwrap();
        let bytes = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        for ch in bytes.chunks_exact(2) {
            let raw = if signed == 1 {
                i16::from_le_bytes([ch[0], ch[1]]) as f64
            } else {
                u16::from_le_bytes([ch[0], ch[1]]) as f64
            };
            hu.push((raw * slope + icpt) as i16);
        }
    }
    (hu, files.len())
}

fn read_npy(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let b = fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hl) % 64, 0);
    let h = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(h.contains("'descr': '|u1'") && h.contains("'fortran_order': False"));
    let shape = h[h.find("'shape': (").unwrap() + 10..h.find(")").unwrap()]
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    (shape, b[10 + hl..].to_vec())
}

/// Writes a series and checks truth == recomputation from the files.
fn roundtrip(task: Task, seed: u64, index: u32, size: usize) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let p = generate(task, seed, index, Some(size));
    let dir = tmp.path().join("s");
    let truth = write_series(&dir, task, seed, index, &p).unwrap();
    let (hu, slices) = read_series(&dir);
    assert_eq!(slices, p.slices);
    assert_eq!(hu, p.hu);
    let (shape, mask) = read_npy(&dir.join("mask.npy"));
    assert_eq!(shape, vec![p.slices, p.rows, p.cols]);
    assert_eq!(mask, p.mask);
    let on_disk: Value = serde_json::from_str(&fs::read_to_string(dir.join("truth.json")).unwrap()).unwrap();
    // serde_json's default float parsing may differ in the last ulp.
    for key in ["task", "unit", "series_instance_uid", "study_instance_uid", "rows", "slices"] {
        assert_eq!(on_disk[key], truth[key]);
    }
    assert!((on_disk["value"].as_f64().unwrap() - truth["value"].as_f64().unwrap()).abs() < 1e-9);
    let px = p.spacing[0] * p.spacing[1];
    let value = match task {
        Task::Cac => {
            let shape = (p.slices, p.rows, p.cols);
            let region = Array3::from_shape_vec(shape, mask.iter().map(|&m| m == 1).collect()).unwrap();
            let hu = Array3::from_shape_vec(shape, hu.iter().map(|&v| v as f32).collect()).unwrap();
            let (c, _) = agatston::lesions(hu.view(), Some(region.view()), LesionRule::AGATSTON, px, p.thickness);
            let lesions = truth["lesions"].as_array().unwrap();
            assert_eq!(lesions.len(), c.len());
            assert_eq!(
                truth["risk_category"].as_str().unwrap(),
                RiskCategory::from_score(agatston::total(&c)).as_str()
            );
            agatston::total(&c)
        }
        _ => {
            let (lo, hi) = match task {
                Task::Pma => (-29, 150),
                Task::Sfa => (-190, -30),
                _ => (-20, 200),
            };
            for (h, m) in hu.iter().zip(&mask) {
                if *m == 1 {
                    assert!(*h >= lo && *h <= hi, "mask pixel {h} outside the HU range");
                }
            }
            mask.iter().filter(|&&m| m == 1).count() as f64 * px / 100.0
        }
    };
    let t = truth["value"].as_f64().unwrap();
    assert!((value - t).abs() <= 1e-9 * t.max(1.0), "{task:?}: {value} vs {t}");
    truth
}

#[test]
fn truth_matches_files_for_every_task() {
    for (task, size) in [(Task::Pma, 256), (Task::Sfa, 256), (Task::Liver, 256), (Task::Cac, 96)] {
        for k in 0..2 {
            let t = roundtrip(task, 7, k, size);
            assert_eq!(t["task"], task.name());
        }
    }
}

#[test]
fn same_seed_same_series() {
    for (task, size) in [(Task::Sfa, 128), (Task::Cac, 64)] {
        let a = generate(task, 11, 3, Some(size));
        let b = generate(task, 11, 3, Some(size));
        assert_eq!(a.hu, b.hu);
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.value, b.value);
        let c = generate(task, 11, 4, Some(size));
        assert_ne!(a.hu, c.hu);
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = generate(Task::Pma, 5, 0, Some(128));
    let t1 = write_series(&tmp.path().join("a"), Task::Pma, 5, 0, &p).unwrap();
    let t2 = write_series(&tmp.path().join("b"), Task::Pma, 5, 0, &p).unwrap();
    assert_eq!(t1, t2);
    assert_eq!(
        fs::read(tmp.path().join("a/CT0001.dcm")).unwrap(),
        fs::read(tmp.path().join("b/CT0001.dcm")).unwrap()
    );
}

#[test]
fn thresholding_alone_fails_on_pma_and_sfa() {
    for task in [Task::Pma, Task::Sfa] {
        let mut rel = 0.0;
        let n = 6;
        for k in 0..n {
            let p = generate(task, 21, k, Some(192));
            let th = p.extra["threshold_area_cm2"].as_f64().unwrap();
            assert!(p.value > 0.0);
            rel += (th - p.value).abs() / p.value;
        }
        rel /= n as f64;
        assert!(rel > 0.5, "{task:?}: threshold area only {rel:.2} off the truth");
    }
}

#[test]
fn thresholding_alone_fails_on_cac() {
    for k in 0..3 {
        let p = generate(Task::Cac, 4, k, Some(64));
        let raw = p.extra["threshold_agatston"].as_f64().unwrap();
        assert!(raw > 10.0 * p.value.max(10.0), "raw {raw} vs truth {}", p.value);
    }
}

#[test]
fn npy_header_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("m.npy");
    write_npy_u8(&f, &[2, 3, 4], &[1; 24]).unwrap();
    let (shape, data) = read_npy(&f);
    assert_eq!(shape, vec![2, 3, 4]);
    assert_eq!(data.len(), 24);
}
