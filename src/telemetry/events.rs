//! Typed operational events: one struct per event whose `emit()` writes one
//! structured log line and bumps one metric, so call sites never format log
//! lines themselves and `/metrics` reads the same numbers the logs report.
//! The log messages are part of the interface: the integration tests and
//! operators grep for them, so they do not change.
//!
//! Events carry UIDs, AE titles, names and counts only, never patient data.

use std::fmt::Display;

use super::metrics::{InferenceLabels, JobLabels, PolicyLabel, RefusalLabels, RouteModelLabels, METRICS};

pub struct AssociationAccepted<'a> {
    pub contexts: usize,
    pub calling_ae: &'a str,
}
impl AssociationAccepted<'_> {
    pub fn emit(self) {
        METRICS.count_association("accepted");
        tracing::info!(calling_ae = self.calling_ae, contexts = self.contexts, "association accepted");
    }
}

pub struct AssociationRejected<'a> {
    pub calling_ae: &'a str,
    pub called_ae: &'a str,
    pub reason: &'a str,
}
impl AssociationRejected<'_> {
    pub fn emit(self) {
        METRICS.count_association("rejected");
        tracing::warn!(
            calling_ae = self.calling_ae,
            called_ae = self.called_ae,
            reason = self.reason,
            "association rejected"
        );
    }
}

pub struct AssociationAborted<'a> {
    pub by: &'static str,
    pub reason: &'a str,
}
impl AssociationAborted<'_> {
    pub fn emit(self) {
        METRICS.count_association("aborted");
        tracing::warn!(by = self.by, reason = self.reason, "association aborted");
    }
}

/// A connection to the TLS port that never became a TLS session: a plain
/// DICOM client, an untrusted or missing client certificate, a timeout.
pub struct TlsHandshakeFailed<'a> {
    pub peer: std::net::SocketAddr,
    pub reason: &'a str,
}
impl TlsHandshakeFailed<'_> {
    pub fn emit(self) {
        METRICS.tls_handshakes_failed.inc();
        tracing::warn!(peer = %self.peer, reason = self.reason, "TLS handshake failed");
    }
}

pub struct InstanceStored<'a> {
    pub sop_instance_uid: &'a str,
    pub series_instance_uid: &'a str,
    pub bytes: u64,
    pub duplicate: bool,
}
impl InstanceStored<'_> {
    pub fn emit(self) {
        METRICS.bytes_received.inc_by(self.bytes);
        if self.duplicate {
            METRICS.count_instance(0x0000, "duplicate");
            tracing::info!(
                sop_instance_uid = self.sop_instance_uid,
                series_instance_uid = self.series_instance_uid,
                "duplicate instance: first copy kept"
            );
        } else {
            METRICS.count_instance(0x0000, "stored");
            tracing::debug!(
                sop_instance_uid = self.sop_instance_uid,
                series_instance_uid = self.series_instance_uid,
                bytes = self.bytes,
                "instance stored"
            );
        }
    }
}

pub struct StoreFailed<'a> {
    pub sop_instance_uid: &'a str,
    pub status: u16,
    pub reason: &'a str,
}
impl StoreFailed<'_> {
    pub fn emit(self) {
        METRICS.count_instance(self.status, "failed");
        tracing::warn!(
            sop_instance_uid = self.sop_instance_uid,
            status = format_args!("0x{:04X}", self.status),
            reason = self.reason,
            "C-STORE failed"
        );
    }
}

/// Routing set a series aside; the queue moves on.
pub struct SeriesUnroutable<'a> {
    pub series_instance_uid: &'a str,
    pub generation: u32,
    pub reason: &'a str,
}
impl SeriesUnroutable<'_> {
    pub fn emit(self) {
        METRICS.series_unroutable.inc();
        tracing::warn!(
            series_instance_uid = self.series_instance_uid,
            generation = self.generation,
            reason = self.reason,
            "series set aside as unroutable"
        );
    }
}

/// A job ran past its deadline and was failed; its computation is abandoned.
pub struct JobDeadlineExceeded<'a> {
    pub job: i64,
    pub series_instance_uid: &'a str,
    pub route: &'a str,
    pub timeout_s: f64,
}
impl JobDeadlineExceeded<'_> {
    pub fn emit(self) {
        METRICS.jobs_deadline_exceeded.inc();
        tracing::warn!(
            job = self.job,
            series_instance_uid = self.series_instance_uid,
            route = self.route,
            timeout_s = self.timeout_s,
            "job deadline exceeded: failed, its worker slot is free"
        );
    }
}

