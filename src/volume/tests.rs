use std::path::{Path, PathBuf};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use super::*;

fn realct() -> Option<PathBuf> {
    crate::test_data::realct()
}

fn files(dir: &Path, filter: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| filter(p))
        .collect();
    v.sort();
    v
}

fn chest(root: &Path, ts: &str) -> PathBuf {
    let dir = root.join("chest-slice-encodings");
    files(&dir, |p| p.to_string_lossy().ends_with(&format!("_{ts}.dcm")))
        .pop()
        .unwrap_or_else(|| panic!("no chest slice in {ts}"))
}

#[test]
fn chest_lossless_encodings_decode_to_identical_hu_and_lossy_ones_close() {
    let Some(root) = realct() else { return };
    let reference = Volume::from_files(&[chest(&root, "1.2.840.10008.1.2")]).unwrap();
    assert_eq!(reference.hu.dim(), (1, 512, 512));
    assert!((reference.pixel_spacing[0] - 0.676).abs() < 0.01, "{:?}", reference.pixel_spacing);
    let (min, max) = reference.hu.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    // GE writes -2000 (→ -3024 HU) outside the reconstruction circle even
    // though its PixelPaddingValue says -32768.
    assert!(min >= -3024.0 && max > 500.0, "HU range {min}..{max}");
    for ts in [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
    ] {
        let v = Volume::from_files(&[chest(&root, ts)]).unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert_eq!(v.hu, reference.hu, "{ts} differs from implicit VR LE");
        assert_eq!(v.padding_voxels, reference.padding_voxels, "{ts}");
    }
    for (ts, max_tol, mean_tol) in [
        ("1.2.840.10008.1.2.4.50", 400.0, 30.0),
        // 12-bit DCT of a range rescaled to slope 2.0002442: measured
        // (pydicom on dcmdjpeg's output) max 35.6, mean 3.84 HU.
        ("1.2.840.10008.1.2.4.51", 50.0, 5.0),
        ("1.2.840.10008.1.2.4.81", 50.0, 10.0),
        ("1.2.840.10008.1.2.4.91", 400.0, 30.0),
    ] {
        let v = Volume::from_files(&[chest(&root, ts)]).unwrap_or_else(|e| panic!("{ts}: {e}"));
        let diff: Vec<f32> = v.hu.iter().zip(&reference.hu).map(|(a, b)| (a - b).abs()).collect();
        let max = diff.iter().copied().fold(0.0, f32::max);
        let mean = diff.iter().sum::<f32>() / diff.len() as f32;
        eprintln!("{ts}: max |ΔHU| {max}, mean |ΔHU| {mean:.3}");
        assert!(max <= max_tol && mean <= mean_tol, "{ts}: max {max} mean {mean}");
    }
}

