use super::*;
use crate::volume::Volume;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use ndarray::Array3;
use std::path::{Path, PathBuf};

fn card(name: &str) -> ModelCard {
    ModelCard::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("models/{name}.yaml"))).unwrap()
}

fn shared(rel: &str) -> Option<PathBuf> {
    crate::test_data::require(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel), rel)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v
}

/// A chest CT header as the phantoms and real scanners write it.
fn chest_header() -> HeaderFacts {
    HeaderFacts {
        acquisition: Acquisition {
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            body_part_examined: Some("CHEST".into()),
            kvp: Some(120.0),
            ..Default::default()
        },
        pixel_spacing: Some([0.7, 0.7]),
        slice_thickness: Some(2.5),
        normal_z: Some(1.0),
    }
}

fn refused(r: Result<(), Refusal>) -> (Check, String) {
    let e = r.unwrap_err();
    (e.check, e.to_string())
}

#[test]
fn header_checks_name_the_check_and_the_measured_value() {
    let pma = card("pma");
    let v = pma.validated_input.as_ref().unwrap();
    assert_eq!(check_header(v, &chest_header()), Ok(()));

    let mut h = chest_header();
    h.slice_thickness = Some(7.0);
    assert_eq!(
        refused(check_header(v, &h)),
        (
            Check::SliceThickness,
            "slice thickness 7.0 mm is outside the model's validated 0.5-5.0 mm (check: slice_thickness)".into()
        )
    );
    let mut h = chest_header();
    h.pixel_spacing = Some([0.45, 0.45]);
    assert_eq!(refused(check_header(v, &h)).0, Check::PixelSpacing);
    let mut h = chest_header();
    h.acquisition.kvp = Some(70.0);
    assert_eq!(refused(check_header(v, &h)).0, Check::Kvp);
    let mut h = chest_header();
    h.acquisition.body_part_examined = Some("HEAD".into());
    assert_eq!(refused(check_header(v, &h)).0, Check::BodyPart);
    let mut h = chest_header();
    h.acquisition.image_type.push("LOCALIZER".into());
    assert_eq!(refused(check_header(v, &h)).0, Check::ImageType);
    let mut h = chest_header();
    h.normal_z = Some(0.0);
    assert_eq!(refused(check_header(v, &h)).0, Check::Orientation);
    // A contrast agent: any for PMA, refused for CAC.
    let mut h = chest_header();
    h.acquisition.contrast_bolus_agent = Some("IV".into());
    assert_eq!(check_header(v, &h), Ok(()));
    let cac = card("cac");
    assert_eq!(refused(check_header(cac.validated_input.as_ref().unwrap(), &h)).0, Check::Contrast);
    // Not stated is unknown, and passes.
    let mut h = chest_header();
    h.acquisition = Acquisition::default();
    h.slice_thickness = None;
    assert_eq!(check_header(v, &h), Ok(()));
    assert_eq!(check_header(cac.validated_input.as_ref().unwrap(), &h), Ok(()));
}

#[test]
fn a_card_without_the_sections_is_not_checked() {
    let mut c = card("pma");
    c.validated_input = None;
    c.validated_output = None;
    let vol = noise_volume(1);
    assert_eq!(check_input(&c, &vol, &[0]), Ok(()));
    assert!(check_input(&card("pma"), &vol, &[0]).is_err());
}

/// Deterministic uniform "HU" in -1024..1500 (no scanner makes this).
fn noise_volume(slices: usize) -> Volume {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let hu = Array3::from_shape_fn((slices, 128, 128), |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        -1024.0 + (x % 2524) as f32
    });
    Volume::test_stack(hu, [0.7, 0.7], 2.5)
}

#[test]
fn hu_calibration_refuses_noise_and_a_shifted_scale() {
    let v = card("pma").validated_input.unwrap();
    let (check, text) = refused(check_pixels(&v, &noise_volume(1), &[0]));
    assert_eq!(check, Check::HuAir, "{text}");
    // Air and fat where a calibrated scanner puts them pass the HU checks
    // (and then fail the level: no lungs in a block of air and fat).
    let mut vol = noise_volume(1);
    vol.hu.indexed_iter_mut().for_each(|((_, r, c), v)| *v = if r < 64 { -1000.0 + (c % 7) as f32 } else { -100.0 + (c % 9) as f32 });
    assert_eq!(refused(check_pixels(&v, &vol, &[0])).0, Check::Level);
    // The same image 150 HU off (a miscalibrated or mis-rescaled series).
    vol.hu.mapv_inplace(|x| x + 150.0);
    let (check, text) = refused(check_pixels(&v, &vol, &[0]));
    assert_eq!(check, Check::HuAir, "{text}");
    // Too few voxels in a window: the peak is missing.
    let p = hu_peak([-1000.0f32; 10].into_iter(), [-1100.0, -900.0]);
    assert_eq!((p.voxels, p.mode_hu), (10, -997.5));
}

/// `chest-lungmask` lacks HighBit and Modality (stripped by its source);
/// the pixels are untouched.
fn repaired_copy(src: &Path, dir: &Path) -> PathBuf {
    let mut obj = dicom_object::open_file(src).unwrap();
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")));
    let out = dir.join(src.file_name().unwrap());
    obj.write_to_file(&out).unwrap();
    out
}

