//! The SR instance: a Comprehensive 3D SR (PS3.3 A.35.13) whose content is
//! a TID 1500 Measurement Report with one TID 1501 group per biomarker.
//!
//! Why Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34) and not
//! Comprehensive SR (.88.33): it is what the project's issue asks for,
//! highdicom's default for TID 1500, and the only one of the two that can
//! later carry SCOORD3D lesion locations in patient coordinates. Today's
//! content (no coordinates) is also valid Comprehensive SR; if a PACS does
//! not negotiate .88.34, the outbox could relabel it .88.33 (the IOD modules
//! we fill are a superset) — not done here.

use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};

use super::content::{encode_item, put_children, Code, ContentItem, ImageItem, UcumUnit};
use super::tid1500::{
    AlgorithmIdentification, DeviceObserver, ImageLibrary, Measurement, MeasurementGroup,
    MeasurementReport, QualitativeEvaluation, ReferencedSegment, TrackingIdentifier,
};
use super::seg::SegReference;
use super::{
    codes, da, put_equipment, put_patient_and_study, put_sop_common, seq_elem, with_meta, sop_ref, str_elem, tm,
    ReportContext, ReportError,
};
use crate::biomarkers::{Measurement as BiomarkerMeasurement, RiskCategory};
use crate::inference::card::ModelCard;

pub const COMPREHENSIVE_3D_SR: &str = "1.2.840.10008.5.1.4.1.1.88.34";
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// Series Number of the SR series in the source study.
pub const SR_SERIES_NUMBER: i32 = 9901;

/// The private code for a CAC risk band (values fit SH: ≤ 16 characters).
pub fn risk_code(r: RiskCategory) -> Code {
    let (value, meaning) = match r {
        RiskCategory::Zero => ("CAC-RISK-0", "Agatston score 0"),
        RiskCategory::Minimal => ("CAC-RISK-1-10", "Agatston score 1-10"),
        RiskCategory::Mild => ("CAC-RISK-11-100", "Agatston score 11-100"),
        RiskCategory::Moderate => ("CAC-RISK-101-400", "Agatston score 101-400"),
        RiskCategory::Severe => ("CAC-RISK-GT400", "Agatston score above 400"),
    };
    Code::fixed(value, codes::PRIVATE_SCHEME, meaning)
}

