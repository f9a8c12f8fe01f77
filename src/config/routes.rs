//! The `routes:` section as written: rules, their condition trees and slice
//! selection. Plain data: `routing::RouteTable::compile` turns it into the
//! matcher, and reports what is wrong with it (unknown model or keyword, bad
//! regex) as positioned diagnostics.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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

/// A condition as written in YAML: either a combinator (`all`, `any`, `not`),
/// an anatomy test (`covers`), or a subject (`keyword` or `derived`) with
/// exactly one operator. The shape
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
    /// A test on its own: the series covers this region, found from HU
    /// (`liver`); decodes a sparse stack of the series when evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers: Option<String>,
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
    /// The axial slice just above the aortic arch, found in the volume from
    /// HU structure (trachea → carina → arch); a single image is that image.
    AboveAorticArch,
    /// Every slice, each on its own: a volume's burden (an area card gives
    /// a volume in mL and its largest cross-section); a single image is
    /// measured as with `single`.
    All,
}
