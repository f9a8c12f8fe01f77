//! DICOM Segmentation (1.2.840.10008.5.1.4.1.1.66.4, PS3.3 A.51) of one
//! result's localization: one segment, one frame per source slice the
//! model saw, in the source study and Frame of Reference, in a new series.
//!
//! Input: the [`ReportContext`], the source slices' geometry
//! ([`SegGeometry`], read from their headers), the model card (segment
//! codes, BINARY or FRACTIONAL) and the measurement (map and candidates).
//! Output: one `FileDicomObject`, and [`SegReference`] for the SR.
//!
//! Invariants:
//! - The segment is the node's own mask ([`node_mask`]): what the biomarker
//!   counts. Area cards: candidates with map >= the card's threshold
//!   (BINARY) or the map inside the candidates (FRACTIONAL, 0..=255).
//!   Agatston cards: the pixels of the lesions that count.
//! - Frame k is source slice k (`ctx.source_refs[k]`): per-frame Derivation
//!   Image, Plane Position copied from that slice; Dimension Index Values
//!   (segment number, k + 1).
//! - BINARY Pixel Data is 1 bit per pixel, frames packed back to back with
//!   no padding between them (PS3.5 8.1.1), LSB first.
//! - UIDs from [`ReportContext::uid`]: a rebuild is byte-identical.
//!
//! Failures: [`ReportError`] (shape mismatch, missing geometry, bad codes).

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use ndarray::{Array3, Axis};

use super::content::Code;
use super::{
    da, put_equipment, put_patient_and_study, put_sop_common, seq_elem, with_meta, sop_ref, source_image_ref, source_text, str_elem, tm,
    ReportContext, ReportError,
};
use crate::biomarkers::Measurement;
use crate::dicom::Uid;
use crate::inference::card::{ModelCard, SegmentationType};
use crate::volume::label::label8;

pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// Series Number of the SEG series in the source study (SR 9901, SC 9902).
pub const SEG_SERIES_NUMBER: i32 = 9903;
/// The one segment each SEG has.
pub const SEGMENT_NUMBER: u16 = 1;
pub const MAX_FRACTIONAL_VALUE: u8 = 255;

/// CID 7203 Image Derivation.
const SEGMENTATION_DERIVATION: Code = Code::fixed("113076", "DCM", "Segmentation");
/// CID 7150 default category, when the card has none.
const ANATOMICAL_STRUCTURE: Code = Code::fixed("91723000", "SCT", "Anatomical Structure");
/// CID 7162 default algorithm family.
const ARTIFICIAL_INTELLIGENCE: Code = Code::fixed("123110", "DCM", "Artificial Intelligence");

/// Geometry of the source slices, copied as the sources wrote it (DS text),
/// so the SEG's planes are exactly theirs.
#[derive(Debug, Clone, PartialEq)]
pub struct SegGeometry {
    pub frame_of_reference_uid: Uid,
    /// Image Orientation (Patient), six DS values joined by `\`.
    pub orientation: String,
    /// Pixel Spacing, two DS values.
    pub pixel_spacing: String,
    pub slice_thickness: Option<String>,
    /// Image Position (Patient) of each source slice, in `source_refs` order.
    pub positions: Vec<String>,
}