/// JPEG Extended (.51, 12-bit DCT) decodes to DCMTK's HU. The reference is
/// the same file decompressed by `/usr/bin/dcmdjpeg` (DCMTK's own 12-bit IJG
/// build) and read through the uncompressed path, so both sides share the
/// modality LUT and differ only in the JPEG decoder. Both libjpeg-turbo and
/// IJG use the accurate integer IDCT by default, so the codecs should agree
/// to within one stored value (one RescaleSlope in HU); measured: identical
/// (max and mean |ΔHU| 0 on both files).
#[test]
fn jpeg_extended_12bit_matches_dcmtk_dcmdjpeg() {
    let Some(root) = realct() else { return };
    let dcmdjpeg = Path::new("/usr/bin/dcmdjpeg");
    if !dcmdjpeg.exists() {
        assert!(!crate::test_data::in_ci(), "DCMTK's dcmdjpeg is required under CI");
        eprintln!("skipping: no /usr/bin/dcmdjpeg");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (name, src, frames) in [
        ("chest .51", chest(&root, "1.2.840.10008.1.2.4.51"), 1),
        (
            "CT0012 (Enhanced CT, fragmented, no offset table)",
            root.join("wg04-single-slices/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"),
            2,
        ),
    ] {
        let reference_file = tmp.path().join(format!("ref-{frames}.dcm"));
        let out = std::process::Command::new(dcmdjpeg).arg(&src).arg(&reference_file).output().unwrap();
        assert!(out.status.success(), "dcmdjpeg {}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
        let reference = Volume::from_files(&[reference_file]).unwrap_or_else(|e| panic!("{name} reference: {e}"));
        let ours = Volume::from_files(&[src]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ours.hu.dim(), reference.hu.dim(), "{name}");
        assert_eq!(ours.hu.dim().0, frames, "{name}");
        let (min, max) = reference.hu.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        assert!(max - min > 1000.0, "{name}: reference HU range {min}..{max} is not a CT image");
        let diff: Vec<f32> = ours.hu.iter().zip(&reference.hu).map(|(a, b)| (a - b).abs()).collect();
        let max_diff = diff.iter().copied().fold(0.0, f32::max);
        let mean_diff = diff.iter().sum::<f32>() / diff.len() as f32;
        let step = ours.hu_step as f32;
        eprintln!(
            "{name}: {} voxels, HU step {step}, max |ΔHU| {max_diff}, mean |ΔHU| {mean_diff:.4} vs dcmdjpeg",
            diff.len()
        );
        assert!(max_diff <= step * 1.001, "{name}: max |ΔHU| {max_diff} above one stored step {step}");
        assert!(mean_diff <= 0.01 * step, "{name}: mean |ΔHU| {mean_diff}");
    }
}

#[test]
fn chest_undecodable_encodings_give_a_decode_error() {
    let Some(root) = realct() else { return };
    for ts in ["1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"] {
        match Volume::from_files(&[chest(&root, ts)]) {
            Err(e @ VolumeError::Decode { .. }) => {
                eprintln!("{ts}: {e}");
                assert!(e.to_string().contains(ts), "{e}");
                assert!(!e.is_retryable());
            }
            other => panic!("{ts}: expected a decode error, got {other:?}"),
        }
    }
}

#[test]
fn philips_head_unsigned_with_intercept_has_plausible_hu() {
    let Some(root) = realct() else { return };
    let paths = files(&root.join("head-philips/S2010"), |p| {
        p.file_name().unwrap().to_string_lossy().starts_with('I')
    });
    assert_eq!(paths.len(), 28); // I10..I280; SOURCES.md says 29 but DIRFILE is the 29th file
    let v = Volume::from_files(&paths).unwrap();
    assert_eq!(v.hu.dim(), (28, 512, 512));
    let spacing = v.spacing_mm.unwrap();
    assert!((spacing - 5.0).abs() < 0.1, "spacing {spacing}");
    assert!(v.slice_positions.windows(2).all(|w| w[1] > w[0]));
    // Reference values from pydicom (pixel_array * slope + intercept):
    // lowest slice I10 (z 696.21): min -1024, max 770, median of the central
    // 40x40 block 94; whole volume max 782.
    assert_eq!(v.positions[0][2], 696.21);
    let s0 = v.slice(0).unwrap();
    let mut centre: Vec<f32> = s0.slice(ndarray::s![236..276, 236..276]).iter().copied().collect();
    centre.sort_by(f32::total_cmp);
    assert_eq!((centre[799] + centre[800]) / 2.0, 94.0);
    let (min, max) = v.hu.iter().fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    assert_eq!((min, max), (-1024.0, 782.0));
    // Air around the phantom, some water-ish tissue inside.
    let corner = v.hu[[14, 5, 5]];
    assert!((-1024.0..=-900.0).contains(&corner), "corner {corner} HU");
    let tissue = v.hu.iter().filter(|x| (0.0..=80.0).contains(*x)).count();
    assert!(tissue > v.hu.len() / 400, "only {tissue} voxels in 0..80 HU");
    assert_eq!(v.sop_instance_uids.len(), 28);
}

#[test]
fn dicomdir_is_refused_not_crashed() {
    let Some(root) = realct() else { return };
    let e = Volume::from_files(&[root.join("head-philips/S2010/DIRFILE")]).unwrap_err();
    eprintln!("{e}");
}

#[test]
fn ge_abdomen_three_slices_assemble() {
    let Some(root) = realct() else { return };
    let mut paths = files(&root.join("abdomen-ge-3slice"), |_| true);
    paths.reverse(); // order must come from positions, not from the caller
    let v = Volume::from_files(&paths).unwrap();
    assert_eq!(v.slices(), 3);
    // 1.25 mm thick slices reconstructed every 1 mm.
    assert!((v.spacing_mm.unwrap() - 1.0).abs() < 0.01, "{:?}", v.spacing_mm);
    assert_eq!(v.slice_thickness, Some(1.25));
    let min = v.hu.iter().copied().fold(f32::MAX, f32::min);
    assert!(min >= PADDING_HU, "padding must not leak as {min} HU");
}

#[test]
fn tilted_ge_head_is_refused_with_gantry_tilt() {
    let Some(root) = realct() else { return };
    let paths = files(&root.join("head-ge-tilted"), |_| true);
    match Volume::from_files(&paths) {
        Err(VolumeError::GantryTilt { degrees }) => {
            assert!((15.0..=22.0).contains(&degrees), "{degrees}°")
        }
        other => panic!("expected GantryTilt, got {other:?}"),
    }
    // With the tilt check off, the uneven spacing is still caught.
    let opts = VolumeOptions {
        max_tilt_deg: 90.0,
        ..VolumeOptions::default()
    };
    match Volume::from_files_with(&paths, &opts) {
        Err(VolumeError::UnevenSpacing { min_mm, max_mm }) => {
            assert!(min_mm < 2.0 && max_mm > 5.0, "{min_mm}..{max_mm}")
        }
        other => panic!("expected UnevenSpacing, got {other:?}"),
    }
}

#[test]
fn siemens_without_uids_is_refused_clearly() {
    let Some(root) = realct() else { return };
    let paths = files(&root.join("abdomen-siemens-j2k"), |_| true);
    match Volume::from_files(&paths) {
        Err(VolumeError::MissingAttribute { attribute, .. }) => assert_eq!(attribute, "SOPInstanceUID"),
        other => panic!("expected MissingAttribute, got {other:?}"),
    }
}

/// A .51 frame cut short decodes in libjpeg with a warning and grey for the
/// missing rows; that must be a decode error, never a measurable image.
#[test]
fn truncated_jpeg_extended_frame_is_a_decode_error() {
    use dicom_core::value::{PixelFragmentSequence, Value};
    let Some(root) = realct() else { return };
    let src = chest(&root, "1.2.840.10008.1.2.4.51");
    let mut obj = crate::dicom::read::open_dicom(&src, crate::dicom::read::ReadDepth::Full).unwrap();
    let mut jpeg: Vec<u8> = obj.element(tags::PIXEL_DATA).unwrap().value().fragments().unwrap().concat();
    jpeg.truncate(jpeg.len() / 2);
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        Value::<InMemDicomObject, _>::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), vec![jpeg])),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cut.dcm");
    obj.write_to_file(&path).unwrap();
    match Volume::from_files(&[path]) {
        Err(e @ VolumeError::Decode { .. }) => {
            eprintln!("{e}");
            assert!(e.to_string().contains("1.2.840.10008.1.2.4.51"), "{e}");
            assert!(!e.is_retryable());
        }
        other => panic!("expected Decode, got {other:?}"),
    }
}