/// The TID 1500 content for one measurement (no dataset yet): exposed so
/// callers and tests can look at the tree.
pub fn measurement_report(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &BiomarkerMeasurement,
) -> Result<MeasurementReport, ReportError> {
    ctx.check()?;
    if m.volume.is_some() {
        return volume_report(ctx, card, m);
    }
    if m.unit != card.biomarker.unit.ucum {
        return Err(ReportError::InvalidCode {
            field: "unit",
            reason: format!(
                "measurement unit `{}` is not the card's `{}`",
                m.unit, card.biomarker.unit.ucum
            ),
        });
    }
    // Model name and version also go into LO attributes (Contributing
    // Equipment), 64 characters.
    super::check_text("model name", &m.model, 64)?;
    super::check_text("model version", &m.model_version, 64)?;
    let concept = Code::try_from(&card.biomarker.concept)?;
    let site = Code::try_from(&card.biomarker.finding_site)?;
    let unit = UcumUnit::new(&card.biomarker.unit.ucum, &card.biomarker.unit.meaning)?;
    let algorithm = AlgorithmIdentification::new(&m.model, &m.model_version)?;

    // An Agatston card's score says how it was calculated: TID 300
    // Measurement Method from CID 6140 (docs/CONFORMANCE.md, "CAC codes").
    let with_method = |x: Measurement| match card.is_agatston() {
        true => x.with_method(codes::AGATSTON_SCORING_METHOD),
        false => x,
    };
    let mut measurements = vec![with_method(Measurement::new(
        concept.clone(),
        m.value,
        unit,
        Some(algorithm.clone()),
    )?)];
    let mut evaluations = Vec::new();
    if card.is_agatston() {
        // Lesions that count toward the score (all of them under "soft"
        // aggregation count in proportion; those are the ones >= threshold).
        let n = m.lesions.iter().filter(|l| l.counted).count();
        measurements.push(Measurement::new(
            codes::NUMBER_OF_LESIONS,
            n as f64,
            UcumUnit::fixed(codes::UNIT_LESIONS),
            Some(algorithm.clone()),
        )?);
    }
    if let Some(r) = m.risk_category {
        evaluations.push(QualitativeEvaluation::new(
            codes::CAC_RISK_CATEGORY,
            risk_code(r),
        ));
    }
    let source = |slice: usize| -> Result<ImageItem, ReportError> {
        let r = ctx
            .source_refs
            .get(slice)
            .ok_or_else(|| ReportError::Shape {
                what: format!(
                    "lesion on slice {slice} of {} source instances",
                    ctx.source_refs.len()
                ),
            })?;
        Ok(ImageItem::new(
            r.sop_class_uid.clone(),
            r.sop_instance_uid.clone(),
        ))
    };
    let main_sources: Vec<ImageItem> = if card.is_agatston() {
        let mut slices: Vec<usize> = m
            .lesions
            .iter()
            .filter(|l| l.counted)
            .map(|l| l.lesion.slice)
            .collect();
        slices.sort_unstable();
        slices.dedup();
        slices.into_iter().map(source).collect::<Result<_, _>>()?
    } else {
        (0..ctx.source_refs.len())
            .map(source)
            .collect::<Result<_, _>>()?
    };
    let mut groups = vec![MeasurementGroup {
        tracking: TrackingIdentifier::new(
            &format!("{} ({})", concept.meaning(), card.name),
            ctx.uid(&format!("sr-tracking|{}", card.name)),
        )?,
        finding: None,
        finding_site: Some(site.clone()),
        algorithm: Some(algorithm.clone()),
        sources: main_sources,
        measurements,
        evaluations,
        segment: None,
    }];
    if card.is_agatston() {
        groups.extend(lesion_groups(
            ctx, card, m, &concept, &site, &algorithm, &source,
        )?);
    }
    Ok(MeasurementReport {
        observer: DeviceObserver::new(
            ctx.device.uid.clone(),
            &ctx.device.name,
            &ctx.device.manufacturer,
            &m.model,
        )?,
        procedure: codes::COMPUTED_TOMOGRAPHY,
        library: ImageLibrary {
            modality: codes::MODALITY_CT,
            images: ctx
                .source_refs
                .iter()
                .map(|s| ImageItem::new(s.sop_class_uid.clone(), s.sop_instance_uid.clone()))
                .collect(),
        },
        groups,
    })
}

/// The TID 1500 content for an area card measured on every slice of a
/// volume (`m.volume` set): one group with the volume (SCT Volume, UCUM ml)
/// over all slices, and one with the largest cross-sectional area (the
/// card's concept and unit, derivation Maximum) on the one image it lies on.
fn volume_report(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &BiomarkerMeasurement,
) -> Result<MeasurementReport, ReportError> {
    let Some(b) = m.volume.as_ref() else {
        return Err(ReportError::Shape { what: "a volume report without per-slice areas".into() });
    };
    if b.slice_areas_cm2.len() != ctx.source_refs.len() || card.biomarker.unit.ucum != "cm2" {
        return Err(ReportError::Shape {
            what: format!(
                "{} slice areas in {} for {} source instances",
                b.slice_areas_cm2.len(),
                card.biomarker.unit.ucum,
                ctx.source_refs.len()
            ),
        });
    }
    super::check_text("model name", &m.model, 64)?;
    super::check_text("model version", &m.model_version, 64)?;
    let area_concept = Code::try_from(&card.biomarker.concept)?;
    let site = Code::try_from(&card.biomarker.finding_site)?;
    let area_unit = UcumUnit::new(&card.biomarker.unit.ucum, &card.biomarker.unit.meaning)?;
    let algorithm = AlgorithmIdentification::new(&m.model, &m.model_version)?;
    let image = |s: &super::SourceInstance| ImageItem::new(s.sop_class_uid.clone(), s.sop_instance_uid.clone());
    let largest = &ctx.source_refs[b.largest_slice.min(ctx.source_refs.len() - 1)];
    let groups = vec![
        MeasurementGroup {
            tracking: TrackingIdentifier::new(
                &format!("{} ({})", codes::VOLUME.meaning(), card.name),
                ctx.uid(&format!("sr-tracking|{}|volume", card.name)),
            )?,
            finding: None,
            finding_site: Some(site.clone()),
            algorithm: Some(algorithm.clone()),
            sources: ctx.source_refs.iter().map(image).collect(),
            measurements: vec![Measurement::new(
                codes::VOLUME,
                m.value,
                UcumUnit::fixed(codes::UNIT_ML),
                Some(algorithm.clone()),
            )?],
            evaluations: vec![],
            segment: None,
        },
        MeasurementGroup {
            tracking: TrackingIdentifier::new(
                &format!("Largest cross-section ({}, slice {})", card.name, b.largest_slice + 1),
                ctx.uid(&format!("sr-tracking|{}|largest-area", card.name)),
            )?,
            finding: None,
            finding_site: Some(site),
            algorithm: Some(algorithm.clone()),
            sources: vec![image(largest)],
            measurements: vec![Measurement::new(area_concept, b.largest_area_cm2, area_unit, Some(algorithm))?
                .with_derivation(codes::MAXIMUM)],
            evaluations: vec![],
            segment: None,
        },
    ];
    Ok(MeasurementReport {
        observer: DeviceObserver::new(ctx.device.uid.clone(), &ctx.device.name, &ctx.device.manufacturer, &m.model)?,
        procedure: codes::COMPUTED_TOMOGRAPHY,
        library: ImageLibrary {
            modality: codes::MODALITY_CT,
            images: ctx.source_refs.iter().map(image).collect(),
        },
        groups,
    })
}

