//! From HU to a measurement with one model: normalise, infer, aggregate.

use ndarray::{s, Array3, Array4, ArrayView3, Axis};
use serde::Serialize;

use super::aggregate::{normalise_slice, upsample_nearest};
use super::candidates::{cac_lesions, candidate_mask, Lesion, RiskCategory};
use crate::inference::{InferenceError, Model};

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
}

/// Measure on `hu` (`[S,R,C]`, patient order). Blocking: call from a
/// blocking context.
pub fn measure(model: &Model, hu: ArrayView3<f32>, geom: PixelGeometry) -> Result<Measurement, InferenceError> {
    let card = &model.card;
    let (n, rows, cols) = hu.dim();
    let [h, w] = card.input.size;
    let mut input = Array4::<f32>::zeros((n, 1, h, w));
    for (i, slice) in hu.axis_iter(Axis(0)).enumerate() {
        let x = normalise_slice(
            slice,
            (card.input.hu_clip[0], card.input.hu_clip[1]),
            (h, w),
            card.input.scale.subtract,
            card.input.scale.divide,
        );
        input.slice_mut(s![i, 0, .., ..]).assign(&x);
    }
    let out = model.run(input)?;

    let unit = card.biomarker.unit.ucum.clone();
    let base = |value, risk, lesions, map, candidates| Measurement {
        value,
        unit: unit.clone(),
        risk_category: risk,
        lesions,
        map,
        candidates,
        model: card.name.clone(),
        model_version: card.version.clone(),
        execution_provider: model.provider.as_str(),
    };
    if card.aggregation.kind == "direct" {
        let v: f64 = out.iter().map(|&x| x as f64).sum();
        let risk = card.is_agatston().then(|| RiskCategory::from_score(v));
        return Ok(base(v, risk, vec![], Array3::zeros((0, 0, 0)), Array3::from_elem((0, 0, 0), false)));
    }

    let mut map = Array3::<f32>::zeros((n, rows, cols));
    for i in 0..n {
        let up = upsample_nearest(out.slice(s![i, 0, .., ..]), (rows, cols));
        map.index_axis_mut(Axis(0), i).assign(&up);
    }
    let area = geom.pixel_area_mm2();
    if card.is_agatston() {
        let (lesions, labels) = cac_lesions(hu, &card.candidates, area, geom.slice_thickness_mm);
        let mut sums = vec![0f64; lesions.len()];
        // lesion index by (slice, label)
        let mut first_of_slice = vec![usize::MAX; n];
        for (k, l) in lesions.iter().enumerate().rev() {
            first_of_slice[l.slice] = k;
        }
        for ((s, r, c), &lab) in labels.indexed_iter() {
            if lab > 0 {
                sums[first_of_slice[s] + lab as usize - 1] += map[[s, r, c]] as f64;
            }
        }
        let threshold = card.aggregation.lesion_threshold.unwrap_or(0.5);
        let soft = card.aggregation.lesion_aggregation.as_deref() == Some("soft");
        let mut value = 0.0;
        let results: Vec<LesionResult> = lesions
            .into_iter()
            .zip(sums)
            .map(|(l, sum)| {
                let mean_map = sum / l.n_pixels as f64;
                let counted = mean_map >= threshold;
                value += if soft { mean_map * l.score } else if counted { l.score } else { 0.0 };
                LesionResult { lesion: l, mean_map, counted }
            })
            .collect();
        let candidates = labels.mapv(|l| l > 0);
        return Ok(base(value, Some(RiskCategory::from_score(value)), results, map, candidates));
    }
    let candidates = candidate_mask(hu, &card.candidates, area);
    let sum: f64 = map
        .iter()
        .zip(candidates.iter())
        .filter(|(_, &c)| c)
        .map(|(&m, _)| m as f64)
        .sum();
    Ok(base(sum * area * card.aggregation.unit_scale, None, vec![], map, candidates))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::{init_for_tests, RuntimeOptions};

    #[test]
    fn area_is_map_inside_candidates_times_pixel_area() {
        if !init_for_tests() {
            return;
        }
        let card = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inference/testdata/sigmoid_map.yaml");
        let model = Model::load(&card, &RuntimeOptions::default()).unwrap();
        // 16×16 at 40 HU (a candidate), with a 4×4 block of fat (-100 HU, not a candidate)
        let mut hu = Array3::<f32>::from_elem((1, 16, 16), 40.0);
        hu.slice_mut(s![0, 0..4, 0..4]).fill(-100.0);
        let geom = PixelGeometry { pixel_spacing: [0.5, 2.0], slice_thickness_mm: 5.0 };
        let m = measure(&model, hu.view(), geom).unwrap();
        // The 4×4 fat block is exactly model cells [0..2, 0..2]: their input is
        // -100/250, elsewhere 40/250; only candidate pixels count.
        let expected = 240.0 * (1.0 / (1.0 + (-0.16f64).exp())) * 1.0 * 0.01;
        assert!((m.value - expected).abs() < 1e-6, "{} vs {expected}", m.value);
        assert_eq!(m.unit, "cm2");
        assert_eq!(m.candidates.iter().filter(|&&c| c).count(), 240);
        assert_eq!(m.execution_provider, "cpu");
    }
}
