//! The `retention:` section: when spooled instances may be deleted. The
//! retention stage reads it; its ranges are checked in [`super::check`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
}
