//! Node configuration: one YAML file, one section per stage.
//!
//! Every section denies unknown fields so a typo is an error, not a silent
//! default. Defaults come from functions so the README's reference and the
//! code cannot drift apart. `validate()` checks what serde cannot: value
//! ranges and cross-field rules, and names the offending key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub series: SeriesConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Callers allowed to associate. Empty means any caller (logged loudly).
    #[serde(default)]
    pub allowed_callers: Vec<AllowedCaller>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Below this much free space under `data_dir`, new associations get a
    /// transient reject and C-STORE answers 0xA700.
    #[serde(default = "default_min_free_mb")]
    pub min_free_disk_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllowedCaller {
    pub ae_title: String,
    /// Optional source address the caller must connect from.
    #[serde(default)]
    pub host: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// ARTIM: time allowed for the A-ASSOCIATE-RQ after TCP accept.
    #[serde(default = "default_assoc_timeout")]
    pub association_request_s: u64,
    /// Time allowed to finish a PDU once its first byte arrived.
    #[serde(default = "default_read_timeout")]
    pub read_s: u64,
    /// Time allowed between PDUs on an established association.
    #[serde(default = "default_idle_timeout")]
    pub idle_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
fn default_max_pdu() -> u32 {
    // Large PDUs cut per-PDU overhead; memory per association stays bounded
    // by this value because we stream each PDU to disk.
    262_144
}
fn default_max_associations() -> usize {
    16
}
fn default_min_free_mb() -> u64 {
    1024
}
fn default_assoc_timeout() -> u64 {
    30
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
        if cfg.node.data_dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            let base = if base.as_os_str().is_empty() {
                Path::new(".")
            } else {
                base
            };
            cfg.node.data_dir = base.join(&cfg.node.data_dir);
        }
        Ok(cfg)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        check_ae(&self.node.ae_title).map_err(|m| bad("node.ae_title", m))?;
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
        if !(self.series.quiet_seconds > 0.0) {
            return Err(bad("series.quiet_seconds", "must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.series.spacing_tolerance) {
            return Err(bad(
                "series.spacing_tolerance",
                "must be in [0, 1)".into(),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(bad("log.format", "must be `text` or `json`".into()));
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
    fn relative_data_dir_resolves_against_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        std::fs::write(&p, MIN).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.node.data_dir, dir.path().join("data"));
    }
}
