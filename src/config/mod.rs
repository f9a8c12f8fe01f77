//! Node configuration: one YAML file, one section per stage.
//!
//! Every section denies unknown fields so a typo is an error, not a silent
//! default. Defaults come from functions so the README's reference and the
//! code cannot drift apart. `validate()` checks what serde cannot: value
//! ranges and cross-field rules, and names the offending key.
//!
//! The routing sections (`models`, `destinations`, `routes`, `onnxruntime`)
//! are optional and default to empty. Their semantic checks — a route naming
//! an unknown model, a bad regex, an unknown DICOM keyword — live in
//! [`crate::routing::RouteTable::compile`], which needs the DICOM dictionary
//! and the regex engine; [`check_file`] runs both and reports every problem
//! as a [`ConfigDiagnostic`] positioned at `file:line:column`.

pub mod schema;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub series: SeriesConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Biomarker models by name; routes refer to these names.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Where results go, by name; routes refer to these names.
    #[serde(default)]
    pub destinations: BTreeMap<String, DestinationConfig>,
    /// Evaluated in order against every completed series; every matching
    /// route is one job. See docs/ROUTING.md.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub onnxruntime: OnnxRuntimeConfig,
    /// Delivery of results: retries, backoff and timeouts.
    #[serde(default)]
    pub outbox: crate::outbox::OutboxConfig,
    /// The administrator's HTTP interface: health, metrics, REST API, status page.
    #[serde(default)]
    pub http: HttpConfig,
    /// Analysis jobs: how long one may run.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Deleting spooled instances whose series has no work left. Off unless
    /// a policy is set.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// The file and text this config came from, so later semantic checks can
    /// point at a line. Absent for configs built in code.
    #[serde(skip)]
    pub source: Option<ConfigSource>,
}

/// Where a [`Config`] was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model card (YAML); relative paths resolve against the config
    /// file's directory.
    pub card: PathBuf,
    #[serde(default)]
    pub execution_provider: ExecutionProvider,
    /// GPU ordinal for `cuda`; ignored for `cpu`.
    #[serde(default)]
    pub device_id: u32,
    /// When the model fails to load at start, refuse to start (true) or run
    /// without it and fail its jobs (false).
    #[serde(default)]
    pub fail_hard: bool,
    /// Jobs of this model run at most this many at a time.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
}

pub use crate::inference::ExecutionProvider;

/// A C-STORE SCP results are sent to, or with `stow_rs` a DICOMweb
/// origin server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Required for C-STORE; `validate` says so at the key. Defaulted so a
    /// `stow_rs` destination can leave it out.
    #[serde(default)]
    pub ae_title: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
    /// Deliver over DICOM TLS (PS3.15 B.1) instead of plain TCP.
    #[serde(default)]
    pub tls: Option<DestinationTlsConfig>,
    /// Deliver by STOW-RS (PS3.18 10.5) instead of C-STORE.
    #[serde(default)]
    pub stow_rs: Option<crate::outbox::stow::StowRsConfig>,
    /// Which outputs this destination gets (default: all three).
    #[serde(default = "all_outputs")]
    pub send: Vec<OutputKind>,
}

/// One kind of result object the node sends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// The TID 1500 Structured Report.
    Sr,
    /// The Secondary Capture overlays.
    Sc,
    /// The Segmentation of the localization.
    Seg,
}

fn all_outputs() -> Vec<OutputKind> {
    vec![OutputKind::Sr, OutputKind::Sc, OutputKind::Seg]
}

/// How we verify a TLS destination and, optionally, prove who we are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationTlsConfig {
    /// PEM file of the roots we trust for the destination's certificate. No
    /// system store: a PACS certificate is nearly always from a private CA,
    /// and trusting every public CA would let any web certificate pass.
    pub ca: PathBuf,
    /// PEM chain for client authentication, when the destination asks.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// PEM private key for `certificate`; both or neither.
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// Name checked against the destination's certificate; defaults to `host`.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// One routing rule. `match` is a condition tree (docs/ROUTING.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub condition: ConditionSpec,
    /// A key of `models`.
    pub model: String,
    /// Keys of `destinations`.
    #[serde(default)]
    pub send_to: Vec<String>,
    /// For 2-D models: which slice of the series to give them.
    #[serde(default)]
    pub slices: Option<SliceSelectionConfig>,
}

