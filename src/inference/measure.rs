//! From HU to a measurement with one model: normalise, infer, then the pure
//! aggregation in `biomarkers`.
//!
//! Input: a loaded [`Model`], HU `[S,R,C]` in patient order, the pixel
//! geometry. Output: a [`Measurement`] naming the model, its version and the
//! execution provider that ran. Failure modes: the model run's
//! [`InferenceError`] (session, output shape).

use ndarray::{s, Array4, ArrayView3, Axis};

use super::{InferenceError, Model, ModelCard};
use crate::biomarkers::{aggregate, normalise_slice, Measurement, PixelGeometry};

/// The model input `[S,1,H,W]` for `hu` (`[S,R,C]`): each slice clipped,
/// area-resampled to the card's size and scaled.
pub fn model_input(card: &ModelCard, hu: ArrayView3<f32>) -> Array4<f32> {
    let [h, w] = card.input.size;
    let mut input = Array4::<f32>::zeros((hu.dim().0, 1, h, w));
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
    input
}

/// Measure on `hu` (`[S,R,C]`, patient order). Blocking: call from a
/// blocking context.
pub fn measure(model: &Model, hu: ArrayView3<f32>, geom: PixelGeometry) -> Result<Measurement, InferenceError> {
    let card = &model.card;
    let input = model_input(card, hu);
    let out = model.run(input)?;
    let a = aggregate(hu, out.view(), geom, &card.candidates, &card.aggregation);
    Ok(Measurement {
        value: a.value,
        unit: card.biomarker.unit.ucum.clone(),
        risk_category: a.risk_category,
        lesions: a.lesions,
        map: a.map,
        candidates: a.candidates,
        model: card.name.clone(),
        model_version: card.version.clone(),
        execution_provider: model.provider.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::{init_for_tests, RuntimeOptions};
    use ndarray::Array3;

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
