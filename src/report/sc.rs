//! Secondary Capture overlays: the source slices, windowed, with what the
//! value was made of drawn on them, and the result burned in ("NOT FOR
//! DIAGNOSTIC USE").
//!
//! What is drawn: for area tasks, the localization map in colour and the
//! candidates outlined. For Agatston, the lesions only, no map: each
//! counted lesion outlined in the colour of its Agatston weight (1-4, a
//! legend burned in), every lesion that does not count (excluded by anatomy,
//! `volume::heart`, or the map too low) outlined thin in grey. The outline
//! lies on the pixels just outside the lesion, so the calcium itself is
//! shown as the window shows it: a reader sees exactly which calcium was
//! counted and at which weight.
//!
//! Why single-frame Secondary Capture (1.2.840.10008.5.1.4.1.1.7, PS3.3
//! A.8.1) rather than Multi-frame True Color SC (.7.4): every PACS and
//! viewer stores and shows it, each image carries a Source Image Sequence
//! to exactly the slice it shows, and a CAC result is at most a handful of
//! slices, so one instance per slice costs nothing. RGB, Planar
//! Configuration 0 (colour-by-pixel), 8 bits.
//!
//! Which slices: for Agatston, the slices with lesions, the highest-scoring
//! first, at most `max_images`, shown in slice order (the middle slice when
//! there is no lesion, so the PACS still shows the zero); otherwise the one
//! slice with the most map inside candidates (2D tasks have one slice).

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use ndarray::{ArrayView3, Axis};

use super::overlay::{
    draw_text, line_height, outline_lesions, render_slice, text_scale, OverlayStyle, RgbImage, Window,
    UNCOUNTED_COLOUR, WEIGHT_COLOURS,
};
use super::{
    da, put_equipment, put_patient_and_study, put_sop_common, seq_elem, with_meta, source_image_ref, copied_text, str_elem, tm,
};
use super::{ReportContext, ReportError};
use crate::biomarkers::{agatston, Measurement};
use crate::inference::card::ModelCard;
use crate::volume::label::label8;

pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Series Number of the overlay series in the source study.
pub const SC_SERIES_NUMBER: i32 = 9902;

pub const DISCLAIMER: &str = "NOT FOR DIAGNOSTIC USE";

/// How the overlays look and how many there are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScOptions {
    pub window: Window,
    pub style: OverlayStyle,
    /// Cap on the number of images for Agatston.
    pub max_images: usize,
}

impl ScOptions {
    /// Calcium window for Agatston, soft tissue for the rest.
    pub fn for_card(card: &ModelCard) -> ScOptions {
        ScOptions {
            window: if card.is_agatston() {
                Window::CALCIUM
            } else {
                Window::SOFT_TISSUE
            },
            style: OverlayStyle::default(),
            max_images: 16,
        }
    }
}

/// The slices to show, in slice order.
pub fn choose_slices(
    card: &ModelCard,
    m: &Measurement,
    n_slices: usize,
    max_images: usize,
) -> Vec<usize> {
    if n_slices == 0 {
        return vec![];
    }
    // A volume's burden: the slice with the largest cross-section, the one
    // the SR's area measurement references.
    if let Some(b) = m.volume.as_ref().filter(|b| b.largest_slice < n_slices) {
        return vec![b.largest_slice];
    }
    if card.is_agatston() {
        let mut score = vec![0f64; n_slices];
        let mut any = vec![false; n_slices];
        for l in &m.lesions {
            if l.lesion.slice < n_slices {
                score[l.lesion.slice] += l.lesion.score * l.mean_map;
                any[l.lesion.slice] = true;
            }
        }
        let mut with: Vec<usize> = (0..n_slices).filter(|&s| any[s]).collect();
        if with.is_empty() {
            return vec![n_slices / 2];
        }
        // highest score first; ties by slice index, so the choice is stable
        with.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        with.truncate(max_images.max(1));
        with.sort_unstable();
        return with;
    }
    if m.map.dim().0 != n_slices {
        return vec![n_slices / 2];
    }
    let best = (0..n_slices)
        .map(|s| {
            let sum: f64 = m
                .map
                .index_axis(Axis(0), s)
                .iter()
                .zip(m.candidates.index_axis(Axis(0), s).iter())
                .filter(|(_, &c)| c)
                .map(|(&v, _)| v as f64)
                .sum();
            (s, sum)
        })
        .fold((n_slices / 2, f64::NEG_INFINITY), |acc, x| {
            if x.1 > acc.1 {
                x
            } else {
                acc
            }
        });
    vec![best.0]
}

