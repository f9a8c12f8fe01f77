//! One job: a routed series through volume assembly, slice selection,
//! inference and aggregation. Shared by `analyze` (files) and `serve`
//! (spooled series), so both compute the same thing.
//!
//! Input: the series' files and a [`RouteMatch`]. Output: an [`Analysis`]
//! whose JSON line is what `analyze` prints and what the job store keeps.
//! Failure: an [`AnalysisError`] that says whether the input was unusable
//! (permanent) or the environment failed (retryable).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{s, Array3};
use serde::Serialize;

use crate::biomarkers::{measure, Measurement, PixelGeometry};
use crate::config::Config;
use crate::inference::{self, InferenceError, Model, RuntimeOptions};
use crate::jobs::ResolvedRoute;
use crate::volume::{SliceSelection, Volume, VolumeError, VolumeOptions};

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("volume: {0}")]
    Volume(#[from] VolumeError),
    #[error("inference: {0}")]
    Inference(#[from] InferenceError),
    #[error("model `{model}` is not loaded: {reason}")]
    ModelUnavailable { model: String, reason: String },
    #[error("no slice thickness or spacing to scale the Agatston score")]
    NoThickness,
    #[error("pixel values are stored in steps of {step} HU (a lossy 8-bit encoding?); HU-threshold biomarkers need steps of at most {MAX_HU_STEP} HU")]
    CoarseHu { step: f64 },
    #[error("writing outputs: {0}")]
    Output(String),
}

impl AnalysisError {
    pub fn is_retryable(&self) -> bool {
        match self {
            AnalysisError::Volume(e) => e.is_retryable(),
            AnalysisError::Inference(e) => e.is_retryable(),
            AnalysisError::Output(_) => true,
            _ => false,
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

/// Every configured model, loaded once at start.
pub struct Models {
    loaded: BTreeMap<String, Arc<Model>>,
    /// Models that failed to load and why; their jobs fail with this reason.
    failed: BTreeMap<String, String>,
}

impl Models {
    /// Loads ONNX Runtime and every model in `cfg.models`. A model marked
    /// `fail_hard` that fails to load is an error; others are recorded.
    pub fn load(cfg: &Config) -> Result<Models, InferenceError> {
        let mut loaded = BTreeMap::new();
        let mut failed = BTreeMap::new();
        if cfg.models.is_empty() {
            return Ok(Models { loaded, failed });
        }
        if let Err(e) = inference::init(cfg.onnxruntime.library_path().as_deref()) {
            if cfg.models.values().any(|m| m.fail_hard) {
                return Err(e);
            }
            tracing::error!(error = %e, "ONNX Runtime unavailable: every model's jobs will fail");
            for name in cfg.models.keys() {
                failed.insert(name.clone(), e.to_string());
            }
            return Ok(Models { loaded, failed });
        }
        for (name, m) in &cfg.models {
            let opts = RuntimeOptions {
                execution_provider: m.execution_provider,
                device_id: m.device_id as i32,
                fail_hard: m.fail_hard,
                max_concurrency: m.max_concurrency,
                intra_threads: 0,
            };
            match Model::load(&m.card, &opts) {
                Ok(model) => {
                    loaded.insert(name.clone(), Arc::new(model));
                }
                Err(e) if m.fail_hard => return Err(e),
                Err(e) => {
                    tracing::error!(model = %name, error = %e, "model failed to load; its jobs will fail");
                    failed.insert(name.clone(), e.to_string());
                }
            }
        }
        Ok(Models { loaded, failed })
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Model>, AnalysisError> {
        self.loaded.get(name).ok_or_else(|| AnalysisError::ModelUnavailable {
            model: name.to_owned(),
            reason: self.failed.get(name).cloned().unwrap_or_else(|| "not configured".into()),
        })
    }

    /// The version a job for `model` would run, for job identity.
    pub fn version(&self, name: &str) -> String {
        self.loaded.get(name).map(|m| m.card.version.clone()).unwrap_or_else(|| "unavailable".into())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Model>)> {
        self.loaded.iter()
    }
}

/// What one job produced.
pub struct Analysis {
    pub line: ResultLine,
    pub measurement: Measurement,
    /// HU of the slices the model saw, `[S,R,C]`.
    pub hu: Array3<f32>,
    /// Source file and SOP Instance UID of each of those slices.
    pub slices: Vec<(PathBuf, String)>,
}

/// The JSON line `analyze` prints, one per (series, route).
#[derive(Debug, Clone, Serialize)]
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
}

/// Run one routed job on a series' files. Blocking.
pub fn run(
    models: &Models,
    series_uid: &str,
    m: &ResolvedRoute,
    files: &[PathBuf],
    volume_opts: &VolumeOptions,
) -> Result<Analysis, AnalysisError> {
    let t0 = Instant::now();
    let model = models.get(&m.model)?;
    let card = &model.card;
    let vol = Volume::from_files_with(files, volume_opts)?;
    if hu_step_too_coarse(vol.hu_step) {
        return Err(AnalysisError::CoarseHu { step: vol.hu_step });
    }
    let (hu, idx): (Array3<f32>, Vec<usize>) = if card.input.slices == "single" {
        let sel = m.slices.clone().unwrap_or(if vol.slices() == 1 {
            SliceSelection::Single
        } else {
            SliceSelection::Middle
        });
        let i = vol.select(&sel)?;
        (vol.hu.slice(s![i..i + 1, .., ..]).to_owned(), vec![i])
    } else {
        (vol.hu.clone(), (0..vol.slices()).collect())
    };
    let thickness = vol.slice_thickness.or(vol.spacing_mm);
    if card.is_agatston() && thickness.is_none() {
        return Err(AnalysisError::NoThickness);
    }
    let geom = PixelGeometry {
        pixel_spacing: vol.pixel_spacing,
        slice_thickness_mm: thickness.unwrap_or(1.0),
    };
    let t_infer = Instant::now();
    let measurement = measure(model, hu.view(), geom)?;
    crate::telemetry::METRICS
        .inference_seconds
        .get_or_create(&crate::telemetry::InferenceLabels {
            model: m.model.clone(),
            provider: measurement.execution_provider.to_owned(),
        })
        .observe(t_infer.elapsed().as_secs_f64());
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
    };
    let slices = idx
        .iter()
        .map(|&i| (vol.source_paths[i].clone(), vol.sop_instance_uids[i].clone()))
        .collect();
    Ok(Analysis {
        line,
        measurement,
        hu,
        slices,
    })
}

/// A DICOM object this node made and keeps under `results/`.
#[derive(Debug, Clone)]
pub struct ReportFile {
    pub path: PathBuf,
    /// Which output it is, for each destination's `send` filter.
    pub kind: crate::config::OutputKind,
    pub sop_class_uid: crate::dicom::Uid,
    pub sop_instance_uid: crate::dicom::Uid,
}

/// Identity of the node as the SR's device observer.
pub fn device_info(ae_title: &str) -> crate::report::DeviceInfo {
    crate::report::DeviceInfo {
        uid: crate::report::result_uid(ae_title, "device"),
        name: ae_title.to_owned(),
        manufacturer: "biomarker-node".into(),
        serial_number: ae_title.to_owned(),
        software_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Build the TID 1500 SR, the overlay SCs and the SEG for a result and
/// write them durably (fsync'd file and directory) as `sr.dcm`, `sc-NN.dcm`,
/// `seg.dcm` under
/// `dir`. `seed` and `created` fix the UIDs and dates, so a rebuild after a
/// crash writes the very same instances.
pub fn write_reports(
    a: &Analysis,
    model: &Model,
    seed: &str,
    created: time::OffsetDateTime,
    device: crate::report::DeviceInfo,
    dir: &Path,
) -> Result<Vec<ReportFile>, AnalysisError> {
    use crate::dicom::read::{open_dicom, ReadDepth};
    use crate::report::{build_sc, build_seg, build_sr_with_seg, ReportContext, ScOptions, SourceInstance};
    let out = |e: &dyn std::fmt::Display| AnalysisError::Output(format!("{}: {e}", dir.display()));
    let first = a.slices.first().ok_or_else(|| out(&"no source slices"))?;
    let source = open_dicom(&first.0, ReadDepth::Header).map_err(|e| out(&e))?.into_inner();
    let text = |tag| {
        source
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
            .unwrap_or_default()
    };
    let sop_class = crate::dicom::Uid::parse(&text(dicom_dictionary_std::tags::SOP_CLASS_UID)).map_err(|e| out(&e))?;
    let series = crate::dicom::Uid::parse(&text(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)).map_err(|e| out(&e))?;
    let source_refs = a
        .slices
        .iter()
        .map(|(_, uid)| {
            Ok(SourceInstance {
                sop_class_uid: sop_class.clone(),
                sop_instance_uid: crate::dicom::Uid::parse(uid).map_err(|e| out(&e))?,
            })
        })
        .collect::<Result<Vec<_>, AnalysisError>>()?;
    let ctx = ReportContext {
        source,
        source_refs,
        series_instance_uid: series,
        seed: seed.to_owned(),
        device,
        created,
    };
    let card = &model.card;
    use crate::config::OutputKind;
    // A series without plane geometry (no Frame of Reference, say) still
    // gets its SR and SC; only the SEG, which cannot place its frames, is
    // left out, and the log says why.
    let seg = if a.measurement.map.is_empty() {
        None
    } else {
        let headers = a
            .slices
            .iter()
            .map(|(p, _)| open_dicom(p, ReadDepth::Header).map(|o| o.into_inner()).map_err(|e| out(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        match crate::report::SegGeometry::from_headers(&headers)
            .and_then(|g| build_seg(&ctx, card, &a.measurement, &g))
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(series = %ctx.series_instance_uid, error = %e, "no SEG for this result");
                None
            }
        }
    };
    let sr = build_sr_with_seg(&ctx, card, &a.measurement, seg.as_ref().map(|s| &s.1)).map_err(|e| out(&e))?;
    let scs = build_sc(&ctx, card, &a.measurement, a.hu.view(), &ScOptions::for_card(card)).map_err(|e| out(&e))?;
    std::fs::create_dir_all(dir).map_err(|e| out(&e))?;
    let mut files = Vec::new();
    let objects = std::iter::once(("sr.dcm".to_owned(), OutputKind::Sr, sr))
        .chain(scs.into_iter().enumerate().map(|(i, o)| (format!("sc-{i:02}.dcm"), OutputKind::Sc, o)))
        .chain(seg.map(|(o, _)| ("seg.dcm".to_owned(), OutputKind::Seg, o)));
    for (name, kind, obj) in objects {
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        obj.write_to_file(&tmp).map_err(|e| out(&e))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| out(&e))?;
        std::fs::rename(&tmp, &path).map_err(|e| out(&e))?;
        let meta = obj.meta();
        files.push(ReportFile {
            path,
            kind,
            sop_class_uid: crate::dicom::Uid::parse(meta.media_storage_sop_class_uid()).map_err(|e| out(&e))?,
            sop_instance_uid: crate::dicom::Uid::parse(meta.media_storage_sop_instance_uid()).map_err(|e| out(&e))?,
        });
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| out(&e))?;
    Ok(files)
}

/// Write a job's outputs under `dir`: result.json, map.npy (f32) and
/// candidates.npy (u8), all `[S,R,C]`.
pub fn write_outputs(a: &Analysis, dir: &Path) -> Result<(), AnalysisError> {
    let out = |e: &dyn std::fmt::Display| AnalysisError::Output(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| out(&e))?;
    let json = serde_json::json!({
        "result": a.line,
        "measurement": a.measurement,
        "source_instances": a.slices.iter().map(|(_, uid)| uid).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("result.json"), serde_json::to_vec_pretty(&json).map_err(|e| out(&e))?)
        .map_err(|e| out(&e))?;
    let m = &a.measurement;
    if !m.map.is_empty() {
        crate::npy::write(&dir.join("map.npy"), m.map.shape(), m.map.iter().copied()).map_err(|e| out(&e))?;
        crate::npy::write(&dir.join("candidates.npy"), m.candidates.shape(), m.candidates.iter().map(|&c| c as u8))
            .map_err(|e| out(&e))?;
    }
    Ok(())
}

/// Who decides a job's fate once it runs: its computation, by starting to
/// commit results, or the worker, by abandoning it at the deadline. Exactly
/// one of them wins, so an abandoned computation never writes or sends.
#[derive(Debug, Default)]
pub struct JobGuard(std::sync::atomic::AtomicU8);

impl JobGuard {
    const RUNNING: u8 = 0;
    const COMMITTING: u8 = 1;
    const ABANDONED: u8 = 2;

    fn swap_from_running(&self, to: u8) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        self.0.compare_exchange(Self::RUNNING, to, AcqRel, std::sync::atomic::Ordering::Acquire).is_ok()
    }

    /// The computation is about to write results; false when it was abandoned.
    pub fn begin_commit(&self) -> bool {
        self.swap_from_running(Self::COMMITTING)
    }

    /// The deadline passed; false when the computation is already committing
    /// (its remaining work is writing files and outbox rows, which is short).
    pub fn abandon(&self) -> bool {
        self.swap_from_running(Self::ABANDONED)
    }

    pub fn is_abandoned(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) == Self::ABANDONED
    }
}

/// The reason a job failed at its deadline.
pub fn deadline_reason(timeout: std::time::Duration) -> String {
    format!("deadline of {} s exceeded", timeout.as_secs_f64())
}

const ABANDONED: &str = "abandoned at its deadline";

/// The inference stage in `serve`: claims jobs, runs them on the spooled
/// files, keeps the outputs under `results/`, and records the outcome.
///
/// A job that runs past `timeout` is failed with [`deadline_reason`] and
/// the next job is claimed. Its computation (a `spawn_blocking` thread,
/// which cannot be cancelled) is abandoned: [`JobGuard`] keeps it from
/// writing results or enqueueing reports, and the store only records the
/// outcome of the attempt that is still running. If it is stuck inside ONNX
/// Runtime it keeps holding that model's session, so jobs of the same model
/// may wait for it (and fail at their own deadline); other models run.
pub struct Worker {
    pub jobs: Arc<dyn crate::jobs::JobStore>,
    pub index_path: PathBuf,
    pub spool_root: PathBuf,
    pub results_dir: PathBuf,
    pub models: Arc<Models>,
    /// The live route table, only for jobs stored before jobs carried their
    /// route ([`crate::jobs::Job::resolved`] is `None`).
    pub routes: Arc<dyn crate::jobs::RouteLookup>,
    pub work: Arc<tokio::sync::Notify>,
    pub volume_opts: VolumeOptions,
    /// Where finished reports go; `None` keeps them under results/ only.
    pub outbox: Option<crate::outbox::OutboxHandle>,
    /// This node's AE title, as the reports' device observer.
    pub ae_title: String,
    /// `jobs.timeout_s`.
    pub timeout: std::time::Duration,
    /// `destinations.<name>.send`: the output kinds each destination gets;
    /// a destination not in the map gets all of them.
    pub send_filter: std::collections::HashMap<String, Vec<crate::config::OutputKind>>,
}

impl Worker {
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let this = Arc::new(self);
        loop {
            // Register interest before claiming so a notify in between is not lost.
            let notified = this.work.notified();
            let job = match this.jobs.claim() {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim a job");
                    None
                }
            };
            let Some(job) = job else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = notified => {}
                    // belt and braces: jobs re-queued by another process
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                }
                continue;
            };
            let me = this.clone();
            let id = job.id;
            let attempt = job.attempts;
            let series = job.key.series_instance_uid.clone();
            let (route, model) = (job.key.route.clone(), job.key.model.clone());
            let guard = Arc::new(JobGuard::default());
            let g = guard.clone();
            let mut handle = tokio::task::spawn_blocking(move || me.process(&job, &g));
            let joined = |r: Result<Result<serde_json::Value, String>, tokio::task::JoinError>| {
                r.unwrap_or_else(|e| Err(format!("job panicked: {e}")))
            };
            let outcome = match tokio::time::timeout(this.timeout, &mut handle).await {
                Ok(r) => joined(r),
                Err(_) if guard.abandon() => {
                    crate::telemetry::JobDeadlineExceeded {
                        job: id,
                        series_instance_uid: &series,
                        route: &route,
                        timeout_s: this.timeout.as_secs_f64(),
                    }
                    .emit();
                    // Only to say when the abandoned thread is gone.
                    tokio::spawn(async move {
                        let late = handle.await;
                        tracing::info!(
                            job = id,
                            panicked = late.is_err(),
                            "abandoned job computation ended; its outcome is discarded"
                        );
                    });
                    Err(deadline_reason(this.timeout))
                }
                // Already writing its results: let it finish.
                Err(_) => joined(handle.await),
            };
            crate::telemetry::METRICS
                .jobs
                .get_or_create(&crate::telemetry::JobLabels {
                    route: route.clone(),
                    model: model.clone(),
                    outcome: if outcome.is_ok() { "done" } else { "failed" }.into(),
                })
                .inc();
            let stored = match &outcome {
                Ok(v) => this.jobs.finish_attempt(id, attempt, Ok(v)),
                Err(e) => this.jobs.finish_attempt(id, attempt, Err(e.as_str())),
            };
            match stored {
                Ok(true) => {}
                Ok(false) => tracing::warn!(job = id, attempt, "job moved on meanwhile; this outcome is not recorded"),
                Err(e) => tracing::error!(job = id, error = %e, "cannot record a job outcome"),
            }
            this.update_series_state(&series);
        }
    }

    fn process(&self, job: &crate::jobs::Job, guard: &JobGuard) -> Result<serde_json::Value, String> {
        let span = tracing::info_span!("job", id = job.id, series = %job.key.series_instance_uid, route = %job.key.route);
        let _g = span.enter();
        let uid = crate::dicom::Uid::parse(&job.key.series_instance_uid).map_err(|e| e.to_string())?;
        let index = crate::series::SeriesIndex::open_readonly(&self.index_path).map_err(|e| e.to_string())?;
        let files: Vec<PathBuf> = index
            .series_instances(&uid)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(p, _)| self.spool_root.join(p))
            .collect();
        // The route as routing resolved it when it made the job. A job from
        // before jobs carried their route is looked up by name in the live
        // table, as it was then; a route gone from it delivers nowhere.
        let m = job.resolved.clone().unwrap_or_else(|| {
            self.routes.resolve(&job.key.route).unwrap_or_else(|| ResolvedRoute {
                route: job.key.route.clone(),
                model: job.key.model.clone(),
                send_to: vec![],
                slices: None,
            })
        });
        if files.is_empty() {
            return Err("no instances of this series are in the spool (deleted by retention?); \
                        send the series again to analyse it"
                .into());
        }
        let a = run(&self.models, uid.as_str(), &m, &files, &self.volume_opts).map_err(|e| e.to_string())?;
        // The store is checked too: another process may have re-queued the
        // job, and then that attempt owns the results directory.
        let still_ours = matches!(
            self.jobs.get(job.id),
            Ok(Some(j)) if j.state == "running" && j.attempts == job.attempts
        );
        if guard.is_abandoned() || !still_ours || !guard.begin_commit() {
            return Err(ABANDONED.into());
        }
        let inference_finished_at = crate::store::rfc3339(std::time::SystemTime::now());
        let dir = crate::dicom::uid_path(&self.results_dir, &[&uid], &[&m.route, &format!("g{}", job.key.generation)])
            .map_err(|e| e.to_string())?;
        write_outputs(&a, &dir).map_err(|e| e.to_string())?;
        let model = self.models.get(&m.model).map_err(|e| e.to_string())?;
        let seed = format!("{}|{}|{}|{}", uid, m.route, job.key.model_version, job.key.generation);
        // The job's persisted creation time, so a rerun makes identical objects.
        let created = time::OffsetDateTime::parse(&job.created_at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        let files = write_reports(&a, model, &seed, created, device_info(&self.ae_title), &dir)
            .map_err(|e| e.to_string())?;
        if let Some(outbox) = &self.outbox {
            for dest in &m.send_to {
                let wanted = self.send_filter.get(dest);
                for f in files.iter().filter(|f| wanted.is_none_or(|k| k.contains(&f.kind))) {
                    outbox
                        .enqueue(dest, &f.path, &f.sop_class_uid, &f.sop_instance_uid)
                        .map_err(|e| format!("outbox: {e}"))?;
                }
            }
        }
        tracing::info!(value = a.line.value, unit = %a.line.unit, ms = a.line.elapsed_ms, reports = files.len(), "job done");
        let mut v = serde_json::to_value(&a.line).map_err(|e| e.to_string())?;
        v["inference_finished_at"] = inference_finished_at.into();
        v["reports"] = files
            .iter()
            .map(|f| serde_json::json!({"path": f.path, "sop_instance_uid": f.sop_instance_uid}))
            .collect();
        Ok(v)
    }

    fn update_series_state(&self, series: &str) {
        let Ok(jobs) = self.jobs.for_series(series) else { return };
        let Some(gen) = jobs.iter().map(|j| j.key.generation).max() else { return };
        let current: Vec<_> = jobs.iter().filter(|j| j.key.generation == gen).collect();
        if current.iter().any(|j| j.state == "pending" || j.state == "running") {
            return;
        }
        let state = if current.iter().all(|j| j.state == "done") { "analyzed" } else { "failed" };
        if let (Ok(uid), Ok(mut index)) = (
            crate::dicom::Uid::parse(series),
            crate::series::SeriesIndex::open(&self.index_path),
        ) {
            if let Err(e) = index.set_state(&uid, state) {
                tracing::debug!(error = %e, state, "series state not updated");
            }
        }
    }
}