/// At most this many per-lesion groups; beyond it, the largest
/// contributions are kept (the total is always in the main group).
pub const MAX_LESION_GROUPS: usize = 64;

/// One TID 1501 group per CAC lesion: its Agatston contribution, area and
/// peak attenuation, on the slice it lies on.
fn lesion_groups(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &BiomarkerMeasurement,
    concept: &Code,
    site: &Code,
    algorithm: &AlgorithmIdentification,
    source: &dyn Fn(usize) -> Result<ImageItem, ReportError>,
) -> Result<Vec<MeasurementGroup>, ReportError> {
    let soft = card.aggregation.lesion_aggregation.as_deref() == Some("soft");
    let contribution = |l: &crate::biomarkers::LesionResult| {
        if l.excluded.is_some() {
            0.0
        } else if soft {
            l.mean_map * l.lesion.score
        } else if l.counted {
            l.lesion.score
        } else {
            0.0
        }
    };
    let mut keep: Vec<usize> = (0..m.lesions.len()).collect();
    if keep.len() > MAX_LESION_GROUPS {
        keep.sort_by(|&a, &b| {
            contribution(&m.lesions[b])
                .total_cmp(&contribution(&m.lesions[a]))
                .then(a.cmp(&b))
        });
        keep.truncate(MAX_LESION_GROUPS);
        keep.sort_unstable();
    }
    let unit = UcumUnit::new(&card.biomarker.unit.ucum, &card.biomarker.unit.meaning)?;
    keep.into_iter()
        .map(|k| {
            let l = &m.lesions[k];
            Ok(MeasurementGroup {
                tracking: TrackingIdentifier::new(
                    &format!("Lesion {} (slice {})", k + 1, l.lesion.slice + 1),
                    ctx.uid(&format!("sr-tracking|{}|lesion|{k}", card.name)),
                )?,
                finding: Some(codes::CALCIFIED_ATHEROMATOUS_PLAQUE),
                finding_site: Some(site.clone()),
                algorithm: Some(algorithm.clone()),
                sources: vec![source(l.lesion.slice)?],
                measurements: vec![
                    Measurement::new(concept.clone(), contribution(l), unit.clone(), None)?
                        .with_method(codes::AGATSTON_SCORING_METHOD),
                    Measurement::new(
                        codes::AREA,
                        l.lesion.area_mm2,
                        UcumUnit::fixed(codes::UNIT_MM2),
                        None,
                    )?,
                    Measurement::new(
                        codes::ATTENUATION_COEFFICIENT,
                        l.lesion.peak_hu,
                        UcumUnit::fixed(codes::UNIT_HU),
                        None,
                    )?
                    .with_derivation(codes::MAXIMUM),
                ],
                evaluations: vec![],
                segment: None,
            })
        })
        .collect()
}

