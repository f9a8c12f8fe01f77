//! From a model's map to a measurement: the map aggregated inside the
//! candidates (area), over the Agatston lesions (agatston), or the model's
//! output summed (direct). Pure: running the model is `inference::measure`.
//!
//! Input: HU `[S,R,C]` in patient order, the model output `[S,1,H,W]`, the
//! pixel geometry and the card's `candidates:` and `aggregation:` sections.
//! Output: the value, risk category (Agatston), lesions, and the map and
//! candidates at native resolution. Invariant: the map is resampled back by
//! nearest neighbour (see the module header of `biomarkers`).

use ndarray::{s, Array3, ArrayView3, ArrayView4, Axis};
use serde::{Deserialize, Serialize};

use super::agatston::{self, Lesion, RiskCategory};
use super::aggregate::upsample_nearest;
use super::candidates::{candidate_mask, CandidateSpec};

/// The card's `aggregation:` section: how the map becomes a value.
#[derive(Debug, Clone, Deserialize)]
pub struct AggregationSpec {
    /// "area", "agatston" or "direct".
    pub kind: String,
    #[serde(default = "one")]
    pub unit_scale: f64,
    /// Agatston only: "lesion_threshold" (a lesion counts fully when the mean
    /// map over it reaches `lesion_threshold`) or "soft" (mean map × score).
    #[serde(default)]
    pub lesion_aggregation: Option<String>,
    #[serde(default)]
    pub lesion_threshold: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl AggregationSpec {
    pub fn is_agatston(&self) -> bool {
        self.kind == "agatston"
    }
}

/// Pixel geometry the aggregation needs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PixelGeometry {
    /// Row spacing, column spacing (mm).
    pub pixel_spacing: [f64; 2],
    pub slice_thickness_mm: f64,
}

impl PixelGeometry {
    pub fn pixel_area_mm2(&self) -> f64 {
        self.pixel_spacing[0] * self.pixel_spacing[1]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LesionResult {
    #[serde(flatten)]
    pub lesion: Lesion,
    /// Mean of the native-resolution map over the lesion.
    pub mean_map: f64,
    /// Whether the lesion counts toward the score.
    pub counted: bool,
}

/// One biomarker value with what it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub value: f64,
    pub unit: String,
    pub risk_category: Option<RiskCategory>,
    pub lesions: Vec<LesionResult>,
    /// Localization map at native resolution `[S,R,C]`.
    #[serde(skip)]
    pub map: Array3<f32>,
    #[serde(skip)]
    pub candidates: Array3<bool>,
    pub model: String,
    pub model_version: String,
    pub execution_provider: &'static str,
    /// A 2-D area measured on every slice of a volume (route `slices: all`):
    /// `value` is then the volume (mL) and this has the per-slice areas and
    /// the largest cross-section. `None` for one slice or a 3-D model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<super::burden::VolumeBurden>,
}

/// What the aggregation yields; the model's identity completes it into a
/// [`Measurement`].
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub value: f64,
    pub risk_category: Option<RiskCategory>,
    pub lesions: Vec<LesionResult>,
    /// `[S,R,C]`; empty for "direct".
    pub map: Array3<f32>,
    /// `[S,R,C]`; empty for "direct".
    pub candidates: Array3<bool>,
}