#[test]
fn wg04_j2k_slices_decode() {
    let Some(root) = realct() else { return };
    for name in ["CT1_J2KR.dcm", "CT2_J2KR.dcm"] {
        let v = Volume::from_files(&[root.join("wg04-single-slices").join(name)]).unwrap();
        assert_eq!(v.slices(), 1, "{name}");
    }
}

fn seq(items: Vec<InMemDicomObject>) -> DataSetSequence<InMemDicomObject> {
    DataSetSequence::from(items)
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A 3-frame Enhanced CT, frames stored in descending z, 2x2 pixels,
/// slope 2 intercept -1000 in the shared group.
pub(crate) fn write_enhanced(path: &Path, z: [f64; 3]) {
    // Frame f holds stored values 100*f + 0..4.
    let pixels: Vec<u16> = (0..3u16).flat_map(|f| (0..4u16).map(move |i| 100 * f + i)).collect();
    let pixel_data = DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into()));
    enhanced_object(&z, 2, 2, 16, pixel_data)
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .unwrap()
        .write_to_file(path)
        .unwrap();
}

/// An Enhanced CT object of `z.len()` frames of `rows` x `cols` at `bits`
/// (12 stored when 16 allocated), one frame per z, rescaled 2x - 1000.
fn enhanced_object(
    z: &[f64],
    rows: u16,
    cols: u16,
    bits: u16,
    pixel_data: DataElement<InMemDicomObject>,
) -> InMemDicomObject {
    let ds = |v: &str| PrimitiveValue::from(v);
    let shared = item(vec![
        DataElement::new(
            tags::PLANE_ORIENTATION_SEQUENCE,
            VR::SQ,
            seq(vec![item(vec![DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds("1\\0\\0\\0\\1\\0"))])]),
        ),
        DataElement::new(
            tags::PIXEL_MEASURES_SEQUENCE,
            VR::SQ,
            seq(vec![item(vec![
                DataElement::new(tags::PIXEL_SPACING, VR::DS, ds("0.5\\0.5")),
                DataElement::new(tags::SLICE_THICKNESS, VR::DS, ds("2")),
            ])]),
        ),
        DataElement::new(
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            VR::SQ,
            seq(vec![item(vec![
                DataElement::new(tags::RESCALE_SLOPE, VR::DS, ds("2")),
                DataElement::new(tags::RESCALE_INTERCEPT, VR::DS, ds("-1000")),
            ])]),
        ),
    ]);
    let per_frame: Vec<InMemDicomObject> = z
        .iter()
        .map(|z| {
            item(vec![DataElement::new(
                tags::PLANE_POSITION_SEQUENCE,
                VR::SQ,
                seq(vec![item(vec![DataElement::new(
                    tags::IMAGE_POSITION_PATIENT,
                    VR::DS,
                    ds(&format!("-10\\-10\\{z}")),
                )])]),
            )])
        })
        .collect();
    let stored = if bits == 16 { 12u16 } else { bits };
    InMemDicomObject::from_element_iter(vec![
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, ds(uids::ENHANCED_CT_IMAGE_STORAGE)),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, ds("1.2.3.4.5")),
        DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, ds("1.2.3")),
        DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, ds("1.2.3.4")),
        DataElement::new(tags::IMAGE_TYPE, VR::CS, ds("ORIGINAL\\PRIMARY\\AXIAL")),
        DataElement::new(tags::MODALITY, VR::CS, ds("CT")),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, ds("MONOCHROME2")),
        DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, ds(&z.len().to_string())),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(rows)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(cols)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(bits)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(stored)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(stored - 1)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, VR::SQ, seq(vec![shared])),
        DataElement::new(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, VR::SQ, seq(per_frame)),
        pixel_data,
    ])
}

