//! 8-connected component labelling of a 2-D mask: the one copy, used by the
//! heart region (`heart`, with per-component statistics), Agatston lesions
//! and candidates (`biomarkers`) and the report builders that relabel them.
//!
//! Input: a boolean mask. Output: the label image (0 = background, 1..=n)
//! and n. Invariant: components are numbered in raster order of their first
//! pixel, as `scipy.ndimage.label` numbers them with a 3×3 structure, so
//! the Python twins (`models/training`) and every user here agree on a
//! lesion's label. No failure modes.

use ndarray::{Array2, ArrayView2};

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
