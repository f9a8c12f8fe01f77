//! One job's computation: a routed series through volume assembly, slice
//! selection (or, for Agatston on thin slices, 3 mm slabs:
//! `volume::resample`), inference and aggregation. Shared by `analyze` (files) and the
//! job worker (spooled series), so both compute the same thing.
//!
//! Input: the series' files and a [`ResolvedRoute`]. Output: an [`Analysis`]
//! whose [`ResultLine`] is what `analyze` prints; the worker stores it,
//! with the report files, as the job's [`JobResult`].
//! Failure: a [`JobError`], whose [`JobError::fault`] says whether the input
//! was unusable (permanent) or the environment failed (transient). The input
//! guard (`inference::guard`) runs on the selected slices before inference
//! and on the measurement after it; its refusal is [`JobError::Refused`]. Errors
//! stay typed up to the job store, which keeps their text.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{s, Array3};
use serde::{Deserialize, Serialize};

use super::ResolvedRoute;
use crate::biomarkers::{agatston, Measurement, PixelGeometry};
use crate::inference::measure::{measure, measure_volume};
use crate::fault::Fault;
use crate::inference::registry::ModelUnavailable;
use crate::inference::{InferenceError, Model};
use crate::report::write::{ReportSource, WriteError};
use crate::inference::ModelCard;
use crate::volume::heart::{self, HeartRegion};
use crate::volume::{resample, SliceSelection, Volume, VolumeError, VolumeOptions};

