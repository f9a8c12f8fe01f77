//! Agatston scoring (Agatston et al., JACC 1990): the one copy, used by the
//! CAC measurement (`measure`) and by the phantom generator's ground truth.
//!
//! Input: HU `[slices, rows, cols]`, optionally a region of the same shape
//! (the phantom scores inside its plaques), the lesion rule (HU floor and
//! minimum area), pixel area and slice thickness. Output: the lesions with
//! their weight and score, and per-slice label images of the kept lesions.
//!
//! Rules (shared with `models/training/biomarker_training/candidates.py`):
//! - a lesion is a 2D 8-connected component on one slice of pixels with
//!   HU ≥ [`THRESHOLD_HU`] whose area (pixels × pixel area) is ≥
//!   [`MIN_AREA_MM2`], compared without tolerance, as the Python twin does;
//! - its weight comes from its peak HU: [130,200) → 1, [200,300) → 2,
//!   [300,400) → 3, ≥ 400 → 4;
//! - its score is area × weight × thickness / 3 (the protocol's 3 mm slices);
//! - risk categories of a total: 0, 1-10, 11-100, 101-400, > 400.
//!
//! Components are numbered in raster order of their first pixel (as
//! `scipy.ndimage.label` numbers them). No failure modes: pure functions.

use ndarray::{Array3, ArrayView2, ArrayView3, ArrayViewMut2, Axis};
use serde::Serialize;

use crate::volume::label::label8;

/// The HU floor of calcium.
pub const THRESHOLD_HU: f64 = 130.0;
/// The smallest lesion counted.
pub const MIN_AREA_MM2: f64 = 1.0;
/// The slice thickness the score is defined on (mm). Thinner series are
/// averaged into slabs of this width before scoring
/// (`crate::volume::resample`, which says why and how).
pub const PROTOCOL_SLICE_MM: f64 = 3.0;
/// A series whose slice thickness or spacing is below this (mm) is thin:
/// scored on [`PROTOCOL_SLICE_MM`] slabs. 2.0–3.5 mm series are scored as
/// they are, their thickness scaling the score (area × weight × thickness / 3).
pub const THIN_SLICE_BELOW_MM: f64 = 2.0;

/// Agatston density weight from a lesion's peak HU; 0 below the threshold.
pub fn weight(peak_hu: f64) -> u8 {
    match peak_hu {
        p if p < 130.0 => 0,
        p if p < 200.0 => 1,
        p if p < 300.0 => 2,
        p if p < 400.0 => 3,
        _ => 4,
    }
}

/// A lesion's Agatston score: area × weight × thickness / 3.
pub fn slice_score(area_mm2: f64, weight: u8, thickness_mm: f64) -> f64 {
    area_mm2 * weight as f64 * thickness_mm / 3.0
}

/// The lesion rule on HU floor and minimum area.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LesionRule {
    pub hu_min: f64,
    pub min_area_mm2: f64,
}

impl LesionRule {
    /// Agatston's own: HU ≥ 130, area ≥ 1 mm².
    pub const AGATSTON: LesionRule = LesionRule {
        hu_min: THRESHOLD_HU,
        min_area_mm2: MIN_AREA_MM2,
    };
}

/// A calcified lesion: one kept component on one slice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lesion {
    pub slice: usize,
    /// 1-based label within its slice's label image.
    pub label: u32,
    pub n_pixels: usize,
    pub area_mm2: f64,
    pub peak_hu: f64,
    pub weight: u8,
    /// area × weight × thickness / 3: its Agatston contribution if counted.
    pub score: f64,
}

/// All lesions of `hu` (inside `region` when given) and per-slice label
/// images (labels renumbered over kept lesions only, in raster order).
/// Slices are independent: runs of them are labelled side by side
/// (`crate::par`), the lesions listed in slice order as one thread would.
pub fn lesions(
    hu: ArrayView3<f32>,
    region: Option<ArrayView3<bool>>,
    rule: LesionRule,
    pixel_area_mm2: f64,
    thickness_mm: f64,
) -> (Vec<Lesion>, Array3<u32>) {
    let mut labels = Array3::<u32>::zeros(hu.dim());
    let found = crate::par::map_slice_runs(labels.view_mut(), crate::par::threads(), |first, mut run| {
        let mut found = Vec::new();
        for (j, out) in run.axis_iter_mut(Axis(0)).enumerate() {
            let s = first + j;
            let region = region.as_ref().map(|r| r.index_axis(Axis(0), s));
            slice_lesions(hu.index_axis(Axis(0), s), region, s, rule, pixel_area_mm2, thickness_mm, out, &mut found);
        }
        found
    });
    (found.into_iter().flatten().collect(), labels)
}

