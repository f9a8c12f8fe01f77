//! 8-connected component labelling of a 2-D mask: the one copy, used by the
//! heart region (`heart`, with per-component statistics), Agatston lesions
//! and candidates (`biomarkers`) and the report builders that relabel them.
//!
//! Input: a boolean mask. Output: the label image (0 = background, 1..=n)
//! and n. Invariant: components are numbered in raster order of their first
//! pixel, as `scipy.ndimage.label` numbers them with a 3×3 structure, so
//! the Python twins (`models/training`) and every user here agree on a
//! lesion's label. No failure modes.
//!
//! Method: two raster passes with union-find over provisional labels (the
//! classic scheme), on flat row-major buffers, by runs: the first pass finds
//! each row's runs of foreground eight bytes at a time and joins a run to
//! the labels above it; the second relabels runs, not pixels. A CAC job
//! labels every 3 mm slab several times (lungs, body holes, dense
//! structures, lesions): the flood fill this replaced was 15 % of a
//! 300-slice chest's CAC CPU, and the pixel-by-pixel passes after it still
//! 10 %.

use ndarray::{Array2, ArrayView2};

/// Label 8-connected components of `mask` in raster order of their first
/// pixel (the same numbering as `scipy.ndimage.label`). Returns the label
/// image (0 = background) and the number of components.
pub fn label8(mask: ArrayView2<bool>) -> (Array2<u32>, usize) {
    let (rows, cols) = mask.dim();
    let std = mask.as_standard_layout();
    let m = std.as_slice().expect("standard layout is contiguous");
    // SAFETY: a bool is one byte holding 0 or 1.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<u8>(), m.len()) };
    let mut lab = vec![0u32; rows * cols];
    // parent[k] for provisional label k (index 0 unused: background).
    let mut parent: Vec<u32> = vec![0];
    // Runs of foreground [start, end) in raster order, flat indices: a run
    // has one provisional label, so the second pass visits runs, not pixels.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for r in 0..rows {
        let row = r * cols;
        let line = &bytes[row..row + cols];
        let mut c = 0;
        loop {
            c = next_set(line, c);
            if c == cols {
                break;
            }
            let e = next_clear(line, c);
            // The run's 8-neighbours in the row above: columns c-1 ..= e.
            let mut l = 0u32;
            if r > 0 {
                let (lo, hi) = (row - cols + c.saturating_sub(1), row - cols + (e + 1).min(cols));
                let mut last = 0u32;
                for &up in &lab[lo..hi] {
                    if up != 0 && up != last {
                        l = if l == 0 { up } else { union(&mut parent, l, up) };
                        last = up;
                    }
                }
            }
            if l == 0 {
                l = parent.len() as u32;
                parent.push(l);
            }
            lab[row + c..row + e].fill(l);
            runs.push((row + c, row + e));
            c = e;
        }
    }
    // Final labels in raster order of each component's first pixel: the
    // first run met of a set gets the next number.
    let mut final_of = vec![0u32; parent.len()];
    let mut next = 0u32;
    for &(a, b) in &runs {
        let root = find(&mut parent, lab[a]) as usize;
        if final_of[root] == 0 {
            next += 1;
            final_of[root] = next;
        }
        lab[a..b].fill(final_of[root]);
    }
    let labels = Array2::from_shape_vec((rows, cols), lab).expect("rows * cols labels");
    (labels, next as usize)
}

/// Bytes 0 or 1 eight at a time.
const ONES: u64 = 0x0101_0101_0101_0101;

/// The first index from `c` whose byte is 1, or `line.len()`.
fn next_set(line: &[u8], mut c: usize) -> usize {
    while c + 8 <= line.len() {
        let w = u64::from_le_bytes(line[c..c + 8].try_into().expect("8 bytes"));
        if w != 0 {
            return c + (w.trailing_zeros() / 8) as usize;
        }
        c += 8;
    }
    while c < line.len() && line[c] == 0 {
        c += 1;
    }
    c
}

