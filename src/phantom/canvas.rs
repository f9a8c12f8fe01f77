//! A 2x supersampled label canvas for one axial slice, and the step that
//! turns labels into stored HU and a truth mask.
//!
//! Partial volume: each output pixel is the mean HU of its 2×2 subsamples, so
//! boundaries blend the way a reconstruction does. A pixel belongs to a
//! tissue when at least 2 of its 4 subsamples carry that tissue's label.

use rand_chacha::ChaCha8Rng;

use super::raster::{blur121, correlated_noise, ellipse_r2, to_hu};

/// Sub-grid geometry in patient mm (x = column direction, y = row direction).
pub struct Canvas {
    pub rows: usize,
    pub cols: usize,
    /// Output pixel spacing (mm), isotropic in-plane.
    pub spacing: f64,
    /// Patient x, y of output pixel (0, 0) centre.
    pub x0: f64,
    pub y0: f64,
    /// Labels on the 2x sub-grid, (2 rows) × (2 cols).
    pub labels: Vec<u8>,
}

impl Canvas {
    pub fn new(rows: usize, cols: usize, spacing: f64, x0: f64, y0: f64) -> Canvas {
        Canvas {
            rows,
            cols,
            spacing,
            x0,
            y0,
            labels: vec![0; rows * cols * 4],
        }
    }

    pub fn sub_cols(&self) -> usize {
        self.cols * 2
    }

    /// Patient coordinates of sub-sample (sr, sc).
    pub fn sub_xy(&self, sr: usize, sc: usize) -> (f64, f64) {
        (
            self.x0 + (sc as f64 * 0.5 - 0.25) * self.spacing,
            self.y0 + (sr as f64 * 0.5 - 0.25) * self.spacing,
        )
    }

    /// Sets every sub-sample's label from a function of position.
    pub fn fill(&mut self, f: impl Fn(f64, f64) -> u8) {
        let sc = self.sub_cols();
        for sr in 0..self.rows * 2 {
            for c in 0..sc {
                let (x, y) = self.sub_xy(sr, c);
                self.labels[sr * sc + c] = f(x, y);
            }
        }
    }

    /// Sub-sample index range covering the patient box.
    fn sub_range(&self, xlo: f64, xhi: f64, ylo: f64, yhi: f64) -> (usize, usize, usize, usize) {
        let to_c = |x: f64| ((x - self.x0) / self.spacing + 0.25) * 2.0;
        let to_r = |y: f64| ((y - self.y0) / self.spacing + 0.25) * 2.0;
        let n_c = self.cols as f64 * 2.0;
        let n_r = self.rows as f64 * 2.0;
        (
            to_r(ylo).floor().clamp(0.0, n_r) as usize,
            to_r(yhi).ceil().clamp(0.0, n_r) as usize,
            to_c(xlo).floor().clamp(0.0, n_c) as usize,
            to_c(xhi).ceil().clamp(0.0, n_c) as usize,
        )
    }

    /// Paints a rotated ellipse; `f(old_label, rho2)` returns the new label
    /// (rho2 is the normalised radius squared, < 1 inside).
    #[allow(clippy::too_many_arguments)]
    pub fn ellipse(
        &mut self,
        cx: f64,
        cy: f64,
        a: f64,
        b: f64,
        rot: f64,
        f: impl Fn(u8, f64) -> Option<u8>,
    ) {
        let m = a.max(b);
        let (r0, r1, c0, c1) = self.sub_range(cx - m, cx + m, cy - m, cy + m);
        let sc = self.sub_cols();
        for sr in r0..r1 {
            for c in c0..c1 {
                let (x, y) = self.sub_xy(sr, c);
                let rho2 = ellipse_r2(x, y, cx, cy, a, b, rot);
                if rho2 < 1.0 {
                    let i = sr * sc + c;
                    if let Some(l) = f(self.labels[i], rho2) {
                        self.labels[i] = l;
                    }
                }
            }
        }
    }

    /// Paints a capsule (segment with radius); `f(old_label, d/r)`.
    pub fn capsule(
        &mut self,
        a: (f64, f64),
        b: (f64, f64),
        r: f64,
        f: impl Fn(u8, f64) -> Option<u8>,
    ) {
        let (r0, r1, c0, c1) = self.sub_range(
            a.0.min(b.0) - r,
            a.0.max(b.0) + r,
            a.1.min(b.1) - r,
            a.1.max(b.1) + r,
        );
        let sc = self.sub_cols();
        for sr in r0..r1 {
            for c in c0..c1 {
                let (x, y) = self.sub_xy(sr, c);
                let d = super::raster::seg_dist([x, y, 0.0], [a.0, a.1, 0.0], [b.0, b.1, 0.0]);
                if d < r {
                    let i = sr * sc + c;
                    if let Some(l) = f(self.labels[i], d / r) {
                        self.labels[i] = l;
                    }
                }
            }
        }
    }

    /// Renders: HU per sub-sample from `hu_of(label, x, y)`, 2×2 mean, a
    /// light PSF blur, correlated noise of `sigma`, rounding. Pixels outside
    /// the reconstruction circle (when `padding_hu` is set) get that value.
    /// Returns (HU, per-pixel label with ≥2 of 4 votes or 255 for "mixed").
    pub fn render(
        &self,
        rng: &mut ChaCha8Rng,
        hu_of: impl Fn(u8, f64, f64) -> f32,
        sigma: f64,
        padding_hu: Option<i16>,
    ) -> (Vec<i16>, Vec<u8>) {
        let (rows, cols) = (self.rows, self.cols);
        let sc = self.sub_cols();
        let mut img = vec![0f32; rows * cols];
        let mut lab = vec![255u8; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let mut acc = 0.0;
                let ls = [
                    self.labels[(2 * r) * sc + 2 * c],
                    self.labels[(2 * r) * sc + 2 * c + 1],
                    self.labels[(2 * r + 1) * sc + 2 * c],
                    self.labels[(2 * r + 1) * sc + 2 * c + 1],
                ];
                for (k, &l) in ls.iter().enumerate() {
                    let (x, y) = self.sub_xy(2 * r + k / 2, 2 * c + k % 2);
                    acc += hu_of(l, x, y);
                }
                img[r * cols + c] = acc / 4.0;
                for &l in &ls {
                    if ls.iter().filter(|&&m| m == l).count() >= 2 {
                        lab[r * cols + c] = l;
                        break;
                    }
                }
            }
        }
        // Mild in-plane PSF on top of the 2x2 box: a [1 2 1] pass mixed 50/50.
        let mut psf = img.clone();
        blur121(&mut psf, rows, cols, 1);
        for (a, b) in img.iter_mut().zip(&psf) {
            *a = 0.5 * *a + 0.5 * b;
        }
        let noise = correlated_noise(rng, rows, cols, sigma);
        let rad2 = (cols as f64 / 2.0).powi(2);
        let mut out = vec![0i16; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let dy = r as f64 + 0.5 - rows as f64 / 2.0;
                let dx = c as f64 + 0.5 - cols as f64 / 2.0;
                out[i] = match padding_hu {
                    Some(p) if dx * dx + dy * dy > rad2 => {
                        lab[i] = 254;
                        p
                    }
                    _ => to_hu(img[i] + noise[i]),
                };
            }
        }
        (out, lab)
    }
}