/// [`lesions`] of slice `s`: appends its lesions to `found` and writes its
/// renumbered labels to `out` (zeros on entry).
#[allow(clippy::too_many_arguments)]
fn slice_lesions(
    slice: ArrayView2<f32>,
    region: Option<ArrayView2<bool>>,
    s: usize,
    rule: LesionRule,
    pixel_area_mm2: f64,
    thickness_mm: f64,
    mut out: ArrayViewMut2<u32>,
    found: &mut Vec<Lesion>,
) {
    let mut mask = slice.mapv(|v| v as f64 >= rule.hu_min);
    if let Some(region) = &region {
        mask.zip_mut_with(region, |m, &r| *m &= r);
    }
    let (lab, n) = label8(mask.view());
    if n == 0 {
        return;
    }
    let mut counts = vec![0usize; n + 1];
    let mut peaks = vec![f64::NEG_INFINITY; n + 1];
    for (l, v) in lab.iter().zip(slice.iter()) {
        let l = *l as usize;
        if l > 0 {
            counts[l] += 1;
            peaks[l] = peaks[l].max(*v as f64);
        }
    }
    let mut renumber = vec![0u32; n + 1];
    let mut next = 1u32;
    for k in 1..=n {
        let area = counts[k] as f64 * pixel_area_mm2;
        if area < rule.min_area_mm2 {
            continue;
        }
        renumber[k] = next;
        let w = weight(peaks[k]);
        found.push(Lesion {
            slice: s,
            label: next,
            n_pixels: counts[k],
            area_mm2: area,
            peak_hu: peaks[k],
            weight: w,
            score: slice_score(area, w, thickness_mm),
        });
        next += 1;
    }
    out.zip_mut_with(&lab, |o, &l| *o = renumber[l as usize]);
}

/// Index into `lesions` of the lesion each label of `labels` names, by
/// (slice, label): `first_of_slice[s] + label - 1`.
pub fn first_of_slice(lesions: &[Lesion], slices: usize) -> Vec<usize> {
    let mut first = vec![usize::MAX; slices];
    for (k, l) in lesions.iter().enumerate().rev() {
        first[l.slice] = k;
    }
    first
}

/// The total score: the sum over lesions, in order.
pub fn total(lesions: &[Lesion]) -> f64 {
    lesions.iter().fold(0.0, |acc, l| acc + l.score)
}

/// Coronary calcium risk categories by Agatston score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RiskCategory {
    #[serde(rename = "0")]
    Zero,
    #[serde(rename = "1-10")]
    Minimal,
    #[serde(rename = "11-100")]
    Mild,
    #[serde(rename = "101-400")]
    Moderate,
    #[serde(rename = ">400")]
    Severe,
}

