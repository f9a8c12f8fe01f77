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
    /// Subject prefix of that stream: messages go to `<prefix>.<study UID>`.
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