#[test]
fn enhanced_ct_frames_are_sorted_and_rescaled_per_functional_groups() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enh.dcm");
    write_enhanced(&p, [10.0, 6.0, 2.0]);
    let v = Volume::from_files(&[p]).unwrap();
    assert_eq!(v.hu.dim(), (3, 2, 2));
    assert_eq!(v.slice_positions, vec![2.0, 6.0, 10.0]);
    // Lowest z is frame 3 (stored 200..203) → 2*200-1000 = -600.
    assert_eq!(v.frame_numbers, vec![Some(3), Some(2), Some(1)]);
    assert_eq!(v.hu[[0, 0, 0]], -600.0);
    assert_eq!(v.hu[[2, 1, 1]], -994.0);
    assert_eq!(v.pixel_spacing, [0.5, 0.5]);
    assert_eq!(v.slice_thickness, Some(2.0));
    assert_eq!(v.spacing_mm, Some(4.0));
    assert_eq!(v.select(&SliceSelection::Middle).unwrap(), 1);
    assert_eq!(v.select(&SliceSelection::ZMm(9.0)).unwrap(), 2);
    assert!(v.select(&SliceSelection::ZMm(20.0)).is_err());
    assert!(v.select(&SliceSelection::Single).is_err());
    assert!(v.select(&SliceSelection::Index(3)).is_err());
    // 2x2 pixels of air: no trachea, so no arch; the refusal says so.
    assert!(matches!(v.select(&SliceSelection::AboveAorticArch), Err(VolumeError::Landmark(_))));
    // One image: that image, as with `single`.
    let one = Volume {
        hu: v.hu.slice(ndarray::s![0..1, .., ..]).to_owned(),
        ..v.clone()
    };
    assert_eq!(one.select(&SliceSelection::AboveAorticArch).unwrap(), 0);
    // The level is found once per volume, and a clone (a volume with other
    // HU in the making) does not inherit it.
    assert!(v.arch.0.get().is_some());
    assert!(one.arch.0.get().is_none());
}

#[test]
fn enhanced_ct_with_uneven_frames_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enh.dcm");
    write_enhanced(&p, [0.0, 1.0, 5.0]);
    assert!(matches!(Volume::from_files(&[p]), Err(VolumeError::UnevenSpacing { .. })));
}