/// Why a job failed. The text is what the job store and the API show.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("volume: {0}")]
    Volume(#[from] VolumeError),
    #[error("inference: {0}")]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    ModelUnavailable(#[from] ModelUnavailable),
    #[error("no slice thickness or spacing to scale the Agatston score")]
    NoThickness,
    #[error("pixel values are stored in steps of {step} HU (a lossy 8-bit encoding?); HU-threshold biomarkers need steps of at most {MAX_HU_STEP} HU")]
    CoarseHu { step: f64 },
    #[error(transparent)]
    Output(#[from] WriteError),
    /// Reading the series index.
    #[error(transparent)]
    Series(#[from] crate::series::SeriesError),
    #[error(transparent)]
    Uid(#[from] crate::dicom::UidError),
    #[error(transparent)]
    ResultPath(#[from] crate::dicom::PathEscape),
    #[error("no instances of this series are in the spool (deleted by retention?); send the series again to analyse it")]
    NoInstances,
    #[error("outbox: {0}")]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    /// The deadline passed, or another process re-queued the job: this
    /// attempt's outcome is not the job's.
    #[error("abandoned at its deadline")]
    Abandoned,
    /// The worker gave up on the attempt at `jobs.timeout_s`.
    #[error("deadline of {} s exceeded", .0.as_secs_f64())]
    Deadline(std::time::Duration),
    #[error("job panicked: {0}")]
    Panicked(String),
    /// The series is not what the route's model measures: its input is
    /// outside what the model card says the model was validated on, its
    /// output is implausible (`inference::guard`), or a landmark the slice
    /// selection needs is not in it (no aortic arch). Permanent; the job ends
    /// `refused` (not `failed`) with this text, and `check` is the `check`
    /// label of `biomarker_node_jobs_refused_total`: the guard's check, or
    /// `aortic_arch`.
    #[error("refused: {reason}")]
    Refused { check: &'static str, reason: String },
}

impl From<crate::inference::guard::Refusal> for JobError {
    fn from(r: crate::inference::guard::Refusal) -> JobError {
        JobError::Refused { check: r.check.as_str(), reason: r.to_string() }
    }
}

impl JobError {
    /// For a refusal, the check that refused (the `check` label of
    /// `biomarker_node_jobs_refused_total`).
    pub fn refused_by(&self) -> Option<&'static str> {
        match self {
            JobError::Refused { check, .. } => Some(check),
            _ => None,
        }
    }

    /// How the job store records this error: `refused` for a refusal,
    /// `failed` otherwise, with `text` (this error's display, chain included)
    /// as the reason.
    pub fn outcome<'a>(&self, text: &'a str) -> super::store::Outcome<'a> {
        match self {
            JobError::Refused { .. } => super::store::Outcome::Refused(text),
            _ => super::store::Outcome::Failed(text),
        }
    }

    /// Whether running the same job again, unchanged, may succeed.
    pub fn fault(&self) -> Fault {
        let transient = match self {
            JobError::Volume(e) => e.is_retryable(),
            JobError::Inference(e) => e.is_retryable(),
            JobError::Series(e) => e.is_retryable(),
            JobError::Outbox(e) => return e.fault(),
            JobError::Output(_) | JobError::Abandoned | JobError::Deadline(_) => true,
            JobError::ModelUnavailable(_)
            | JobError::NoThickness
            | JobError::CoarseHu { .. }
            | JobError::Uid(_)
            | JobError::ResultPath(_)
            | JobError::NoInstances
            | JobError::Encode(_)
            | JobError::Panicked(_)
            | JobError::Refused { .. } => false,
        };
        if transient {
            Fault::Transient
        } else {
            Fault::Permanent
        }
    }
}

/// Candidate heuristics threshold HU at single-HU edges (e.g. −29, −30,
/// 130); stored steps coarser than this make the candidates, and so the
/// value, an artefact of the encoding rather than of the patient.
pub const MAX_HU_STEP: f64 = 2.0;

/// Whether a volume's HU step is above [`MAX_HU_STEP`]. The margin is for
/// slopes that are a 2 HU grid in intent but not in decimal: a 12-bit
/// re-encoding spreads 8190 HU over 4095 steps (slope 2.0002442, the chest
/// slice's JPEG Extended encoding in shared/realct).
pub fn hu_step_too_coarse(step: f64) -> bool {
    step > MAX_HU_STEP * 1.001
}

/// Whether a volume's slices are thinner than the Agatston protocol wants
/// ([`agatston::THIN_SLICE_BELOW_MM`]), by thickness or by spacing.
fn is_thin(vol: &Volume) -> bool {
    [vol.slice_thickness, vol.spacing_mm].into_iter().flatten().any(|t| t < agatston::THIN_SLICE_BELOW_MM)
}

/// What one job produced.
pub struct Analysis {
    pub line: ResultLine,
    pub measurement: Measurement,
    /// HU of the slices the model saw, `[S,R,C]`.
    pub hu: Hu,
    /// Source file and SOP Instance UID of each of those slices.
    pub slices: Vec<(PathBuf, String)>,
}

/// The HU an [`Analysis`] reports from: the slices it cut out of a volume,
/// or a whole volume that is shared (a worker's series cache,
/// `job::volumes`), which is read in place rather than copied.
pub enum Hu {
    Owned(Array3<f32>),
    Volume(Arc<Volume>),
}

impl Hu {
    pub fn view(&self) -> ndarray::ArrayView3<'_, f32> {
        match self {
            Hu::Owned(a) => a.view(),
            Hu::Volume(v) => v.hu.view(),
        }
    }
}

impl From<Array3<f32>> for Hu {
    fn from(a: Array3<f32>) -> Hu {
        Hu::Owned(a)
    }
}

impl Analysis {
    /// The analysis of the volume's slices `idx` (the ones the model saw, in
    /// the order of `hu`).
    fn of(
        vol: &Volume,
        idx: impl IntoIterator<Item = usize>,
        line: ResultLine,
        measurement: Measurement,
        hu: impl Into<Hu>,
    ) -> Analysis {
        let slices = idx
            .into_iter()
            .map(|i| (vol.source_paths[i].clone(), vol.sop_instance_uids[i].clone()))
            .collect();
        Analysis {
            line,
            measurement,
            hu: hu.into(),
            slices,
        }
    }

    /// What the reports are made of.
    pub fn report_source(&self) -> ReportSource<'_> {
        ReportSource {
            measurement: &self.measurement,
            hu: self.hu.view(),
            slices: &self.slices,
        }
    }
}