#[cfg(test)]
mod hu_step_tests {
    use super::*;

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

    #[test]
    fn deadline_and_commit_exclude_each_other() {
        // The deadline wins: the computation may no longer commit.
        let g = JobGuard::default();
        assert!(!g.is_abandoned());
        assert!(g.abandon());
        assert!(g.is_abandoned());
        assert!(!g.begin_commit());
        // The commit wins: the worker waits instead of failing the job.
        let g = JobGuard::default();
        assert!(g.begin_commit());
        assert!(!g.abandon());
        assert!(!g.is_abandoned());
        assert_eq!(deadline_reason(std::time::Duration::from_secs(600)), "deadline of 600 s exceeded");
        assert_eq!(deadline_reason(std::time::Duration::from_millis(2500)), "deadline of 2.5 s exceeded");
    }
}

#[cfg(test)]
mod reload_tests {
    use std::sync::RwLock;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::jobs::{JobStore, SqliteJobStore};
    use crate::outbox::{OutboxStore, SqliteOutboxStore};
    use crate::routing::stage::{RetryPolicy, Router, SharedRoutes};
    use crate::series::{CompletionQueue, CompletionReason, SeriesIndex, SqliteCompletionQueue, StoredInstance};

    fn config(dir: &Path, card: &Path, lib: &Path, route: &str, send_to: &str) -> String {
        format!(
            "node: {{ae_title: NODE, data_dir: {data}}}\n\
             onnxruntime: {{library: {lib}}}\n\
             models: {{cac: {{card: {card}}}}}\n\
             destinations: {{pacs: {{ae_title: PACS, host: 127.0.0.1, port: 1}}}}\n\
             routes:\n  - {{name: {route}, model: cac, send_to: {send_to}, match: {{derived: modality, equals: CT}}}}\n",
            data = dir.join("data").display(),
            card = card.display(),
            lib = lib.display(),
        )
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(tokio::time::Instant::now() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reload bug (issue 13): a job routed to `pacs`, whose route a
    /// SIGHUP renames (and points nowhere) before the worker runs it, still
    /// sends its reports to `pacs`, because the job carries the route it was
    /// created with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_between_routing_and_running_keeps_the_jobs_destinations() {
        let Some(card) = crate::test_data::model_card("cac") else { return };
        let Some(realct) = crate::test_data::realct() else { return };
        if !crate::inference::init_for_tests() {
            return;
        }
        let lib = crate::inference::test_library().unwrap();
        let d = tempfile::tempdir().unwrap();
        let cfg_path = d.path().join("node.yaml");
        std::fs::write(&cfg_path, config(d.path(), &card, &lib, "cac", "[pacs]")).unwrap();
        let (cfg, table) = crate::node::check::check_file(&cfg_path).unwrap_or_else(|e| panic!("{e:#?}"));
        let index_path = d.path().join("index.sqlite");
        let spool = d.path().join("spool");

        // One spooled, indexed, completed CT slice.
        let rel = PathBuf::from("1/2/ct.dcm");
        std::fs::create_dir_all(spool.join("1/2")).unwrap();
        std::fs::copy(realct.join("abdomen-ge-3slice/01.dcm"), spool.join(&rel)).unwrap();
        let header = crate::spool::read_header(&spool.join(&rel)).unwrap();
        let series = header.series_instance_uid.clone();
        let mut ix = SeriesIndex::open(&index_path).unwrap();
        let inst = StoredInstance {
            header,
            rel_path: rel,
            transfer_syntax: "1.2.840.10008.1.2".into(),
            size_bytes: 1,
            association_id: 1,
            calling_ae: "T".into(),
        };
        ix.insert_instance(&inst, SystemTime::now()).unwrap();
        let ev = ix.pending_completion(&series, CompletionReason::QuietTimer).unwrap().unwrap();
        let queue = Arc::new(SqliteCompletionQueue::open(&index_path).unwrap());
        queue.push(&ev).unwrap();
        ix.mark_complete(&ev, SystemTime::now()).unwrap();

        let models = Arc::new(Models::load(&cfg).unwrap());
        let jobs = Arc::new(SqliteJobStore::open(&index_path).unwrap());
        let routes: SharedRoutes = Arc::new(RwLock::new(Arc::new(table)));
        let work = Arc::new(tokio::sync::Notify::new());
        let stop = tokio_util::sync::CancellationToken::new();

        // Routing makes the job (route `cac`, to `pacs`)...
        let router = Router {
            queue: queue.clone(),
            index_path: index_path.clone(),
            spool_root: spool.clone(),
            routes: routes.clone(),
            jobs: jobs.clone(),
            models: models.clone(),
            work: work.clone(),
            retry: RetryPolicy::default(),
        };
        let router_task = tokio::spawn(router.run(stop.clone()));
        wait_until("the router to drain the queue", || queue.peek().unwrap().is_none()).await;
        assert_eq!(jobs.list().unwrap().len(), 1);

        // ...then a SIGHUP renames the route and sends it nowhere.
        std::fs::write(&cfg_path, config(d.path(), &card, &lib, "renamed", "[]")).unwrap();
        assert_eq!(crate::pipeline::reload(&cfg_path, &routes), Ok(1));
        assert_eq!(routes.read().unwrap().routes[0].name, "renamed");

        // Only now does the worker run the job.
        let outbox_store: Arc<dyn OutboxStore> =
            Arc::new(SqliteOutboxStore::open(&d.path().join("outbox.sqlite")).unwrap());
        let dest = crate::outbox::Destination {
            ae_title: "PACS".into(),
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            stow: None,
        };
        let (outbox, outbox_task) = crate::outbox::Outbox::spawn(
            outbox_store.clone(),
            [("pacs".to_owned(), dest)].into(),
            cfg.outbox.clone(),
            crate::dicom::AeTitle::new("NODE"),
            stop.clone(),
        )
        .unwrap();
        let worker = Worker {
            jobs: jobs.clone(),
            index_path: index_path.clone(),
            spool_root: spool.clone(),
            results_dir: d.path().join("results"),
            models: models.clone(),
            routes: routes.clone(),
            work: work.clone(),
            volume_opts: VolumeOptions::default(),
            outbox: Some(outbox),
            ae_title: "NODE".into(),
            timeout: Duration::from_secs(120),
            send_filter: Default::default(),
        };
        let worker_task = tokio::spawn(worker.run(stop.clone()));
        work.notify_one();
        wait_until("the job to finish", || {
            jobs.list().unwrap().iter().all(|j| j.state == "done" || j.state == "failed")
        })
        .await;
        stop.cancel();
        for t in [router_task, worker_task, outbox_task] {
            t.await.unwrap();
        }

        let job = &jobs.list().unwrap()[0];
        assert_eq!((job.state.as_str(), job.key.route.as_str()), ("done", "cac"), "{:?}", job.error);
        let items = outbox_store.list().unwrap();
        let reports = job.result.as_ref().unwrap()["reports"].as_array().unwrap().len();
        assert!(reports > 0);
        assert_eq!(items.len(), reports, "every report is queued for the route's destination");
        assert!(items.iter().all(|i| i.destination == "pacs"), "{items:?}");
    }
}