/// Aggregate the model output `out` (`[S,1,H,W]`) over `hu` (`[S,R,C]`).
pub fn aggregate(
    hu: ArrayView3<f32>,
    out: ArrayView4<f32>,
    geom: PixelGeometry,
    spec: &CandidateSpec,
    aggregation: &AggregationSpec,
) -> Aggregate {
    let (n, rows, cols) = hu.dim();
    if aggregation.kind == "direct" {
        let v: f64 = out.iter().map(|&x| x as f64).sum();
        return Aggregate {
            value: v,
            risk_category: aggregation.is_agatston().then(|| RiskCategory::from_score(v)),
            lesions: vec![],
            map: Array3::zeros((0, 0, 0)),
            candidates: Array3::from_elem((0, 0, 0), false),
        };
    }

    let mut map = Array3::<f32>::zeros((n, rows, cols));
    for i in 0..n {
        let up = upsample_nearest(out.slice(s![i, 0, .., ..]), (rows, cols));
        map.index_axis_mut(Axis(0), i).assign(&up);
    }
    let area = geom.pixel_area_mm2();
    if aggregation.is_agatston() {
        let (lesions, labels) = agatston::lesions(hu, None, spec.lesion_rule(), area, geom.slice_thickness_mm);
        let mut sums = vec![0f64; lesions.len()];
        let first_of_slice = agatston::first_of_slice(&lesions, n);
        for ((s, r, c), &lab) in labels.indexed_iter() {
            if lab > 0 {
                sums[first_of_slice[s] + lab as usize - 1] += map[[s, r, c]] as f64;
            }
        }
        let threshold = aggregation.lesion_threshold.unwrap_or(0.5);
        let soft = aggregation.lesion_aggregation.as_deref() == Some("soft");
        let mut value = 0.0;
        let results: Vec<LesionResult> = lesions
            .into_iter()
            .zip(sums)
            .map(|(l, sum)| {
                let mean_map = sum / l.n_pixels as f64;
                let counted = mean_map >= threshold;
                value += if soft {
                    mean_map * l.score
                } else if counted {
                    l.score
                } else {
                    0.0
                };
                LesionResult {
                    lesion: l,
                    mean_map,
                    counted,
                }
            })
            .collect();
        let candidates = labels.mapv(|l| l > 0);
        return Aggregate {
            value,
            risk_category: Some(RiskCategory::from_score(value)),
            lesions: results,
            map,
            candidates,
        };
    }
    let candidates = candidate_mask(hu, spec, area);
    let sum: f64 = map
        .iter()
        .zip(candidates.iter())
        .filter(|(_, &c)| c)
        .map(|(&m, _)| m as f64)
        .sum();
    Aggregate {
        value: sum * area * aggregation.unit_scale,
        risk_category: None,
        lesions: vec![],
        map,
        candidates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn spec(kind: &str) -> AggregationSpec {
        AggregationSpec {
            kind: kind.into(),
            unit_scale: 0.01,
            lesion_aggregation: None,
            lesion_threshold: None,
        }
    }

    #[test]
    fn area_is_map_inside_candidates_times_pixel_area() {
        // 4×4 at 40 HU, a 2×2 block of fat (not a candidate); the model map
        // is 2×2 and upsamples by nearest.
        let mut hu = Array3::<f32>::from_elem((1, 4, 4), 40.0);
        hu.slice_mut(s![0, 0..2, 0..2]).fill(-100.0);
        let mut out = Array4::<f32>::from_elem((1, 1, 2, 2), 0.5);
        out[[0, 0, 1, 1]] = 1.0;
        let geom = PixelGeometry {
            pixel_spacing: [0.5, 2.0],
            slice_thickness_mm: 5.0,
        };
        let cand = CandidateSpec {
            hu_min: -29.0,
            hu_max: Some(150.0),
            min_area_mm2: 0.0,
        };
        let a = aggregate(hu.view(), out.view(), geom, &cand, &spec("area"));
        // 8 candidate pixels at 0.5 and 4 at 1.0, 1 mm² each, × 0.01
        assert!((a.value - (8.0 * 0.5 + 4.0) * 0.01).abs() < 1e-12);
        assert_eq!(a.candidates.iter().filter(|&&c| c).count(), 12);
        assert!(a.risk_category.is_none());
    }

    #[test]
    fn agatston_counts_lesions_whose_mean_map_reaches_the_threshold() {
        let mut hu = Array3::<f32>::zeros((1, 4, 4));
        hu.slice_mut(s![0, 0..2, 0..2]).fill(250.0); // 4 mm², weight 2
        hu.slice_mut(s![0, 3..4, 2..4]).fill(450.0); // 2 mm², weight 4, apart
        let mut out = Array4::<f32>::zeros((1, 1, 2, 2));
        out[[0, 0, 0, 0]] = 0.9;
        out[[0, 0, 1, 1]] = 0.2;
        let geom = PixelGeometry {
            pixel_spacing: [1.0, 1.0],
            slice_thickness_mm: 3.0,
        };
        let cand = CandidateSpec {
            hu_min: 130.0,
            hu_max: None,
            min_area_mm2: 1.0,
        };
        let a = aggregate(hu.view(), out.view(), geom, &cand, &spec("agatston"));
        assert_eq!(a.lesions.len(), 2);
        assert!(a.lesions[0].counted && !a.lesions[1].counted);
        assert!((a.value - 8.0).abs() < 1e-12);
        assert_eq!(a.risk_category, Some(RiskCategory::Minimal));
    }
}