impl SegGeometry {
    /// From the headers of the source slices, in slice order.
    pub fn from_headers(headers: &[InMemDicomObject]) -> Result<SegGeometry, ReportError> {
        let first = headers.first().ok_or(ReportError::NoSources)?;
        // DS values as the sources wrote them, unless one is longer than DS
        // allows (`fit_ds_text`).
        let need = |o: &InMemDicomObject, tag: Tag, attribute: &'static str| {
            source_text(o, tag).ok_or(ReportError::MissingSource { attribute })
        };
        let ds = |o: &InMemDicomObject, tag: Tag, attribute: &'static str| {
            need(o, tag, attribute).map(|t| super::content::fit_ds_text(&t))
        };
        let for_raw = need(first, tags::FRAME_OF_REFERENCE_UID, "FrameOfReferenceUID")?;
        let frame_of_reference_uid = Uid::parse(&for_raw).map_err(|source| ReportError::BadUid {
            what: "FrameOfReferenceUID",
            source,
        })?;
        let orientation = ds(first, tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient")?;
        let pixel_spacing = ds(first, tags::PIXEL_SPACING, "PixelSpacing")?;
        let positions = headers
            .iter()
            .map(|h| ds(h, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient"))
            .collect::<Result<Vec<_>, _>>()?;
        for h in headers {
            // One plane orientation shared by every frame: the sources must
            // agree, or the Shared Functional Group would lie.
            if ds(h, tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient")? != orientation {
                return Err(ReportError::Shape {
                    what: "source slices differ in ImageOrientationPatient".into(),
                });
            }
        }
        Ok(SegGeometry {
            frame_of_reference_uid,
            orientation,
            pixel_spacing,
            slice_thickness: source_text(first, tags::SLICE_THICKNESS).map(|t| super::content::fit_ds_text(&t)),
            positions,
        })
    }
}

/// What the SR needs to point at the segment (TID 1411 Referenced Segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegReference {
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
    /// The SEG's own series, for the SR's evidence.
    pub series_uid: Uid,
    pub segment_number: u16,
    /// The source series (TID 1411 row 12, Source series for segmentation).
    pub source_series_uid: Uid,
}

/// The node's own mask `[S,R,C]`: 0/1 for BINARY, 0..=255 for FRACTIONAL.
pub fn node_mask(card: &ModelCard, m: &Measurement) -> Result<Array3<u8>, ReportError> {
    if m.map.dim() != m.candidates.dim() {
        return Err(ReportError::Shape {
            what: format!("map {:?}, candidates {:?}", m.map.dim(), m.candidates.dim()),
        });
    }
    let seg = &card.segmentation;
    if card.is_agatston() && seg.kind == SegmentationType::Binary {
        // The score counts whole lesions, not pixels: relabel each slice's
        // candidates the way `cac_lesions` numbered its kept components
        // (8-connected, raster order) and keep the counted ones.
        let mut out = Array3::<u8>::zeros(m.candidates.dim());
        for (s, cand) in m.candidates.axis_iter(Axis(0)).enumerate() {
            let counted: Vec<u32> = m
                .lesions
                .iter()
                .filter(|l| l.counted && l.lesion.slice == s)
                .map(|l| l.lesion.label)
                .collect();
            if counted.is_empty() {
                continue;
            }
            let (labels, _) = label8(cand);
            out.index_axis_mut(Axis(0), s)
                .zip_mut_with(&labels, |o, &l| *o = counted.contains(&l) as u8);
        }
        return Ok(out);
    }
    let threshold = seg.threshold as f32;
    let mut out = Array3::<u8>::zeros(m.map.dim());
    ndarray::Zip::from(&mut out)
        .and(&m.map)
        .and(&m.candidates)
        .for_each(|o, &v, &c| {
            *o = match (c, seg.kind) {
                (false, _) => 0,
                (true, SegmentationType::Binary) => (v >= threshold) as u8,
                (true, SegmentationType::Fractional) => {
                    (v.clamp(0.0, 1.0) * MAX_FRACTIONAL_VALUE as f32).round() as u8
                }
            };
        });
    Ok(out)
}

/// 1 bit per pixel, LSB first, every frame back to back (PS3.5 8.1.1),
/// padded to an even length.
pub fn pack_bits(mask: &Array3<u8>) -> Vec<u8> {
    let n = mask.len();
    let mut out = vec![0u8; n.div_ceil(8)];
    for (i, &v) in mask.iter().enumerate() {
        if v != 0 {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    if out.len() % 2 == 1 {
        out.push(0);
    }
    out
}

fn us(tag: Tag, v: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(v))
}

fn at(tag: Tag, value: Tag) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::AT, PrimitiveValue::Tags(vec![value].into()))
}

