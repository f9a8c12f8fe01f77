//! The out-of-distribution guard: is this input what the model was validated
//! on, and is its output plausible? A model trained on phantoms and checked
//! on a few real scans says nothing trustworthy about a head CT, a localizer
//! or a slice at the heart; the node refuses those instead of sending a
//! number.
//!
//! Input: a model card's `validated_input:` and `validated_output:` sections
//! ([`ValidatedInput`], [`ValidatedOutput`]), the assembled [`Volume`] and
//! the indices of the slices the model sees, the series' header
//! ([`Acquisition`]), and after inference the [`Measurement`].
//! Output: `Ok(())`, or a [`Refusal`] that names the [`Check`] and the
//! measured value against the validated range.
//!
//! Invariants:
//! - A card without the sections is not checked (site cards written before
//!   them keep working); a key absent from a section is not checked.
//! - An attribute the series does not state (KVP, BodyPartExamined,
//!   ContrastBolusAgent) is unknown and passes; the pixel checks, which
//!   every series has data for, still run. Refusals rest on what the data
//!   says, never on what it leaves out.
//! - Checks run in a fixed order (header, then pixels, then output) and the
//!   first that fails is the reason, so a refusal is reproducible.
//! - [`check_header`] needs only the header: the route tester runs it on
//!   files without decoding pixels.
//!
//! Failure modes: none besides the refusal. A header that cannot be read
//! again (the volume was just read from it) makes the header-only checks
//! see unknown values.

use ndarray::{ArrayView2, Axis};

use super::card::{ContrastRule, HuPeak, ModelCard, Range, ValidatedInput, ValidatedOutput};
use crate::biomarkers::Measurement;
use crate::volume::acquisition::Acquisition;
use crate::volume::{landmark, Volume};

/// Which check refused; the `check` label of
/// `biomarker_node_jobs_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    ImageType,
    Orientation,
    BodyPart,
    PixelSpacing,
    SliceThickness,
    Kvp,
    Contrast,
    HuAir,
    HuFat,
    Level,
    OutputValue,
    OutputMapMass,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::ImageType => "image_type",
            Check::Orientation => "orientation",
            Check::BodyPart => "body_part",
            Check::PixelSpacing => "pixel_spacing",
            Check::SliceThickness => "slice_thickness",
            Check::Kvp => "kvp",
            Check::Contrast => "contrast",
            Check::HuAir => "hu_air",
            Check::HuFat => "hu_fat",
            Check::Level => "level",
            Check::OutputValue => "output_value",
            Check::OutputMapMass => "output_map_mass",
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an input or output is refused: the check and what it measured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (check: {check})")]
pub struct Refusal {
    pub check: Check,
    pub message: String,
}

fn refuse(check: Check, message: String) -> Result<(), Refusal> {
    Err(Refusal { check, message })
}

fn within(v: f64, [lo, hi]: Range) -> bool {
    // A hair of slack for values written in decimal (0.5 stored as 0.49999).
    let eps = 1e-6 * hi.abs().max(1.0);
    v >= lo - eps && v <= hi + eps
}

/// What the header-level checks look at: the header of the first slice the
/// model sees, with the geometry the volume was assembled with when there
/// is one (multi-frame objects keep it in functional groups).
#[derive(Debug, Clone, Default)]
pub struct HeaderFacts {
    pub acquisition: Acquisition,
    /// PixelSpacing (mm).
    pub pixel_spacing: Option<[f64; 2]>,
    /// SliceThickness, else the spacing between slices (mm).
    pub slice_thickness: Option<f64>,
    /// |z component| of the image normal.
    pub normal_z: Option<f64>,
}

impl HeaderFacts {
    /// From a header alone (the route tester).
    pub fn from_acquisition(a: Acquisition) -> HeaderFacts {
        let normal_z = a.orientation.map(|o| {
            let (r, c) = (&o[0..3], &o[3..6]);
            let n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]];
            let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
            if len == 0.0 {
                0.0
            } else {
                (n[2] / len).abs()
            }
        });
        HeaderFacts { pixel_spacing: a.pixel_spacing, slice_thickness: a.slice_thickness, normal_z, acquisition: a }
    }

    /// From an assembled volume and the header of slice `first`.
    pub fn from_volume(vol: &Volume, first: usize) -> HeaderFacts {
        let acquisition = vol
            .source_paths
            .get(first)
            .and_then(|p| Acquisition::read(p).ok())
            .unwrap_or_default();
        HeaderFacts {
            pixel_spacing: Some(vol.pixel_spacing),
            slice_thickness: acquisition.slice_thickness.or(vol.slice_thickness).or(vol.spacing_mm),
            normal_z: Some(vol.normal[2].abs()),
            acquisition,
        }
    }
}

