//! Non-contrast calcium-scoring volume: a heart-centred thorax slab.
//!
//! Geometry: `size`² pixels (default 256, 0.7-1.0 mm, so a 180-256 mm
//! heart-centred field of view that clips the body), 40 slices of 3 mm or
//! 48 of 2.5 mm (120 mm craniocaudal), about 5-6 MB per series.
//!
//! Contents: body wall, ribs that come and go along z, sternum, vertebrae
//! with discs, lungs, mediastinal fat, ascending and descending aorta,
//! pulmonary trunk, SVC, a heart ellipsoid in epicardial fat, and coronary
//! arteries (LM, LAD, LCX, RCA) running in the fat of the atrioventricular
//! and anterior interventricular grooves. Calcified plaques sit on the
//! coronaries; distractors ≥ 130 HU that must not count: bone, aortic wall
//! calcification, mitral annulus and aortic valve calcification.
//!
//! Rendering: the anatomy is sampled 2×2 in-plane per voxel; small objects
//! (vessels, plaques, calcifications) by 3×3×5 sub-samples so that plaques
//! straddle slices, then an in-plane PSF blur and correlated noise. The
//! coronary-plaque region is every voxel a plaque touches, dilated by one
//! pixel in-plane to hold its blur; the truth is [`agatston::lesions`] inside it.

use ndarray::{Array3, ArrayView3};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::biomarkers::agatston::{self, LesionRule, RiskCategory};
use super::raster::{blur121, correlated_noise, seg_dist, to_hu, wrap, AngleProfile, ValueNoise};
use super::Phantom;

type V3 = [f64; 3];

fn u(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    rng.gen_range(lo..hi)
}
fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn mul(a: V3, k: f64) -> V3 {
    [a[0] * k, a[1] * k, a[2] * k]
}
fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn cross(a: V3, b: V3) -> V3 {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}
fn norm(a: V3) -> V3 {
    let l = dot(a, a).sqrt();
    mul(a, 1.0 / l)
}

const VESSELS: [&str; 4] = ["LM", "LAD", "LCX", "RCA"];

/// A small object rendered with sub-voxel sampling: a chain of spheres.
struct Blob {
    /// (centre, radius) spheres; inside = within any.
    spheres: Vec<(V3, f64)>,
    hu: f64,
    /// Coronary plaque index (for the candidate region), if a plaque.
    plaque: Option<usize>,
}

impl Blob {
    fn inside(&self, p: V3) -> bool {
        self.spheres.iter().any(|(c, r)| {
            let d = sub(p, *c);
            dot(d, d) < r * r
        })
    }
}

/// Heart ellipsoid frame: centre, unit axes (e1 base→apex, e2 anterior,
/// e3 patient left), semi-axes.
struct Heart {
    c: V3,
    e: [V3; 3],
    s: V3,
}

impl Heart {
    /// Normalised radius squared of `p` in the ellipsoid grown by `grow` mm.
    fn rho2(&self, p: V3, grow: f64) -> f64 {
        let d = sub(p, self.c);
        (0..3).map(|k| (dot(d, self.e[k]) / (self.s[k] + grow)).powi(2)).sum()
    }
    /// Surface point at long-axis position `t` (-1 base .. 1 apex) and angle
    /// `phi` (0 anterior, +pi/2 left), pushed out by `out` mm.
    fn surface(&self, t: f64, phi: f64, out: f64) -> V3 {
        let k = (1.0 - t * t).max(0.0).sqrt();
        let p = add(
            add(mul(self.e[0], t * (self.s[0] + out)), mul(self.e[1], phi.cos() * k * (self.s[1] + out))),
            mul(self.e[2], phi.sin() * k * (self.s[2] + out)),
        );
        add(self.c, p)
    }
}

/// Polyline by sampling a path function at ~0.7 mm steps.
fn path(f: impl Fn(f64) -> V3, len_hint: f64) -> Vec<V3> {
    let n = (len_hint / 0.7).ceil().max(2.0) as usize;
    (0..=n).map(|i| f(i as f64 / n as f64)).collect()
}

fn chain(points: &[V3], r: f64) -> Vec<(V3, f64)> {
    points.iter().map(|p| (*p, r)).collect()
}

