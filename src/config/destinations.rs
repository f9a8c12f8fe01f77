//! The `destinations:` section: where results go, by name. One destination
//! is either a C-STORE SCP (`ae_title`, `host`, `port`, optionally `tls`) or
//! a DICOMweb origin server (`stow_rs`).
//!
//! This is the one description of a destination: [`super::check`] validates
//! it once, and `outbox::Destination::build` loads what it names (TLS
//! material, secrets) without checking it again. [`StowUrl`] is here because
//! both need it: the check refuses a URL that does not parse, and the
//! STOW-RS client connects to the parsed parts.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    pub stow_rs: Option<StowRsConfig>,
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

/// The `destinations.<name>.stow_rs` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StowRsConfig {
    /// Base URL of the DICOMweb service; instances go to `{url}/studies`.
    pub url: String,
    #[serde(default)]
    pub auth: StowAuth,
    /// For `auth: basic`.
    #[serde(default)]
    pub username: Option<String>,
    /// For `auth: basic`: the environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// For `auth: basic`: a file holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// For `auth: bearer`: the environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// For `auth: bearer`: a file holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM roots trusted for an `https` URL (required there).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StowAuth {
    #[default]
    None,
    Basic,
    Bearer,
}

impl StowRsConfig {
    /// Make `ca` and the secret files absolute relative to the config file.
    pub fn resolve_paths(&mut self, resolve: &dyn Fn(&mut PathBuf)) {
        for p in [&mut self.ca, &mut self.password_file, &mut self.token_file].into_iter().flatten() {
            resolve(p);
        }
    }
}

/// A parsed `stow_rs.url`: what a connection and a request need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StowUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// The Host header value (`host[:port]`).
    pub authority: String,
    /// Path without a trailing slash (`""` or `/dicom-web`).
    pub path: String,
}

impl StowUrl {
    /// The message says what is wrong, for `destinations.<name>.stow_rs.url`.
    pub fn parse(url: &str) -> Result<StowUrl, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("`{url}` must start with http:// or https://")),
        };
        let auth = uri.authority().ok_or_else(|| format!("`{url}` has no host"))?;
        if auth.as_str().contains('@') {
            return Err("credentials in the URL would be logged; use `auth`".into());
        }
        if uri.query().is_some() {
            return Err(format!("`{url}` has a query; give the service's base URL"));
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        Ok(StowUrl {
            https,
            port: auth.port_u16().unwrap_or(if https { 443 } else { 80 }),
            host,
            authority: auth.as_str().to_owned(),
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}
