//! Node configuration: one YAML file, one section per stage.
//!
//! [`Config`] is the root: it composes the sections, each defined in its own
//! file with its defaults ([`NodeConfig`] in `node.rs`, [`OutboxConfig`] in
//! `outbox.rs`, ...). Config is plain data at the bottom of the stage
//! layering: every stage reads its section, and config imports no stage.
//!
//! Every section denies unknown fields so a typo is an error, not a silent
//! default. Defaults come from functions so the README's reference and the
//! code cannot drift apart. [`Config::validate`] (in `check.rs`) checks what
//! serde cannot, value ranges and cross-field rules, and returns every
//! problem with its key; `locate.rs` turns a key into a `line:column`.
//!
//! The routing sections (`models`, `destinations`, `routes`, `onnxruntime`)
//! are optional and default to empty. Their semantic checks (a route naming
//! an unknown model, a bad regex, an unknown DICOM keyword) belong to the
//! routing stage, which needs the DICOM dictionary and the regex engine;
//! `node::check::check_file` runs those and the stages' file checks after
//! loading, and reports every problem as a [`ConfigDiagnostic`] positioned
//! at `file:line:column`.

mod check;
mod cluster;
mod destinations;
mod http;
mod locate;
mod log;
mod models;
mod node;
mod outbox;
mod retention;
mod routes;
pub mod schema;
mod series;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use cluster::{ClusterConfig, Role};
pub use check::{check_ae, ConfigDiagnostic, Problem};
pub use destinations::{DestinationConfig, DestinationTlsConfig, OutputKind, StowAuth, StowRsConfig, StowUrl};
pub use http::HttpConfig;
pub use log::LogConfig;
pub use models::{ExecutionProvider, JobsConfig, ModelConfig, OnnxRuntimeConfig};
pub use node::{AllowedCaller, NodeConfig, NodeTlsConfig, Timeouts};
pub use outbox::OutboxConfig;
pub use retention::RetentionConfig;
pub use routes::{ConditionSpec, RangeSpec, RouteConfig, SliceMode, SliceSelectionConfig};
pub use series::SeriesConfig;

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
    /// Every problem `validate` found, one line each when displayed.
    #[error("{}", problems.iter().map(|p| format!("{}: {p}", path.display())).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
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
    pub outbox: OutboxConfig,
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
    /// Cluster mode on NATS JetStream (`serve --role`). Absent: the
    /// embedded node, as always.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
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

fn default_true() -> bool {
    true
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

    pub fn index_path(&self) -> PathBuf {
        self.node.data_dir.join("index.sqlite")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.node.data_dir.join("spool")
    }
}

/// The JSON Schema (draft 2020-12) of the config file, generated from the
/// section structs by `schemars`: what `biomarker-node config-schema` prints,
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
    fn stow_rs_destination_parses_and_resolves_paths() {
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
        assert_eq!(s.auth, StowAuth::Bearer);
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

}