pub(crate) fn generate(rng: &mut ChaCha8Rng, size: usize) -> Phantom {
    use std::f64::consts::{FRAC_PI_2, PI};
    let n = size;
    let spacing = (u(rng, 0.7, 1.0) * 256.0 / n as f64 * 1e4).round() / 1e4;
    let thick3 = rng.gen_bool(0.6);
    let (thickness, slices) = if thick3 { (3.0, 40) } else { (2.5, 48) };
    let fov = spacing * n as f64;
    let x0 = -fov / 2.0 + spacing / 2.0;
    let y0 = -fov / 2.0 + spacing / 2.0;
    let z0 = -(slices as f64 - 1.0) * thickness / 2.0 + u(rng, -10.0, 10.0);

    // Body, centred right-posterior of the heart (which sits near the origin).
    let bx = u(rng, -40.0, -22.0);
    let by = u(rng, 10.0, 30.0);
    let big_a = u(rng, 135.0, 175.0);
    let big_b = big_a * u(rng, 0.62, 0.78);
    let radius = AngleProfile::from_fn(|th| {
        let (s, c) = th.sin_cos();
        big_a * big_b / ((big_b * c).powi(2) + (big_a * s).powi(2)).sqrt()
    });
    let skin = 2.0;
    let tsf_m = u(rng, 5.0, 30.0);
    let tsf = AngleProfile::smooth(rng, tsf_m, 4.0, 5);
    let musc_m = u(rng, 8.0, 16.0);
    let musc = AngleProfile::smooth(rng, musc_m, 3.0, 5);
    let rib_wall = u(rng, 9.0, 12.0);
    let rib_phase = u(rng, 0.0, 30.0);
    let rib_period = u(rng, 22.0, 30.0);
    let rib_tilt = u(rng, 0.15, 0.3); // rib obliquity: angle shift per mm of z
    let d_wall = |th: f64| skin + tsf.at(th).max(2.0) + musc.at(th).max(4.0);
    let post_cav = radius.at(FRAC_PI_2) - d_wall(FRAC_PI_2) - rib_wall;
    let spine = [bx, by + post_cav - u(rng, 2.0, 8.0)];
    let vb_r = u(rng, 15.0, 19.0);
    let disc_phase = u(rng, 0.0, 26.0);
    let sternum_hw = u(rng, 12.0, 18.0);

    // Heart and great vessels.
    let heart = {
        let e1 = norm([u(rng, 0.45, 0.7), u(rng, -0.6, -0.35), u(rng, -0.7, -0.45)]);
        let ant = [0.0, -1.0, 0.0];
        let e2 = norm(sub(ant, mul(e1, dot(ant, e1))));
        let mut e3 = cross(e1, e2);
        if e3[0] < 0.0 {
            e3 = mul(e3, -1.0);
        }
        Heart {
            c: [u(rng, -5.0, 5.0), u(rng, -8.0, 4.0), u(rng, -10.0, 5.0)],
            e: [e1, e2, e3],
            s: [u(rng, 55.0, 68.0), u(rng, 42.0, 50.0), u(rng, 40.0, 48.0)],
        }
    };
    let epi_fat = u(rng, 4.0, 12.0);
    let root = add(heart.surface(-0.95, -0.4, -8.0), [0.0, 0.0, 0.0]);
    let aorta_r = u(rng, 13.0, 17.0);
    let asc_top = [root[0] - u(rng, 0.0, 8.0), root[1] - u(rng, 0.0, 8.0), z0 + slices as f64 * thickness + 20.0];
    let desc = [spine[0] + u(rng, 18.0, 28.0), spine[1] - vb_r - u(rng, 8.0, 14.0)];
    let desc_r = u(rng, 10.0, 13.5);
    let pa_base = heart.surface(-0.9, 0.3, -6.0);
    let pa_top = [pa_base[0] + 15.0, pa_base[1] + 10.0, pa_base[2] + 45.0];
    let pa_r = u(rng, 11.0, 15.0);
    let svc = [root[0] - aorta_r - u(rng, 8.0, 14.0), root[1] + u(rng, -4.0, 6.0)];
    let svc_r = u(rng, 8.0, 11.0);
    let med_w = u(rng, 30.0, 45.0);

    #[derive(Clone, Copy, PartialEq)]
    enum L {
        Air,
        Skin,
        Fat,
        Muscle,
        Cortex,
        Marrow,
        Disc,
        Lung,
        Blood,
        Myo,
    }
    let label = |x: f64, y: f64, z: f64| -> L {
        let th = (y - by).atan2(x - bx);
        let r = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
        let d = radius.at(th) - r;
        if d < 0.0 {
            return L::Air;
        }
        if d < skin {
            return L::Skin;
        }
        let mut zz = skin + tsf.at(th).max(2.0);
        if d < zz {
            return L::Fat;
        }
        zz += musc.at(th).max(4.0);
        if d < zz {
            return L::Muscle;
        }
        let a = wrap(th + FRAC_PI_2);
        if d < zz + rib_wall {
            let ud = d - zz - rib_wall / 2.0;
            if a.abs() * r < sternum_hw {
                let e = (a.abs() * r / sternum_hw).max(ud.abs() / (rib_wall / 2.0));
                return if e > 0.8 { L::Cortex } else { L::Marrow };
            }
            // ribs: bands along the wall whose angular phase drifts with z
            let arc = a.abs() * r + (z + rib_phase) / rib_tilt.max(0.05) * 0.1;
            let ph = arc.rem_euclid(rib_period) / rib_period;
            if a.abs() > 0.45 && a.abs() < 2.8 && ph < 0.4 {
                let e = ((ph - 0.2) / 0.2).powi(2) + (ud / (rib_wall * 0.42)).powi(2);
                if e < 1.0 {
                    return if e > 0.5 { L::Cortex } else { L::Marrow };
                }
            }
            return L::Muscle;
        }
        // Cavity: spine, vessels, heart, mediastinum, lungs.
        let ds = ((x - spine[0]).powi(2) + (y - spine[1]).powi(2)).sqrt();
        if ds < vb_r {
            if (z - disc_phase).rem_euclid(26.0) < 5.0 {
                return L::Disc;
            }
            return if ds > vb_r - 1.8 { L::Cortex } else { L::Marrow };
        }
        if ((x - desc[0]).powi(2) + (y - desc[1]).powi(2)).sqrt() < desc_r {
            return L::Blood;
        }
        let p = [x, y, z];
        if seg_dist(p, root, asc_top) < aorta_r || seg_dist(p, pa_base, pa_top) < pa_r {
            return L::Blood;
        }
        if ((x - svc[0]).powi(2) + (y - svc[1]).powi(2)).sqrt() < svc_r && z > root[2] - 10.0 {
            return L::Blood;
        }
        let h = heart.rho2(p, 0.0);
        if h < 1.0 {
            return L::Myo;
        }
        if heart.rho2(p, epi_fat) < 1.0 {
            return L::Fat;
        }
        let my = (spine[1] - vb_r + heart.c[1] - heart.s[1]) / 2.0;
        let mh = (spine[1] - vb_r - heart.c[1] + heart.s[1]) / 2.0;
        if ((x - heart.c[0] + 10.0) / med_w).powi(2) + ((y - my) / mh).powi(2) < 1.0 && (z > heart.c[2] + 10.0 || heart.rho2(p, epi_fat + 12.0) < 1.0) {
            return L::Fat;
        }
        L::Lung
    };

    // Coronary centrelines in the epicardial fat.
    let cor_r = u(rng, 1.4, 2.0);
    let out = (epi_fat * 0.45).max(cor_r + 0.6);
    let t_av = u(rng, -0.6, -0.45);
    let phi_lad = u(rng, 0.05, 0.35);
    let bif = heart.surface(t_av, 0.55, out);
    let lm_start = add(root, mul(norm(sub(bif, root)), aorta_r * 0.8));
    let lm = path(|s| add(lm_start, mul(sub(bif, lm_start), s)), 12.0);
    let lad_end = u(rng, 0.75, 0.92);
    let lad = path(
        |s| {
            let t = t_av + (lad_end - t_av) * s;
            let phi = 0.55 + (phi_lad - 0.55) * (s * 4.0).min(1.0) + 0.05 * (s * 9.0).sin();
            heart.surface(t, phi, out)
        },
        140.0,
    );
    let lcx_end = u(rng, 1.8, 2.7);
    let lcx = path(|s| heart.surface(t_av, 0.6 + (lcx_end - 0.6) * s, out), 90.0);
    let rca_o = heart.surface(t_av, -0.35, out);
    let rca_start = add(root, mul(norm(sub(rca_o, root)), aorta_r * 0.8));
    let rca_end = u(rng, 2.0, 2.9);
    let rca: Vec<V3> = path(|s| add(rca_start, mul(sub(rca_o, rca_start), s)), 15.0)
        .into_iter()
        .chain(path(|s| heart.surface(t_av, -0.35 - (rca_end - 0.35) * s, out), 110.0))
        .collect();
    let vessels = [lm, lad, lcx, rca];

    // Plaques: burden class drives count, size and density.
    let class = match rng.gen_range(0..100) {
        0..=19 => 0,
        20..=42 => 1,
        43..=62 => 2,
        63..=82 => 3,
        _ => 4,
    };
    let (n_pl, len_r, rad_r, hu_r) = match class {
        0 => (0, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
        1 => (1, (0.4, 1.5), (0.6, 0.95), (350.0, 700.0)),
        2 => (rng.gen_range(1..=4), (1.0, 5.0), (0.8, 1.6), (250.0, 800.0)),
        3 => (rng.gen_range(3..=7), (2.0, 9.0), (1.0, 2.0), (350.0, 1100.0)),
        _ => (rng.gen_range(6..=13), (3.0, 15.0), (1.3, 2.6), (450.0, 1500.0)),
    };
    let mut blobs: Vec<Blob> = Vec::new();
    // Vessel lumens first (soft tissue against the epicardial fat).
    let blood_hu = u(rng, 35.0, 50.0);
    for v in &vessels {
        blobs.push(Blob {
            spheres: chain(v, cor_r),
            hu: blood_hu,
            plaque: None,
        });
    }
    let mut plaques = Vec::new();
    for i in 0..n_pl {
        let vi = match rng.gen_range(0..100) {
            0..=14 => 0,
            15..=54 => 1,
            55..=74 => 2,
            _ => 3,
        };
        let pts = &vessels[vi];
        let m = pts.len();
        let start = ((m as f64) * rng.gen::<f64>().powf(1.6) * 0.85) as usize;
        let len_mm = u(rng, len_r.0, len_r.1);
        let npts = ((len_mm / 0.7).ceil() as usize).max(1);
        let rad = u(rng, rad_r.0, rad_r.1);
        let ecc = norm([u(rng, -1.0, 1.0), u(rng, -1.0, 1.0), u(rng, -1.0, 1.0)]);
        let off = mul(ecc, cor_r * u(rng, 0.3, 0.8));
        let hu = u(rng, hu_r.0, hu_r.1);
        let spheres: Vec<(V3, f64)> = (0..npts)
            .map(|k| {
                let idx = (start + k).min(m - 1);
                let t = (k as f64 + 0.5) / npts as f64;
                let taper = if npts > 2 { (PI * t).sin().powf(0.4).max(0.5) } else { 1.0 };
                (add(pts[idx], off), rad * taper)
            })
            .collect();
        plaques.push(json!({"vessel": VESSELS[vi], "length_mm": len_mm, "radius_mm": rad, "hu": hu}));
        blobs.push(Blob {
            spheres,
            hu,
            plaque: Some(i),
        });
    }
    let plaque_vessel: Vec<&str> = plaques
        .iter()
        .map(|p| p["vessel"].as_str().unwrap_or("?"))
        .collect();
    // Distractors.
    let mut distractors = Vec::new();
    for _ in 0..rng.gen_range(0..7) {
        let (c, kind) = if rng.gen_bool(0.5) {
            let z = u(rng, z0, z0 + slices as f64 * thickness);
            let a = u(rng, 0.0, 2.0 * PI);
            ([desc[0] + desc_r * a.cos(), desc[1] + desc_r * a.sin(), z], "descending aorta wall")
        } else {
            let s = u(rng, 0.1, 0.9);
            let axis = add(root, mul(sub(asc_top, root), s * 0.5));
            let a = u(rng, 0.0, 2.0 * PI);
            (add(axis, [aorta_r * a.cos(), aorta_r * a.sin(), 0.0]), "ascending aorta wall")
        };
        let r = u(rng, 1.0, 3.5);
        let hu = u(rng, 200.0, 1000.0);
        distractors.push(json!({"kind": kind, "radius_mm": r, "hu": hu}));
        blobs.push(Blob {
            spheres: vec![(c, r), (add(c, [0.0, 0.0, u(rng, -4.0, 4.0)]), r * 0.8)],
            hu,
            plaque: None,
        });
    }
    if rng.gen_bool(0.2) {
        let (p0, p1) = (u(rng, 0.9, 1.4), u(rng, 1.9, 2.8));
        let mac = path(|s| heart.surface(t_av + 0.04, p0 + (p1 - p0) * s, -6.0), 60.0);
        let hu = u(rng, 300.0, 1000.0);
        distractors.push(json!({"kind": "mitral annulus", "hu": hu}));
        blobs.push(Blob {
            spheres: chain(&mac, u(rng, 1.5, 2.8)),
            hu,
            plaque: None,
        });
    }
    if rng.gen_bool(0.12) {
        let hu = u(rng, 300.0, 900.0);
        distractors.push(json!({"kind": "aortic valve", "hu": hu}));
        let c = add(root, [0.0, 0.0, -3.0]);
        blobs.push(Blob {
            spheres: (0..3)
                .map(|k| (add(c, [6.0 * (k as f64 * 2.1).cos(), 6.0 * (k as f64 * 2.1).sin(), 0.0]), 2.0))
                .collect(),
            hu,
            plaque: None,
        });
    }

    // Base anatomy.
    let fat = u(rng, -110.0, -85.0);
    let hu_of = |l: L| -> f64 {
        match l {
            L::Air => -1000.0,
            L::Skin => 40.0,
            L::Fat => fat,
            L::Muscle => 50.0,
            L::Cortex => 800.0,
            L::Marrow => 240.0,
            L::Disc => 85.0,
            L::Lung => -860.0,
            L::Blood => blood_hu,
            L::Myo => blood_hu + 5.0,
        }
    };
    let tex = ValueNoise::new(rng, [x0 - 10.0, y0 - 10.0, z0 - 10.0], [x0 + fov + 10.0, y0 + fov + 10.0, z0 + 200.0], 4.0);
    let np = n * n;
    let mut vol = vec![0f32; np * slices];
    for s in 0..slices {
        let z = z0 + s as f64 * thickness;
        for r in 0..n {
            for c in 0..n {
                let mut acc = 0.0;
                for k in 0..4 {
                    let x = x0 + (c as f64 + (k % 2) as f64 * 0.5 - 0.25) * spacing;
                    let y = y0 + (r as f64 + (k / 2) as f64 * 0.5 - 0.25) * spacing;
                    let l = label(x, y, z);
                    let t = tex.at(x, y, z) as f64;
                    acc += hu_of(l)
                        + match l {
                            L::Lung => 30.0 * t,
                            L::Marrow => 40.0 * t,
                            L::Fat => 8.0 * t,
                            _ => 4.0 * t,
                        };
                }
                vol[s * np + r * n + c] = (acc / 4.0) as f32;
            }
        }
    }
    // Small objects with sub-voxel sampling (3×3 in-plane × 5 along z).
    let mut region = vec![false; np * slices];
    let mut plaque_of = vec![u16::MAX; np * slices];
    // Each blob visits the union of its spheres' voxel boxes once (`stamp`).
    let mut stamp = vec![u32::MAX; np * slices];
    for (bi, b) in blobs.iter().enumerate() {
        for (centre, rad) in &b.spheres {
            let lo = sub(*centre, [*rad; 3]);
            let hi = add(*centre, [*rad; 3]);
            let c0 = (((lo[0] - x0) / spacing).floor().max(0.0)) as usize;
            let c1 = ((((hi[0] - x0) / spacing).ceil() + 1.0).max(0.0) as usize).min(n);
            let r0 = (((lo[1] - y0) / spacing).floor().max(0.0)) as usize;
            let r1 = ((((hi[1] - y0) / spacing).ceil() + 1.0).max(0.0) as usize).min(n);
            let s0 = (((lo[2] - z0) / thickness).floor().max(0.0)) as usize;
            let s1 = ((((hi[2] - z0) / thickness).ceil() + 1.0).max(0.0) as usize).min(slices);
            for s in s0..s1 {
                for r in r0..r1 {
                    for c in c0..c1 {
                        let v = s * np + r * n + c;
                        if stamp[v] == bi as u32 {
                            continue;
                        }
                        stamp[v] = bi as u32;
                        let mut inside = 0;
                        for k in 0..45 {
                            let (i, j, l) = (k % 3, (k / 3) % 3, k / 9);
                            let p = [
                                x0 + (c as f64 + (i as f64 - 1.0) / 3.0) * spacing,
                                y0 + (r as f64 + (j as f64 - 1.0) / 3.0) * spacing,
                                z0 + (s as f64 + (l as f64 - 2.0) / 5.0) * thickness,
                            ];
                            if b.inside(p) {
                                inside += 1;
                            }
                        }
                        if inside == 0 {
                            continue;
                        }
                        let f = inside as f32 / 45.0;
                        vol[v] = vol[v] * (1.0 - f) + b.hu as f32 * f;
                        if let Some(pi) = b.plaque {
                            region[v] = true;
                            plaque_of[v] = pi as u16;
                        }
                    }
                }
            }
        }
    }
    // PSF, noise, padding.
    let sharp = u(rng, 0.3, 0.8) as f32;
    let sigma = u(rng, 10.0, 28.0);
    let signed = rng.gen_bool(0.5);
    let padding_hu = rng.gen_bool(0.4).then_some(if signed { -2000 } else { -1024 });
    let mut hu = vec![0i16; np * slices];
    let rad2 = (n as f64 / 2.0).powi(2);
    for s in 0..slices {
        let sl = &mut vol[s * np..(s + 1) * np];
        let mut bl = sl.to_vec();
        blur121(&mut bl, n, n, 1);
        let noise = correlated_noise(rng, n, n, sigma);
        for i in 0..np {
            let (r, c) = (i / n, i % n);
            let dy = r as f64 + 0.5 - n as f64 / 2.0;
            let dx = c as f64 + 0.5 - n as f64 / 2.0;
            hu[s * np + i] = match padding_hu {
                Some(p) if dx * dx + dy * dy > rad2 => p,
                _ => to_hu(sl[i] * sharp + bl[i] * (1.0 - sharp) + noise[i]),
            };
        }
    }
    // Dilate the plaque region by one pixel in-plane (the blur's reach).
    let mut dil = region.clone();
    for s in 0..slices {
        for r in 0..n {
            for c in 0..n {
                let v = s * np + r * n + c;
                if !region[v] {
                    continue;
                }
                for dr in -1i64..=1 {
                    for dc in -1i64..=1 {
                        let (rr, cc) = (r as i64 + dr, c as i64 + dc);
                        if rr >= 0 && cc >= 0 && (rr as usize) < n && (cc as usize) < n {
                            let w = s * np + rr as usize * n + cc as usize;
                            dil[w] = true;
                            if plaque_of[w] == u16::MAX {
                                plaque_of[w] = plaque_of[v];
                            }
                        }
                    }
                }
            }
        }
    }
    let px = spacing * spacing;
    let hu_f = Array3::from_shape_vec((slices, n, n), hu.iter().map(|&v| v as f32).collect())
        .expect("hu is slices × n × n");
    let region = ArrayView3::from_shape((slices, n, n), &dil[..]).expect("region is slices × n × n");
    let rule = LesionRule::AGATSTON;
    let (comps, labels) = agatston::lesions(hu_f.view(), Some(region), rule, px, thickness);
    let total = agatston::total(&comps);
    let raw = agatston::total(&agatston::lesions(hu_f.view(), None, rule, px, thickness).0);
    let mut mask = vec![0u8; np * slices];
    let first_of_slice = agatston::first_of_slice(&comps, slices);
    let mut votes = vec![[0usize; 64]; comps.len()];
    for ((s, r, c), &l) in labels.indexed_iter() {
        if l == 0 {
            continue;
        }
        let v = s * np + r * n + c;
        mask[v] = 1;
        let p = plaque_of[v];
        if (p as usize) < 64 {
            votes[first_of_slice[s] + l as usize - 1][p as usize] += 1;
        }
    }
    let mut lesions = Vec::new();
    for (cmp, votes) in comps.iter().zip(&votes) {
        let best = (0..votes.len()).max_by_key(|&k| votes[k]).unwrap_or(0);
        lesions.push(json!({
            "slice": cmp.slice,
            "area_mm2": cmp.area_mm2,
            // HU of an i16 volume: integral, written as an integer.
            "peak_hu": cmp.peak_hu as i16,
            "weight": cmp.weight,
            "score": cmp.score,
            "vessel": plaque_vessel.get(best).copied().unwrap_or("?"),
        }));
    }
    Phantom {
        rows: n,
        cols: n,
        slices,
        spacing: [spacing, spacing],
        thickness,
        origin: [x0, y0, z0],
        hu,
        mask,
        signed,
        padding_hu,
        value: total,
        risk: Some(RiskCategory::from_score(total).as_str()),
        kvp: 120.0,
        extra: json!({
            "lesions": lesions,
            "distractors": distractors,
            "plaques": plaques,
            "burden_class": class,
            "threshold_agatston": raw,
            "noise_sigma_hu": sigma,
            "fov_mm": fov,
        }),
    }
}