/// The first index from `c` whose byte is 0, or `line.len()`.
fn next_clear(line: &[u8], mut c: usize) -> usize {
    while c + 8 <= line.len() {
        let w = u64::from_le_bytes(line[c..c + 8].try_into().expect("8 bytes")) ^ ONES;
        if w != 0 {
            return c + (w.trailing_zeros() / 8) as usize;
        }
        c += 8;
    }
    while c < line.len() && line[c] != 0 {
        c += 1;
    }
    c
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        // Path halving: each step points x at its grandparent.
        let g = parent[parent[x as usize] as usize];
        parent[x as usize] = g;
        x = g;
    }
    x
}

/// Join the sets of `a` and `b`; returns the root (the smaller label).
fn union(parent: &mut [u32], a: u32, b: u32) -> u32 {
    let (ra, rb) = (find(parent, a), find(parent, b));
    let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
    parent[hi as usize] = lo;
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: a fixed stream of masks without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// The flood fill `label8` replaced: the reference for the numbering.
    fn flood_fill(mask: ArrayView2<bool>) -> (Array2<u32>, usize) {
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
                    for ny in y.saturating_sub(1)..=(y + 1).min(rows - 1) {
                        for nx in x.saturating_sub(1)..=(x + 1).min(cols - 1) {
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

    #[test]
    fn numbers_components_like_the_flood_fill_on_random_masks() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            let (rows, cols) = (1 + rng.below(40), 1 + rng.below(40));
            // Foreground fraction 5-70 %: from specks to one sprawling blob.
            let p = 5 + rng.below(66) as u64;
            let mask = Array2::from_shape_fn((rows, cols), |_| rng.below(100) < p as usize);
            assert_eq!(label8(mask.view()), flood_fill(mask.view()), "case {case}: {rows}x{cols}, p {p}");
        }
    }

    /// Wider rows and blobs too: runs that cross the 8-byte words the row
    /// scan reads, and sets joined far from where they start.
    #[test]
    fn numbers_blobs_on_wide_masks_like_the_flood_fill() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..60 {
            let (rows, cols) = (1 + rng.below(120), 1 + rng.below(300));
            let seeds: Vec<(usize, usize, usize)> =
                (0..1 + rng.below(12)).map(|_| (rng.below(rows as u64), rng.below(cols as u64), 1 + rng.below(30))).collect();
            let speck = rng.below(4);
            let mask = Array2::from_shape_fn((rows, cols), |(r, c)| {
                seeds.iter().any(|&(y, x, rad)| r.abs_diff(y).pow(2) + c.abs_diff(x).pow(2) <= rad * rad)
                    || rng.below(100) < speck
            });
            assert_eq!(label8(mask.view()), flood_fill(mask.view()), "case {case}: {rows}x{cols}");
        }
    }

    #[test]
    fn joins_what_only_a_later_row_connects_and_numbers_by_first_pixel() {
        // A "U" whose arms meet only at the bottom row, then a "V" that meets
        // only diagonally, and a single pixel between them in raster order.
        let rows = [
            "1.1..2...2",
            "1.1...2.2.",
            "111....2..",
            "....3.....",
        ];
        let mask = Array2::from_shape_fn((rows.len(), rows[0].len()), |(r, c)| rows[r].as_bytes()[c] != b'.');
        let (lab, n) = label8(mask.view());
        assert_eq!(n, 3);
        let want: Vec<u32> = rows.concat().bytes().map(|b| if b == b'.' { 0 } else { (b - b'0') as u32 }).collect();
        assert_eq!(lab.iter().copied().collect::<Vec<_>>(), want);
    }

    #[test]
    fn reads_a_non_contiguous_view() {
        let full = Array2::from_shape_fn((6, 6), |(r, c)| (r + c) % 3 == 0);
        let view = full.slice(ndarray::s![..;2, 1..]);
        assert_eq!(label8(view), flood_fill(view));
    }
}
