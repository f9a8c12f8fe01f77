//! The `cluster:` section: cluster mode on NATS JetStream (docs/SCALE-OUT.md).
//! Absent: the embedded node (SQLite, local disk), as always. `serve --role`
//! picks what a process runs; its checks are in [`super::check`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the cluster's shared state lives on NATS JetStream. Every process
/// of one cluster (receivers, workers) has the same section; the role is
/// chosen per process with `serve --role`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server(s), e.g. `nats://127.0.0.1:4222`; several comma
    /// separated URLs of one NATS cluster are allowed.
    pub nats_url: String,
    /// The JetStream Object Store bucket that holds received instances
    /// (object name `<study>/<series>/<sop>.dcm`). File storage: an
    /// instance acknowledged by JetStream is on disk.
    #[serde(default = "default_bucket")]
    pub instances_bucket: String,
    /// The stream of instance metadata, one message per stored instance,
    /// published after its object; the series stage consumes it.
    #[serde(default = "default_stream")]
    pub instances_stream: String,
    /// Subject prefix of that stream: messages go to `<prefix>.<study>.<series>`
    /// (each UID as one token, `_` for `.`).
    #[serde(default = "default_subject")]
    pub instances_subject: String,
    /// Replicas of the bucket and stream (1 for one server; 3 on a
    /// three-server NATS cluster survives the loss of one).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Seconds to wait for JetStream to acknowledge a put or publish before
    /// the C-STORE fails (transient, 0xA700 family).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_s: f64,
    /// The KV bucket of series state (key: Series Instance UID), updated
    /// with compare-and-set by every receiver and every quiet-timer sweep.
    #[serde(default = "default_series_bucket")]
    pub series_bucket: String,
    /// The work-queue stream of completed series (`<jobs_subject>.series`):
    /// each message is one series generation to route and run, taken by one
    /// worker, acked once its reports are durable.
    #[serde(default = "default_jobs_stream")]
    pub jobs_stream: String,
    #[serde(default = "default_jobs_subject")]
    pub jobs_subject: String,
    /// The stream of dead letters: work that was delivered `max_deliver`
    /// times without finishing, with its last error (`<dead_subject>.series`).
    #[serde(default = "default_dead_stream")]
    pub dead_stream: String,
    #[serde(default = "default_dead_subject")]
    pub dead_subject: String,
    /// The KV bucket of outbox delivery state, one key per (destination,
    /// SOP Instance UID), claimed with compare-and-set before a send.
    #[serde(default = "default_outbox_bucket")]
    pub outbox_bucket: String,
    /// Seconds a worker may hold a job without acking or reporting progress
    /// before JetStream delivers it to another worker. A running job reports
    /// progress every third of this.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_s: f64,
    /// Deliveries of one job before it goes to the dead letters.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    /// Seconds a worker's claim on an outbox send holds before another
    /// worker may take it over (a worker that died mid-send).
    #[serde(default = "default_outbox_lease")]
    pub outbox_lease_s: f64,
}

fn default_bucket() -> String {
    "bn-instances".into()
}
fn default_stream() -> String {
    "BN_INSTANCES".into()
}
fn default_subject() -> String {
    "bn.instances".into()
}
fn default_replicas() -> usize {
    1
}
fn default_ack_timeout() -> f64 {
    10.0
}
fn default_series_bucket() -> String {
    "bn-series".into()
}
fn default_jobs_stream() -> String {
    "BN_JOBS".into()
}
fn default_jobs_subject() -> String {
    "bn.jobs".into()
}
fn default_dead_stream() -> String {
    "BN_DEAD".into()
}
fn default_dead_subject() -> String {
    "bn.dead".into()
}
fn default_outbox_bucket() -> String {
    "bn-outbox".into()
}
fn default_ack_wait() -> f64 {
    30.0
}
fn default_max_deliver() -> i64 {
    5
}
fn default_outbox_lease() -> f64 {
    60.0
}

/// What one `serve` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Every stage in one process on SQLite and local disk: the default,
    /// and the only role without a `cluster:` section.
    #[default]
    Embedded,
    /// A stateless DICOM SCP: instances go to the object store, their
    /// metadata to the stream.
    Receiver,
    /// Series, routing, jobs and outbox, fed from the instances stream
    /// (one worker per cluster so far: docs/SCALE-OUT.md).
    Worker,
    /// Receiver and worker in one process, on the shared state.
    All,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "embedded" => Role::Embedded,
            "receiver" => Role::Receiver,
            "worker" => Role::Worker,
            "all" => Role::All,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Embedded => "embedded",
            Role::Receiver => "receiver",
            Role::Worker => "worker",
            Role::All => "all",
        }
    }
}

/// NATS names: stream and bucket names are tokens without `.`, `*`, `>`,
/// whitespace or path separators; a subject prefix is dot-separated tokens.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub(crate) fn valid_subject_prefix(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
}