#[test]
fn modality_lut_masks_and_sign_extends() {
    // 12 bits stored, signed: 0x0FFF is -1; garbage in the high bits ignored.
    let bytes: Vec<u8> = [0xF_FFFu16, 0x0800, 0x07FF, 0x0005]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let (hu, pad) = to_hu(&bytes, 16, 12, true, 1.0, 0.0, Some((-2048, -2048)));
    assert_eq!(hu, vec![-1.0, PADDING_HU, 2047.0, 5.0]);
    assert_eq!(pad, 1);
    let (hu, _) = to_hu(&bytes, 16, 12, false, 1.0, -1024.0, None);
    assert_eq!(hu, vec![4095.0 - 1024.0, 2048.0 - 1024.0, 2047.0 - 1024.0, 5.0 - 1024.0]);
}

/// The rule `to_hu` implements, one pixel at a time as it was first written:
/// the vectorised pass must give the same bits for every stored value.
#[test]
fn to_hu_matches_the_scalar_rule_on_every_value() {
    fn scalar(raw: u32, bits_stored: u32, signed: bool, slope: f64, intercept: f64, padding: Option<(i32, i32)>) -> (f32, bool) {
        let v = raw & ((1u32 << bits_stored) - 1);
        let s = if signed && v & (1u32 << (bits_stored - 1)) != 0 { v as i32 - (1i32 << bits_stored) } else { v as i32 };
        match padding {
            Some((lo, hi)) if (lo..=hi).contains(&s) => (PADDING_HU, true),
            _ => ((s as f64 * slope + intercept) as f32, false),
        }
    }
    let all16: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_ne_bytes()).collect();
    let all8: Vec<u8> = (0..=u8::MAX).collect();
    let rescales = [(1.0, -1024.0), (1.0, 0.0), (0.5, -1000.25), (2.7, 13.1), (1e-3, -3e4)];
    let paddings = [None, Some((-2000, -2000)), Some((0, 0)), Some((-32768, -1001)), Some((5, 1))];
    for (bits_allocated, bytes) in [(16u32, &all16), (8, &all8)] {
        for bits_stored in [1, 7, 8, 12, 15, 16].into_iter().filter(|b| *b <= bits_allocated) {
            for signed in [false, true] {
                for &(slope, intercept) in &rescales {
                    for &padding in &paddings {
                        let (hu, pads) = to_hu(bytes, bits_allocated, bits_stored, signed, slope, intercept, padding);
                        let mut want_pads = 0;
                        for (i, got) in hu.iter().enumerate() {
                            let (want, pad) = scalar(i as u32, bits_stored, signed, slope, intercept, padding);
                            want_pads += pad as usize;
                            assert_eq!(got.to_bits(), want.to_bits(), "raw {i}, {bits_allocated}/{bits_stored} signed {signed}");
                        }
                        assert_eq!(pads, want_pads, "{bits_allocated}/{bits_stored} signed {signed} {padding:?}");
                    }
                }
            }
        }
    }
}

/// Rows × Columns × NumberOfFrames from a hostile header: 65536 × 32768 ×
/// 2 bytes × 2^32 frames is 2^64, which wrapped to 0 in release builds, so
/// 24 bytes of pixel data passed the length check and slicing the first
/// frame panicked (an overflow panic in the `dicom_file` fuzz target).
#[test]
fn a_pixel_data_size_that_overflows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enh.dcm");
    write_enhanced(&p, [10.0, 6.0, 2.0]);
    let mut f = dicom_object::open_file(&p).unwrap();
    f.put(DataElement::new(tags::ROWS, VR::IS, PrimitiveValue::from("65536")));
    f.put(DataElement::new(tags::COLUMNS, VR::IS, PrimitiveValue::from("32768")));
    f.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("4294967296")));
    f.write_to_file(&p).unwrap();
    match Volume::from_files(&[p]) {
        Err(VolumeError::Unsupported { reason, .. }) => {
            assert!(reason.contains("more pixel data than memory can hold"), "{reason}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// Sizes a few bytes can claim, refused before a decoder allocates (or
/// spends its time on) what they describe: 65535 x 65535 x 16-bit (8 GiB),
/// and 17 frames of 4096 x 4096 x 8-bit (285 MB decoded, 1.1 GiB of f32 HU)
/// from 24 bytes of Pixel Data.
#[test]
fn a_pixel_data_size_past_the_decode_budget_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enh.dcm");
    for (rows, cols, frames, bits, says) in [
        (65535u16, 65535u16, 3u32, 16u16, "more than the 4096 rows or columns"),
        (4096, 4097, 1, 16, "more than the 4096 rows or columns"),
        (4096, 4096, 17, 8, "Pixel Data holds 24 bytes, the image needs 285212672"),
    ] {
        write_enhanced(&p, [10.0, 6.0, 2.0]);
        let mut f = dicom_object::open_file(&p).unwrap();
        f.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(rows)));
        f.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(cols)));
        f.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from(frames.to_string())));
        f.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(bits)));
        f.put(DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(bits)));
        f.write_to_file(&p).unwrap();
        match Volume::from_files(std::slice::from_ref(&p)) {
            Err(VolumeError::Unsupported { reason, .. }) => assert!(reason.contains(says), "{reason}"),
            other => panic!("{rows}x{cols}x{frames}: expected Unsupported, got {other:?}"),
        }
    }
}

