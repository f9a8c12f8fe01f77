//! Typed operational events: each emits one structured log line and bumps
//! one counter, so call sites never format log lines themselves and the
//! metrics endpoint (`/metrics`) reads the same numbers the logs report.
//!
//! Events carry UIDs, AE titles and counts only, never patient data.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// The retention policy: `age` or `size`.
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// The DIMSE status we answered, `0x0000` style.
    pub status: String,
    /// `stored`, `duplicate` or `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub route: String,
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InferenceLabels {
    pub model: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the node exports. Counters are bumped by the events below;
/// the gauges that describe stored state (series, jobs, outbox, disk) are
/// set from the stores at scrape time, so they are right after a restart.
pub struct Metrics {
    registry: Registry,
    pub associations: Family<OutcomeLabel, Counter>,
    pub instances: Family<InstanceLabels, Counter>,
    pub bytes_received: Counter,
    pub series_completed: Counter,
    pub series: Family<StateLabel, Gauge>,
    pub jobs: Family<JobLabels, Counter>,
    pub jobs_by_state: Family<StateLabel, Gauge>,
    pub inference_seconds: HistogramFamily<InferenceLabels>,
    pub outbox_attempts: Family<DeliveryLabels, Counter>,
    pub outbox_items: Family<StateLabel, Gauge>,
    pub cuda_fallbacks: Counter,
    pub tls_handshakes_failed: Counter,
    pub config_reloads: Family<OutcomeLabel, Counter>,
    pub free_disk_bytes: Gauge,
    pub connections_open: Gauge,
    pub association_limit: Gauge,
    pub series_unroutable: Counter,
    pub jobs_deadline_exceeded: Counter,
    pub retention_series: Family<PolicyLabel, Counter>,
    pub retention_instances: Family<PolicyLabel, Counter>,
    pub retention_bytes: Family<PolicyLabel, Counter>,
    pub pre_association_evicted: Counter,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s: a CPU slice is ~10 ms, a CPU volume seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("biomarker_node");
        let m = Metrics {
            associations: Family::default(),
            instances: Family::default(),
            bytes_received: Counter::default(),
            series_completed: Counter::default(),
            series: Family::default(),
            jobs: Family::default(),
            jobs_by_state: Family::default(),
            inference_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            outbox_attempts: Family::default(),
            outbox_items: Family::default(),
            cuda_fallbacks: Counter::default(),
            tls_handshakes_failed: Counter::default(),
            config_reloads: Family::default(),
            free_disk_bytes: Gauge::default(),
            connections_open: Gauge::default(),
            association_limit: Gauge::default(),
            series_unroutable: Counter::default(),
            jobs_deadline_exceeded: Counter::default(),
            retention_series: Family::default(),
            retention_instances: Family::default(),
            retention_bytes: Family::default(),
            pre_association_evicted: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("associations", "DICOM associations by outcome (accepted, rejected, aborted)", m.associations.clone());
        r.register("instances", "C-STORE requests by the status we answered", m.instances.clone());
        r.register("received_bytes", "Dataset bytes received", m.bytes_received.clone());
        r.register("series_completed", "Series completions (every generation)", m.series_completed.clone());
        r.register("series", "Series in the index by state", m.series.clone());
        r.register("jobs", "Finished jobs by route, model and outcome", m.jobs.clone());
        r.register("jobs_by_state", "Jobs in the job store by state", m.jobs_by_state.clone());
        r.register(
            "inference_seconds",
            "Model inference time per job (ONNX Runtime, candidates and aggregation) by model and execution provider",
            m.inference_seconds.clone(),
        );
        r.register("outbox_attempts", "Delivery attempts by destination and outcome (delivered, retry, dead)", m.outbox_attempts.clone());
        r.register("outbox_items", "Outbox items by state (pending and sending are the depth)", m.outbox_items.clone());
        r.register("cuda_fallbacks", "Models that fell back from CUDA to CPU at load", m.cuda_fallbacks.clone());
        r.register("tls_handshakes_failed", "Connections to the TLS port that never became a TLS session", m.tls_handshakes_failed.clone());
        r.register("config_reloads", "Config reloads by outcome (ok, refused)", m.config_reloads.clone());
        r.register("data_dir_free_bytes", "Free bytes on the data_dir file system", m.free_disk_bytes.clone());
        r.register(
            "connections_open",
            "DICOM connections holding an association slot (both ports); at association_limit new ones are rejected",
            m.connections_open.clone(),
        );
        r.register("association_limit", "node.max_associations", m.association_limit.clone());
        r.register(
            "series_unroutable",
            "Series set aside as unroutable (a permanent routing failure, or a transient one past its retries)",
            m.series_unroutable.clone(),
        );
        r.register(
            "jobs_deadline_exceeded",
            "Jobs failed because they ran past jobs.timeout_s",
            m.jobs_deadline_exceeded.clone(),
        );
        r.register(
            "retention_purged_series",
            "Series whose spooled instances retention deleted, by policy (age, size)",
            m.retention_series.clone(),
        );
        r.register(
            "retention_purged_instances",
            "Spooled instances retention deleted, by policy (age, size)",
            m.retention_instances.clone(),
        );
        r.register(
            "retention_purged_bytes",
            "Spool bytes retention deleted, by policy (age, size)",
            m.retention_bytes.clone(),
        );
        r.register(
            "pre_association_evicted",
            "Connections closed before their A-ASSOCIATE-RQ because node.max_pending_connections was full (the oldest waiting one goes)",
            m.pre_association_evicted.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn count_association(&self, outcome: &str) {
        self.associations.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
    }

    pub fn count_instance(&self, status: u16, outcome: &str) {
        self.instances
            .get_or_create(&InstanceLabels {
                status: format!("0x{status:04X}"),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn count_reload(&self, outcome: &str) {
        self.config_reloads.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
    }

    /// Replace a by-state gauge family with fresh counts: states that
    /// vanished must not keep their last value.
    pub fn set_states<'a>(family: &Family<StateLabel, Gauge>, counts: impl IntoIterator<Item = (&'a str, i64)>) {
        family.clear();
        for (state, n) in counts {
            family.get_or_create(&StateLabel { state: state.into() }).set(n);
        }
    }
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

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