/// An image normal at most ~25° from the patient z axis is axial (the
/// landmark search uses the same bound).
const AXIAL_MIN_NORMAL_Z: f64 = 0.9;

/// The checks that need only the header, in order: image type,
/// orientation, body part, pixel spacing, slice thickness, kVp, contrast.
pub fn check_header(v: &ValidatedInput, h: &HeaderFacts) -> Result<(), Refusal> {
    let a = &h.acquisition;
    if v.orientation.is_some() {
        if a.image_type.iter().any(|t| t == "LOCALIZER") {
            return refuse(Check::ImageType, "the image is a localizer (ImageType LOCALIZER), not an axial slice".into());
        }
        if let Some(nz) = h.normal_z.filter(|nz| *nz < AXIAL_MIN_NORMAL_Z) {
            let deg = nz.clamp(-1.0, 1.0).acos().to_degrees();
            return refuse(
                Check::Orientation,
                format!("the image plane is {deg:.0}° from axial; the model is validated on axial slices (at most 25°)"),
            );
        }
    }
    if let Some(part) = &a.body_part_examined {
        if !v.body_part_examined.is_empty() && !v.body_part_examined.iter().any(|p| p.eq_ignore_ascii_case(part)) {
            return refuse(
                Check::BodyPart,
                format!(
                    "body part examined {part} is outside the model's validated {}",
                    v.body_part_examined.join(", ")
                ),
            );
        }
    }
    if let (Some(r), Some(ps)) = (v.pixel_spacing_mm, h.pixel_spacing) {
        if let Some(bad) = ps.iter().find(|p| !within(**p, r)) {
            return refuse(
                Check::PixelSpacing,
                format!("pixel spacing {bad:.3} mm is outside the model's validated {:.2}-{:.2} mm", r[0], r[1]),
            );
        }
    }
    if let (Some(r), Some(t)) = (v.slice_thickness_mm, h.slice_thickness) {
        if !within(t, r) {
            return refuse(
                Check::SliceThickness,
                format!("slice thickness {t:.1} mm is outside the model's validated {:.1}-{:.1} mm", r[0], r[1]),
            );
        }
    }
    if let (Some(r), Some(kvp)) = (v.kvp, a.kvp) {
        if !within(kvp, r) {
            return refuse(Check::Kvp, format!("tube voltage {kvp:.0} kVp is outside the model's validated {:.0}-{:.0} kVp", r[0], r[1]));
        }
    }
    if v.contrast == ContrastRule::NonContrast {
        if let Some(agent) = &a.contrast_bolus_agent {
            return refuse(
                Check::Contrast,
                format!(
                    "the series states a contrast agent ({}); the model is validated on non-contrast CT only",
                    crate::dicom::header::escaped(agent)
                ),
            );
        }
    }
    Ok(())
}

/// Opacified blood (cm² per slice, median; `volume::heart::opacified_blood_cm2`)
/// above which a series is contrast-enhanced, whatever its header says. The
/// descending aorta alone is about 5 cm² (25 mm across); non-contrast blood
/// never reaches 130 HU, so the CAC phantoms and chest-lidc0001 with its
/// contrast taken out (its table in view) measure 0, and the contrast
/// chest as scanned 28.
pub const OPACIFIED_BLOOD_MAX_CM2: f64 = 5.0;

/// The contrast rule from the pixels: a card validated on non-contrast CT
/// only refuses a series whose heart region is full of opacified blood.
/// Archives often leave ContrastBolusAgent empty (the header check then
/// passes), and an Agatston score on contrast CT counts the blood pool.
pub fn check_opacified_blood(card: &ModelCard, blood_cm2: Option<f64>) -> Result<(), Refusal> {
    let Some(v) = &card.validated_input else { return Ok(()) };
    match blood_cm2 {
        Some(cm2) if v.contrast == ContrastRule::NonContrast && cm2 > OPACIFIED_BLOOD_MAX_CM2 => refuse(
            Check::Contrast,
            format!(
                "the heart region shows {cm2:.1} cm2 per slice of blood at 130 HU or more (IV contrast; at most \
                 {OPACIFIED_BLOOD_MAX_CM2:.0} cm2 without): the model is validated on non-contrast CT only"
            ),
        ),
        _ => Ok(()),
    }
}

