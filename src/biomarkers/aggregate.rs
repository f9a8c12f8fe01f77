//! Resampling between native and model resolution, and the aggregation.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayView4, ArrayViewMut2, Axis};

/// Adaptive-average-pool bins (torch semantics): [⌊i·n_in/n_out⌋, ⌈(i+1)·n_in/n_out⌉).
fn bins(n_in: usize, n_out: usize) -> Vec<(usize, usize)> {
    (0..n_out)
        .map(|i| ((i * n_in) / n_out, ((i + 1) * n_in).div_ceil(n_out)))
        .collect()
}

/// Box-average resample of one slice, in f64, with torch's bins.
pub fn area_resample(img: ArrayView2<f64>, out: (usize, usize)) -> Array2<f64> {
    let (r, c) = img.dim();
    // summed-area table: exact for overlapping bins and O(1) per output cell
    let mut sat = Array2::<f64>::zeros((r + 1, c + 1));
    for y in 0..r {
        let mut row = 0.0;
        for x in 0..c {
            row += img[[y, x]];
            sat[[y + 1, x + 1]] = sat[[y, x + 1]] + row;
        }
    }
    let rb = bins(r, out.0);
    let cb = bins(c, out.1);
    Array2::from_shape_fn(out, |(i, j)| {
        let (r0, r1) = rb[i];
        let (c0, c1) = cb[j];
        let tot = sat[[r1, c1]] - sat[[r0, c1]] - sat[[r1, c0]] + sat[[r0, c0]];
        tot / (((r1 - r0) * (c1 - c0)) as f64)
    })
}

/// Model input for one slice: clip → area resample → (x − subtract) / divide.
pub fn normalise_slice(
    hu: ArrayView2<f32>,
    clip: (f64, f64),
    size: (usize, usize),
    subtract: f64,
    divide: f64,
) -> Array2<f32> {
    let clipped = hu.mapv(|v| (v as f64).clamp(clip.0, clip.1));
    area_resample(clipped.view(), size).mapv(|x| ((x - subtract) / divide) as f32)
}

/// Nearest upsampling to native size: native index i reads (i·model_n)/native_n.
pub fn upsample_nearest(map: ArrayView2<f32>, native: (usize, usize)) -> Array2<f32> {
    let mut out = Array2::zeros(native);
    upsample_nearest_into(map, out.view_mut());
    out
}

/// [`upsample_nearest`] into `out`, whose shape is the native one.
pub fn upsample_nearest_into(map: ArrayView2<f32>, mut out: ArrayViewMut2<f32>) {
    let (mh, mw) = map.dim();
    let (rows, cols) = out.dim();
    // Row by row through a column table: once per slice of every volume
    // job, and a 2-D index per native pixel was 6 % of a liver volume's CPU.
    let table: Vec<usize> = (0..cols).map(|x| (x * mw) / cols).collect();
    for (y, mut row_out) in out.rows_mut().into_iter().enumerate() {
        let row = map.row((y * mh) / rows);
        for (o, &c) in row_out.iter_mut().zip(&table) {
            *o = row[c];
        }
    }
}

/// Every slice of the model output `out` (`[S,1,H,W]`) back at the native
/// `(rows, cols)`, as `[S,R,C]`: runs of slices side by side (`crate::par`;
/// a chest's 110 slabs of 512² are 29 M pixels).
pub fn upsample_volume(out: ArrayView4<f32>, native: (usize, usize)) -> Array3<f32> {
    let mut map = Array3::<f32>::zeros((out.dim().0, native.0, native.1));
    crate::par::map_slice_runs(map.view_mut(), crate::par::threads(), |first, mut run| {
        for (j, slice) in run.axis_iter_mut(Axis(0)).enumerate() {
            upsample_nearest_into(out.slice(s![first + j, 0, .., ..]), slice);
        }
    });
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn bins_match_torch_adaptive_pool() {
        assert_eq!(bins(4, 2), vec![(0, 2), (2, 4)]);
        // non-integer ratio: bins overlap
        assert_eq!(bins(5, 3), vec![(0, 2), (1, 4), (3, 5)]);
    }

    #[test]
    fn area_resample_averages_boxes() {
        let img = array![[1.0, 3.0, 5.0, 7.0], [1.0, 3.0, 5.0, 7.0]];
        let out = area_resample(img.view(), (1, 2));
        assert_eq!(out, array![[2.0, 6.0]]);
    }

    #[test]
    fn upsample_is_the_documented_index_rule_at_any_ratio() {
        // native index i reads model index (i * model_n) // native_n, per axis
        let m = Array2::from_shape_fn((5, 7), |(y, x)| (y * 10 + x) as f32);
        for native in [(5, 7), (12, 9), (13, 29), (3, 2)] {
            let u = upsample_nearest(m.view(), native);
            let want = Array2::from_shape_fn(native, |(y, x)| m[[(y * 5) / native.0, (x * 7) / native.1]]);
            assert_eq!(u, want, "{native:?}");
        }
    }

    #[test]
    fn upsample_reads_the_covering_model_cell() {
        let m = array![[0.0f32, 1.0], [2.0, 3.0]];
        let u = upsample_nearest(m.view(), (4, 4));
        assert_eq!(u[[0, 0]], 0.0);
        assert_eq!(u[[1, 3]], 1.0);
        assert_eq!(u[[3, 0]], 2.0);
        assert_eq!(u[[3, 3]], 3.0);
    }
}