/// The JSON line `analyze` prints, one per (series, route).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    pub series_instance_uid: String,
    pub route: String,
    pub model: String,
    pub model_version: String,
    pub biomarker: String,
    pub value: f64,
    pub unit: String,
    pub execution_provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk_category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lesions: Option<usize>,
    pub slices: usize,
    pub elapsed_ms: f64,
    /// Patient z (mm) of the one slice a 2-D model was given, when it was
    /// selected from a volume of several slices (absent for single-image
    /// series and whole-volume models, so their lines are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_z_mm: Option<f64>,
    /// SOP Instance UID of that slice (the image the SR references and the
    /// SC shows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_sop_instance_uid: Option<String>,
    /// A volume measured slice by slice (route `slices: all`): the largest
    /// cross-sectional area (cm2); `slice_z_mm` and `slice_sop_instance_uid`
    /// then name the slice it is on, and `value` is the volume (mL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub largest_area_cm2: Option<f64>,
    /// Agatston: lesions not counted because they lie outside the heart
    /// region (`volume::heart`), by reason; absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lesions_excluded: Option<std::collections::BTreeMap<String, usize>>,
}

/// A report file a job wrote, as its result lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRef {
    pub path: PathBuf,
    pub sop_instance_uid: String,
}

/// A finished job's result as the job store keeps it (`result_json`) and the
/// API and `jobs` print it: the [`ResultLine`], when inference finished, and
/// the report files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    #[serde(flatten)]
    pub line: ResultLine,
    pub inference_finished_at: String,
    pub reports: Vec<ReportRef>,
}

/// The slices of `vol` the route's model is given: every slice for a
/// whole-volume card, and for a 2-D card every slice under `slices: all`
/// (a volume measured slice by slice) or else the one slice the route
/// selects (a single image is itself; a volume without a selection, its
/// middle). A landmark the selection needs that is not in the series is a
/// refusal. The job and the route tester both ask this, so they agree.
pub fn model_slices(
    card: &ModelCard,
    selection: Option<&SliceSelection>,
    vol: &Volume,
) -> Result<Vec<usize>, JobError> {
    let n = vol.slices();
    if card.input.slices != "single" || (n > 1 && selection == Some(&SliceSelection::All)) {
        return Ok((0..n).collect());
    }
    let default = if n == 1 { SliceSelection::Single } else { SliceSelection::Middle };
    let i = vol.select(selection.unwrap_or(&default)).map_err(|e| match e {
        VolumeError::Landmark(l) => JobError::Refused { check: "aortic_arch", reason: l.to_string() },
        e => JobError::Volume(e),
    })?;
    Ok(vec![i])
}

/// The input guard of the model's card on the slices `idx` it will see
/// (`inference::guard::check_input`), and for an Agatston card the heart
/// region (`volume::heart`), found from HU before the model runs: it also
/// tells a contrast-enhanced series by its blood, which the card's
/// non-contrast rule refuses (`guard::check_opacified_blood`). Returns the
/// region, whose exclusions the score applies after inference. The job and
/// the route tester both run it, so they refuse alike.
pub fn check_input(card: &ModelCard, vol: &Volume, idx: &[usize]) -> Result<Option<HeartRegion>, JobError> {
    crate::inference::guard::check_input(card, vol, idx)?;
    let region = if card.is_agatston() { heart::heart_region(vol) } else { None };
    if let Some(r) = &region {
        let blood = heart::opacified_blood_cm2(r, vol.pixel_spacing[0] * vol.pixel_spacing[1]);
        crate::inference::guard::check_opacified_blood(card, blood)?;
    }
    Ok(region)
}

/// Whether the route measures a volume slice by slice with a 2-D area card
/// ([`run_volume`]) rather than giving the model one input.
pub fn is_volume_route(card: &ModelCard, selection: Option<&SliceSelection>, vol: &Volume) -> bool {
    card.input.slices == "single" && vol.slices() > 1 && selection == Some(&SliceSelection::All)
}

/// The series' files as one HU volume, refused when its stored HU steps are
/// too coarse for HU-threshold candidates ([`MAX_HU_STEP`]).
pub fn load_volume(files: &[PathBuf], volume_opts: &VolumeOptions) -> Result<Volume, JobError> {
    let t0 = Instant::now();
    let vol = Volume::from_files_with(files, volume_opts)?;
    tracing::debug!(files = files.len(), slices = vol.slices(), elapsed_ms = t0.elapsed().as_millis() as u64, "volume decoded");
    if hu_step_too_coarse(vol.hu_step) {
        return Err(JobError::CoarseHu { step: vol.hu_step });
    }
    Ok(vol)
}