/// One peak of a HU histogram (see [`hu_peak`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Centre of the densest 25 HU of the window.
    pub mode_hu: f64,
    /// Voxels inside the window.
    pub voxels: usize,
    /// Share of those within the densest 25 HU.
    pub fraction: f64,
}

const BIN_HU: f64 = 5.0;
/// Bins either side of the centre bin in the running sum: 5 bins, 25 HU.
const HALF_SPAN_BINS: usize = 2;

/// The mode of the voxels inside `window` (5 HU bins, smoothed by a 25 HU
/// running sum, so single-HU quantisation such as clipped air at −1024
/// does not split the peak), and how sharp it is. A calibrated CT has sharp
/// air (outside the body, trachea, lungs' airways) and fat peaks; uniform
/// noise has ~12% of its window in any 25 HU.
pub fn hu_peak(hu: impl Iterator<Item = f32>, window: Range) -> Peak {
    let (bins, voxels) = histogram(hu, window);
    peak_of(&bins, voxels, window)
}

/// Counts of `hu` in [`BIN_HU`] bins over `window`, and how many fell in it.
fn histogram(hu: impl Iterator<Item = f32>, window: Range) -> (Vec<usize>, usize) {
    let [lo, hi] = window;
    let n = ((hi - lo) / BIN_HU).ceil().max(1.0) as usize;
    let mut bins = vec![0usize; n];
    let mut voxels = 0usize;
    for v in hu {
        let v = v as f64;
        if v >= lo && v < hi {
            bins[(((v - lo) / BIN_HU) as usize).min(n - 1)] += 1;
            voxels += 1;
        }
    }
    (bins, voxels)
}

fn peak_of(bins: &[usize], voxels: usize, window: Range) -> Peak {
    let n = bins.len();
    let smooth = |i: usize| bins[i.saturating_sub(HALF_SPAN_BINS)..(i + HALF_SPAN_BINS + 1).min(n)].iter().sum::<usize>();
    // Ties (a peak narrower than the running sum) go to the fullest bin.
    let (best, count) =
        (0..n).map(|i| (i, smooth(i))).max_by_key(|&(i, c)| (c, bins[i], std::cmp::Reverse(i))).unwrap_or((0, 0));
    Peak {
        mode_hu: window[0] + (best as f64 + 0.5) * BIN_HU,
        voxels,
        fraction: if voxels == 0 { 0.0 } else { count as f64 / voxels as f64 },
    }
}