/// The text lines burned into every overlay.
pub fn caption(card: &ModelCard, m: &Measurement) -> Vec<String> {
    // UCUM annotations ({Agatston}) read better without braces.
    let unit = m.unit.trim_start_matches('{').trim_end_matches('}');
    let value = if card.is_agatston() {
        format!("{:.1}", m.value)
    } else {
        format!("{:.2}", m.value)
    };
    if let Some(b) = &m.volume {
        return vec![
            format!("{} volume", card.segmentation.label.as_deref().unwrap_or(&card.biomarker.finding_site.meaning)),
            format!("{value} {unit} over {} slices", b.slice_areas_cm2.len()),
            format!("largest area {:.2} cm2: this slice", b.largest_area_cm2),
            format!("{} v{}", m.model, m.model_version),
        ];
    }
    let mut result = format!("{value} {unit}");
    if let Some(r) = m.risk_category {
        result.push_str(&format!(" (category {})", r.as_str()));
    }
    vec![
        card.biomarker.concept.meaning.clone(),
        result,
        format!("{} v{}", m.model, m.model_version),
    ]
}

/// The legend of the Agatston outlines: (text, colour).
pub fn weight_legend() -> Vec<(String, [u8; 3])> {
    let bands = ["130-199", "200-299", "300-399", ">=400"];
    let mut out: Vec<(String, [u8; 3])> = bands
        .iter()
        .enumerate()
        .map(|(k, b)| (format!("weight {}: peak {b} HU", k + 1), WEIGHT_COLOURS[k]))
        .collect();
    out.push(("grey: not counted".to_owned(), UNCOUNTED_COLOUR));
    out
}

/// Outline the lesions of slice `s` of an Agatston measurement (module doc).
fn outline_slice(img: &mut RgbImage, m: &Measurement, s: usize) {
    let lesions: Vec<_> = m.lesions.iter().map(|l| l.lesion.clone()).collect();
    let first = agatston::first_of_slice(&lesions, m.candidates.dim().0);
    if first[s] == usize::MAX {
        return;
    }
    // The candidates are the lesions; labelling them per slice numbers them
    // as `agatston::lesions` did.
    let (labels, _) = label8(m.candidates.index_axis(Axis(0), s));
    outline_lesions(img, labels.view(), |l| {
        let les = m.lesions.get(first[s] + l as usize - 1)?;
        if les.counted && (1..=4).contains(&les.lesion.weight) {
            Some((1 + les.lesion.weight, WEIGHT_COLOURS[les.lesion.weight as usize - 1]))
        } else {
            Some((0, UNCOUNTED_COLOUR))
        }
    });
}

/// Render the chosen slices: `(slice index, image)`.
pub fn render_overlays(
    card: &ModelCard,
    m: &Measurement,
    hu: ArrayView3<f32>,
    opts: &ScOptions,
) -> Result<Vec<(usize, RgbImage)>, ReportError> {
    let has_map = !m.map.is_empty();
    if has_map && (m.map.dim() != hu.dim() || m.candidates.dim() != hu.dim()) {
        return Err(ReportError::Shape {
            what: format!(
                "HU {:?}, map {:?}, candidates {:?}",
                hu.dim(),
                m.map.dim(),
                m.candidates.dim()
            ),
        });
    }
    let lines = caption(card, m);
    let outlines = card.is_agatston() && has_map;
    let legend = if outlines { weight_legend() } else { vec![] };
    let (_, rows, cols) = hu.dim();
    let longest = lines
        .iter()
        .map(|l| l.chars().count())
        .chain(legend.iter().map(|(l, _)| l.chars().count()))
        .chain([DISCLAIMER.len()])
        .max()
        .unwrap_or(1);
    let scale = text_scale(cols, longest);
    let pad = 2 * scale;
    Ok(choose_slices(card, m, hu.dim().0, opts.max_images)
        .into_iter()
        .map(|s| {
            let mut img = if outlines {
                let mut img = render_slice(hu.index_axis(Axis(0), s), None, None, opts.window, &opts.style);
                outline_slice(&mut img, m, s);
                img
            } else {
                render_slice(
                    hu.index_axis(Axis(0), s),
                    has_map.then(|| m.map.index_axis(Axis(0), s)),
                    has_map.then(|| m.candidates.index_axis(Axis(0), s)),
                    opts.window,
                    &opts.style,
                )
            };
            for (i, l) in lines.iter().enumerate() {
                draw_text(
                    &mut img,
                    pad + i * line_height(scale),
                    pad,
                    l,
                    scale,
                    [255, 255, 255],
                );
            }
            let bottom = rows.saturating_sub(pad + line_height(scale));
            for (i, (l, colour)) in legend.iter().enumerate() {
                let row = bottom.saturating_sub((legend.len() - i) * line_height(scale));
                draw_text(&mut img, row, pad, l, scale, *colour);
            }
            draw_text(&mut img, bottom, pad, DISCLAIMER, scale, [255, 220, 0]);
            (s, img)
        })
        .collect())
}