/// Retention deleted the spooled instances of one series.
pub struct SeriesPurged<'a> {
    pub series_instance_uid: &'a str,
    /// `age` or `size`.
    pub policy: &'a str,
    pub instances: u64,
    pub bytes: u64,
}
impl SeriesPurged<'_> {
    pub fn emit(self) {
        let l = PolicyLabel { policy: self.policy.into() };
        METRICS.retention_series.get_or_create(&l).inc();
        METRICS.retention_instances.get_or_create(&l).inc_by(self.instances);
        METRICS.retention_bytes.get_or_create(&l).inc_by(self.bytes);
        tracing::info!(
            series_instance_uid = self.series_instance_uid,
            policy = self.policy,
            instances = self.instances,
            bytes = self.bytes,
            "retention deleted spooled instances"
        );
    }
}

/// A connection still in the pre-association stage (TLS handshake or
/// A-ASSOCIATE-RQ not yet in) closed to make room for a newer one.
///
/// A flood brings thousands of these a second, so the log line is limited
/// to one a second, carrying the count since the last; the counter sees all.
pub struct PreAssociationEvicted {
    pub id: u64,
    pub peer: std::net::SocketAddr,
    pub budget: usize,
}
impl PreAssociationEvicted {
    pub fn emit(self) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static LAST_LINE_S: AtomicU64 = AtomicU64::new(0);
        static SINCE_LAST_LINE: AtomicU64 = AtomicU64::new(0);
        METRICS.pre_association_evicted.inc();
        let n = SINCE_LAST_LINE.fetch_add(1, Ordering::Relaxed) + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = LAST_LINE_S.load(Ordering::Relaxed);
        if now > last && LAST_LINE_S.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            SINCE_LAST_LINE.fetch_sub(n, Ordering::Relaxed);
            tracing::warn!(
                id = self.id,
                peer = %self.peer,
                budget = self.budget,
                evicted = n,
                "pre-association budget full: closed the oldest connection still without an A-ASSOCIATE-RQ"
            );
        }
    }
}

/// A series completed (one generation), recorded in the index and queued
/// for routing.
pub struct SeriesCompleted<'a> {
    pub series_instance_uid: &'a str,
    pub instances: u32,
    pub generation: u32,
    /// `quiet_timer` or `association_released`.
    pub reason: &'a str,
}
impl SeriesCompleted<'_> {
    pub fn emit(self) {
        METRICS.series_completed.inc();
        tracing::info!(
            series = %self.series_instance_uid,
            instances = self.instances,
            generation = self.generation,
            reason = %self.reason,
            "series complete"
        );
    }
}

/// A model's CUDA session failed its smoke run at load; the model runs on CPU.
pub struct CudaFallback<'a> {
    pub model: &'a str,
    pub error: &'a dyn Display,
}
impl CudaFallback<'_> {
    pub fn emit(self) {
        METRICS.cuda_fallbacks.inc();
        tracing::warn!(model = %self.model, error = %self.error, "CUDA execution provider unusable; falling back to CPU");
    }
}

/// One model run with its aggregation (`inference::measure`) took `seconds`.
pub struct InferenceTimed<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub seconds: f64,
}
impl InferenceTimed<'_> {
    pub fn emit(self) {
        METRICS
            .inference_seconds
            .get_or_create(&InferenceLabels { model: self.model.into(), provider: self.provider.into() })
            .observe(self.seconds);
        tracing::debug!(model = self.model, provider = self.provider, seconds = self.seconds, "inference timed");
    }
}

/// The worker claimed a job and starts an attempt.
pub struct JobStarted<'a> {
    pub job: i64,
    pub series_instance_uid: &'a str,
    pub route: &'a str,
    pub model: &'a str,
    pub attempt: u32,
}
impl JobStarted<'_> {
    pub fn emit(self) {
        METRICS
            .jobs_started
            .get_or_create(&RouteModelLabels { route: self.route.into(), model: self.model.into() })
            .inc();
        tracing::debug!(
            job = self.job,
            series_instance_uid = self.series_instance_uid,
            route = self.route,
            model = self.model,
            attempt = self.attempt,
            "job started"
        );
    }
}

fn count_job(route: &str, model: &str, outcome: &str) {
    let labels = JobLabels { route: route.into(), model: model.into(), outcome: outcome.into() };
    METRICS.jobs.get_or_create(&labels).inc();
}

/// A job's computation succeeded: its value, and how many report files it
/// wrote. Logged inside the job's span (which names job, series and route).
pub struct JobFinished<'a> {
    pub route: &'a str,
    pub model: &'a str,
    pub value: f64,
    pub unit: &'a str,
    pub ms: f64,
    pub reports: usize,
}
impl JobFinished<'_> {
    pub fn emit(self) {
        count_job(self.route, self.model, "done");
        tracing::info!(value = self.value, unit = %self.unit, ms = self.ms, reports = self.reports, "job done");
    }
}

/// A job attempt failed (error, panic or deadline); the job store decides
/// whether it is retried.
pub struct JobFailed<'a> {
    pub job: i64,
    pub route: &'a str,
    pub model: &'a str,
    pub attempt: u32,
    pub fault: crate::fault::Fault,
    pub reason: &'a str,
}
impl JobFailed<'_> {
    pub fn emit(self) {
        count_job(self.route, self.model, "failed");
        tracing::warn!(
            job = self.job,
            route = self.route,
            attempt = self.attempt,
            fault = ?self.fault,
            error = self.reason,
            "job failed"
        );
    }
}