/// The volume budget counts the voxels of every file of the series, single
/// frame or multi-frame, and refuses the file that would pass it before it
/// is decoded: a budget of exactly the series' voxels reads it, one voxel
/// less refuses it, naming the file and the sizes.
#[test]
fn the_volume_budget_counts_every_file_and_refuses_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, z) in [[10.0, 6.0, 2.0], [22.0, 18.0, 14.0]].iter().enumerate() {
        let p = dir.path().join(format!("enh{i}.dcm"));
        write_enhanced(&p, *z);
        let mut f = dicom_object::open_file(&p).unwrap();
        f.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(format!("1.2.3.4.5.{i}"))));
        f.write_to_file(&p).unwrap();
        paths.push(p);
    }
    // 2 files x 3 frames x 2 x 2 pixels.
    let opts = |max_voxels| VolumeOptions { max_voxels, ..Default::default() };
    let v = Volume::from_files_with(&paths, &opts(24)).unwrap();
    assert_eq!(v.hu.dim(), (6, 2, 2));
    match Volume::from_files_with(&paths, &opts(23)) {
        Err(e @ VolumeError::TooLarge { voxels: 24, limit: 23, .. }) => {
            assert!(e.to_string().contains("enh1.dcm"), "the file past the budget is named: {e}");
            assert!(e.to_string().contains("jobs.max_volume_mb"), "{e}");
            assert!(!e.is_retryable());
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match Volume::from_files_with(&paths[..1], &opts(11)) {
        Err(VolumeError::TooLarge { voxels: 12, limit: 11, .. }) => {}
        other => panic!("one multi-frame file past the budget: expected TooLarge, got {other:?}"),
    }
}

/// A series read by several threads (`read_all_parallel`) gives the frames
/// one reader gives, in the same order; past the budget it reads again in
/// order, so the error names the same file with the same count whatever
/// thread got there first.
#[test]
fn files_read_side_by_side_give_what_one_reader_gives_and_the_same_budget_error() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..20)
        .map(|i| {
            let p = dir.path().join(format!("enh{i:02}.dcm"));
            let z0 = 100.0 - 12.0 * i as f64;
            write_enhanced(&p, [z0, z0 - 4.0, z0 - 8.0]);
            let mut f = dicom_object::open_file(&p).unwrap();
            f.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(format!("1.2.3.4.5.{i}"))));
            f.write_to_file(&p).unwrap();
            p
        })
        .collect();
    let opts = VolumeOptions::default();
    let one = read_all(&paths, &opts).unwrap();
    let side_by_side = read_all_parallel(&paths, &opts, 3).expect("no file fails");
    assert_eq!(one.len(), 60);
    assert_eq!(side_by_side.len(), one.len());
    for (a, b) in one.iter().zip(&side_by_side) {
        assert_eq!((&a.sop_instance_uid, a.frame_number, a.position), (&b.sop_instance_uid, b.frame_number, b.position));
        assert_eq!(a.hu, b.hu);
    }
    assert_eq!(Volume::from_files_with(&paths, &opts).unwrap().slices(), 60);

    // 12 voxels a file: 13 files fit in 161, the 14th (enh13) passes it.
    let small = VolumeOptions { max_voxels: 161, ..Default::default() };
    assert!(read_all_parallel(&paths, &small, 3).is_none());
    for _ in 0..5 {
        match Volume::from_files_with(&paths, &small) {
            Err(e @ VolumeError::TooLarge { voxels: 168, limit: 161, .. }) => {
                assert!(e.to_string().contains("enh13.dcm"), "{e}")
            }
            other => panic!("expected TooLarge at enh13, got {other:?}"),
        }
    }
}