/// A condition as written in YAML: either a combinator (`all`, `any`, `not`)
/// or a subject (`keyword` or `derived`) with exactly one operator. The shape
/// is checked by `RouteTable::compile`, which can say which rule was broken.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<ConditionSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<ConditionSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<ConditionSpec>>,
    /// A DICOM keyword from the standard dictionary, e.g. `ImageType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword: Option<String>,
    /// A value the node derives from the series, e.g. `axial`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Value>")]
    pub equals: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<serde_json::Value>>")]
    pub one_of: Option<Vec<serde_yaml::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<RangeSpec>,
    /// One value of a multi-valued attribute equals this (e.g. ImageType).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absent: Option<bool>,
}

/// Inclusive numeric bounds; either may be left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RangeSpec {
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SliceSelectionConfig {
    pub mode: SliceMode,
    /// For `mode: index`.
    #[serde(default)]
    pub index: Option<usize>,
    /// For `mode: z_mm`: patient z (mm) of the wanted slice.
    #[serde(default)]
    pub z_mm: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SliceMode {
    Single,
    Middle,
    Index,
    ZMm,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnnxRuntimeConfig {
    /// Path of the ONNX Runtime shared library; relative paths resolve
    /// against the config file's directory. `ORT_DYLIB_PATH` overrides it.
    #[serde(default)]
    pub library: Option<PathBuf>,
}

impl OnnxRuntimeConfig {
    /// The library to load: `ORT_DYLIB_PATH` if set, else `library`.
    pub fn library_path(&self) -> Option<PathBuf> {
        std::env::var_os("ORT_DYLIB_PATH")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| self.library.clone())
    }
}

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

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SeriesConfig {
    /// A series with no new instance for this long is complete.
    #[serde(default = "default_quiet")]
    pub quiet_seconds: f64,
    /// Complete a series as soon as its association is released, if it is
    /// geometrically whole.
    #[serde(default = "default_true")]
    pub early_completion: bool,
    /// Relative tolerance on slice spacing for "evenly spaced".
    #[serde(default = "default_spacing_tol")]
    pub spacing_tolerance: f64,
}

/// The HTTP interface. Loopback by default: a bearer token is required as
/// soon as it listens on anything else, because the API can retry, dismiss
/// and reload.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `false` turns the HTTP interface off.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address and port, e.g. `127.0.0.1:8080`.
    #[serde(default = "default_http_listen")]
    pub listen: std::net::SocketAddr,
    /// Bearer token for every endpoint but health and readiness. Required
    /// when `listen` is not a loopback address. `BIOMARKER_HTTP_TOKEN`
    /// overrides it, so the token can stay out of the file.
    #[serde(default)]
    pub token: Option<String>,
}

fn default_http_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_http_listen(),
            token: None,
        }
    }
}

impl HttpConfig {
    /// The token in force: the environment wins over the file.
    pub fn effective_token(&self) -> Option<String> {
        std::env::var("BIOMARKER_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone().filter(|t| !t.is_empty()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// A job still running after this many seconds fails with "deadline of
    /// N s exceeded" and the next job runs.
    #[serde(default = "default_job_timeout")]
    pub timeout_s: f64,
}

fn default_job_timeout() -> f64 {
    600.0
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig { timeout_s: default_job_timeout() }
    }
}

/// Retention of spooled instances. A series is only ever deleted when no
/// work on it is pending: not receiving or waiting for routing, no job
/// pending or running, no report pending or sending in the outbox. Dead
/// letters do not hold it: their retry re-sends the reports under
/// `results/`, which retention never touches.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete a series' spooled instances this many days after its last
    /// activity (completion, job end, delivery). Fractions are allowed.
    /// Unset: no age limit.
    #[serde(default)]
    pub after_days: Option<f64>,
    /// When the spooled instances pass this many GB (10^9 bytes), delete
    /// series, oldest activity first, until they are under it. Unset: no cap.
    #[serde(default)]
    pub max_spool_gb: Option<f64>,
    /// Seconds between retention sweeps in `serve` (the first runs at start).
    #[serde(default = "default_retention_interval")]
    pub interval_s: f64,
}

