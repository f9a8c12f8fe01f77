//! The `http:` section: the administrator's HTTP interface (health,
//! metrics, REST API, status page) and its bearer token.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::default_true;

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
