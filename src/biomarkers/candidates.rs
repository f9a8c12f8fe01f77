//! Candidate regions: the HU heuristic the map picks among (CAC lesions are
//! in `agatston`).

use ndarray::{Array3, ArrayView3, Axis};
use serde::Serialize;

use super::agatston::LesionRule;
use crate::volume::label::label8;

/// Candidate heuristic parameters from a model card.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
pub struct CandidateSpec {
    pub hu_min: f64,
    pub hu_max: Option<f64>,
    #[serde(default)]
    pub min_area_mm2: f64,
}

impl CandidateSpec {
    /// The CAC card's candidates are Agatston's lesion rule.
    pub fn lesion_rule(&self) -> LesionRule {
        LesionRule { hu_min: self.hu_min, min_area_mm2: self.min_area_mm2 }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_rule_drops_small_components() {
        // 0.5 mm pixels: 0.25 mm² each; a 4-pixel component is exactly 1 mm².
        let mut hu = Array3::<f32>::from_elem((1, 6, 6), 0.0);
        for (r, c) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            hu[[0, r, c]] = 250.0;
        }
        hu[[0, 4, 4]] = 900.0; // single pixel: 0.25 mm² < 1 mm², dropped
        let spec = CandidateSpec { hu_min: 130.0, hu_max: None, min_area_mm2: 1.0 };
        let cand = candidate_mask(hu.view(), &spec, 0.25);
        assert_eq!(cand.iter().filter(|&&b| b).count(), 4);
        assert!(!cand[[0, 4, 4]]);
    }

    #[test]
    fn hu_range_is_inclusive() {
        let hu = Array3::from_shape_vec((1, 1, 4), vec![-30.0f32, -29.0, 150.0, 150.5]).unwrap();
        let spec = CandidateSpec { hu_min: -29.0, hu_max: Some(150.0), min_area_mm2: 0.0 };
        let c = candidate_mask(hu.view(), &spec, 1.0);
        assert_eq!(c.iter().copied().collect::<Vec<_>>(), vec![false, true, true, false]);
    }
}