#[test]
fn real_slices_at_the_heart_and_the_neck_are_refused_and_the_slice_above_the_arch_passes() {
    let v = card("pma").validated_input.unwrap();
    if let Some(lm) = shared("realct-labelled/chest-lungmask") {
        let d = tempfile::tempdir().unwrap();
        for f in ["0.dcm", "1.dcm"] {
            let vol = Volume::from_files(&[repaired_copy(&lm.join(f), d.path())]).unwrap();
            let (check, text) = refused(check_pixels(&v, &vol, &[0]));
            assert_eq!(check, Check::Level, "{f}: {text}");
            assert!(text.contains("heart level"), "{text}");
        }
    }
    if let Some(root) = crate::test_data::realct() {
        // The "chest" slice in shared/realct is at the larynx: no lungs.
        let p = root.join("chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm");
        let vol = Volume::from_files(&[p]).unwrap();
        assert_eq!(refused(check_pixels(&v, &vol, &[0])).0, Check::Level);
        // A head CT is refused from its header.
        let head: Vec<PathBuf> = std::fs::read_dir(root.join("head-philips/S2010"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.ends_with("DIRFILE"))
            .collect();
        let vol = Volume::from_files(&head).unwrap();
        assert_eq!(refused(check_input(&card("pma"), &vol, &[vol.slices() / 2])).0, Check::BodyPart);
    }
    if let Some(dir) = shared("realct-labelled/chest-lidc0001/ct") {
        let vol = Volume::from_files(&files(&dir)).unwrap();
        let i = crate::volume::landmark::above_aortic_arch(&vol).unwrap().index;
        for name in ["pma", "sfa"] {
            assert_eq!(check_input(&card(name), &vol, &[i]), Ok(()), "{name}");
        }
        // 80 mm below the arch, at the heart.
        let heart = vol.positions.iter().position(|p| (p[2] - (vol.positions[i][2] - 90.0)).abs() < 1.3).unwrap();
        assert_eq!(refused(check_input(&card("pma"), &vol, &[heart])).0, Check::Level);
    }
}

#[test]
fn phantoms_pass_every_input_check() {
    use crate::phantom::{generate, write_series, Task};
    let d = tempfile::tempdir().unwrap();
    for (task, model) in [(Task::Pma, "pma"), (Task::Sfa, "sfa"), (Task::Liver, "liver"), (Task::Cac, "cac")] {
        for k in 0..if task == Task::Cac { 2 } else { 6 } {
            let dir = d.path().join(format!("{}-{k}", task.name()));
            std::fs::create_dir_all(&dir).unwrap();
            write_series(&dir, task, 7, k, &generate(task, 7, k, None)).unwrap();
            let vol = Volume::from_files(&files(&dir)).unwrap();
            let idx: Vec<usize> = (0..vol.slices()).collect();
            assert_eq!(check_input(&card(model), &vol, &idx), Ok(()), "{model} phantom {k}");
        }
    }
}

fn measurement(value: f64, map: Array3<f32>, candidates: Array3<bool>) -> Measurement {
    Measurement {
        value,
        unit: "cm2".into(),
        risk_category: None,
        lesions: vec![],
        map,
        candidates,
        model: "m".into(),
        model_version: "1".into(),
        execution_provider: "cpu",
        volume: None,
    }
}

#[test]
fn output_checks_refuse_an_implausible_value_and_a_map_outside_the_candidates() {
    let pma = card("pma");
    let cand = Array3::from_shape_fn((1, 100, 100), |(_, r, _)| r < 50);
    let inside = Array3::from_shape_fn((1, 100, 100), |(_, r, _)| if r < 50 { 0.9 } else { 0.1 });
    assert_eq!(check_output(&pma, &measurement(20.0, inside.clone(), cand.clone()), 1.0), Ok(()));
    let (check, text) = refused(check_output(&pma, &measurement(400.0, inside, cand.clone()), 1.0));
    assert_eq!(check, Check::OutputValue, "{text}");
    // 99.5% of the map >= 0.5 outside the candidates (PMA allows 99%).
    let lost = Array3::from_shape_fn((1, 100, 100), |(_, r, c)| if r >= 50 || (r == 0 && c < 25) { 0.9 } else { 0.0 });
    let (check, text) = refused(check_output(&pma, &measurement(20.0, lost.clone(), cand.clone()), 1.0));
    assert_eq!(check, Check::OutputMapMass, "{text}");
    // Too little map to judge (below min_map_mass_mm2).
    assert_eq!(check_output(&pma, &measurement(20.0, lost, cand.clone()), 0.001), Ok(()));
    // A model without a map (direct) has no map check.
    assert_eq!(
        check_output(&pma, &measurement(20.0, Array3::zeros((0, 0, 0)), Array3::from_elem((0, 0, 0), false)), 1.0),
        Ok(())
    );
}

#[test]
fn a_non_contrast_card_refuses_a_heart_full_of_opacified_blood() {
    let cac = card("cac");
    assert_eq!(check_opacified_blood(&cac, Some(0.0)), Ok(()));
    assert_eq!(check_opacified_blood(&cac, None), Ok(()));
    let (check, text) = refused(check_opacified_blood(&cac, Some(28.4)));
    assert_eq!(check, Check::Contrast);
    assert!(text.contains("28.4 cm2"), "{text}");
    // A card validated on any phase does not look.
    assert_eq!(check_opacified_blood(&card("liver"), Some(28.4)), Ok(()));
}