/// Build the SR for one measurement. Deterministic in its inputs.
pub fn build_sr(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &BiomarkerMeasurement,
) -> Result<FileDicomObject<InMemDicomObject>, ReportError> {
    build_sr_with_seg(ctx, card, m, None)
}

/// [`build_sr`], with the biomarker's group pointing at the SEG's segment
/// (TID 1411 Referenced Segment) when there is one.
pub fn build_sr_with_seg(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &BiomarkerMeasurement,
    seg: Option<&SegReference>,
) -> Result<FileDicomObject<InMemDicomObject>, ReportError> {
    let mut report = measurement_report(ctx, card, m)?;
    if let (Some(seg), Some(group)) = (seg, report.groups.first_mut()) {
        group.segment = Some(ReferencedSegment {
            segmentation: ImageItem::new(seg.sop_class_uid.clone(), seg.sop_instance_uid.clone())
                .with_segments(vec![seg.segment_number]),
            source_series: seg.source_series_uid.clone(),
        });
    }
    let sop_instance = ctx.uid("sr-instance");
    let mut o = InMemDicomObject::new_empty();

    put_sop_common(
        &mut o,
        ctx,
        COMPREHENSIVE_3D_SR,
        &sop_instance,
        (&m.model, &m.model_version),
    );
    // Declare our private scheme (PS3.3 C.12.1.1.5) when the content uses
    // it: the risk category does, and a card may.
    let private = |c: &crate::inference::card::Code| c.scheme.trim() == codes::PRIVATE_SCHEME;
    if m.risk_category.is_some()
        || private(&card.biomarker.concept)
        || private(&card.biomarker.finding_site)
    {
        let mut scheme = InMemDicomObject::new_empty();
        scheme.put(str_elem(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            codes::PRIVATE_SCHEME,
        ));
        scheme.put(str_elem(
            tags::CODING_SCHEME_NAME,
            VR::ST,
            codes::PRIVATE_SCHEME_NAME,
        ));
        o.put(seq_elem(
            tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
            vec![scheme],
        ));
    }

    let study = put_patient_and_study(&mut o, &ctx.source)?;

    // SR Document Series (C.17.1).
    super::put_series(
        &mut o,
        "SR",
        &ctx.uid("sr-series"),
        SR_SERIES_NUMBER,
        ctx.created,
        &format!("Biomarker report {}", m.model),
    );
    o.put(seq_elem(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));

    put_equipment(&mut o, ctx);

    // SR Document General (C.17.2).
    o.put(str_elem(tags::INSTANCE_NUMBER, VR::IS, "1"));
    o.put(str_elem(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"));
    o.put(str_elem(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"));
    o.put(str_elem(tags::CONTENT_DATE, VR::DA, da(ctx.created)));
    o.put(str_elem(tags::CONTENT_TIME, VR::TM, tm(ctx.created)));
    o.put(seq_elem(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    o.put(seq_elem(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence_item(ctx, study.as_str(), seg)],
    ));

    // SR Document Content (C.17.3): the root content item lives in the
    // dataset itself.
    let (root, children) = report.root();
    encode_item(&mut o, &ContentItem::Container(root));
    put_children(&mut o, &children);

    with_meta(o)
}

/// Hierarchical SOP Instance Reference Macro (C.17.2.1): the source study,
/// series and every instance used.
/// The SEG the content references is evidence too (PS3.3 C.17.2.3: every
/// instance the content references is listed); same study, its own series.
fn evidence_item(ctx: &ReportContext, study: &str, seg: Option<&SegReference>) -> InMemDicomObject {
    let sops = ctx
        .source_refs
        .iter()
        .map(|s| sop_ref(s.sop_class_uid.as_str(), s.sop_instance_uid.as_str()))
        .collect();
    let mut series = InMemDicomObject::new_empty();
    series.put(str_elem(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ctx.series_instance_uid.as_str(),
    ));
    series.put(seq_elem(tags::REFERENCED_SOP_SEQUENCE, sops));
    let mut all_series = vec![series];
    if let Some(seg) = seg {
        let r = sop_ref(seg.sop_class_uid.as_str(), seg.sop_instance_uid.as_str());
        let mut s = InMemDicomObject::new_empty();
        s.put(str_elem(tags::SERIES_INSTANCE_UID, VR::UI, seg.series_uid.as_str()));
        s.put(seq_elem(tags::REFERENCED_SOP_SEQUENCE, vec![r]));
        all_series.push(s);
    }
    let mut item = InMemDicomObject::new_empty();
    item.put(str_elem(tags::STUDY_INSTANCE_UID, VR::UI, study));
    item.put(seq_elem(tags::REFERENCED_SERIES_SEQUENCE, all_series));
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::testutil::*;

    #[test]
    fn sr_is_deterministic_for_the_same_seed() {
        let (ctx, card, m) = area_fixture();
        let a = build_sr(&ctx, &card, &m).unwrap();
        let b = build_sr(&ctx, &card, &m).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.write_all(&mut x).unwrap();
        b.write_all(&mut y).unwrap();
        assert_eq!(x, y);
        let mut other = ctx.clone();
        other.seed.push('1');
        let c = build_sr(&other, &card, &m).unwrap();
        assert_ne!(
            c.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap(),
            a.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap()
        );
    }

    /// Fuzz finding (fuzz/corpus/part10_roundtrip/regress-long-source-value):
    /// a source PatientName longer than a 16-bit length was copied, and the
    /// finished SR failed to write ("Could not print data set"). Now the
    /// build refuses it, naming the attribute; at the limit it still
    /// writes and reads back unchanged.
    #[test]
    fn a_source_value_too_long_for_its_element_is_refused_by_name() {
        use dicom_core::DataElement;
        let (mut ctx, card, m) = area_fixture();
        ctx.source.put(DataElement::new(tags::PATIENT_NAME, VR::PN, "A".repeat(70_000)));
        assert!(matches!(
            build_sr(&ctx, &card, &m),
            Err(ReportError::SourceTooLong { attribute: "PatientName", bytes: 70_000, .. })
        ));
        let longest = "B".repeat(crate::report::MAX_SHORT_VALUE);
        ctx.source.put(DataElement::new(tags::PATIENT_NAME, VR::PN, longest.as_str()));
        let sr = build_sr(&ctx, &card, &m).unwrap();
        let mut bytes = Vec::new();
        sr.write_all(&mut bytes).unwrap();
        let back = dicom_object::from_reader(&bytes[128..]).unwrap();
        assert_eq!(back.element(tags::PATIENT_NAME).unwrap().to_str().unwrap().trim_end(), longest);
    }

    /// Fuzz finding (fuzz/corpus/part10_roundtrip/regress-non-ascii-study-time):
    /// a StudyTime with a non-ASCII character was written as Latin-1 in a
    /// UTF-8 file and read back as an escape. It is left empty now; a
    /// non-ASCII PatientName (declared character set) is still copied.
    #[test]
    fn a_non_ascii_value_of_an_ascii_only_vr_is_left_out() {
        use dicom_core::DataElement;
        let (mut ctx, card, m) = area_fixture();
        ctx.source.put(DataElement::new(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
        ctx.source.put(DataElement::new(tags::STUDY_TIME, VR::TM, "1200ü"));
        ctx.source.put(DataElement::new(tags::PATIENT_NAME, VR::PN, "Müller^Zoë"));
        let sr = build_sr(&ctx, &card, &m).unwrap();
        let mut bytes = Vec::new();
        sr.write_all(&mut bytes).unwrap();
        let back = dicom_object::from_reader(&bytes[128..]).unwrap();
        assert_eq!(back.element(tags::STUDY_TIME).unwrap().to_str().unwrap(), "");
        assert_eq!(back.element(tags::PATIENT_NAME).unwrap().to_str().unwrap().trim_end(), "Müller^Zoë");
    }

    #[test]
    fn bad_inputs_are_rejected_at_the_boundary() {
        let (ctx, card, mut m) = area_fixture();
        m.value = f64::NAN;
        assert!(matches!(
            build_sr(&ctx, &card, &m),
            Err(ReportError::NonFinite { .. })
        ));
        let (ctx, card, mut m) = area_fixture();
        m.unit = "mm2".into();
        assert!(build_sr(&ctx, &card, &m).is_err());
        let (mut ctx, card, m) = area_fixture();
        ctx.source_refs.clear();
        assert_eq!(
            build_sr(&ctx, &card, &m).unwrap_err(),
            ReportError::NoSources
        );
    }

    #[test]
    fn area_sr_passes_dciodvfy_dsrdump_and_highdicom() {
        let (ctx, card, m) = area_fixture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sr.dcm");
        build_sr(&ctx, &card, &m)
            .unwrap()
            .write_to_file(&path)
            .unwrap();
        keep(&path, "sr-area.dcm");
        dciodvfy_clean(&path);
        let dump = dsrdump(&path);
        if let Some(dump) = dump {
            assert!(dump.contains("23.456"), "{dump}");
            assert!(dump.contains("(cm2,UCUM,\"square centimeter\")"), "{dump}");
            assert!(dump.contains("Imaging Measurement Report"));
        }
        highdicom_readback(&path, "42798000", 23.456, "cm2", 0, None);
    }

    #[test]
    fn volume_sr_has_the_volume_in_ml_and_the_largest_area_on_its_image() {
        let (_, mut m) = crate::report::testutil::area_measurement(3, 32, 32);
        let ctx = context(real_or_synthetic_source(), 3, "1.2.3|liver|0.3.0|0");
        let card = crate::report::testutil::card(crate::report::testutil::AREA_CARD);
        m.value = 12.5;
        m.unit = "mL".into();
        m.volume = crate::biomarkers::volume_burden(&[1.0, 30.0, 2.0], &[0.0, 5.0, 10.0]);
        assert_eq!(m.volume.as_ref().unwrap().largest_slice, 1);
        let report = measurement_report(&ctx, &card, &m).unwrap();
        assert_eq!(report.groups.len(), 2);
        // the largest area's group names the one image it lies on
        let sop = |g: &MeasurementGroup| g.sources.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>();
        assert_eq!(sop(&report.groups[1]).len(), 1);
        assert!(sop(&report.groups[1])[0].contains(ctx.source_refs[1].sop_instance_uid.as_str()));
        assert_eq!(report.groups[0].sources.len(), 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sr.dcm");
        build_sr(&ctx, &card, &m).unwrap().write_to_file(&path).unwrap();
        dciodvfy_clean(&path);
        if let Some(dump) = dsrdump(&path) {
            assert!(dump.contains("(118565006,SCT,\"Volume\")=\"12.5\" (ml,UCUM,\"milliliter\")"), "{dump}");
            assert!(dump.contains("(42798000,SCT,\"Area\")=\"30\" (cm2,UCUM,\"square centimeter\")"), "{dump}");
            assert!(dump.contains("(56851009,SCT,\"Maximum\")"), "{dump}");
        }
    }

    #[test]
    fn cac_sr_has_risk_and_lesion_count_and_passes_checks() {
        let (ctx, card, m) = cac_fixture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sr.dcm");
        build_sr(&ctx, &card, &m)
            .unwrap()
            .write_to_file(&path)
            .unwrap();
        keep(&path, "sr-cac.dcm");
        dciodvfy_clean(&path);
        if let Some(dump) = dsrdump(&path) {
            assert!(dump.contains("CAC-RISK-101-400"), "{dump}");
            assert!(dump.contains("Number of lesions"), "{dump}");
            assert!(dump.contains("({Agatston},UCUM"), "{dump}");
            // Standard codes (docs/CONFORMANCE.md "CAC codes"): the score
            // concept and its Measurement Method, nothing private for them.
            assert!(dump.contains("(450360000,SCT,\"Coronary artery calcium score\")"), "{dump}");
            assert!(dump.contains("(370129005,SCT,\"Measurement Method\")"), "{dump}");
            assert!(dump.contains("(112055,DCM,\"Agatston scoring method\")"), "{dump}");
            assert!(!dump.contains("CAC-AGATSTON"), "{dump}");
        }
        highdicom_readback(
            &path,
            "450360000",
            123.5,
            "{Agatston}",
            2,
            Some("CAC-RISK-101-400"),
        );
    }
}