fn default_retention_interval() -> f64 {
    600.0
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            after_days: None,
            max_spool_gb: None,
            interval_s: default_retention_interval(),
        }
    }
}

impl RetentionConfig {
    /// Whether any policy is set.
    pub fn enabled(&self) -> bool {
        self.after_days.is_some() || self.max_spool_gb.is_some()
    }

    /// `(key, message)` of the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if self.after_days.is_some_and(|v| !ok(v)) {
            return Err(("after_days", "must be a number of days, 0 or more".into()));
        }
        if self.max_spool_gb.is_some_and(|v| !ok(v)) {
            return Err(("max_spool_gb", "must be a number of GB, 0 or more".into()));
        }
        if !(self.interval_s.is_finite() && self.interval_s > 0.0) {
            return Err(("interval_s", "must be a positive number of seconds".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// An EnvFilter directive; RUST_LOG overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
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
fn default_quiet() -> f64 {
    30.0
}
fn default_max_concurrency() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_spacing_tol() -> f64 {
    0.1
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
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

impl Default for SeriesConfig {
    fn default() -> Self {
        SeriesConfig {
            quiet_seconds: default_quiet(),
            early_completion: true,
            spacing_tolerance: default_spacing_tol(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

impl Config {
    /// Read, parse and validate; `data_dir` is made absolute relative to the
    /// config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        cfg.resolve_paths(path);
        Ok(cfg)
    }

    /// Make `data_dir`, model cards and the ORT library absolute relative to
    /// the config file, so a checkout runs from anywhere.
    fn resolve_paths(&mut self, path: &Path) {
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.node.data_dir);
        for m in self.models.values_mut() {
            resolve(&mut m.card);
        }
        if let Some(lib) = self.onnxruntime.library.as_mut() {
            resolve(lib);
        }
        if let Some(t) = self.node.tls.as_mut() {
            resolve(&mut t.certificate);
            resolve(&mut t.private_key);
            if let Some(ca) = t.client_ca.as_mut() {
                resolve(ca);
            }
        }
        for d in self.destinations.values_mut() {
            if let Some(s) = d.stow_rs.as_mut() {
                s.resolve_paths(&resolve);
            }
            if let Some(t) = d.tls.as_mut() {
                resolve(&mut t.ca);
                for p in [t.certificate.as_mut(), t.private_key.as_mut()].into_iter().flatten() {
                    resolve(p);
                }
            }
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate(path)?;
        cfg.source = Some(ConfigSource {
            path: path.to_owned(),
            text: text.to_owned(),
        });
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        check_ae(&self.node.ae_title).map_err(|m| bad("node.ae_title", m))?;
        self.outbox
            .validate()
            .map_err(|f| bad(&format!("outbox.{}", f.key), f.message))?;
        for (i, c) in self.node.allowed_callers.iter().enumerate() {
            check_ae(&c.ae_title)
                .map_err(|m| bad(&format!("node.allowed_callers[{i}].ae_title"), m))?;
        }
        // PS3.8 D.1: the max length field is 32 bits; below 4 KiB no real peer works.
        if !(4096..=(1 << 24)).contains(&self.node.max_pdu) {
            return Err(bad(
                "node.max_pdu",
                format!("{} is outside 4096..=16777216", self.node.max_pdu),
            ));
        }
        if self.node.max_associations == 0 {
            return Err(bad("node.max_associations", "must be at least 1".into()));
        }
        if self.node.max_pending_connections == 0 {
            return Err(bad("node.max_pending_connections", "must be at least 1".into()));
        }
        if self.node.max_dataset_mb == 0 {
            return Err(bad("node.max_dataset_mb", "must be at least 1".into()));
        }
        if !(self.series.quiet_seconds > 0.0) {
            return Err(bad("series.quiet_seconds", "must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.series.spacing_tolerance) {
            return Err(bad(
                "series.spacing_tolerance",
                "must be in [0, 1)".into(),
            ));
        }
        if !(self.jobs.timeout_s > 0.0 && self.jobs.timeout_s.is_finite()) {
            return Err(bad("jobs.timeout_s", "must be a positive number of seconds".into()));
        }
        self.retention.validate().map_err(|(k, m)| bad(&format!("retention.{k}"), m))?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(bad("log.format", "must be `text` or `json`".into()));
        }
        for (name, m) in &self.models {
            if m.max_concurrency == 0 {
                return Err(bad(&format!("models.{name}.max_concurrency"), "must be at least 1".into()));
            }
        }
        if self.http.enabled
            && !self.http.listen.ip().is_loopback()
            && self.http.effective_token().is_none()
        {
            return Err(bad(
                "http.token",
                format!(
                    "required when http.listen ({}) is not a loopback address",
                    self.http.listen
                ),
            ));
        }
        for (name, d) in &self.destinations {
            if let Some(s) = &d.stow_rs {
                let given = [
                    ("ae_title", !d.ae_title.is_empty()),
                    ("host", !d.host.is_empty()),
                    ("port", d.port != 0),
                    ("tls", d.tls.is_some()),
                ];
                if let Some((k, _)) = given.iter().find(|(_, g)| *g) {
                    return Err(bad(
                        &format!("destinations.{name}.{k}"),
                        "is for C-STORE; a `stow_rs` destination takes only `stow_rs`".into(),
                    ));
                }
                s.validate(name).map_err(|f| bad(&f.key, f.message))?;
                continue;
            }
            // Defaulted for `stow_rs`; missing ones say so here, not as "empty".
            for (k, missing) in [("ae_title", d.ae_title.is_empty()), ("host", d.host.is_empty()), ("port", d.port == 0)] {
                if missing {
                    return Err(bad(
                        &format!("destinations.{name}.{k}"),
                        "is required for a C-STORE destination (or give `stow_rs`)".into(),
                    ));
                }
            }
            check_ae(&d.ae_title).map_err(|m| bad(&format!("destinations.{name}.ae_title"), m))?;
            if d.host.trim().is_empty() {
                return Err(bad(&format!("destinations.{name}.host"), "is empty".into()));
            }
            if d.port == 0 {
                return Err(bad(&format!("destinations.{name}.port"), "must be 1-65535".into()));
            }
            if let Some(t) = &d.tls {
                if t.certificate.is_some() != t.private_key.is_some() {
                    let missing = if t.certificate.is_some() { "private_key" } else { "certificate" };
                    return Err(bad(
                        &format!("destinations.{name}.tls.{missing}"),
                        "client authentication needs both `certificate` and `private_key`".into(),
                    ));
                }
                if let Some(sn) = &t.server_name {
                    if rustls::pki_types::ServerName::try_from(sn.as_str()).is_err() {
                        return Err(bad(
                            &format!("destinations.{name}.tls.server_name"),
                            format!("`{sn}` is not a DNS name or IP address"),
                        ));
                    }
                }
            }
        }
        if let Some(t) = &self.node.tls {
            if t.plain && t.port == self.node.port && t.port != 0 {
                return Err(bad(
                    "node.tls.port",
                    format!("{} is also node.port; the plain and TLS listeners need their own ports", t.port),
                ));
            }
        }
        Ok(())
    }

    pub fn index_path(&self) -> PathBuf {
        self.node.data_dir.join("index.sqlite")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.node.data_dir.join("spool")
    }
}

/// The JSON Schema (draft 2020-12) of the config file, generated from the
/// structs above by `schemars`: what `biomarker-node config-schema` prints,
/// and what docs/CONFIGURATION.md is checked against.
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Config)).expect("a schema serializes");
    if let Some(o) = schema.as_object_mut() {
        o.insert("title".into(), "biomarker-node configuration".into());
        o.insert(
            "description".into(),
            "The YAML config of biomarker-node; reference: docs/CONFIGURATION.md".into(),
        );
    }
    schema
}

/// PS3.5 6.2: AE is 1-16 chars of the default repertoire, no backslash or
/// control characters, and not all spaces.
pub fn check_ae(ae: &str) -> Result<(), String> {
    let t = ae.trim();
    if t.is_empty() {
        return Err("AE title is empty".into());
    }
    if ae.len() > 16 {
        return Err(format!("AE title `{ae}` is longer than 16 characters"));
    }
    if ae.chars().any(|c| !c.is_ascii() || c.is_ascii_control() || c == '\\') {
        return Err(format!("AE title `{ae}` has a character outside the AE repertoire"));
    }
    Ok(())
}

/// One problem in a config file, positioned for a human:
/// `path/to/file.yaml:LINE:COL: routes[1].model: unknown model "foo"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigDiagnostic {
    pub file: PathBuf,
    /// 1-based; `None` when the key could not be found in the text.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, e.g. `routes[2].match.all[0].keyword`; empty for a
    /// syntax error.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl ConfigDiagnostic {
    /// A diagnostic for `key`, positioned by finding that key path in the
    /// source text when there is one.
    pub fn at(source: Option<&ConfigSource>, key: &str, message: String) -> ConfigDiagnostic {
        let pos = source.and_then(|s| locate(&s.text, key));
        ConfigDiagnostic {
            file: source.map(|s| s.path.clone()).unwrap_or_default(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            key: key.to_owned(),
            message,
        }
    }

    /// Turn a load error into a positioned diagnostic.
    pub fn from_error(e: &ConfigError, text: Option<&str>) -> ConfigDiagnostic {
        match e {
            ConfigError::Read { path, source } => ConfigDiagnostic {
                file: path.clone(),
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read: {source}"),
            },
            ConfigError::Parse { path, source } => {
                let loc = source.location();
                let mut message = source.to_string();
                // serde_yaml repeats the position at the end; it is already
                // in front.
                if loc.is_some() {
                    if let Some(i) = message.rfind(" at line ") {
                        message.truncate(i);
                    }
                }
                ConfigDiagnostic {
                    file: path.clone(),
                    line: loc.as_ref().map(|l| l.line()),
                    column: loc.as_ref().map(|l| l.column()),
                    key: String::new(),
                    message,
                }
            }
            ConfigError::Invalid { path, key, message } => {
                let pos = text.and_then(|t| locate(t, key));
                ConfigDiagnostic {
                    file: path.clone(),
                    line: pos.map(|p| p.0),
                    column: pos.map(|p| p.1),
                    key: key.clone(),
                    message: message.clone(),
                }
            }
        }
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn key_path(key: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Seg::Key(name));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(i) = rest[1..end].parse() {
                out.push(Seg::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

/// A block-style YAML token that can start a node: a `- ` sequence entry or a
/// `key:`; columns are 0-based here.
#[derive(Debug)]
struct Token<'a> {
    line: usize,
    col: usize,
    key: Option<&'a str>,
}

fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    // Inside a block scalar (`|` or `>`), lines deeper than its key are text.
    let mut block_scalar_above: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = line[indent..].trim_end();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if let Some(c) = block_scalar_above {
            if indent > c {
                continue;
            }
            block_scalar_above = None;
        }
        if content == "---" || content == "..." {
            continue;
        }
        let mut col = indent;
        let mut rest = content;
        while rest == "-" || rest.starts_with("- ") {
            out.push(Token { line: n, col, key: None });
            let after = rest[1..].trim_start_matches(' ');
            col += rest.len() - after.len();
            rest = after;
        }
        if rest.starts_with(['{', '[', '"', '\'', '&', '*', '|', '>']) && !rest.starts_with(['"', '\'']) {
            continue;
        }
        let Some(key) = yaml_key(rest) else { continue };
        out.push(Token { line: n, col, key: Some(key) });
        let value = rest[rest.find(':').map_or(rest.len(), |i| i + 1)..].trim();
        let value = value.split(" #").next().unwrap_or("").trim();
        if value.starts_with('|') || value.starts_with('>') {
            block_scalar_above = Some(col);
        }
    }
    out
}

/// The key of a `key: value` line, unquoted.
fn yaml_key(s: &str) -> Option<&str> {
    if let Some(q) = s.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = s[1..].find(q)? + 1;
        return s[end + 1..].starts_with(':').then(|| &s[1..end]);
    }
    let i = s.find(": ").or_else(|| s.ends_with(':').then(|| s.len() - 1))?;
    let key = s[..i].trim_end();
    (!key.is_empty() && !key.contains(['{', '[', ','])).then_some(key)
}

/// Best-effort position (1-based line and column) of a key path such as
/// `routes[2].match.all[0].keyword` in block-style YAML. Flow collections
/// (`{...}`, `[...]`) are not entered: the deepest block-style node found is
/// returned, which is the line an admin needs to look at anyway.
pub fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    let toks = tokens(text);
    let path = key_path(key);
    let (mut lo, mut hi) = (0usize, toks.len());
    let mut found: Option<&Token> = None;
    for seg in &path {
        let col = toks.get(lo).map(|t| t.col).unwrap_or(0);
        let hit = match seg {
            _ if lo >= hi => None,
            Seg::Key(k) => (lo..hi).find(|&i| toks[i].col == col && toks[i].key == Some(*k)),
            Seg::Index(n) => (lo..hi)
                .filter(|&i| toks[i].col == col && toks[i].key.is_none())
                .nth(*n),
        };
        let Some(i) = hit else {
            // A flow collection on the parent's line: look for the key text
            // there so at least the column is close.
            if let (Some(f), Seg::Key(k)) = (found, seg) {
                let line = text.lines().nth(f.line)?;
                if let Some(c) = line.get(f.col..).and_then(|rest| rest.find(&format!("{k}:"))) {
                    return Some((f.line + 1, f.col + c + 1));
                }
            }
            break;
        };
        found = Some(&toks[i]);
        let parent_col = toks[i].col;
        let is_key = toks[i].key.is_some();
        // The node's children run until the next token at the node's own
        // column (or left of it). A block sequence may sit at its key's
        // column (`routes:\n- name: a`), so keys do not end at those.
        let end = (i + 1..hi)
            .find(|&j| {
                toks[j].col < parent_col
                    || (toks[j].col == parent_col && (toks[j].key.is_some() || !is_key))
            })
            .unwrap_or(hi);
        lo = i + 1;
        hi = end;
    }
    found.map(|t| (t.line + 1, t.col + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "node:\n  ae_title: BIOMARKER\n  data_dir: data\n";

    #[test]
    fn defaults_fill_in() {
        let c = Config::parse(MIN, Path::new("t.yaml")).expect("minimal config parses");
        assert_eq!(c.node.port, 11112);
        assert_eq!(c.series.quiet_seconds, 30.0);
        assert!(c.series.early_completion);
    }

    #[test]
    fn unknown_key_is_refused() {
        let e = Config::parse(&format!("{MIN}  colour: blue\n"), Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn long_ae_is_refused_with_key() {
        let y = "node:\n  ae_title: ABCDEFGHIJKLMNOPQ\n  data_dir: d\n";
        let e = Config::parse(y, Path::new("t.yaml")).unwrap_err();
        assert!(e.to_string().contains("node.ae_title"), "{e}");
    }

    #[test]
    fn tls_sections_parse_with_defaults_and_resolve_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        let y = format!(
            "{MIN}  tls: {{certificate: tls/n.pem, private_key: /abs/n.key}}\n\
             destinations:\n  pacs: {{ae_title: P, host: h.example, port: 2762, tls: {{ca: ca.pem}}}}\n"
        );
        std::fs::write(&p, y).unwrap();
        let c = Config::load(&p).unwrap();
        let t = c.node.tls.as_ref().expect("node.tls parsed");
        assert_eq!(t.port, 2762);
        assert!(t.plain);
        assert_eq!(t.client_ca, None);
        assert_eq!(t.certificate, dir.path().join("tls/n.pem"));
        assert_eq!(t.private_key, Path::new("/abs/n.key"));
        let d = c.destinations["pacs"].tls.as_ref().expect("destination tls parsed");
        assert_eq!(d.ca, dir.path().join("ca.pem"));
        assert_eq!(d.server_name, None);
    }

    #[test]
    fn tls_mistakes_name_their_key() {
        let cases = [
            (format!("{MIN}  tls: {{certificate: a, private_key: b, colour: red}}\n"), "colour"),
            (format!("{MIN}  port: 2762\n  tls: {{certificate: a, private_key: b}}\n"), "node.tls.port"),
            (
                format!("{MIN}destinations:\n  pacs: {{ae_title: P, host: h, port: 1, tls: {{ca: c, certificate: x}}}}\n"),
                "destinations.pacs.tls.private_key",
            ),
            (
                format!("{MIN}destinations:\n  pacs: {{ae_title: P, host: h, port: 1, tls: {{ca: c, server_name: 'a b'}}}}\n"),
                "destinations.pacs.tls.server_name",
            ),
        ];
        for (y, key) in cases {
            let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
            assert!(e.to_string().contains(key), "{y}: {e}");
        }
        // TLS-only on the plain port is fine: there is one listener.
        let y = format!("{MIN}  port: 2762\n  tls: {{certificate: a, private_key: b, plain: false}}\n");
        Config::parse(&y, Path::new("t.yaml")).unwrap();
    }

    #[test]
    fn stow_rs_destination_parses_and_mistakes_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        let y = format!(
            "{MIN}destinations:\n  web:\n    stow_rs: {{url: 'https://pacs/dicom-web', ca: ca.pem, auth: bearer, token_file: t}}\n"
        );
        std::fs::write(&p, y).unwrap();
        let c = Config::load(&p).unwrap();
        let s = c.destinations["web"].stow_rs.as_ref().expect("stow_rs parsed");
        assert_eq!(s.ca.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        assert_eq!(s.token_file.as_deref(), Some(dir.path().join("t").as_path()));
        let cases = [
            ("{stow_rs: {url: 'http://h/'}, host: h}", "destinations.web.host"),
            ("{stow_rs: {url: 'http://h/'}, ae_title: P}", "destinations.web.ae_title"),
            ("{stow_rs: {url: 'http://h/', auth: basic}}", "destinations.web.stow_rs.username"),
            ("{stow_rs: {url: 'h/x'}}", "destinations.web.stow_rs.url"),
            ("{stow_rs: {url: 'http://h/', colour: red}}", "colour"),
            ("{host: h, port: 104}", "destinations.web.ae_title"),
            ("{ae_title: P, port: 104}", "destinations.web.host"),
        ];
        for (d, key) in cases {
            let y = format!("{MIN}destinations:\n  web: {d}\n");
            let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
            assert!(e.to_string().contains(key), "{y}: {e}");
        }
    }

    #[test]
    fn check_file_reports_a_missing_stow_secret_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        let y = format!(
            "{MIN}destinations:\n  web:\n    stow_rs:\n      url: http://h/dicom-web\n      auth: basic\n      \
             username: u\n      password_env: BMN_CONFIG_TEST_UNSET_PW_41\n"
        );
        std::fs::write(&p, y).unwrap();
        let diags = crate::node::check::check_file(&p).unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].key, "destinations.web.stow_rs.password_env");
        assert_eq!(diags[0].line, Some(10), "{diags:?}");
        assert!(diags[0].message.contains("BMN_CONFIG_TEST_UNSET_PW_41"));
    }

    #[test]
    fn check_file_reports_unreadable_tls_files_at_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        std::fs::write(&p, format!("{MIN}  tls:\n    certificate: nope.pem\n    private_key: nope.key\n")).unwrap();
        let diags = crate::node::check::check_file(&p).unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].key, "node.tls.certificate");
        assert_eq!(diags[0].line, Some(5), "{diags:?}");
    }

    #[test]
    fn relative_data_dir_resolves_against_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        std::fs::write(&p, MIN).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.node.data_dir, dir.path().join("data"));
    }

    #[test]
    fn routing_sections_are_optional_and_parse() {
        let y = format!(
            "{MIN}models:\n  pma:\n    card: ../models/pma.yaml\n    execution_provider: cuda\n\
             destinations:\n  pacs: {{ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}\n\
             onnxruntime:\n  library: lib/libonnxruntime.so\n"
        );
        let c = Config::parse(&y, Path::new("t.yaml")).unwrap();
        assert_eq!(c.models["pma"].execution_provider, ExecutionProvider::Cuda);
        assert_eq!(c.models["pma"].max_concurrency, 1);
        assert_eq!(c.destinations["pacs"].port, 4242);
        assert!(c.routes.is_empty());
        let c = Config::parse(MIN, Path::new("t.yaml")).unwrap();
        assert!(c.models.is_empty() && c.destinations.is_empty() && c.onnxruntime.library.is_none());
    }

    #[test]
    fn bad_destination_ae_names_the_key_and_line() {
        let y = format!("{MIN}destinations:\n  pacs:\n    ae_title: ABCDEFGHIJKLMNOPQ\n    host: h\n    port: 1\n");
        let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
        let d = ConfigDiagnostic::from_error(&e, Some(&y));
        assert_eq!(d.to_string().split(": ").next(), Some("t.yaml:6:5"), "{d}");
        assert_eq!(d.key, "destinations.pacs.ae_title");
    }

    #[test]
    fn parse_error_carries_its_position() {
        let y = format!("{MIN}routes:\n  - name: a\n    colour: red\n");
        let e = Config::parse(&y, Path::new("t.yaml")).unwrap_err();
        let d = ConfigDiagnostic::from_error(&e, Some(&y));
        assert_eq!(d.line, Some(6), "{d}");
        assert!(d.to_string().starts_with("t.yaml:6:5: routes[0]: unknown field `colour`"), "{d}");
        assert!(!d.message.contains("at line"), "{d}");
    }

    #[test]
    fn locate_walks_block_yaml() {
        let y = "\
node:
  ae_title: X
routes:
- name: a          # first
  match:
    all:
      - keyword: Modality
        equals: CT
      - not:
          keyword: ImageType
          regex: LOCALIZER
  model: pma
- name: b
  description: |
    model: not a key
  match: {all: [{keyword: Modality, equals: CT}]}
  model: sfa
";
        assert_eq!(locate(y, "routes[0].model"), Some((12, 3)));
        assert_eq!(locate(y, "routes[0].match.all[1].not.regex"), Some((11, 11)));
        assert_eq!(locate(y, "routes[0].match.all[0].equals"), Some((8, 9)));
        assert_eq!(locate(y, "routes[1].model"), Some((17, 3)));
        assert_eq!(locate(y, "routes[1]"), Some((13, 1)));
        // Inside a flow mapping: the line of the parent, near the key.
        assert_eq!(locate(y, "routes[1].match.all[0].keyword").map(|p| p.0), Some(16));
        assert_eq!(locate(y, "node.ae_title"), Some((2, 3)));
    }
}
