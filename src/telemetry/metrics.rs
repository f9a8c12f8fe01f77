//! The metrics the node exports at `/metrics` (Prometheus text), each
//! declared once: field, type, exported name and help.

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
pub struct RouteModelLabels {
    pub route: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub model: String,
    /// The guard check that refused (`slice_thickness`, `hu_air`, `level`,
    /// ...; `aortic_arch` for a volume without the landmark).
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InferenceLabels {
    pub model: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    /// `delivered`, `retry` or `dead`; in a cluster also `delivered_elsewhere`,
    /// `held` or `unavailable` (the shared claims kept it from being sent).
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Declares [`Metrics`] from one row per metric (field, type, exported
/// name, help) and registers them in row order, the order `/metrics` lists.
macro_rules! metrics {
    ($($field:ident: $ty:ty = $init:expr, $name:literal, $help:literal;)*) => {
        /// Every metric the node exports. Counters are bumped by the events
        /// (`telemetry::events`); the gauges that describe stored state
        /// (series, jobs, outbox, disk) are set from the stores at scrape
        /// time, so they are right after a restart.
        pub struct Metrics {
            registry: Registry,
            $(pub $field: $ty,)*
        }

        impl Metrics {
            fn new() -> Metrics {
                let mut registry = Registry::with_prefix("biomarker_node");
                $(
                    let $field: $ty = $init;
                    registry.register($name, $help, $field.clone());
                )*
                Metrics { registry, $($field,)* }
            }
        }
    };
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s: a CPU slice is ~10 ms, a CPU volume seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

metrics! {
    associations: Family<OutcomeLabel, Counter> = Family::default(), "associations",
        "DICOM associations by outcome (accepted, rejected, aborted)";
    instances: Family<InstanceLabels, Counter> = Family::default(), "instances",
        "C-STORE requests by the status we answered";
    bytes_received: Counter = Counter::default(), "received_bytes", "Dataset bytes received";
    series_completed: Counter = Counter::default(), "series_completed", "Series completions (every generation)";
    series: Family<StateLabel, Gauge> = Family::default(), "series", "Series in the index by state";
    jobs: Family<JobLabels, Counter> = Family::default(), "jobs", "Finished jobs by route, model and outcome";
    jobs_by_state: Family<StateLabel, Gauge> = Family::default(), "jobs_by_state", "Jobs in the job store by state";
    inference_seconds: HistogramFamily<InferenceLabels> =
        Family::new_with_constructor(latency_histogram as fn() -> Histogram), "inference_seconds",
        "Model inference time per job (ONNX Runtime, candidates and aggregation) by model and execution provider";
    outbox_attempts: Family<DeliveryLabels, Counter> = Family::default(), "outbox_attempts",
        "Delivery attempts by destination and outcome (delivered, retry, dead)";
    outbox_items: Family<StateLabel, Gauge> = Family::default(), "outbox_items",
        "Outbox items by state (pending and sending are the depth)";
    cuda_fallbacks: Counter = Counter::default(), "cuda_fallbacks", "Models that fell back from CUDA to CPU at load";
    tls_handshakes_failed: Counter = Counter::default(), "tls_handshakes_failed",
        "Connections to the TLS port that never became a TLS session";
    config_reloads: Family<OutcomeLabel, Counter> = Family::default(), "config_reloads",
        "Config reloads by outcome (ok, refused)";
    free_disk_bytes: Gauge = Gauge::default(), "data_dir_free_bytes", "Free bytes on the data_dir file system";
    connections_open: Gauge = Gauge::default(), "connections_open",
        "DICOM connections holding an association slot (both ports); at association_limit new ones are rejected";
    association_limit: Gauge = Gauge::default(), "association_limit", "node.max_associations";
    series_unroutable: Counter = Counter::default(), "series_unroutable",
        "Series set aside as unroutable (a permanent routing failure, or a transient one past its retries)";
    jobs_deadline_exceeded: Counter = Counter::default(), "jobs_deadline_exceeded",
        "Jobs failed because they ran past jobs.timeout_s";
    retention_series: Family<PolicyLabel, Counter> = Family::default(), "retention_purged_series",
        "Series whose spooled instances retention deleted, by policy (age, size)";
    retention_instances: Family<PolicyLabel, Counter> = Family::default(), "retention_purged_instances",
        "Spooled instances retention deleted, by policy (age, size)";
    retention_bytes: Family<PolicyLabel, Counter> = Family::default(), "retention_purged_bytes",
        "Spool bytes retention deleted, by policy (age, size)";
    pre_association_evicted: Counter = Counter::default(), "pre_association_evicted",
        "Connections closed before their A-ASSOCIATE-RQ because node.max_pending_connections was full (the oldest waiting one goes)";
    jobs_started: Family<RouteModelLabels, Counter> = Family::default(), "jobs_started",
        "Job attempts the worker started, by route and model";
    jobs_refused: Family<RefusalLabels, Counter> = Family::default(), "jobs_refused",
        "Jobs refused because their input is outside what the model was validated on (or its output implausible), by model and check";
    cluster_series: Family<StateLabel, Gauge> = Family::default(), "cluster_series",
        "Cluster mode: series in the shared series bucket by state (receiving, complete), as of cluster_snapshot_age_seconds";
    cluster_jobs: Family<StateLabel, Gauge> = Family::default(), "cluster_jobs",
        "Cluster mode: series jobs by state (waiting in the work queue, running on a worker, dead letters)";
    cluster_outbox: Family<StateLabel, Gauge> = Family::default(), "cluster_outbox",
        "Cluster mode: outbox claims in the shared outbox bucket by state (sending, delivered)";
    cluster_snapshot_age: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default(), "cluster_snapshot_age_seconds",
        "Cluster mode: age of the cluster-wide counts (refreshed at most every 2 s; older when NATS does not answer)";
}

impl Metrics {
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

    pub(super) fn count_reload(&self, outcome: &str) {
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

