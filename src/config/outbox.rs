//! The `outbox:` section: delivery retries, backoff and timeouts. The
//! outbox stage reads it (as [`Duration`]s); its ranges are checked in
//! [`super::check`].

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `outbox:` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Delay before the 2nd attempt; doubles per failed attempt.
    #[serde(default = "default_retry_base")]
    pub retry_base_s: f64,
    /// Longest delay between attempts.
    #[serde(default = "default_retry_cap")]
    pub retry_cap_s: f64,
    /// Attempts (transient failures) before an item becomes a dead letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// TCP connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: f64,
    /// Time allowed for the A-ASSOCIATE-AC, each PDU write, each C-STORE-RSP
    /// and the A-RELEASE-RP.
    #[serde(default = "default_dimse_timeout")]
    pub dimse_timeout_s: f64,
}

fn default_retry_base() -> f64 {
    2.0
}
fn default_retry_cap() -> f64 {
    300.0
}
fn default_max_attempts() -> u32 {
    10
}
fn default_connect_timeout() -> f64 {
    10.0
}
fn default_dimse_timeout() -> f64 {
    60.0
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            retry_base_s: default_retry_base(),
            retry_cap_s: default_retry_cap(),
            max_attempts: default_max_attempts(),
            connect_timeout_s: default_connect_timeout(),
            dimse_timeout_s: default_dimse_timeout(),
        }
    }
}

/// As durations; `check` keeps the values in (0, 7 days], so the 1 s
/// fallback is never used for a loaded config.
impl OutboxConfig {
    fn secs(v: f64) -> Duration {
        Duration::try_from_secs_f64(v).unwrap_or(Duration::from_secs(1))
    }
    pub fn retry_base(&self) -> Duration {
        Self::secs(self.retry_base_s)
    }
    pub fn retry_cap(&self) -> Duration {
        Self::secs(self.retry_cap_s)
    }
    pub fn connect_timeout(&self) -> Duration {
        Self::secs(self.connect_timeout_s)
    }
    pub fn dimse_timeout(&self) -> Duration {
        Self::secs(self.dimse_timeout_s)
    }
}