fn card_code(
    c: &Option<crate::inference::card::Code>,
    default: Code,
) -> Result<Code, ReportError> {
    c.as_ref().map_or(Ok(default), Code::try_from)
}

/// Build the SEG for one measurement. Returns the file and the reference
/// the SR uses.
pub fn build_seg(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &Measurement,
    geometry: &SegGeometry,
) -> Result<(FileDicomObject<InMemDicomObject>, SegReference), ReportError> {
    ctx.check()?;
    super::check_text("model name", &m.model, 64)?;
    super::check_text("model version", &m.model_version, 64)?;
    let (n, rows, cols) = m.map.dim();
    if n == 0 || n != ctx.source_refs.len() || n != geometry.positions.len() {
        return Err(ReportError::Shape {
            what: format!(
                "map has {n} slices, {} source instances, {} positions",
                ctx.source_refs.len(),
                geometry.positions.len()
            ),
        });
    }
    let dim = |v: usize, what: &str| {
        u16::try_from(v).map_err(|_| ReportError::Shape {
            what: format!("{what} {v} exceeds 65535"),
        })
    };
    let (rows16, cols16) = (dim(rows, "rows")?, dim(cols, "columns")?);
    let spec = &card.segmentation;
    let site = Code::try_from(&card.biomarker.finding_site)?;
    let category = card_code(&spec.category, ANATOMICAL_STRUCTURE)?;
    let property = card_code(&spec.property_type, site)?;
    let region = spec.anatomic_region.as_ref().map(Code::try_from).transpose()?;
    let family = card_code(&spec.algorithm_family, ARTIFICIAL_INTELLIGENCE)?;
    let label = spec.label.clone().unwrap_or_else(|| property.meaning().to_owned());
    super::check_text("segmentation.label", &label, 64)?;
    let mask = node_mask(card, m)?;

    let series = ctx.uid("seg-series");
    let sop = ctx.uid("seg-instance");
    let mut o = InMemDicomObject::new_empty();
    put_sop_common(&mut o, ctx, SEGMENTATION_STORAGE, &sop, (&m.model, &m.model_version));
    put_patient_and_study(&mut o, &ctx.source)?;

    // General Series + Segmentation Series (C.8.20.1).
    super::put_series(
        &mut o,
        "SEG",
        &series,
        SEG_SERIES_NUMBER,
        ctx.created,
        &format!("Biomarker segmentation {}", m.model),
    );
    // Frame of Reference (C.7.4.1): the source's, so the SEG overlays it.
    o.put(str_elem(
        tags::FRAME_OF_REFERENCE_UID,
        VR::UI,
        geometry.frame_of_reference_uid.as_str(),
    ));
    o.put(str_elem(
        tags::POSITION_REFERENCE_INDICATOR,
        VR::LO,
        source_text(&ctx.source, tags::POSITION_REFERENCE_INDICATOR).unwrap_or_default(),
    ));
    put_equipment(&mut o, ctx);

    // General Image / Segmentation Image (C.8.20.2), Content Identification.
    o.put(str_elem(tags::INSTANCE_NUMBER, VR::IS, "1"));
    o.put(str_elem(tags::CONTENT_DATE, VR::DA, da(ctx.created)));
    o.put(str_elem(tags::CONTENT_TIME, VR::TM, tm(ctx.created)));
    o.put(str_elem(tags::IMAGE_TYPE, VR::CS, "DERIVED\\PRIMARY"));
    o.put(str_elem(tags::CONTENT_LABEL, VR::CS, "BIOMARKER"));
    o.put(str_elem(
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        format!("{} localization", m.model),
    ));
    o.put(str_elem(tags::CONTENT_CREATOR_NAME, VR::PN, ""));
    o.put(str_elem(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"));
    o.put(us(tags::SAMPLES_PER_PIXEL, 1));
    o.put(str_elem(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
    o.put(us(tags::ROWS, rows16));
    o.put(us(tags::COLUMNS, cols16));
    o.put(us(tags::PIXEL_REPRESENTATION, 0));
    let bits: u16 = match spec.kind {
        SegmentationType::Binary => 1,
        SegmentationType::Fractional => 8,
    };
    o.put(us(tags::BITS_ALLOCATED, bits));
    o.put(us(tags::BITS_STORED, bits));
    o.put(us(tags::HIGH_BIT, bits - 1));
    match spec.kind {
        SegmentationType::Binary => {
            o.put(str_elem(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"));
        }
        SegmentationType::Fractional => {
            o.put(str_elem(tags::SEGMENTATION_TYPE, VR::CS, "FRACTIONAL"));
            o.put(str_elem(
                tags::SEGMENTATION_FRACTIONAL_TYPE,
                VR::CS,
                "PROBABILITY",
            ));
            o.put(us(tags::MAXIMUM_FRACTIONAL_VALUE, MAX_FRACTIONAL_VALUE as u16));
        }
    }

    // Segment Sequence: one segment, from the card.
    let mut segment = InMemDicomObject::new_empty();
    segment.put(us(tags::SEGMENT_NUMBER, SEGMENT_NUMBER));
    segment.put(str_elem(tags::SEGMENT_LABEL, VR::LO, label));
    segment.put(seq_elem(
        tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
        vec![category.to_item()],
    ));
    segment.put(seq_elem(
        tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
        vec![property.to_item()],
    ));
    if let Some(r) = region {
        segment.put(seq_elem(tags::ANATOMIC_REGION_SEQUENCE, vec![r.to_item()]));
    }
    segment.put(str_elem(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"));
    segment.put(str_elem(tags::SEGMENT_ALGORITHM_NAME, VR::LO, m.model.clone()));
    // Algorithm Identification Macro (Table 10-19).
    let mut alg = InMemDicomObject::new_empty();
    alg.put(seq_elem(tags::ALGORITHM_FAMILY_CODE_SEQUENCE, vec![family.to_item()]));
    alg.put(str_elem(tags::ALGORITHM_NAME, VR::LO, m.model.clone()));
    alg.put(str_elem(tags::ALGORITHM_VERSION, VR::LO, m.model_version.clone()));
    alg.put(str_elem(
        tags::ALGORITHM_PARAMETERS,
        VR::LT,
        match (card.is_agatston(), spec.kind) {
            (true, SegmentationType::Binary) => format!(
                "counted lesions: mean map >= {}",
                card.aggregation.lesion_threshold.unwrap_or(0.5)
            ),
            (_, SegmentationType::Binary) => format!("candidates with map >= {}", spec.threshold),
            (_, SegmentationType::Fractional) => "map inside candidates, x255".into(),
        },
    ));
    segment.put(seq_elem(
        tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
        vec![alg],
    ));
    o.put(seq_elem(tags::SEGMENT_SEQUENCE, vec![segment]));

    // Multi-frame Dimension (C.7.6.17): segment, then position.
    let dim_org = ctx.uid("seg-dimension-organization");
    let mut org = InMemDicomObject::new_empty();
    org.put(str_elem(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org.as_str()));
    o.put(seq_elem(tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]));
    o.put(str_elem(tags::DIMENSION_ORGANIZATION_TYPE, VR::CS, "3D"));
    let index = |pointer: Tag, group: Tag, description: &str| {
        let mut d = InMemDicomObject::new_empty();
        d.put(str_elem(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org.as_str()));
        d.put(at(tags::DIMENSION_INDEX_POINTER, pointer));
        d.put(at(tags::FUNCTIONAL_GROUP_POINTER, group));
        d.put(str_elem(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, description));
        d
    };
    o.put(seq_elem(
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            index(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "Segment Number",
            ),
            index(
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "Image Position Patient",
            ),
        ],
    ));

    // Common Instance Reference (C.12.2): every source slice, one series.
    let mut ref_series = InMemDicomObject::new_empty();
    ref_series.put(str_elem(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ctx.series_instance_uid.as_str(),
    ));
    ref_series.put(seq_elem(
        tags::REFERENCED_INSTANCE_SEQUENCE,
        ctx.source_refs
            .iter()
            .map(|s| sop_ref(s.sop_class_uid.as_str(), s.sop_instance_uid.as_str()))
            .collect(),
    ));
    o.put(seq_elem(tags::REFERENCED_SERIES_SEQUENCE, vec![ref_series]));

    // Multi-frame Functional Groups (C.7.6.16).
    let mut shared = InMemDicomObject::new_empty();
    let mut measures = InMemDicomObject::new_empty();
    measures.put(str_elem(tags::PIXEL_SPACING, VR::DS, geometry.pixel_spacing.clone()));
    if let Some(t) = &geometry.slice_thickness {
        measures.put(str_elem(tags::SLICE_THICKNESS, VR::DS, t.clone()));
    }
    shared.put(seq_elem(tags::PIXEL_MEASURES_SEQUENCE, vec![measures]));
    let mut orient = InMemDicomObject::new_empty();
    orient.put(str_elem(
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        geometry.orientation.clone(),
    ));
    shared.put(seq_elem(tags::PLANE_ORIENTATION_SEQUENCE, vec![orient]));
    o.put(seq_elem(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));

    let frames = (0..n)
        .map(|k| {
            let src = &ctx.source_refs[k];
            let mut f = InMemDicomObject::new_empty();
            let mut content = InMemDicomObject::new_empty();
            content.put(DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32(vec![SEGMENT_NUMBER as u32, k as u32 + 1].into()),
            ));
            f.put(seq_elem(tags::FRAME_CONTENT_SEQUENCE, vec![content]));
            let mut pos = InMemDicomObject::new_empty();
            pos.put(str_elem(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                geometry.positions[k].clone(),
            ));
            f.put(seq_elem(tags::PLANE_POSITION_SEQUENCE, vec![pos]));
            let mut seg_id = InMemDicomObject::new_empty();
            seg_id.put(us(tags::REFERENCED_SEGMENT_NUMBER, SEGMENT_NUMBER));
            f.put(seq_elem(tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![seg_id]));
            let mut source = source_image_ref(src.sop_class_uid.as_str(), src.sop_instance_uid.as_str());
            // Same rows, columns and plane as the source slice: viewers
            // (and highdicom) may then index the SEG by source frame.
            source.put(str_elem(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"));
            let mut derivation = InMemDicomObject::new_empty();
            derivation.put(seq_elem(
                tags::DERIVATION_CODE_SEQUENCE,
                vec![SEGMENTATION_DERIVATION.to_item()],
            ));
            derivation.put(seq_elem(tags::SOURCE_IMAGE_SEQUENCE, vec![source]));
            f.put(seq_elem(tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]));
            f
        })
        .collect();
    o.put(seq_elem(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frames));
    o.put(str_elem(tags::NUMBER_OF_FRAMES, VR::IS, n.to_string()));

    let pixels = match spec.kind {
        SegmentationType::Binary => pack_bits(&mask),
        SegmentationType::Fractional => {
            let mut v: Vec<u8> = mask.iter().copied().collect();
            if v.len() % 2 == 1 {
                v.push(0);
            }
            v
        }
    };
    o.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels)));

    let file = with_meta(o)?;
    Ok((
        file,
        SegReference {
            sop_class_uid: Uid::parse(SEGMENTATION_STORAGE).expect("constant UID"),
            sop_instance_uid: sop,
            series_uid: series,
            segment_number: SEGMENT_NUMBER,
            source_series_uid: ctx.series_instance_uid.clone(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::testutil::*;
    use std::path::Path;
    use std::process::Command;

    fn geometry(n: usize) -> SegGeometry {
        SegGeometry {
            frame_of_reference_uid: Uid::parse("1.2.826.0.1.3680043.10.1484.99.1.9").unwrap(),
            orientation: "1\\0\\0\\0\\1\\0".into(),
            pixel_spacing: "0.7\\0.7".into(),
            slice_thickness: Some("2.5".into()),
            positions: (0..n).map(|k| format!("-120\\-110.5\\{}", -50.0 + 2.5 * k as f64)).collect(),
        }
    }

    /// highdicom reads the SEG back: pixels (per source instance, in slice
    /// order) equal `expected.npy`, planes equal the geometry; and, given an
    /// SR, its TID 1411 Referenced Segment resolves to this SEG's segment.
    const SEGREAD: &str = r#"
import sys, numpy as np, pydicom, highdicom as hd
seg_path, want_path, kind, sr_path = sys.argv[1:5]
seg = hd.seg.segread(seg_path)
ds = pydicom.dcmread(seg_path)
want = np.load(want_path)
assert seg.segmentation_type.value == kind, seg.segmentation_type
srcs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in ds.PerFrameFunctionalGroupsSequence]
px = seg.get_pixels_by_source_instance(source_sop_instance_uids=srcs, segment_numbers=[1],
                                       combine_segments=False, rescale_fractional=False)
got = px[..., 0]
assert got.shape == want.shape, (got.shape, want.shape)
assert np.array_equal(got.astype(np.uint8), want), (int(got.sum()), int(want.sum()))
assert want.sum() > 0
desc = seg.get_segment_description(1)
print("segread ok", kind, got.shape, int(got.astype(np.int64).sum()), desc.segment_label)
if sr_path != "-":
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1, len(groups)
    ref = groups[0].referenced_segment
    item = ref[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert int(item.ReferencedSegmentNumber) in [s.SegmentNumber for s in ds.SegmentSequence]
    assert ref[1].UID == ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    ev = [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
          for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence]
    assert ds.SOPInstanceUID in ev, ev
    print("SR -> SEG reference resolves", item.ReferencedSegmentNumber)
"#;

    fn segread(seg: &Path, want: &Array3<u8>, kind: &str, sr: Option<&Path>) {
        let probe = Command::new("python3").args(["-c", "import highdicom, numpy"]).output();
        if !matches!(&probe, Ok(o) if o.status.success()) {
            if std::env::var_os("CI").is_some() {
                panic!("python3 with highdicom is required under CI");
            }
            eprintln!("SKIP: highdicom not importable");
            return;
        }
        let want_path = seg.with_extension("npy");
        crate::npy::write(&want_path, want.shape(), want.iter().copied()).unwrap();
        let out = Command::new("python3")
            .args(["-c", SEGREAD])
            .arg(seg)
            .arg(&want_path)
            .arg(kind)
            .arg(sr.map_or("-".into(), |p| p.display().to_string()))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "highdicom segread failed:\n{text}");
        eprintln!("{}", text.trim());
    }

    /// Unpack the Pixel Data with dicom-object, independently of `pack_bits`.
    fn pixels(f: &FileDicomObject<InMemDicomObject>) -> Vec<u8> {
        f.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().into_owned()
    }

    #[test]
    fn binary_area_seg_is_the_thresholded_mask_and_passes_dciodvfy() {
        let (ctx, card, _) = area_fixture();
        let (_, m) = area_measurement(1, 64, 64);
        let g = geometry(1);
        let (f, r) = build_seg(&ctx, &card, &m, &g).unwrap();
        // the node's mask: candidates with map >= 0.5 (the 0.3 halo is out)
        let mask = node_mask(&card, &m).unwrap();
        let want = ndarray::Zip::from(&m.map)
            .and(&m.candidates)
            .map_collect(|&v, &c| (c && v >= 0.5) as u8);
        assert_eq!(mask, want);
        assert!(mask.iter().any(|&v| v == 1));
        let px = pixels(&f);
        assert_eq!(px.len(), 64 * 64 / 8);
        for (i, &v) in want.iter().enumerate() {
            assert_eq!((px[i / 8] >> (i % 8)) & 1, v, "pixel {i}");
        }
        assert_eq!(f.element(tags::SEGMENTATION_TYPE).unwrap().to_str().unwrap(), "BINARY");
        assert_eq!(f.element(tags::BITS_ALLOCATED).unwrap().to_int::<u16>().unwrap(), 1);
        assert_eq!(
            f.element(tags::FRAME_OF_REFERENCE_UID).unwrap().to_str().unwrap(),
            g.frame_of_reference_uid.as_str()
        );
        assert_eq!(r.sop_instance_uid.as_str(), f.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg.dcm");
        f.write_to_file(&p).unwrap();
        keep(&p, "seg-area.dcm");
        dciodvfy_clean(&p);
        let sr = crate::report::build_sr_with_seg(&ctx, &card, &m, Some(&r)).unwrap();
        let srp = dir.path().join("sr.dcm");
        sr.write_to_file(&srp).unwrap();
        keep(&srp, "sr-with-seg.dcm");
        dciodvfy_clean(&srp);
        segread(&p, &want, "BINARY", Some(&srp));
        // stable: the same job gives the same bytes
        let (again, _) = build_seg(&ctx, &card, &m, &g).unwrap();
        let (mut a, mut b) = (vec![], vec![]);
        f.write_all(&mut a).unwrap();
        again.write_all(&mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn fractional_seg_is_the_map_inside_candidates() {
        let (ctx, mut card, _) = area_fixture();
        card.segmentation.kind = SegmentationType::Fractional;
        let (_, m) = area_measurement(1, 64, 64);
        let (f, _) = build_seg(&ctx, &card, &m, &geometry(1)).unwrap();
        let want = ndarray::Zip::from(&m.map)
            .and(&m.candidates)
            .map_collect(|&v, &c| if c { (v * 255.0).round() as u8 } else { 0 });
        assert_eq!(pixels(&f), want.iter().copied().collect::<Vec<_>>());
        assert_eq!(f.element(tags::MAXIMUM_FRACTIONAL_VALUE).unwrap().to_int::<u16>().unwrap(), 255);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg.dcm");
        f.write_to_file(&p).unwrap();
        keep(&p, "seg-fractional.dcm");
        dciodvfy_clean(&p);
        segread(&p, &want, "FRACTIONAL", None);
    }

    #[test]
    fn cac_seg_holds_only_counted_lesions_frames_packed_back_to_back() {
        let (ctx, card, _) = cac_fixture();
        // 30 columns: 4 frames of 30×30 = 3600 bits, frames do not start
        // on byte boundaries (900 bits each), so packing must be contiguous.
        let (_, mut m) = cac_measurement(4, 30, 30);
        m.lesions[1].counted = false;
        let mask = node_mask(&card, &m).unwrap();
        let on: Vec<usize> = (0..4).filter(|&s| mask.index_axis(Axis(0), s).iter().any(|&v| v == 1)).collect();
        assert_eq!(on, vec![1], "only the counted lesion's slice");
        // the counted lesion is exactly its candidates
        let lesion_1 = m.candidates.index_axis(Axis(0), 1).mapv(|c| c as u8);
        assert_eq!(mask.index_axis(Axis(0), 1), lesion_1);
        let (f, _) = build_seg(&ctx, &card, &m, &geometry(4)).unwrap();
        let px = pixels(&f);
        assert_eq!(px.len(), 3600 / 8);
        for (i, &v) in mask.iter().enumerate() {
            assert_eq!((px[i / 8] >> (i % 8)) & 1, v, "bit {i}");
        }
        let frames = f.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap();
        assert_eq!(frames.len(), 4);
        for (k, fr) in frames.iter().enumerate() {
            let src = fr.element(tags::DERIVATION_IMAGE_SEQUENCE).unwrap().items().unwrap()[0]
                .element(tags::SOURCE_IMAGE_SEQUENCE).unwrap().items().unwrap()[0]
                .element(tags::REFERENCED_SOP_INSTANCE_UID).unwrap().to_str().unwrap().into_owned();
            assert_eq!(src, ctx.source_refs[k].sop_instance_uid.as_str());
            let div = fr.element(tags::FRAME_CONTENT_SEQUENCE).unwrap().items().unwrap()[0]
                .element(tags::DIMENSION_INDEX_VALUES).unwrap().to_multi_int::<u32>().unwrap();
            assert_eq!(div, vec![1, k as u32 + 1]);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg.dcm");
        f.write_to_file(&p).unwrap();
        keep(&p, "seg-cac.dcm");
        dciodvfy_clean(&p);
        segread(&p, &mask, "BINARY", None);
    }

    #[test]
    fn geometry_comes_from_the_headers_and_missing_geometry_is_an_error() {
        let mk = |z: &str| {
            let mut h = synthetic_source("X");
            h.put(str_elem(tags::FRAME_OF_REFERENCE_UID, VR::UI, "1.2.3.4"));
            h.put(str_elem(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0"));
            h.put(str_elem(tags::IMAGE_POSITION_PATIENT, VR::DS, format!("0\\0\\{z}")));
            h.put(str_elem(tags::SLICE_THICKNESS, VR::DS, "1.25"));
            h
        };
        let g = SegGeometry::from_headers(&[mk("0"), mk("1.25")]).unwrap();
        assert_eq!(g.positions, vec!["0\\0\\0", "0\\0\\1.25"]);
        assert_eq!(g.pixel_spacing, "0.7\\0.7");
        assert_eq!(g.slice_thickness.as_deref(), Some("1.25"));
        let mut tilted = mk("2.5");
        tilted.put(str_elem(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\0.9\\0.1"));
        assert!(matches!(SegGeometry::from_headers(&[mk("0"), tilted]), Err(ReportError::Shape { .. })));
        assert!(matches!(
            SegGeometry::from_headers(&[synthetic_source("X")]),
            Err(ReportError::MissingSource { .. })
        ));
        // a SEG whose frames do not match the sources is refused
        let (ctx, card, _) = area_fixture();
        let (_, m) = area_measurement(1, 16, 16);
        assert!(matches!(build_seg(&ctx, &card, &m, &geometry(2)), Err(ReportError::Shape { .. })));
    }

    /// Every shipped card's segment codes are valid and its SEG passes
    /// dciodvfy, with its own label and property type.
    #[test]
    fn shipped_cards_make_valid_segs() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let dir = tempfile::tempdir().unwrap();
        for name in ["pma", "sfa", "cac", "liver"] {
            let card = ModelCard::load(&models.join(format!("{name}.yaml"))).unwrap();
            let (ctx, m) = if card.is_agatston() {
                let (ctx, _, _) = cac_fixture();
                (ctx, cac_measurement(4, 32, 32).1)
            } else {
                let (ctx, _, _) = area_fixture();
                (ctx, area_measurement(1, 32, 32).1)
            };
            let (f, _) = build_seg(&ctx, &card, &m, &geometry(m.map.dim().0)).unwrap();
            let seg = &f.element(tags::SEGMENT_SEQUENCE).unwrap().items().unwrap()[0];
            let prop = &seg.element(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE).unwrap().items().unwrap()[0];
            assert_eq!(
                prop.element(tags::CODE_VALUE).unwrap().to_str().unwrap(),
                card.segmentation.property_type.as_ref().unwrap().value.as_str()
            );
            let p = dir.path().join(format!("{name}.dcm"));
            f.write_to_file(&p).unwrap();
            dciodvfy_clean(&p);
        }
    }
}