/// Exactly what a one-input model is given for a series (everything but
/// [`run_volume`]'s routes), after the input guard passed it.
pub struct ModelInput {
    /// The volume the slices were chosen from: for Agatston on thin slices,
    /// the 3 mm slabs.
    pub vol: Arc<Volume>,
    /// Indices into `vol` of the slices the model sees, in the order of `hu`.
    pub idx: Vec<usize>,
    /// HU `[S,R,C]` of those slices: the volume itself, shared, when the
    /// model sees all of it (a copy was 115 MB for a chest's 3 mm slabs).
    pub hu: Hu,
    pub geom: PixelGeometry,
    /// The heart region of an Agatston card ([`check_input`]).
    pub heart: Option<HeartRegion>,
}

/// The model input for `vol` under the route's slice `selection`: Agatston's
/// 3 mm slabs for a thin series, the slices [`model_slices`] chooses, their
/// geometry, and the input guard ([`check_input`]). The job runs this before
/// inference and `dataset export` writes it out, so a model is trained on
/// exactly what it will see.
pub fn model_input(card: &ModelCard, selection: Option<&SliceSelection>, mut vol: Arc<Volume>) -> Result<ModelInput, JobError> {
    if card.is_agatston() && is_thin(&vol) {
        // Agatston is defined on 3 mm slices: a thin series is scored on 3 mm
        // slabs averaged from it, as a scanner reconstructs them.
        if let Some(slabs) = resample::slabs(&vol, agatston::PROTOCOL_SLICE_MM) {
            resample::carry_arch_level(&vol, &slabs);
            vol = Arc::new(slabs);
        }
    }
    let idx = model_slices(card, selection, &vol)?;
    let hu = match idx[..] {
        [i] if card.input.slices == "single" => Hu::Owned(vol.hu.slice(s![i..i + 1, .., ..]).to_owned()),
        _ => Hu::Volume(vol.clone()),
    };
    let thickness = vol.slice_thickness.or(vol.spacing_mm);
    if card.is_agatston() && thickness.is_none() {
        return Err(JobError::NoThickness);
    }
    let geom = PixelGeometry {
        pixel_spacing: vol.pixel_spacing,
        slice_thickness_mm: thickness.unwrap_or(1.0),
    };
    let heart = check_input(card, &vol, &idx)?;
    Ok(ModelInput { vol, idx, hu, geom, heart })
}

/// Runs one routed job with the given model version (the worker runs the
/// version a job was routed with: an active one since demoted, or a shadow
/// candidate) on the series' volume, already loaded ([`load_volume`]) and
/// shared by the jobs of a series (the worker's `job::volumes`, `analyze`'s
/// per-series volume); `t0` is when the job started, for its `elapsed_ms`.
/// Blocking.
pub fn run_on_volume(
    model: &Model,
    series_uid: &str,
    m: &ResolvedRoute,
    vol: Arc<Volume>,
    t0: Instant,
) -> Result<Analysis, JobError> {
    let card = &model.card;
    if is_volume_route(card, m.slices.as_ref(), &vol) {
        return run_volume(model, series_uid, m, vol, t0);
    }
    let ModelInput { vol, idx, hu, geom, heart } = model_input(card, m.slices.as_ref(), vol)?;
    // A slice chosen out of several: the line says which one.
    let selected = (card.input.slices == "single" && vol.slices() > 1).then(|| idx[0]);
    let t_infer = Instant::now();
    let mut measurement = measure(model, hu.view(), geom)?;
    if let Some(region) = &heart {
        // Calcium outside the heart region (bone, aorta, above the arch) is
        // never coronary, whatever the map says.
        crate::biomarkers::exclude_lesions(&mut measurement, region, &card.aggregation);
    }
    crate::inference::guard::check_output(card, &measurement, geom.pixel_spacing[0] * geom.pixel_spacing[1])?;
    crate::telemetry::InferenceTimed {
        model: &m.model,
        provider: measurement.execution_provider,
        seconds: t_infer.elapsed().as_secs_f64(),
    }
    .emit();
    let line = ResultLine {
        series_instance_uid: series_uid.to_owned(),
        route: m.route.clone(),
        model: m.model.clone(),
        model_version: card.version.clone(),
        biomarker: card.task.clone(),
        value: measurement.value,
        unit: measurement.unit.clone(),
        execution_provider: measurement.execution_provider.to_owned(),
        risk_category: measurement.risk_category.map(|r| r.as_str().to_owned()),
        lesions: card.is_agatston().then(|| measurement.lesions.iter().filter(|l| l.counted).count()),
        slices: idx.len(),
        elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
        slice_z_mm: selected.map(|i| vol.positions[i][2]),
        slice_sop_instance_uid: selected.map(|i| vol.sop_instance_uids[i].clone()),
        largest_area_cm2: None,
        lesions_excluded: measurement.lesions.iter().filter_map(|l| l.excluded).fold(None, |acc, e| {
            let mut acc: std::collections::BTreeMap<String, usize> = acc.unwrap_or_default();
            *acc.entry(e.as_str().to_owned()).or_default() += 1;
            Some(acc)
        }),
    };
    Ok(Analysis::of(&vol, idx, line, measurement, hu))
}

