//! Thin slices to thick slabs: consecutive slices averaged into
//! non-overlapping slabs of a fixed width along the plane normal.
//!
//! **Why.** The Agatston score is defined on 3 mm contiguous slices
//! (Agatston et al., JACC 1990, electron-beam CT), and the SCCT/STR guideline
//! for calcium scoring on non-cardiac chest CT (Hecht et al., J Cardiovasc
//! Comput Tomogr 2017) keeps scoring on ~3 mm (2.5–3 mm) reconstructions. A
//! lung-screening series is 0.5–2 mm: scored as it is, its noise puts more
//! pixels above 130 HU and small plaques are less diluted by partial volume,
//! so the number is not the Agatston score its risk categories were made
//! for. Scanners and workstations make the 3 mm series from thin data by
//! averaging contiguous thin images into 3 mm slabs ("average" thick MPR);
//! this module does the same in the image domain.
//!
//! **Rule.** Each input slice stands for the interval between the midpoints
//! to its neighbours along the normal (the first and last extend by half
//! their one neighbouring step). The stack's extent is cut into
//! `floor(extent / width)` slabs of exactly `width` mm, centred on the
//! stack (the remainder, less than one slab, is split between both ends). A
//! slab's HU is the mean of the slices it overlaps, each weighted by the
//! length of its interval inside the slab (a box filter: with a spacing that
//! divides the width, e.g. 1 mm → 3 mm, it is the plain mean of 3 slices;
//! with 1.25 mm, two whole slices and 0.5 mm of a third). Overlapping
//! reconstructions (thickness > spacing) are averaged by position the same
//! way; their wider slice profile makes the slab a little smoother.
//!
//! **Output.** A new [`Volume`] whose slice thickness and spacing are the
//! slab width and whose positions are the slab centres. The SOP Instance
//! UID, frame number and file behind each slab are those of the input slice
//! nearest the slab centre: the image a report references for that slab.
//!
//! **Failure modes.** None: pure arithmetic. [`slabs`] returns `None` when
//! the volume cannot be cut (one slice, or an extent under one slab), and
//! the caller keeps the volume it had.

use ndarray::{Array3, Axis};

use super::Volume;

/// The volume averaged into slabs of `width_mm` (see the module doc), or
/// `None` when it has fewer than two slices or spans less than one slab.
pub fn slabs(vol: &Volume, width_mm: f64) -> Option<Volume> {
    let n = vol.slices();
    let p = &vol.slice_positions;
    if n < 2 || p.len() != n || width_mm.is_nan() || width_mm <= 0.0 {
        return None;
    }
    // Interval [lo_i, hi_i] each input slice stands for.
    let mut bounds = Vec::with_capacity(n + 1);
    bounds.push(p[0] - (p[1] - p[0]) / 2.0);
    for i in 0..n - 1 {
        bounds.push((p[i] + p[i + 1]) / 2.0);
    }
    bounds.push(p[n - 1] + (p[n - 1] - p[n - 2]) / 2.0);
    let extent = bounds[n] - bounds[0];
    // 1e-6: 40 slices of 3 mm are 120 mm, not 119.99999.
    let count = (extent / width_mm + 1e-6).floor() as usize;
    if count == 0 {
        return None;
    }
    let start = bounds[0] + (extent - count as f64 * width_mm) / 2.0;
    let (_, rows, cols) = vol.hu.dim();
    let mut hu = Array3::<f32>::zeros((count, rows, cols));
    let mut centres = Vec::with_capacity(count);
    let mut nearest = Vec::with_capacity(count);
    for j in 0..count {
        let (a, b) = (start + j as f64 * width_mm, start + (j + 1) as f64 * width_mm);
        let mut out = hu.index_axis_mut(Axis(0), j);
        let mut total = 0.0;
        for i in 0..n {
            let overlap = bounds[i + 1].min(b) - bounds[i].max(a);
            if overlap > 1e-9 {
                out.scaled_add(overlap as f32, &vol.hu.index_axis(Axis(0), i));
                total += overlap;
            }
        }
        // total is the slab width (the slabs lie inside the extent).
        out.mapv_inplace(|v| (v as f64 / total) as f32);
        let centre = (a + b) / 2.0;
        centres.push(centre);
        let near = (0..n)
            .min_by(|&x, &y| (p[x] - centre).abs().total_cmp(&(p[y] - centre).abs()))
            .unwrap_or(0);
        nearest.push(near);
    }
    // Slab centres in patient coordinates: slice 0's position moved along
    // the normal (slice_positions are dot(position, normal)).
    let position = |c: f64| {
        let d = c - p[0];
        [
            vol.positions[0][0] + d * vol.normal[0],
            vol.positions[0][1] + d * vol.normal[1],
            vol.positions[0][2] + d * vol.normal[2],
        ]
    };
    let positions: Vec<[f64; 3]> = centres.iter().map(|&c| position(c)).collect();
    Some(Volume {
        hu,
        pixel_spacing: vol.pixel_spacing,
        origin: positions[0],
        positions,
        slice_positions: centres,
        slice_thickness: Some(width_mm),
        spacing_mm: (count > 1).then_some(width_mm),
        orientation: vol.orientation,
        normal: vol.normal,
        sop_instance_uids: nearest.iter().map(|&i| vol.sop_instance_uids[i].clone()).collect(),
        frame_numbers: nearest.iter().map(|&i| vol.frame_numbers[i]).collect(),
        source_paths: nearest.iter().map(|&i| vol.source_paths[i].clone()).collect(),
        padding_voxels: vol.padding_voxels,
        hu_step: vol.hu_step,
        arch: Default::default(),
    })
}