fn check_peak(
    check: Check,
    name: &str,
    p: &HuPeak,
    min_voxels: usize,
    min_fraction: f64,
    seen: &[ArrayView2<'_, f32>],
) -> Result<(), Refusal> {
    // Counts add up the same in any order: runs of slices side by side (a
    // chest's 3 mm slabs are 29 M voxels, walked once per peak).
    let runs = crate::par::map_runs(seen, crate::par::threads(), |run| {
        histogram(run.iter().flat_map(|s| s.iter().copied()), p.window_hu)
    });
    let mut runs = runs.into_iter();
    let (mut bins, mut voxels) = runs.next().expect("map_runs returns at least one run");
    for (b, v) in runs {
        bins.iter_mut().zip(b).for_each(|(total, k)| *total += k);
        voxels += v;
    }
    let peak = peak_of(&bins, voxels, p.window_hu);
    let [lo, hi] = p.window_hu;
    if peak.voxels < min_voxels {
        return refuse(
            check,
            format!(
                "no {name} peak: {} voxels in {lo:.0}..{hi:.0} HU, fewer than the {min_voxels} a calibrated CT of the validated region has",
                peak.voxels
            ),
        );
    }
    if peak.fraction < min_fraction {
        return refuse(
            check,
            format!(
                "no {name} peak: the HU histogram in {lo:.0}..{hi:.0} HU is flat ({:.0}% of its voxels in the densest 25 HU, \
                 a calibrated CT has at least {:.0}%): noise or not a CT image",
                peak.fraction * 100.0,
                min_fraction * 100.0
            ),
        );
    }
    if (peak.mode_hu - p.expected_hu).abs() > p.tolerance_hu {
        return refuse(
            check,
            format!(
                "the {name} peak is at {:.0} HU, outside the model's validated {:.0} ± {:.0} HU (HU calibration)",
                peak.mode_hu, p.expected_hu, p.tolerance_hu
            ),
        );
    }
    Ok(())
}

/// The checks on the pixels the model sees (`idx`, slices of `vol`): the
/// air and fat peaks, then the level.
pub fn check_pixels(v: &ValidatedInput, vol: &Volume, idx: &[usize]) -> Result<(), Refusal> {
    if let Some(c) = &v.hu_calibration {
        // Views, not `select`: a copy of a whole liver volume's HU (150 MB)
        // only to histogram it twice.
        let seen: Vec<_> = idx.iter().map(|&i| vol.hu.index_axis(Axis(0), i)).collect();
        if let Some(air) = &c.air {
            check_peak(Check::HuAir, "air", air, c.min_voxels, c.min_peak_fraction, &seen)?;
        }
        if let Some(fat) = &c.fat {
            check_peak(Check::HuFat, "fat", fat, c.min_voxels, c.min_peak_fraction, &seen)?;
        }
    }
    if v.level.as_deref() == Some("above_aortic_arch") {
        for &i in idx {
            let slice = vol.slice(i).expect("an index the job selected");
            if let Err(landmark::LandmarkError::NotFound(why)) = landmark::trachea_in_slice(slice, vol.pixel_spacing) {
                return refuse(
                    Check::Level,
                    format!(
                        "the slice at z = {:.1} mm is not at the level just above the aortic arch the model is validated on: {why}",
                        vol.positions[i][2]
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Every input check of the card on the slices `idx` of `vol` (the slices
/// the model is given). Called by the job before inference.
pub fn check_input(card: &ModelCard, vol: &Volume, idx: &[usize]) -> Result<(), Refusal> {
    let Some(v) = &card.validated_input else { return Ok(()) };
    check_header(v, &HeaderFacts::from_volume(vol, idx.first().copied().unwrap_or(0)))?;
    check_pixels(v, vol, idx)
}

/// Share of the map's mass outside the candidates, and the mass in mm²;
/// `None` for a model without a map. The mass is the map where it is at
/// least `threshold` (the card's segmentation threshold: what the model
/// calls its anatomy): the maps are trained only inside candidates, so below
/// it they carry a diffuse floor everywhere (on phantoms 90-98% of the raw
/// map sum is outside the candidates, for a correct value).
pub fn map_mass_outside(m: &Measurement, pixel_area_mm2: f64, threshold: f64) -> Option<(f64, f64)> {
    if m.map.is_empty() || m.map.shape() != m.candidates.shape() {
        return None;
    }
    let (mut total, mut outside) = (0.0f64, 0.0f64);
    for (v, c) in m.map.iter().zip(m.candidates.iter()) {
        let v = *v as f64;
        if v < threshold {
            continue;
        }
        total += v;
        if !c {
            outside += v;
        }
    }
    Some((if total > 0.0 { outside / total } else { 0.0 }, total * pixel_area_mm2))
}

/// The output checks of the card. Called by the job after inference.
pub fn check_output(card: &ModelCard, m: &Measurement, pixel_area_mm2: f64) -> Result<(), Refusal> {
    let Some(o) = &card.validated_output else { return Ok(()) };
    check_output_with(o, &card.biomarker.unit.ucum, m, pixel_area_mm2, card.segmentation.threshold)
}

fn check_output_with(
    o: &ValidatedOutput,
    unit: &str,
    m: &Measurement,
    pixel_area_mm2: f64,
    threshold: f64,
) -> Result<(), Refusal> {
    check_value_with(o, unit, m.value)?;
    let outside = map_mass_outside(m, pixel_area_mm2, threshold);
    if let Some((share, mass)) = outside {
        tracing::debug!(share, mass_mm2 = mass, value = m.value, "map mass outside the candidates");
    }
    if let (Some(max), Some((share, mass))) = (o.max_map_mass_outside_candidates, outside) {
        if mass >= o.min_map_mass_mm2 && share > max {
            return refuse(
                Check::OutputMapMass,
                format!(
                    "{:.0}% of the model's map lies outside the candidate pixels (at most {:.0}% on validated input): \
                     the model does not find its anatomy in this image",
                    share * 100.0,
                    max * 100.0
                ),
            );
        }
    }
    Ok(())
}

/// The card's value range alone, for a value the model produced per slice
/// (a volume job checks its largest cross-section: the range is an area's).
pub fn check_value(card: &ModelCard, value: f64) -> Result<(), Refusal> {
    let Some(o) = &card.validated_output else { return Ok(()) };
    check_value_with(o, &card.biomarker.unit.ucum, value)
}

fn check_value_with(o: &ValidatedOutput, unit: &str, value: f64) -> Result<(), Refusal> {
    if let Some(r) = o.value {
        if !value.is_finite() || !within(value, r) {
            return refuse(
                Check::OutputValue,
                format!("the value {value:.2} {unit} is outside the model's plausible {}-{} {unit}", r[0], r[1]),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