impl RiskCategory {
    /// 0 → "0", (0,10] → "1-10", (10,100] → "11-100", (100,400] → "101-400", >400.
    pub fn from_score(score: f64) -> RiskCategory {
        match score {
            s if s <= 0.0 => RiskCategory::Zero,
            s if s <= 10.0 => RiskCategory::Minimal,
            s if s <= 100.0 => RiskCategory::Mild,
            s if s <= 400.0 => RiskCategory::Moderate,
            _ => RiskCategory::Severe,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RiskCategory::Zero => "0",
            RiskCategory::Minimal => "1-10",
            RiskCategory::Mild => "11-100",
            RiskCategory::Moderate => "101-400",
            RiskCategory::Severe => ">400",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn weights_follow_peak_hu_edges() {
        assert_eq!(weight(129.0), 0);
        assert_eq!(weight(129.9), 0);
        assert_eq!(weight(130.0), 1);
        assert_eq!(weight(199.9), 1);
        assert_eq!(weight(200.0), 2);
        assert_eq!(weight(299.0), 2);
        assert_eq!(weight(300.0), 3);
        assert_eq!(weight(399.0), 3);
        assert_eq!(weight(400.0), 4);
        assert_eq!(weight(1500.0), 4);
    }

    #[test]
    fn risk_category_boundaries() {
        assert_eq!(RiskCategory::from_score(0.0), RiskCategory::Zero);
        assert_eq!(RiskCategory::from_score(0.1), RiskCategory::Minimal);
        assert_eq!(RiskCategory::from_score(10.0), RiskCategory::Minimal);
        assert_eq!(RiskCategory::from_score(10.01), RiskCategory::Mild);
        assert_eq!(RiskCategory::from_score(100.0), RiskCategory::Mild);
        assert_eq!(RiskCategory::from_score(100.5), RiskCategory::Moderate);
        assert_eq!(RiskCategory::from_score(400.0), RiskCategory::Moderate);
        assert_eq!(RiskCategory::from_score(400.01), RiskCategory::Severe);
        assert_eq!(RiskCategory::from_score(400.01).as_str(), ">400");
    }

    #[test]
    fn eight_connectivity_joins_diagonals_and_numbers_in_raster_order() {
        let m = array![[false, false, true], [true, false, false], [false, true, false]];
        let (lab, n) = label8(m.view());
        assert_eq!(n, 2);
        assert_eq!(lab[[0, 2]], 1);
        assert_eq!(lab[[1, 0]], 2);
        assert_eq!(lab[[2, 1]], 2);
    }

    #[test]
    fn lesions_apply_area_rule_weight_and_thickness() {
        // 0.5 mm pixels: 0.25 mm² each; a 4-pixel lesion is exactly 1 mm².
        let mut hu = Array3::<f32>::from_elem((1, 6, 6), 0.0);
        for (r, c) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            hu[[0, r, c]] = 250.0; // weight 2
        }
        hu[[0, 1, 1]] = 420.0; // peak → weight 4
        hu[[0, 4, 4]] = 900.0; // single pixel: 0.25 mm² < 1 mm², dropped
        let (les, lab) = lesions(hu.view(), None, LesionRule::AGATSTON, 0.25, 1.5);
        assert_eq!(les.len(), 1);
        assert_eq!(les[0].weight, 4);
        assert!((les[0].area_mm2 - 1.0).abs() < 1e-12);
        assert!((les[0].score - 1.0 * 4.0 * 1.5 / 3.0).abs() < 1e-12);
        assert_eq!(lab[[0, 4, 4]], 0);
    }

    fn img(px: &[(usize, f32)]) -> Array3<f32> {
        let mut v = Array3::<f32>::zeros((1, 10, 10));
        for &(i, h) in px {
            v[[0, i / 10, i % 10]] = h;
        }
        v
    }

    #[test]
    fn area_threshold_and_connectivity() {
        let rule = LesionRule::AGATSTON;
        // pixel 0.5 mm × 0.5 mm = 0.25 mm²: 3 pixels is below 1 mm², 4 is not.
        let three = img(&[(0, 500.0), (1, 500.0), (10, 500.0)]);
        assert!(lesions(three.view(), None, rule, 0.25, 3.0).0.is_empty());
        // diagonal neighbours join (8-connectivity)
        let four = img(&[(0, 500.0), (11, 500.0), (22, 500.0), (33, 135.0)]);
        let (c, _) = lesions(four.view(), None, rule, 0.25, 3.0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].weight, 4);
        assert!((c[0].score - 4.0).abs() < 1e-12);
        // 129 HU is not calcium and breaks the component
        let split = img(&[(0, 500.0), (11, 129.0), (22, 500.0)]);
        assert_eq!(lesions(split.view(), None, rule, 1.0, 3.0).0.len(), 2);
    }

    #[test]
    fn thickness_scaling_region_and_lookup() {
        let rule = LesionRule::AGATSTON;
        let v = img(&[(0, 250.0), (1, 250.0), (50, 300.0)]);
        let (c, lab) = lesions(v.view(), None, rule, 1.0, 2.5);
        assert_eq!(c.len(), 2);
        assert!((c[0].score - 2.0 * 2.0 * 2.5 / 3.0).abs() < 1e-12);
        assert!((total(&c) - (c[0].score + c[1].score)).abs() < 1e-12);
        let first = first_of_slice(&c, 1);
        assert_eq!(c[first[0] + lab[[0, 5, 0]] as usize - 1].weight, 3);
        let mut region = Array3::from_elem((1, 10, 10), false);
        region[[0, 0, 0]] = true;
        let (c, lab) = lesions(v.view(), Some(region.view()), rule, 1.0, 3.0);
        assert_eq!(c.len(), 1);
        assert!((c[0].area_mm2 - 1.0).abs() < 1e-12);
        assert_eq!(lab[[0, 0, 1]], 0);
    }
}