/// Gives `slabs` (made from `source` by [`slabs`]) the aortic arch level
/// found on `source`, when `source` has one: the carina is found on the thin
/// slices it was seen on, not on slabs that average a main bronchus's lumen
/// with its wall. On chest-lidc0001 resampled to 1.1 mm and cut into 3 mm
/// slabs, the slabs showed no carina while the thin slices did, so the heart
/// region (`heart`, step 1) cut nothing above the arch and calcium in the
/// neck counted as coronary. The chosen slice is the slab nearest the
/// source's; the carina and arch top keep their z.
pub fn carry_arch_level(source: &Volume, slabs: &Volume) {
    let Ok(level) = source.arch_level() else { return };
    let Some((index, z)) = slabs
        .positions
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p[2]))
        .min_by(|a, b| (a.1 - level.z_mm).abs().total_cmp(&(b.1 - level.z_mm).abs()))
    else {
        return;
    };
    // Unset on a fresh slab volume; if something asked first, its answer stays.
    let _ = slabs.arch.0.set(Ok(super::landmark::ArchLevel { index, z_mm: z, ..level.clone() }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// `n` slices at `step` mm along z from z = 10, slice i filled with `f(i)`.
    fn stack(n: usize, step: f64, f: impl Fn(usize) -> f32) -> Volume {
        let mut hu = Array3::<f32>::zeros((n, 2, 3));
        for i in 0..n {
            hu.index_axis_mut(Axis(0), i).fill(f(i));
        }
        let positions: Vec<[f64; 3]> = (0..n).map(|i| [-5.0, 7.0, 10.0 + i as f64 * step]).collect();
        Volume {
            hu,
            pixel_spacing: [0.7, 0.7],
            slice_positions: positions.iter().map(|p| p[2]).collect(),
            origin: positions[0],
            positions,
            slice_thickness: Some(step),
            spacing_mm: Some(step),
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            normal: [0.0, 0.0, 1.0],
            sop_instance_uids: (0..n).map(|i| format!("1.2.3.{i}")).collect(),
            frame_numbers: vec![None; n],
            source_paths: (0..n).map(|i| PathBuf::from(format!("{i}.dcm"))).collect(),
            padding_voxels: 0,
            hu_step: 1.0,
            arch: Default::default(),
        }
    }

    #[test]
    fn one_mm_slices_become_the_plain_mean_of_three() {
        let v = stack(9, 1.0, |i| i as f32 * 10.0);
        let s = slabs(&v, 3.0).unwrap();
        assert_eq!(s.slices(), 3);
        for (j, want) in [10.0f32, 40.0, 70.0].into_iter().enumerate() {
            assert!(
                s.hu.index_axis(Axis(0), j).iter().all(|&x| (x - want).abs() < 1e-4),
                "slab {j}: {:?}",
                s.hu
            );
        }
        assert_eq!(s.slice_thickness, Some(3.0));
        assert_eq!(s.spacing_mm, Some(3.0));
        // Slab centres are the middle slices' positions; they are referenced.
        assert_eq!(s.slice_positions, vec![11.0, 14.0, 17.0]);
        assert_eq!(s.positions[1], [-5.0, 7.0, 14.0]);
        assert_eq!(s.origin, [-5.0, 7.0, 11.0]);
        assert_eq!(s.sop_instance_uids, vec!["1.2.3.1", "1.2.3.4", "1.2.3.7"]);
        assert_eq!(s.source_paths[2], PathBuf::from("7.dcm"));
    }

    #[test]
    fn one_and_a_quarter_mm_slices_are_weighted_by_their_overlap() {
        // 1.25 mm: extent 12 × 1.25 = 15 mm → 5 slabs of 3 mm, no remainder.
        // Slab 0 = [0, 3) mm of the stack: slices 0 and 1 whole (2.5 mm) and
        // 0.5 mm of slice 2.
        let v = stack(12, 1.25, |i| i as f32);
        let s = slabs(&v, 3.0).unwrap();
        assert_eq!(s.slices(), 5);
        let want0 = (0.0 * 1.25 + 1.0 * 1.25 + 2.0 * 0.5) / 3.0;
        assert!((s.hu[[0, 0, 0]] as f64 - want0).abs() < 1e-5, "{}", s.hu[[0, 0, 0]]);
        // Slab 1 = [3, 6): slice 2 is [2.5, 3.75), 3 is [3.75, 5), 4 is
        // [5, 6.25): 0.75, 1.25 and 1 mm of them.
        let want1 = (2.0 * 0.75 + 3.0 * 1.25 + 4.0 * 1.0) / 3.0;
        assert!((s.hu[[1, 1, 2]] as f64 - want1).abs() < 1e-5, "{}", s.hu[[1, 1, 2]]);
        // A constant stays constant whatever the weights.
        let c = slabs(&stack(12, 1.25, |_| 237.0), 3.0).unwrap();
        assert!(c.hu.iter().all(|&x| (x - 237.0).abs() < 1e-3));
    }

    #[test]
    fn the_remainder_is_split_between_both_ends() {
        // 10 × 1 mm = 10 mm → 3 slabs (9 mm), 0.5 mm left out at each end.
        let v = stack(10, 1.0, |i| i as f32);
        let s = slabs(&v, 3.0).unwrap();
        assert_eq!(s.slices(), 3);
        // Stack extent [9.5, 19.5]; slabs start at 10.0: [10, 13) is half of
        // slice 0, slices 1 and 2, half of slice 3.
        assert_eq!(s.slice_positions, vec![11.5, 14.5, 17.5]);
        let want0 = (0.0 * 0.5 + 1.0 + 2.0 + 3.0 * 0.5) / 3.0;
        assert!((s.hu[[0, 0, 0]] as f64 - want0).abs() < 1e-5);
    }

    #[test]
    fn three_mm_slices_come_back_unchanged() {
        let v = stack(8, 3.0, |i| (i * i) as f32);
        let s = slabs(&v, 3.0).unwrap();
        assert_eq!(s.hu, v.hu);
        assert_eq!(s.slice_positions, v.slice_positions);
        assert_eq!(s.sop_instance_uids, v.sop_instance_uids);
    }

    #[test]
    fn too_little_to_cut_is_none() {
        assert!(slabs(&stack(1, 1.0, |_| 0.0), 3.0).is_none());
        assert!(slabs(&stack(2, 1.0, |_| 0.0), 3.0).is_none());
        assert_eq!(slabs(&stack(3, 1.0, |_| 5.0), 3.0).unwrap().slices(), 1);
    }

    #[test]
    fn a_descending_normal_keeps_patient_positions_right() {
        // Normal pointing to -z (feet first reconstructions): slice_positions
        // are dot(position, normal), ascending, so z descends.
        let mut v = stack(6, 1.0, |i| i as f32);
        v.normal = [0.0, 0.0, -1.0];
        v.positions = (0..6).map(|i| [0.0, 0.0, -(i as f64)]).collect();
        v.slice_positions = (0..6).map(|i| i as f64).collect();
        let s = slabs(&v, 3.0).unwrap();
        assert_eq!(s.positions, vec![[0.0, 0.0, -1.0], [0.0, 0.0, -4.0]]);
    }
}