/// Compressed pixel data may not describe far more image than it holds: 70
/// frames of 512 x 512 (18 M pixels, 36 MB decoded) in 70 fragments of 64
/// bytes is refused before the RLE decoder sizes its output from the header.
/// The same frames with fragments of a plausible size pass this check (and
/// then fail to decode, being zeros, which is a decode error).
#[test]
fn compressed_pixel_data_that_would_expand_past_the_limit_is_refused_before_decoding() {
    use dicom_core::value::{PixelFragmentSequence, Value};
    let dir = tempfile::tempdir().unwrap();
    let z: Vec<f64> = (0..70).map(f64::from).collect();
    let write = |fragment_len: usize| {
        let fragments = vec![vec![0u8; fragment_len]; z.len()];
        let pixel_data = DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            Value::<InMemDicomObject, _>::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), fragments)),
        );
        let p = dir.path().join(format!("rle-{fragment_len}.dcm"));
        enhanced_object(&z, 512, 512, 16, pixel_data)
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::RLE_LOSSLESS))
            .unwrap()
            .write_to_file(&p)
            .unwrap();
        p
    };
    match Volume::from_files(&[write(64)]) {
        Err(VolumeError::Unsupported { reason, .. }) => {
            assert!(reason.contains("4480 bytes of compressed pixel data cannot hold 36700160 bytes"), "{reason}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    match Volume::from_files(&[write(1024)]) {
        Err(VolumeError::Decode { .. }) => {}
        other => panic!("expected a decode error past the size check, got {other:?}"),
    }
}

/// An Enhanced CT object of more than 2^28 pixels (1025 frames of 512 x 512,
/// which the former per-file limit refused) is read whole within the default
/// volume budget, every frame in place.
#[test]
fn an_enhanced_ct_of_1025_frames_of_512_squared_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.dcm");
    let z: Vec<f64> = (0..1025).map(|k| f64::from(k) * 0.5).collect();
    let plane = 512 * 512;
    // Frame k is filled with k % 251: stored values tell the frames apart.
    let pixels: Vec<u8> = (0..z.len()).flat_map(|k| std::iter::repeat_n((k % 251) as u8, plane)).collect();
    assert!(pixels.len() as u64 > 1 << 28);
    let pixel_data = DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(pixels.into()));
    enhanced_object(&z, 512, 512, 8, pixel_data)
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .unwrap()
        .write_to_file(&p)
        .unwrap();
    let v = Volume::from_files(&[p]).unwrap();
    assert_eq!(v.hu.dim(), (1025, 512, 512));
    assert_eq!(v.spacing_mm, Some(0.5));
    for k in [0usize, 1, 511, 1024] {
        let want = 2.0 * (k % 251) as f32 - 1000.0;
        let s = v.slice(k).unwrap();
        assert!(s.iter().all(|h| *h == want), "frame {k}: {} != {want}", s[[0, 0]]);
    }
}

/// Every compressed syntax of the real chest slice, with Rows and Columns
/// rewritten to 64 while the codestream stays 512 x 512: the codecs would
/// decode 512 x 512 and the first 64 x 64 samples would pass for the image.
/// The frame header is read first and the object refused, and the same slice
/// with its true Rows and Columns still decodes. (The `dicom_file` fuzz
/// target's timeout was this with an 8 x 8 dataset and a 25608 x 24930 JPEG.)
#[test]
fn a_codestream_larger_than_rows_and_columns_is_refused_before_decoding() {
    let Some(root) = realct() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for ts in ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"] {
        let src = chest(&root, ts);
        assert!(Volume::from_files(std::slice::from_ref(&src)).is_ok(), "{ts}: the slice as sent decodes");
        let mut obj = crate::dicom::read::open_dicom(&src, crate::dicom::read::ReadDepth::Full).unwrap();
        obj.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(64u16)));
        obj.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(64u16)));
        let path = tmp.path().join(format!("{ts}.dcm"));
        obj.write_to_file(&path).unwrap();
        match Volume::from_files(&[path]) {
            Err(VolumeError::Decode { message, transfer_syntax, .. }) => {
                assert!(transfer_syntax.contains(ts), "{transfer_syntax}");
                assert!(message.contains("the codestream is 512x512, the dataset says 64x64"), "{ts}: {message}");
            }
            other => panic!("{ts}: expected Decode, got {other:?}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 8);
}
