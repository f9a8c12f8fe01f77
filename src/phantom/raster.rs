//! Shared rendering helpers: smooth random fields, angular profiles,
//! correlated noise and supersampled 2D rendering.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Value noise on a 3D lattice with smoothstep interpolation, in [-1, 1].
/// Cheap stand-in for tissue texture and intramuscular fat streaks.
pub struct ValueNoise {
    cell: f64,
    origin: [f64; 3],
    n: [usize; 3],
    v: Vec<f32>,
}

impl ValueNoise {
    /// Covers the box `lo..hi` (mm) with cells of `cell` mm.
    pub fn new(rng: &mut ChaCha8Rng, lo: [f64; 3], hi: [f64; 3], cell: f64) -> ValueNoise {
        let n = [0, 1, 2].map(|i| (((hi[i] - lo[i]) / cell).ceil() as usize + 2).max(2));
        let v = (0..n[0] * n[1] * n[2])
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        ValueNoise {
            cell,
            origin: lo,
            n,
            v,
        }
    }

    pub fn at(&self, x: f64, y: f64, z: f64) -> f32 {
        let p = [x, y, z];
        let mut i0 = [0usize; 3];
        let mut t = [0f32; 3];
        for k in 0..3 {
            let f = ((p[k] - self.origin[k]) / self.cell).clamp(0.0, (self.n[k] - 2) as f64);
            let fi = f.floor().min((self.n[k] - 2) as f64);
            i0[k] = fi as usize;
            let u = (f - fi) as f32;
            t[k] = u * u * (3.0 - 2.0 * u);
        }
        let idx = |a: usize, b: usize, c: usize| (c * self.n[1] + b) * self.n[0] + a;
        let mut acc = 0.0;
        for dz in 0..2 {
            for dy in 0..2 {
                for dx in 0..2 {
                    let w = (if dx == 1 { t[0] } else { 1.0 - t[0] })
                        * (if dy == 1 { t[1] } else { 1.0 - t[1] })
                        * (if dz == 1 { t[2] } else { 1.0 - t[2] });
                    if w > 0.0 {
                        acc += w * self.v[idx(i0[0] + dx, i0[1] + dy, i0[2] + dz)];
                    }
                }
            }
        }
        acc
    }
}

/// A function of the polar angle around the body centre, tabulated.
#[derive(Clone)]
pub struct AngleProfile {
    v: Vec<f32>,
}

pub const ANGLE_BINS: usize = 720;

impl AngleProfile {
    pub fn from_fn(f: impl Fn(f64) -> f64) -> AngleProfile {
        AngleProfile {
            v: (0..ANGLE_BINS)
                .map(|i| f(i as f64 / ANGLE_BINS as f64 * std::f64::consts::TAU - std::f64::consts::PI) as f32)
                .collect(),
        }
    }

    /// Smooth random profile: mean + sum of low harmonics with decaying amplitude.
    pub fn smooth(rng: &mut ChaCha8Rng, mean: f64, amp: f64, harmonics: usize) -> AngleProfile {
        let terms: Vec<(f64, f64, f64)> = (1..=harmonics)
            .map(|k| {
                (
                    k as f64,
                    rng.gen_range(-1.0..1.0) * amp / (k as f64).sqrt(),
                    rng.gen_range(0.0..std::f64::consts::TAU),
                )
            })
            .collect();
        AngleProfile::from_fn(|t| mean + terms.iter().map(|(k, a, p)| a * (k * t + p).cos()).sum::<f64>())
    }

    /// Value at angle `theta` in (-pi, pi].
    pub fn at(&self, theta: f64) -> f64 {
        let f = (theta + std::f64::consts::PI) / std::f64::consts::TAU * ANGLE_BINS as f64;
        let i = f.floor();
        let t = f - i;
        let i0 = (i as isize).rem_euclid(ANGLE_BINS as isize) as usize;
        let i1 = (i0 + 1) % ANGLE_BINS;
        self.v[i0] as f64 * (1.0 - t) + self.v[i1] as f64 * t
    }
}

/// Wraps an angle into (-pi, pi].
pub fn wrap(a: f64) -> f64 {
    let mut a = a % std::f64::consts::TAU;
    if a <= -std::f64::consts::PI {
        a += std::f64::consts::TAU;
    } else if a > std::f64::consts::PI {
        a -= std::f64::consts::TAU;
    }
    a
}

/// Flat-topped bump on [c - w, c + w]: 0 outside, 1 at the centre.
pub fn bump(x: f64, c: f64, w: f64) -> f64 {
    let t = (x - c) / w;
    if t.abs() >= 1.0 {
        0.0
    } else {
        (std::f64::consts::FRAC_PI_2 * t).cos().powf(0.5)
    }
}

/// Inside a rotated ellipse; returns the normalised radius squared.
pub fn ellipse_r2(x: f64, y: f64, cx: f64, cy: f64, a: f64, b: f64, rot: f64) -> f64 {
    let (s, c) = rot.sin_cos();
    let dx = x - cx;
    let dy = y - cy;
    let u = dx * c + dy * s;
    let v = -dx * s + dy * c;
    (u / a).powi(2) + (v / b).powi(2)
}

/// Distance from `p` to segment `a`-`b` (3D).
pub fn seg_dist(p: [f64; 3], a: [f64; 3], b: [f64; 3]) -> f64 {
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let ap = [p[0] - a[0], p[1] - a[1], p[2] - a[2]];
    let l2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
    let t = if l2 > 0.0 {
        ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / l2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let d = [ap[0] - t * ab[0], ap[1] - t * ab[1], ap[2] - t * ab[2]];
    (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
}

/// Separable [1 2 1]/4 blur, `passes` times, of a rows × cols image.
pub fn blur121(img: &mut [f32], rows: usize, cols: usize, passes: usize) {
    let mut tmp = vec![0f32; img.len()];
    for _ in 0..passes {
        for r in 0..rows {
            for c in 0..cols {
                let l = img[r * cols + c.saturating_sub(1)];
                let m = img[r * cols + c];
                let rr = img[r * cols + (c + 1).min(cols - 1)];
                tmp[r * cols + c] = 0.25 * l + 0.5 * m + 0.25 * rr;
            }
        }
        for r in 0..rows {
            for c in 0..cols {
                let u = tmp[r.saturating_sub(1) * cols + c];
                let m = tmp[r * cols + c];
                let d = tmp[(r + 1).min(rows - 1) * cols + c];
                img[r * cols + c] = 0.25 * u + 0.5 * m + 0.25 * d;
            }
        }
    }
}

/// Correlated Gaussian noise with standard deviation `sigma`: white noise
/// blurred once with [1 2 1]/4 (which scales sigma by 0.375) and rescaled,
/// so neighbouring pixels correlate as after a smooth reconstruction kernel.
pub fn correlated_noise(rng: &mut ChaCha8Rng, rows: usize, cols: usize, sigma: f64) -> Vec<f32> {
    let n = Normal::new(0.0f32, 1.0).expect("unit normal is valid");
    let mut v: Vec<f32> = (0..rows * cols).map(|_| n.sample(rng)).collect();
    blur121(&mut v, rows, cols, 1);
    let k = (sigma / 0.375) as f32;
    for x in &mut v {
        *x *= k;
    }
    v
}

/// Rounds HU and clamps to what a 12-bit CT encoding carries.
pub fn to_hu(v: f32) -> i16 {
    v.round().clamp(-1024.0, 3071.0) as i16
}
