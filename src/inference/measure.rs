//! From HU to a measurement with one model: normalise, infer, then the pure
//! aggregation in `biomarkers`.
//!
//! Input: a loaded [`Model`], HU `[S,R,C]` in patient order, the pixel
//! geometry. Output: a [`Measurement`] naming the model, its version and the
//! execution provider that ran. Failure modes: the model run's
//! [`InferenceError`] (session, output shape).

use ndarray::{s, Array3, Array4, ArrayView3, Axis};

use super::{InferenceError, Model, ModelCard};
use crate::biomarkers::burden::{slice_sums, volume_burden};
use crate::biomarkers::{aggregate, normalise_slice, Measurement, PixelGeometry};

/// The model input `[S,1,H,W]` for `hu` (`[S,R,C]`): each slice clipped,
/// area-resampled to the card's size and scaled.
pub fn model_input(card: &ModelCard, hu: ArrayView3<f32>) -> Array4<f32> {
    let [h, w] = card.input.size;
    let mut input = Array4::<f32>::zeros((hu.dim().0, 1, h, w));
    // Slices side by side: the 110 slabs of a 300-slice chest took 55 ms on
    // one core, all of it before the model runs.
    crate::par::map_slice_runs(input.index_axis_mut(Axis(1), 0), crate::par::threads(), |first, mut run| {
        for (j, mut out) in run.axis_iter_mut(Axis(0)).enumerate() {
            out.assign(&normalise_slice(
                hu.index_axis(Axis(0), first + j),
                (card.input.hu_clip[0], card.input.hu_clip[1]),
                (h, w),
                card.input.scale.subtract,
                card.input.scale.divide,
            ));
        }
    });
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
        volume: None,
    })
}

/// Slices per model run in [`measure_volume`]. The model input is small
/// (128² per slice), but a U-Net's activations are not: at 16 slices a run
/// stays in the tens of MB, where a 600-slice batch would need GBs. The
/// native-resolution map and candidates of one chunk are copied into the
/// volume's arrays and dropped.
pub const VOLUME_CHUNK_SLICES: usize = 16;

/// The unit of [`measure_volume`]'s value (the `analyze` line's `unit`).
/// UCUM is case-sensitive in principle but lists `l` and `L` both; the SR
/// codes it `ml` as DICOM's unit tables do.
pub const VOLUME_UNIT: &str = "mL";

/// A 2-D area card run on every slice of `hu` (`[S,R,C]`, S ≥ 2, patient
/// order), in chunks of [`VOLUME_CHUNK_SLICES`]: each slice's area is what
/// [`measure`] gives on that slice alone, and the value is the volume from
/// those areas at `positions_mm` (slab rule: `biomarkers::burden`), in mL.
/// The caller checks that the card measures an area in cm².
pub fn measure_volume(
    model: &Model,
    hu: ArrayView3<f32>,
    geom: PixelGeometry,
    positions_mm: &[f64],
) -> Result<Measurement, InferenceError> {
    let card = &model.card;
    let (n, rows, cols) = hu.dim();
    let mut map = Array3::<f32>::zeros((n, rows, cols));
    let mut candidates = Array3::<bool>::from_elem((n, rows, cols), false);
    let mut start = 0;
    while start < n {
        let end = (start + VOLUME_CHUNK_SLICES).min(n);
        let chunk = hu.slice(s![start..end, .., ..]);
        let out = model.run(model_input(card, chunk))?;
        let a = aggregate(chunk, out.view(), geom, &card.candidates, &card.aggregation);
        map.slice_mut(s![start..end, .., ..]).assign(&a.map);
        candidates.slice_mut(s![start..end, .., ..]).assign(&a.candidates);
        start = end;
    }
    let per_pixel = geom.pixel_area_mm2() * card.aggregation.unit_scale;
    let areas: Vec<f64> = slice_sums(map.view(), candidates.view()).into_iter().map(|x| x * per_pixel).collect();
    let burden = volume_burden(&areas, positions_mm).ok_or_else(|| InferenceError::Input {
        model: card.name.clone(),
        message: format!("a volume needs at least 2 slices and a position for each ({n} slices, {} positions)", positions_mm.len()),
    })?;
    Ok(Measurement {
        value: burden.volume_ml,
        unit: VOLUME_UNIT.into(),
        risk_category: None,
        lesions: vec![],
        map,
        candidates,
        model: card.name.clone(),
        model_version: card.version.clone(),
        execution_provider: model.provider.as_str(),
        volume: Some(burden),
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

    #[test]
    fn a_volume_is_the_per_slice_areas_over_their_slabs_across_chunks() {
        if !init_for_tests() {
            return;
        }
        let card = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inference/testdata/sigmoid_map.yaml");
        let model = Model::load(&card, &RuntimeOptions::default()).unwrap();
        // More slices than one chunk; each slice a different amount of fat.
        let n = VOLUME_CHUNK_SLICES + 5;
        let mut hu = Array3::<f32>::from_elem((n, 16, 16), 40.0);
        for k in 0..n {
            hu.slice_mut(s![k, 0..(k % 9), ..]).fill(-100.0);
        }
        let geom = PixelGeometry { pixel_spacing: [0.5, 2.0], slice_thickness_mm: 5.0 };
        // uneven, within tolerance: every third gap 2.2 mm instead of 2 mm
        let mut z = vec![0.0];
        for k in 1..n {
            z.push(z[k - 1] + if k % 3 == 0 { 2.2 } else { 2.0 });
        }
        let v = measure_volume(&model, hu.view(), geom, &z).unwrap();
        let b = v.volume.as_ref().unwrap();
        let single: Vec<f64> =
            (0..n).map(|k| measure(&model, hu.slice(s![k..k + 1, .., ..]), geom).unwrap().value).collect();
        for (a, want) in b.slice_areas_cm2.iter().zip(&single) {
            assert!((a - want).abs() < 1e-9, "{a} vs {want}");
        }
        let slabs = crate::biomarkers::burden::slab_widths_mm(&z);
        let want: f64 = single.iter().zip(&slabs).map(|(a, w)| a * w / 10.0).sum();
        assert!((v.value - want).abs() < 1e-9, "{} vs {want}", v.value);
        assert_eq!(v.unit, "mL");
        let max = single.iter().copied().fold(f64::MIN, f64::max);
        assert_eq!(b.largest_area_cm2, max);
        assert_eq!(single[b.largest_slice], max);
        assert_eq!(v.map.dim(), (n, 16, 16));
        assert!(measure_volume(&model, hu.slice(s![0..1, .., ..]), geom, &z[..1]).is_err());
    }
}
