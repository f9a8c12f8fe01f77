//! Tumour burden over a volume: per-slice cross-sectional areas (the 2-D
//! area aggregation run on every slice) → a volume and the largest
//! cross-section. Pure arithmetic; no ONNX, no DICOM.
//!
//! Input: the area of each slice (cm², the card's area unit) and the
//! position of each slice along the plane normal (mm, ascending, as
//! `Volume::slice_positions`). Output: a [`VolumeBurden`].
//!
//! **The slab rule.** Each slice stands for the slab of tissue nearer to it
//! than to any other slice: from half-way to its lower neighbour to half-way
//! to its upper neighbour; the first and last slices reach as far outward as
//! their one inner half-gap (so an evenly spaced stack of `n` slices at
//! spacing `d` covers `n × d`). Volume = Σ areaᵢ × slabᵢ.
//!
//! Why the spacing between slice positions and not SliceThickness:
//! - with gaps (5 mm slices every 7 mm) the tumour does not stop between
//!   slices; the nearest slice is the best estimate of the tissue in the gap,
//!   and thickness would leave the gaps out (undercount by 2/7);
//! - with overlaps (5 mm slices every 2.5 mm, common in reconstructions) each
//!   millimetre is imaged twice; thickness would count it twice;
//! - with slightly uneven spacing (within `series.spacing_tolerance`; the
//!   volume stage refuses worse) each slice gets its own slab.
//!
//! Where thickness and spacing agree, the two rules agree. A single slice
//! has no spacing and so no volume; callers keep its area.
//!
//! Invariants: areas and positions have the same length, at least 2;
//! positions strictly ascending (the volume stage refuses duplicates).
//! The largest cross-section is the first slice (lowest along the normal)
//! with the greatest area.

use ndarray::{ArrayView3, Axis};
use serde::Serialize;

/// The burden of one volume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeBurden {
    /// Σ areaᵢ × slabᵢ, in mL (cm² × mm / 10).
    pub volume_ml: f64,
    /// Area of every slice (cm²), in slice order.
    pub slice_areas_cm2: Vec<f64>,
    /// The slab each slice stands for (mm); see the module doc.
    pub slab_mm: Vec<f64>,
    /// Index of the slice with the largest area.
    pub largest_slice: usize,
    /// Its area (cm²).
    pub largest_area_cm2: f64,
}

/// The slab thickness (mm) each slice stands for: half the gap to each
/// neighbour; an end slice counts its one inner half-gap twice.
/// Empty for fewer than 2 positions (no spacing, no slabs).
pub fn slab_widths_mm(positions_mm: &[f64]) -> Vec<f64> {
    let n = positions_mm.len();
    if n < 2 {
        return vec![];
    }
    (0..n)
        .map(|i| {
            let below = if i > 0 { positions_mm[i] - positions_mm[i - 1] } else { positions_mm[1] - positions_mm[0] };
            let above = if i + 1 < n {
                positions_mm[i + 1] - positions_mm[i]
            } else {
                positions_mm[n - 1] - positions_mm[n - 2]
            };
            (below.abs() + above.abs()) / 2.0
        })
        .collect()
}

/// The burden from per-slice areas (cm²) at `positions_mm`. `None` when
/// there are fewer than 2 slices or the lengths differ.
pub fn volume_burden(slice_areas_cm2: &[f64], positions_mm: &[f64]) -> Option<VolumeBurden> {
    if slice_areas_cm2.len() != positions_mm.len() || slice_areas_cm2.len() < 2 {
        return None;
    }
    let slab_mm = slab_widths_mm(positions_mm);
    // cm² × mm = 0.1 cm³ = 0.1 mL
    let volume_ml = slice_areas_cm2.iter().zip(&slab_mm).map(|(a, w)| a * w).sum::<f64>() / 10.0;
    let (largest_slice, largest_area_cm2) = slice_areas_cm2
        .iter()
        .copied()
        .enumerate()
        .fold((0, slice_areas_cm2[0]), |best, (i, a)| if a > best.1 { (i, a) } else { best });
    Some(VolumeBurden {
        volume_ml,
        slice_areas_cm2: slice_areas_cm2.to_vec(),
        slab_mm,
        largest_slice,
        largest_area_cm2,
    })
}