/// A job was refused: its input is outside what the model card says the
/// model was validated on, or its output is implausible. Final (no retry,
/// nothing sent); counted by model and check, and as a job outcome.
pub struct JobRefused<'a> {
    pub job: i64,
    pub route: &'a str,
    pub model: &'a str,
    pub check: &'a str,
    pub reason: &'a str,
}
impl JobRefused<'_> {
    pub fn emit(self) {
        count_job(self.route, self.model, "refused");
        METRICS
            .jobs_refused
            .get_or_create(&RefusalLabels { model: self.model.into(), check: self.check.into() })
            .inc();
        tracing::warn!(
            job = self.job,
            route = self.route,
            model = self.model,
            check = self.check,
            reason = self.reason,
            "job refused"
        );
    }
}

/// SIGHUP or the HTTP API reloaded the config; `routes` are now in force.
pub struct ConfigReloaded<'a> {
    pub routes: usize,
    pub config: &'a std::path::Path,
}
impl ConfigReloaded<'_> {
    pub fn emit(self) {
        METRICS.count_reload("ok");
        tracing::info!(routes = self.routes, config = %self.config.display(), "config reloaded");
    }
}

/// A reload was refused; the previous config stays in force. The caller
/// logs each diagnostic first (`config reload refused` with `diagnostic`).
pub struct ConfigReloadRefused {
    pub problems: usize,
}
impl ConfigReloadRefused {
    pub fn emit(self) {
        METRICS.count_reload("refused");
        tracing::error!(problems = self.problems, "config reload refused; the previous config stays in force");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::OutcomeLabel;

    fn reloads(outcome: &str) -> u64 {
        METRICS.config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.into() }).get()
    }

    fn jobs(route: &str, outcome: &str) -> u64 {
        let l = JobLabels { route: route.into(), model: "m".into(), outcome: outcome.into() };
        METRICS.jobs.get_or_create(&l).get()
    }

    // METRICS is process-wide and tests run in parallel: each test uses
    // labels of its own and compares counts before and after.

    #[test]
    fn job_events_count_by_route_model_and_outcome() {
        let route = "telemetry-test-route";
        let started = || {
            METRICS.jobs_started.get_or_create(&RouteModelLabels { route: route.into(), model: "m".into() }).get()
        };
        let (s0, d0, f0) = (started(), jobs(route, "done"), jobs(route, "failed"));
        JobStarted { job: 1, series_instance_uid: "1.2.3", route, model: "m", attempt: 1 }.emit();
        JobFinished { route, model: "m", value: 1.5, unit: "cm2", ms: 12.0, reports: 3 }.emit();
        JobFailed { job: 2, route, model: "m", attempt: 1, fault: crate::fault::Fault::Permanent, reason: "volume: no slices" }.emit();
        JobFailed { job: 3, route, model: "m", attempt: 2, fault: crate::fault::Fault::Transient, reason: "deadline" }.emit();
        assert_eq!((started(), jobs(route, "done"), jobs(route, "failed")), (s0 + 1, d0 + 1, f0 + 2));
        let text = METRICS.encode();
        assert!(text.contains("biomarker_node_jobs_started_total{route=\"telemetry-test-route\",model=\"m\"}"), "{text}");
    }

    #[test]
    fn reload_events_count_ok_and_refused() {
        // Other tests may reload too: counts only grow.
        let (ok0, refused0) = (reloads("ok"), reloads("refused"));
        ConfigReloaded { routes: 3, config: std::path::Path::new("node.yaml") }.emit();
        ConfigReloadRefused { problems: 2 }.emit();
        ConfigReloadRefused { problems: 1 }.emit();
        assert!(reloads("ok") > ok0);
        assert!(reloads("refused") >= refused0 + 2);
    }

    #[test]
    fn inference_series_and_cuda_events_bump_their_metrics() {
        let model = "telemetry-test-model";
        InferenceTimed { model, provider: "cpu", seconds: 0.25 }.emit();
        InferenceTimed { model, provider: "cpu", seconds: 0.5 }.emit();
        let text = METRICS.encode();
        let count = format!("biomarker_node_inference_seconds_count{{model=\"{model}\",provider=\"cpu\"}} 2");
        assert!(text.contains(&count), "{text}");
        let (c0, f0) = (METRICS.series_completed.get(), METRICS.cuda_fallbacks.get());
        SeriesCompleted { series_instance_uid: "1.2.3", instances: 40, generation: 1, reason: "quiet_timer" }.emit();
        CudaFallback { model, error: &"no CUDA device" }.emit();
        assert!(METRICS.series_completed.get() > c0);
        assert!(METRICS.cuda_fallbacks.get() > f0);
    }
}
