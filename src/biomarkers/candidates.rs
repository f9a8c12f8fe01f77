//! Candidate regions and Agatston lesions.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use serde::Serialize;

/// Label 8-connected components of `mask` in raster order of their first
/// pixel (the same numbering as `scipy.ndimage.label`). Returns the label
/// image (0 = background) and the number of components.
pub fn label8(mask: ArrayView2<bool>) -> (Array2<u32>, usize) {
    let (rows, cols) = mask.dim();
    let mut labels = Array2::<u32>::zeros((rows, cols));
    let mut next = 0u32;
    let mut stack = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            if !mask[[r, c]] || labels[[r, c]] != 0 {
                continue;
            }
            next += 1;
            labels[[r, c]] = next;
            stack.push((r, c));
            while let Some((y, x)) = stack.pop() {
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                        if ny < 0 || nx < 0 || ny >= rows as i64 || nx >= cols as i64 {
                            continue;
                        }
                        let (ny, nx) = (ny as usize, nx as usize);
                        if mask[[ny, nx]] && labels[[ny, nx]] == 0 {
                            labels[[ny, nx]] = next;
                            stack.push((ny, nx));
                        }
                    }
                }
            }
        }
    }
    (labels, next as usize)
}

/// Candidate heuristic parameters from a model card.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
pub struct CandidateSpec {
    pub hu_min: f64,
    pub hu_max: Option<f64>,
    #[serde(default)]
    pub min_area_mm2: f64,
}

/// Pixels in the HU range; with `min_area_mm2 > 0`, only those in 2D
/// 8-connected components at least that large.
pub fn candidate_mask(hu: ArrayView3<f32>, spec: &CandidateSpec, pixel_area_mm2: f64) -> Array3<bool> {
    let mut cand = hu.mapv(|v| {
        let v = v as f64;
        v >= spec.hu_min && spec.hu_max.is_none_or(|m| v <= m)
    });
    if spec.min_area_mm2 > 0.0 {
        for mut s in cand.axis_iter_mut(Axis(0)) {
            let (lab, n) = label8(s.view());
            let mut counts = vec![0usize; n + 1];
            lab.iter().for_each(|&l| counts[l as usize] += 1);
            let keep: Vec<bool> = counts
                .iter()
                .enumerate()
                .map(|(i, &c)| i > 0 && c as f64 * pixel_area_mm2 >= spec.min_area_mm2)
                .collect();
            s.zip_mut_with(&lab, |m, &l| *m = keep[l as usize]);
        }
    }
    cand
}

/// Agatston density weight from a lesion's peak HU.
pub fn agatston_weight(peak_hu: f64) -> u8 {
    match peak_hu {
        p if p < 130.0 => 0,
        p if p < 200.0 => 1,
        p if p < 300.0 => 2,
        p if p < 400.0 => 3,
        _ => 4,
    }
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

/// All candidate lesions and per-slice label images (labels renumbered over
/// kept components only, in raster order).
pub fn cac_lesions(
    hu: ArrayView3<f32>,
    spec: &CandidateSpec,
    pixel_area_mm2: f64,
    thickness_mm: f64,
) -> (Vec<Lesion>, Array3<u32>) {
    let mut labels = Array3::<u32>::zeros(hu.dim());
    let mut lesions = Vec::new();
    for (s, slice) in hu.axis_iter(Axis(0)).enumerate() {
        let mask = slice.mapv(|v| v as f64 >= spec.hu_min);
        let (lab, n) = label8(mask.view());
        if n == 0 {
            continue;
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
            if (counts[k] as f64) * pixel_area_mm2 < spec.min_area_mm2 {
                continue;
            }
            renumber[k] = next;
            let area = counts[k] as f64 * pixel_area_mm2;
            let w = agatston_weight(peaks[k]);
            lesions.push(Lesion {
                slice: s,
                label: next,
                n_pixels: counts[k],
                area_mm2: area,
                peak_hu: peaks[k],
                weight: w,
                score: area * w as f64 * thickness_mm / 3.0,
            });
            next += 1;
        }
        labels
            .index_axis_mut(Axis(0), s)
            .zip_mut_with(&lab, |o, &l| *o = renumber[l as usize]);
    }
    (lesions, labels)
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
        assert_eq!(agatston_weight(129.9), 0);
        assert_eq!(agatston_weight(130.0), 1);
        assert_eq!(agatston_weight(199.9), 1);
        assert_eq!(agatston_weight(200.0), 2);
        assert_eq!(agatston_weight(300.0), 3);
        assert_eq!(agatston_weight(399.0), 3);
        assert_eq!(agatston_weight(400.0), 4);
        assert_eq!(agatston_weight(1500.0), 4);
    }

    #[test]
    fn risk_category_boundaries() {
        assert_eq!(RiskCategory::from_score(0.0), RiskCategory::Zero);
        assert_eq!(RiskCategory::from_score(0.1), RiskCategory::Minimal);
        assert_eq!(RiskCategory::from_score(10.0), RiskCategory::Minimal);
        assert_eq!(RiskCategory::from_score(10.01), RiskCategory::Mild);
        assert_eq!(RiskCategory::from_score(100.0), RiskCategory::Mild);
        assert_eq!(RiskCategory::from_score(400.0), RiskCategory::Moderate);
        assert_eq!(RiskCategory::from_score(400.5), RiskCategory::Severe);
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
        let spec = CandidateSpec { hu_min: 130.0, hu_max: None, min_area_mm2: 1.0 };
        let (les, lab) = cac_lesions(hu.view(), &spec, 0.25, 1.5);
        assert_eq!(les.len(), 1);
        assert_eq!(les[0].weight, 4);
        assert!((les[0].area_mm2 - 1.0).abs() < 1e-12);
        assert!((les[0].score - 1.0 * 4.0 * 1.5 / 3.0).abs() < 1e-12);
        assert_eq!(lab[[0, 4, 4]], 0);
        let cand = candidate_mask(hu.view(), &spec, 0.25);
        assert_eq!(cand.iter().filter(|&&b| b).count(), 4);
    }

    #[test]
    fn hu_range_is_inclusive() {
        let hu = Array3::from_shape_vec((1, 1, 4), vec![-30.0f32, -29.0, 150.0, 150.5]).unwrap();
        let spec = CandidateSpec { hu_min: -29.0, hu_max: Some(150.0), min_area_mm2: 0.0 };
        let c = candidate_mask(hu.view(), &spec, 1.0);
        assert_eq!(c.iter().copied().collect::<Vec<_>>(), vec![false, true, true, false]);
    }
}
