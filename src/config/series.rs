//! The `series:` section: when a series counts as complete, and how evenly
//! its slices must be spaced. Read by the series tracker and the volume
//! builder.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::default_true;

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

fn default_quiet() -> f64 {
    30.0
}
fn default_spacing_tol() -> f64 {
    0.1
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