/// Per-slice sums of `map` inside `candidates` (both `[S,R,C]`), the
/// numerator of the area aggregation: slice area = sum × pixel area × unit
/// scale, and the slices' areas add up to the area aggregation of the stack.
pub fn slice_sums(map: ArrayView3<f32>, candidates: ArrayView3<bool>) -> Vec<f64> {
    map.axis_iter(Axis(0))
        .zip(candidates.axis_iter(Axis(0)))
        .map(|(m, c)| m.iter().zip(c.iter()).filter(|(_, &c)| c).map(|(&v, _)| v as f64).sum())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn even_spacing_covers_n_times_spacing() {
        assert_eq!(slab_widths_mm(&[0.0, 5.0, 10.0, 15.0]), vec![5.0; 4]);
        // 2 cm² on each of 4 slices 5 mm apart: 2 × 20 mm / 10 = 4 mL
        let b = volume_burden(&[2.0; 4], &[0.0, 5.0, 10.0, 15.0]).unwrap();
        assert!((b.volume_ml - 4.0).abs() < 1e-12);
    }

    #[test]
    fn uneven_spacing_gives_each_slice_its_own_slab() {
        // gaps 5, 5.4, 4.6: slabs 5, 5.2, 5.0, 4.6
        let z = [-10.0, -5.0, 0.4, 5.0];
        let w = slab_widths_mm(&z);
        for (got, want) in w.iter().zip([5.0, 5.2, 5.0, 4.6]) {
            assert!((got - want).abs() < 1e-12, "{w:?}");
        }
        let areas = [1.0, 3.0, 10.0, 2.0];
        let b = volume_burden(&areas, &z).unwrap();
        let want = (1.0 * 5.0 + 3.0 * 5.2 + 10.0 * 5.0 + 2.0 * 4.6) / 10.0;
        assert!((b.volume_ml - want).abs() < 1e-12, "{} vs {want}", b.volume_ml);
        assert_eq!((b.largest_slice, b.largest_area_cm2), (2, 10.0));
        assert_eq!(b.slice_areas_cm2, areas);
    }

    #[test]
    fn descending_positions_use_the_gap_length() {
        let w = slab_widths_mm(&[10.0, 7.0, 4.0]);
        assert_eq!(w, vec![3.0; 3]);
    }

    #[test]
    fn the_first_of_equal_largest_areas_wins_and_zero_burden_is_zero() {
        let b = volume_burden(&[0.0, 4.0, 4.0, 1.0], &[0.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(b.largest_slice, 1);
        let z = volume_burden(&[0.0; 3], &[0.0, 2.5, 5.0]).unwrap();
        assert_eq!((z.volume_ml, z.largest_slice, z.largest_area_cm2), (0.0, 0, 0.0));
    }

    #[test]
    fn one_slice_or_mismatched_lengths_have_no_volume() {
        assert!(volume_burden(&[3.0], &[0.0]).is_none());
        assert!(volume_burden(&[3.0, 1.0], &[0.0]).is_none());
        assert!(slab_widths_mm(&[1.0]).is_empty());
    }

    #[test]
    fn slice_sums_count_the_map_inside_candidates_per_slice() {
        let mut map = Array3::<f32>::from_elem((2, 2, 2), 0.5);
        map[[1, 0, 0]] = 1.0;
        let mut cand = Array3::from_elem((2, 2, 2), true);
        cand[[0, 1, 1]] = false;
        assert_eq!(slice_sums(map.view(), cand.view()), vec![1.5, 2.5]);
    }
}