/// The `biomarker` of a volume line: what the area card's slices add up
/// to. The liver card's area is tumour; other area cards (none routed this
/// way by default) are named by their task.
pub fn volume_biomarker(task: &str) -> String {
    match task {
        "liver" => "liver_tumour_volume".into(),
        t => format!("{t}_volume"),
    }
}

/// [`run`] for a route with `slices: all` on a volume of a 2-D area card:
/// every slice measured as a single slice would be (in chunks:
/// `inference::measure::measure_volume`), the areas summed over the slices'
/// slabs (`biomarkers::burden`) into a volume in mL, and the largest
/// cross-section with its slice. Kept apart from `run`'s one-slice path so
/// the two read (and change) independently.
///
/// Memory: the volume's HU moves into the [`Analysis`] (the reports render
/// from it) when this job holds the only reference (`analyze`); a worker's
/// volume is also held by the series' cache (`job::volumes`), and the
/// Analysis then holds that volume ([`Hu::Volume`]), not a copy of its HU.
/// The native map (f32) and candidates (bool) are the other two
/// volume-sized arrays (2.25 × the HU volume together). Measured peak RSS
/// of `analyze`: 1.6 GB for 604 slices of 512 × 512 (HU 0.63 GB), 1.9 GB
/// with the SEG; 0.53 GB for 151 slices.
fn run_volume(
    model: &crate::inference::Model,
    series_uid: &str,
    m: &ResolvedRoute,
    vol: Arc<Volume>,
    t0: Instant,
) -> Result<Analysis, JobError> {
    let card = &model.card;
    if card.aggregation.kind != "area" || card.biomarker.unit.ucum != "cm2" {
        return Err(JobError::Volume(VolumeError::Selection {
            selection: SliceSelection::All.to_string(),
            reason: format!(
                "model {} aggregates `{}` in {}; a volume is made of areas in cm2",
                m.model, card.aggregation.kind, card.biomarker.unit.ucum
            ),
        }));
    }
    let geom = PixelGeometry {
        pixel_spacing: vol.pixel_spacing,
        slice_thickness_mm: vol.slice_thickness.or(vol.spacing_mm).unwrap_or(1.0),
    };
    // The guard's input checks hold for every slice the volume is summed
    // over (the HU peaks are taken over all of them).
    let all: Vec<usize> = (0..vol.slices()).collect();
    check_input(card, &vol, &all)?;
    // A volume this job alone holds gives its HU up; a shared one is read
    // in place (see the memory note above).
    let (vol, hu) = match Arc::try_unwrap(vol) {
        Ok(mut own) => {
            let hu = std::mem::replace(&mut own.hu, Array3::zeros((0, 0, 0)));
            (Arc::new(own), Hu::Owned(hu))
        }
        Err(shared) => (shared.clone(), Hu::Volume(shared)),
    };
    let t_infer = Instant::now();
    let measurement = measure_volume(model, hu.view(), geom, &vol.slice_positions)?;
    crate::telemetry::InferenceTimed {
        model: &m.model,
        provider: measurement.execution_provider,
        seconds: t_infer.elapsed().as_secs_f64(),
    }
    .emit();
    let Some((largest, largest_area)) = measurement.volume.as_ref().map(|b| (b.largest_slice, b.largest_area_cm2))
    else {
        return Err(JobError::Inference(InferenceError::Input {
            model: m.model.clone(),
            message: "no per-slice burden in a volume measurement".into(),
        }));
    };
    // The card's plausible range is a cross-section's: the volume's largest
    // one is what it bounds. (The map-mass check is per slice; on a volume
    // most slices rightly hold no tumour, so it is not applied here.)
    crate::inference::guard::check_value(card, largest_area)?;
    let n = hu.view().dim().0;
    let line = ResultLine {
        series_instance_uid: series_uid.to_owned(),
        route: m.route.clone(),
        model: m.model.clone(),
        model_version: card.version.clone(),
        biomarker: volume_biomarker(&card.task),
        value: measurement.value,
        unit: measurement.unit.clone(),
        execution_provider: measurement.execution_provider.to_owned(),
        risk_category: None,
        lesions: None,
        slices: n,
        elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
        slice_z_mm: Some(vol.positions[largest][2]),
        slice_sop_instance_uid: Some(vol.sop_instance_uids[largest].clone()),
        largest_area_cm2: Some(largest_area),
        lesions_excluded: None,
    };
    Ok(Analysis::of(&vol, 0..n, line, measurement, hu))
}