/// Build the SC instances for one measurement, one per chosen slice.
/// `hu` is the volume the measurement was made on (`[S,R,C]`, the order of
/// `ctx.source_refs`).
pub fn build_sc(
    ctx: &ReportContext,
    card: &ModelCard,
    m: &Measurement,
    hu: ArrayView3<f32>,
    opts: &ScOptions,
) -> Result<Vec<FileDicomObject<InMemDicomObject>>, ReportError> {
    ctx.check()?;
    super::check_text("model name", &m.model, 64)?;
    super::check_text("model version", &m.model_version, 64)?;
    if ctx.source_refs.len() != hu.dim().0 {
        return Err(ReportError::Shape {
            what: format!(
                "{} source instances for {} slices",
                ctx.source_refs.len(),
                hu.dim().0
            ),
        });
    }
    let series = ctx.uid("sc-series");
    let description = if card.is_agatston() {
        format!(
            "{} overlay: counted lesions outlined by Agatston weight 1-4, uncounted grey, W{}/L{}",
            m.model, opts.window.width, opts.window.center
        )
    } else {
        format!(
            "{} overlay: map > {}, candidate outline, W{}/L{}",
            m.model, opts.style.map_threshold, opts.window.width, opts.window.center
        )
    };
    render_overlays(card, m, hu, opts)?
        .into_iter()
        .enumerate()
        .map(|(k, (slice, img))| {
            let sop = ctx.uid(&format!("sc-instance|{slice}"));
            let mut o = InMemDicomObject::new_empty();
            put_sop_common(
                &mut o,
                ctx,
                SECONDARY_CAPTURE,
                &sop,
                (&m.model, &m.model_version),
            );
            put_patient_and_study(&mut o, &ctx.source)?;

            // General Series (C.7.3.1): our own series in the source study.
            super::put_series(
                &mut o,
                "OT",
                &series,
                SC_SERIES_NUMBER,
                ctx.created,
                &format!("Biomarker overlay {}", m.model),
            );
            // Laterality is Type 2C (paired body parts): with the source's
            // Body Part Examined a checker can tell it is not needed; without
            // it, empty means "unknown".
            match copied_text(&ctx.source, tags::BODY_PART_EXAMINED, VR::CS)? {
                Some(part) => {
                    o.put(str_elem(tags::BODY_PART_EXAMINED, VR::CS, part));
                }
                None => {
                    o.put(str_elem(tags::LATERALITY, VR::CS, ""));
                }
            }
            put_equipment(&mut o, ctx);

            // SC Equipment (C.8.6.1): made on a workstation from CT.
            o.put(str_elem(tags::CONVERSION_TYPE, VR::CS, "WSD"));
            o.put(str_elem(
                tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER,
                VR::LO,
                ctx.device.manufacturer.clone(),
            ));
            o.put(str_elem(
                tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME,
                VR::LO,
                "biomarker-node",
            ));
            o.put(str_elem(
                tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS,
                VR::LO,
                ctx.device.software_version.clone(),
            ));

            // General Image (C.7.6.1).
            o.put(str_elem(tags::INSTANCE_NUMBER, VR::IS, (k + 1).to_string()));
            o.put(str_elem(tags::PATIENT_ORIENTATION, VR::CS, ""));
            o.put(str_elem(tags::CONTENT_DATE, VR::DA, da(ctx.created)));
            o.put(str_elem(tags::CONTENT_TIME, VR::TM, tm(ctx.created)));
            o.put(str_elem(tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY"));
            o.put(str_elem(
                tags::DERIVATION_DESCRIPTION,
                VR::ST,
                description.clone(),
            ));
            o.put(str_elem(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"));
            o.put(str_elem(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"));
            let src = &ctx.source_refs[slice];
            let r = source_image_ref(src.sop_class_uid.as_str(), src.sop_instance_uid.as_str());
            o.put(seq_elem(tags::SOURCE_IMAGE_SEQUENCE, vec![r]));

            // SC Image (C.8.6.2): the overlay is at native resolution, so
            // the source pixel spacing still holds (as nominal spacing).
            o.put(str_elem(
                tags::DATE_OF_SECONDARY_CAPTURE,
                VR::DA,
                da(ctx.created),
            ));
            o.put(str_elem(
                tags::TIME_OF_SECONDARY_CAPTURE,
                VR::TM,
                tm(ctx.created),
            ));
            if let Some(ps) = copied_text(&ctx.source, tags::PIXEL_SPACING, VR::DS)? {
                o.put(str_elem(tags::NOMINAL_SCANNED_PIXEL_SPACING, VR::DS, super::content::fit_ds_text(&ps)));
            }

            // Image Pixel (C.7.6.3).
            let (rows, cols) = (img.rows, img.cols);
            let dim = |v: usize, what: &str| {
                u16::try_from(v).map_err(|_| ReportError::Shape {
                    what: format!("{what} {v} exceeds 65535"),
                })
            };
            o.put(DataElement::new(
                tags::SAMPLES_PER_PIXEL,
                VR::US,
                PrimitiveValue::from(3u16),
            ));
            o.put(str_elem(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"));
            o.put(DataElement::new(
                tags::PLANAR_CONFIGURATION,
                VR::US,
                PrimitiveValue::from(0u16),
            ));
            o.put(DataElement::new(
                tags::ROWS,
                VR::US,
                PrimitiveValue::from(dim(rows, "rows")?),
            ));
            o.put(DataElement::new(
                tags::COLUMNS,
                VR::US,
                PrimitiveValue::from(dim(cols, "columns")?),
            ));
            o.put(DataElement::new(
                tags::BITS_ALLOCATED,
                VR::US,
                PrimitiveValue::from(8u16),
            ));
            o.put(DataElement::new(
                tags::BITS_STORED,
                VR::US,
                PrimitiveValue::from(8u16),
            ));
            o.put(DataElement::new(
                tags::HIGH_BIT,
                VR::US,
                PrimitiveValue::from(7u16),
            ));
            o.put(DataElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(0u16),
            ));
            let mut px = img.data;
            if px.len() % 2 == 1 {
                px.push(0); // OB values have even length (PS3.5 7.1.1)
            }
            o.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PrimitiveValue::from(px),
            ));

            with_meta(o)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::testutil::*;
    use std::path::Path;

    fn write_png(path: &Path, img: &RgbImage) {
        let f = std::fs::File::create(path).unwrap();
        let mut enc =
            png::Encoder::new(std::io::BufWriter::new(f), img.cols as u32, img.rows as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&img.data)
            .unwrap();
    }

    #[test]
    fn cac_overlays_only_lesion_slices_and_pass_dciodvfy() {
        let (ctx, card, _) = cac_fixture();
        let (hu, m) = cac_measurement(4, 32, 32);
        let opts = ScOptions::for_card(&card);
        assert_eq!(choose_slices(&card, &m, 4, 16), vec![1, 3]);
        assert_eq!(choose_slices(&card, &m, 4, 1).len(), 1);
        let files = build_sc(&ctx, &card, &m, hu.view(), &opts).unwrap();
        assert_eq!(files.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let mut uids = vec![];
        for (i, f) in files.iter().enumerate() {
            let p = dir.path().join(format!("sc{i}.dcm"));
            f.write_to_file(&p).unwrap();
            keep(&p, &format!("sc-cac-{i}.dcm"));
            dciodvfy_clean(&p);
            uids.push(
                f.element(tags::SOP_INSTANCE_UID)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .into_owned(),
            );
            let src = f
                .element(tags::SOURCE_IMAGE_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()[0]
                .element(tags::REFERENCED_SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .into_owned();
            assert_eq!(src, ctx.source_refs[[1, 3][i]].sop_instance_uid.as_str());
        }
        // stable: the same job gives the same instances
        let again = build_sc(&ctx, &card, &m, hu.view(), &opts).unwrap();
        let (mut a, mut b) = (vec![], vec![]);
        files[0].write_all(&mut a).unwrap();
        again[0].write_all(&mut b).unwrap();
        assert_eq!(a, b);
        assert_ne!(uids[0], uids[1]);
    }

    #[test]
    fn cac_overlay_outlines_lesions_by_weight_and_does_not_wash_the_map() {
        let (_, card, _) = cac_fixture();
        let (hu, mut m) = cac_measurement(4, 128, 128);
        m.lesions[1].lesion.weight = 2;
        let imgs = render_overlays(&card, &m, hu.view(), &ScOptions::for_card(&card)).unwrap();
        assert_eq!(imgs.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 3]);
        let grey = |p: [u8; 3]| p[0] == p[1] && p[1] == p[2];
        let check = |img: &RgbImage, s: usize, colour: [u8; 3]| {
            let cand = m.candidates.index_axis(Axis(0), s);
            let (r0, c0) = cand.indexed_iter().find(|(_, &v)| v).map(|(p, _)| p).unwrap();
            // the lesion's own pixels keep the window's grey (450 HU)
            assert_eq!(img.get(r0, c0), [Window::CALCIUM.grey(450.0); 3]);
            // the ring just outside it has the lesion's colour
            assert_eq!(img.get(r0 - 1, c0), colour);
            assert_eq!(img.get(r0 - 1, c0 - 1), colour);
            // where the map was washed over before (its halo), grey now
            assert!(grey(img.get(r0 - 2, c0)), "{:?}", img.get(r0 - 2, c0));
        };
        check(&imgs[0].1, 1, WEIGHT_COLOURS[3]);
        check(&imgs[1].1, 3, WEIGHT_COLOURS[1]);
        // a lesion that does not count is outlined grey
        m.lesions[0].counted = false;
        let imgs = render_overlays(&card, &m, hu.view(), &ScOptions::for_card(&card)).unwrap();
        check(&imgs[0].1, 1, UNCOUNTED_COLOUR);
        // and the legend is burned in, in the weight colours
        for w in WEIGHT_COLOURS {
            assert!(imgs[0].1.data.chunks(3).any(|p| p == w), "{w:?} in the legend");
        }
    }

    #[test]
    fn area_overlay_is_one_slice_and_passes_dciodvfy() {
        let (ctx, card, _) = area_fixture();
        let (hu, m) = area_measurement(1, 64, 64);
        let files = build_sc(&ctx, &card, &m, hu.view(), &ScOptions::for_card(&card)).unwrap();
        assert_eq!(files.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sc.dcm");
        files[0].write_to_file(&p).unwrap();
        keep(&p, "sc-area.dcm");
        dciodvfy_clean(&p);
        pydicom_rgb(&p, 64, 64);
    }

    #[test]
    fn mismatched_shapes_are_rejected() {
        let (ctx, card, _) = area_fixture();
        let (hu, m) = area_measurement(1, 64, 64);
        let (hu2, _) = area_measurement(1, 32, 32);
        assert!(matches!(
            build_sc(&ctx, &card, &m, hu2.view(), &ScOptions::for_card(&card)),
            Err(ReportError::Shape { .. })
        ));
        let (hu3, _) = area_measurement(2, 64, 64);
        assert!(build_sc(&ctx, &card, &m, hu3.view(), &ScOptions::for_card(&card)).is_err());
        drop(hu);
    }

    /// Writes docs/overlay-example.png (and a CAC one) from the phantom:
    /// `cargo test --lib report::sc -- --ignored`.
    #[test]
    #[ignore = "writes into docs/"]
    fn write_overlay_examples() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        let card = card(AREA_CARD);
        let (hu, m) = area_measurement(1, 512, 512);
        let imgs = render_overlays(&card, &m, hu.view(), &ScOptions::for_card(&card)).unwrap();
        write_png(&docs.join("overlay-example.png"), &imgs[0].1);
        let card = crate::report::testutil::card(CAC_CARD);
        let (hu, m) = cac_measurement(4, 512, 512);
        let imgs = render_overlays(&card, &m, hu.view(), &ScOptions::for_card(&card)).unwrap();
        write_png(&docs.join("overlay-example-cac.png"), &imgs[0].1);
    }
}
