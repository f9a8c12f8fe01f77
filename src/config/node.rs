//! The `node:` section: who the node is on the network (AE title, address,
//! ports, TLS listener), what it accepts (allowed callers, PDU and dataset
//! limits) and how long it waits (association timeouts). Read by ingest and
//! by the TLS module; checked in [`super::check`].

use std::net::IpAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::default_true;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Our AE title; a called AE title that differs is rejected (PS3.8 9.3.4).
    pub ae_title: String,
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Spool, index and queues live here. Relative paths resolve against the
    /// config file's directory so a checkout runs from anywhere.
    pub data_dir: PathBuf,
    /// Max PDU length we advertise for receiving (PS3.8 D.1).
    #[serde(default = "default_max_pdu")]
    pub max_pdu: u32,
    #[serde(default = "default_max_associations")]
    pub max_associations: usize,
    /// Connections allowed at once before their A-ASSOCIATE-RQ has passed
    /// negotiation (TLS handshake included); past it the oldest is closed.
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// Callers allowed to associate. Empty means any caller (logged loudly).
    #[serde(default)]
    pub allowed_callers: Vec<AllowedCaller>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Below this much free space under `data_dir`, new associations get a
    /// transient reject and C-STORE answers 0xA700.
    #[serde(default = "default_min_free_mb")]
    pub min_free_disk_mb: u64,
    /// Largest dataset accepted by C-STORE, in MiB, as received and, for
    /// deflated datasets, once inflated. Enforced while receiving, so one
    /// peer cannot fill the disk or make validation inflate without end.
    #[serde(default = "default_max_dataset_mb")]
    pub max_dataset_mb: u64,
    /// A second listener with DICOM TLS (PS3.15 B.1); the same association
    /// handler, limits and allow-lists serve both.
    #[serde(default)]
    pub tls: Option<NodeTlsConfig>,
}

/// The TLS listener. Relative paths resolve against the config file's
/// directory, like `data_dir`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeTlsConfig {
    /// 2762 is the registered DICOM-TLS port (PS3.15 B.1).
    #[serde(default = "default_tls_port")]
    pub port: u16,
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// PEM roots for client certificates. When set, a client must present a
    /// certificate that chains to one of them; when absent, none is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Keep the plain listener on `node.port` as well. `false` makes the
    /// node TLS-only.
    #[serde(default = "default_true")]
    pub plain: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowedCaller {
    pub ae_title: String,
    /// Optional source address the caller must connect from.
    #[serde(default)]
    pub host: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// ARTIM: time allowed from TCP accept to a whole A-ASSOCIATE-RQ, the
    /// TLS handshake included (the pre-association deadline).
    #[serde(default = "default_assoc_timeout")]
    pub association_request_s: u64,
    /// Time allowed to finish a PDU once its first byte arrived.
    #[serde(default = "default_read_timeout")]
    pub read_s: u64,
    /// Time allowed between PDUs on an established association.
    #[serde(default = "default_idle_timeout")]
    pub idle_s: u64,
}

fn default_bind() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}
fn default_port() -> u16 {
    11112
}
fn default_tls_port() -> u16 {
    2762
}
fn default_max_pdu() -> u32 {
    // Large PDUs cut per-PDU overhead; memory per association stays bounded
    // by this value because we stream each PDU to disk.
    262_144
}
fn default_max_associations() -> usize {
    16
}
fn default_max_pending_connections() -> usize {
    64
}
fn default_min_free_mb() -> u64 {
    1024
}
/// Twice a 1 GiB multi-frame CT: large enough for real enhanced CT, small
/// enough that a deflate bomb stops long before the disk or the clock do.
fn default_max_dataset_mb() -> u64 {
    2048
}
fn default_assoc_timeout() -> u64 {
    // Short: it is how long a connection nobody has vouched for may sit in
    // the pre-association budget. A real peer sends its RQ in milliseconds.
    5
}
fn default_read_timeout() -> u64 {
    30
}
fn default_idle_timeout() -> u64 {
    120
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            association_request_s: default_assoc_timeout(),
            read_s: default_read_timeout(),
            idle_s: default_idle_timeout(),
        }
    }
}