#[cfg(test)]
mod hu_step_tests {
    use super::*;

    #[test]
    fn a_typed_result_is_the_json_the_store_kept_before() {
        let line = ResultLine {
            series_instance_uid: "1.2.3".into(),
            route: "cac".into(),
            model: "cac".into(),
            model_version: "0.3.0".into(),
            biomarker: "cac".into(),
            value: 12.5,
            unit: "Agatston".into(),
            execution_provider: "cpu".into(),
            risk_category: Some("mild".into()),
            lesions: None,
            slices: 3,
            elapsed_ms: 7.25,
            slice_z_mm: None,
            slice_sop_instance_uid: None,
            largest_area_cm2: None,
            lesions_excluded: None,
        };
        // What the worker built by hand before JobResult.
        let mut before = serde_json::to_value(&line).unwrap();
        before["inference_finished_at"] = "2026-01-01T00:00:02.500Z".into();
        before["reports"] = vec![serde_json::json!({"path": PathBuf::from("/r/sr.dcm"), "sop_instance_uid": "2.25.1"})]
            .into_iter()
            .collect();
        let typed = JobResult {
            line,
            inference_finished_at: "2026-01-01T00:00:02.500Z".into(),
            reports: vec![ReportRef { path: "/r/sr.dcm".into(), sop_instance_uid: "2.25.1".into() }],
        };
        assert_eq!(serde_json::to_value(&typed).unwrap(), before);
        assert_eq!(serde_json::from_value::<JobResult>(before).unwrap(), typed);
    }

    #[test]
    fn hu_step_margin_admits_a_12_bit_two_hu_grid_only() {
        // shared/realct chest slice, JPEG Extended: RescaleSlope 2.0002442.
        assert!(!hu_step_too_coarse(2.0002442));
        assert!(!hu_step_too_coarse(1.0));
        assert!(hu_step_too_coarse(2.01));
        // 8-bit JPEG Baseline of the same slice: ~32 HU.
        assert!(hu_step_too_coarse(32.0));
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::guard::{Check, Refusal};
    use crate::job::{JobState, Outcome};

    #[test]
    fn a_refusal_is_typed_from_the_guard_to_the_store() {
        let e = JobError::from(Refusal { check: Check::SliceThickness, message: "slice thickness 7.0 mm".into() });
        // The text the API and the status page show is what it always was.
        let text = e.to_string();
        assert_eq!(text, "refused: slice thickness 7.0 mm (check: slice_thickness)");
        assert_eq!(e.refused_by(), Some("slice_thickness"));
        assert_eq!(e.outcome(&text).state(), JobState::Refused);
        assert_eq!(e.fault(), Fault::Permanent);
        // Any other error is a failure, whatever its text says.
        let e = JobError::Panicked("refused: not really".into());
        assert_eq!(e.refused_by(), None);
        assert_eq!(e.outcome("refused: not really"), Outcome::Failed("refused: not really"));
    }
}
