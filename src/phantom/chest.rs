//! One axial chest slice just above the aortic arch (sometimes through it),
//! the level used for pectoralis and subcutaneous fat areas in COPDGene.
//!
//! Built as concentric layers measured inward from the body contour along
//! the polar angle (skin, subcutaneous fat, outer muscle layer, scapula,
//! intermuscular fat, inner muscle layer, retro-muscular fat, rib wall),
//! then the thoracic cavity (mediastinum, lungs) and painted structures
//! (spine, vessels, breast, arms, table). The confounders the brief asks for
//! come from the anatomy: fat of the same HU in breast, axilla, mediastinum
//! and between muscles, and muscle of the same HU all around the chest wall.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::canvas::Canvas;
use super::raster::{bump, wrap, AngleProfile, ValueNoise};
use super::{Phantom, Task};

/// Tissue labels on the canvas.
pub mod t {
    pub const AIR: u8 = 0;
    pub const SKIN: u8 = 1;
    pub const SUBCUT_FAT: u8 = 2;
    pub const BREAST_FAT: u8 = 3;
    pub const BREAST_GLAND: u8 = 4;
    pub const PEC_MAJOR: u8 = 5;
    pub const PEC_MINOR: u8 = 6;
    pub const MUSCLE: u8 = 7;
    pub const DEEP_FAT: u8 = 8;
    pub const CORTEX: u8 = 9;
    pub const MARROW: u8 = 10;
    pub const CARTILAGE: u8 = 11;
    pub const LUNG: u8 = 12;
    pub const LUNG_VESSEL: u8 = 13;
    pub const SOFT: u8 = 14;
    pub const MED_FAT: u8 = 15;
    pub const BLOOD: u8 = 16;
    pub const AIRWAY: u8 = 17;
    pub const ARM_FAT: u8 = 18;
    pub const TABLE: u8 = 19;
    pub const CSF: u8 = 20;
    pub const NODE: u8 = 21;
    pub const N: usize = 22;
}

fn u(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    rng.gen_range(lo..hi)
}

/// Renders a chest slice; the truth is PMA or SFA depending on `task`.
pub fn generate(rng: &mut ChaCha8Rng, task: Task, size: usize) -> Phantom {
    use std::f64::consts::{FRAC_PI_2, PI};
    let n = size;
    let spacing = (u(rng, 0.6, 0.9) * 512.0 / n as f64 * 1e4).round() / 1e4;
    let fov = spacing * n as f64;
    let x0 = -fov / 2.0 + spacing / 2.0;
    let table_y = u(rng, -30.0, 30.0);
    let y0 = -fov / 2.0 + spacing / 2.0 + table_y;
    let mut cv = Canvas::new(n, n, spacing, x0, y0);

    // Body outline.
    let bx = u(rng, -15.0, 15.0);
    let by = table_y + u(rng, -20.0, 20.0);
    // Thoracic cavity first; the wall layers grow outward from it, so body
    // habitus (fat, muscle) changes the body, not the lungs.
    let cav_a = u(rng, 100.0, 140.0);
    let cav_b = cav_a * u(rng, 0.58, 0.75);
    let flat = u(rng, 0.0, 0.1);
    let wobble = AngleProfile::smooth(rng, 0.0, 0.02, 5);
    let cav_r = AngleProfile::from_fn(|th| {
        let (s, c) = th.sin_cos();
        let r = cav_a * cav_b / ((cav_b * c).powi(2) + (cav_a * s).powi(2)).sqrt();
        let post = if s > 0.0 { 1.0 - flat * s.powi(4) } else { 1.0 };
        r * post * (1.0 + wobble.at(th))
    });
    let skin = u(rng, 1.5, 2.5);
    // Subcutaneous fat: body-habitus level, thicker posterolaterally.
    let fat_level = (u(rng, 4f64.ln(), 36f64.ln())).exp();
    let fat_var = AngleProfile::smooth(rng, 1.0, 0.3, 6);
    let tsf_raw = AngleProfile::from_fn(|th| {
        let a = wrap(th + FRAC_PI_2).abs();
        let region = 0.8 + 0.5 * bump(a, 2.0, 1.2);
        (fat_level * region * fat_var.at(th)).max(1.2)
    });
    // Muscles: per side jittered bumps over |angle from anterior midline|.
    let side_j = |rng: &mut ChaCha8Rng| [u(rng, 0.85, 1.15), u(rng, 0.85, 1.15)];
    let mscale = u(rng, 0.6, 1.3);
    let pec_s = u(rng, 0.1, 0.16);
    let pec_l = u(rng, 0.85, 1.1);
    let pec_pk = u(rng, 8.0, 24.0) * mscale;
    let pec_j = side_j(rng);
    let pmi_c = u(rng, 0.55, 0.72);
    let pmi_w = u(rng, 0.18, 0.28);
    let pmi_pk = u(rng, 4.0, 12.0) * mscale;
    let pmi_j = side_j(rng);
    let lat_c = u(rng, 1.65, 2.0);
    let lat_w = u(rng, 0.45, 0.65);
    let lat_pk = u(rng, 4.0, 14.0) * mscale;
    let trap_w = u(rng, 0.45, 0.7);
    let trap_pk = u(rng, 4.0, 12.0) * mscale;
    let scap_c = u(rng, 2.05, 2.35);
    let scap_w = u(rng, 0.22, 0.32);
    let infra_pk = u(rng, 8.0, 18.0) * mscale;
    let subsc_pk = u(rng, 6.0, 14.0) * mscale;
    let serr_c = u(rng, 1.35, 1.6);
    let serr_w = u(rng, 0.4, 0.6);
    let serr_pk = u(rng, 4.0, 10.0) * mscale;
    let erec_w = u(rng, 0.3, 0.4);
    let erec_pk = u(rng, 25.0, 40.0) * mscale.sqrt();
    let ax_c = u(rng, 1.05, 1.3);
    let ax_w = u(rng, 0.2, 0.35);
    let ax_pk = u(rng, 6.0, 30.0) * (fat_level / 15.0).sqrt();
    // Outer layer: (thickness, is_pec) from the thickest muscle at the angle.
    let outer = |th: f64| -> (f64, bool) {
        let a = wrap(th + FRAC_PI_2);
        let s = usize::from(a > 0.0);
        let aa = a.abs();
        let pec = pec_pk * pec_j[s] * bump(aa, (pec_s + pec_l) / 2.0, (pec_l - pec_s) / 2.0);
        let lat = lat_pk * bump(aa, lat_c, lat_w);
        let trap = trap_pk * bump(aa, PI, trap_w);
        let infra = infra_pk * bump(aa, scap_c, scap_w * 1.2);
        let other = lat.max(trap).max(infra);
        if pec >= other {
            (pec, pec > 0.3)
        } else {
            (other, false)
        }
    };
    let inner = |th: f64| -> (f64, bool) {
        let a = wrap(th + FRAC_PI_2);
        let s = usize::from(a > 0.0);
        let aa = a.abs();
        let pmi = pmi_pk * pmi_j[s] * bump(aa, pmi_c, pmi_w);
        let serr = serr_pk * bump(aa, serr_c, serr_w);
        let subsc = subsc_pk * bump(aa, scap_c, scap_w * 1.1);
        let erec = erec_pk * bump(aa, PI, erec_w);
        let other = serr.max(subsc).max(erec);
        if pmi >= other {
            (pmi, pmi > 0.3)
        } else {
            (other, false)
        }
    };
    let outer_t = AngleProfile::from_fn(|th| outer(th).0);
    let outer_pec = AngleProfile::from_fn(|th| f64::from(u8::from(outer(th).1)));
    let inner_t = AngleProfile::from_fn(|th| inner(th).0);
    let inner_pec = AngleProfile::from_fn(|th| f64::from(u8::from(inner(th).1)));
    let fp_mean = u(rng, 0.3, 2.5);
    let fp_base = AngleProfile::smooth(rng, fp_mean, 2.5, 8);
    let fp = AngleProfile::from_fn(|th| {
        let aa = wrap(th + FRAC_PI_2).abs();
        fp_base.at(th).max(0.0) + ax_pk * bump(aa, ax_c, ax_w)
    });
    let scap_t = AngleProfile::from_fn(|th| {
        let aa = wrap(th + FRAC_PI_2).abs();
        let b = bump(aa, scap_c, scap_w);
        if b > 0.15 {
            2.5 + 3.0 * b
        } else {
            0.0
        }
    });
    let fr = AngleProfile::smooth(rng, 1.0, 1.5, 6);
    let rib_wall = u(rng, 9.0, 13.0);
    // Depth of the rib wall's outer surface and of the cavity.
    let d_rib = AngleProfile::from_fn(|th| {
        skin + tsf_raw.at(th) + outer_t.at(th) + scap_t.at(th) + fp.at(th) + inner_t.at(th) + fr.at(th).max(0.0)
    });
    // The outline is a smoothed envelope of the wall; subcutaneous fat
    // fills what the smoothing adds, as it does over muscle bulges.
    let deep = AngleProfile::from_fn(|th| cav_r.at(th) + rib_wall + d_rib.at(th) - skin - tsf_raw.at(th));
    let raw_outline = AngleProfile::from_fn(|th| deep.at(th) + skin + tsf_raw.at(th));
    let radius = AngleProfile::from_fn(|th| {
        let k = 30;
        let avg = (-k..=k).map(|i| raw_outline.at(wrap(th + 0.4 * i as f64 / k as f64))).sum::<f64>() / (2 * k + 1) as f64;
        avg.max(deep.at(th) + skin + 1.2)
    });
    let tsf = AngleProfile::from_fn(|th| radius.at(th) - deep.at(th) - skin);
    let d_rib = AngleProfile::from_fn(|th| radius.at(th) - cav_r.at(th) - rib_wall);
    let big_a = radius.at(0.0).max(radius.at(std::f64::consts::PI));
    let big_b = radius.at(-FRAC_PI_2).max(radius.at(FRAC_PI_2));
    // Rib centres (angle from anterior midline), per side.
    let mut ribs: Vec<(f64, f64)> = Vec::new(); // (signed angle, half-length mm)
    for side in [-1.0, 1.0] {
        let mut a = u(rng, 0.3, 0.45);
        while a < 2.75 {
            ribs.push((side * a, u(rng, 6.0, 12.0)));
            a += u(rng, 0.22, 0.32);
        }
    }
    let sternum_hw = u(rng, 11.0, 18.0);

    let depth_at = |x: f64, y: f64| -> (f64, f64) {
        let th = (y - by).atan2(x - bx);
        let r = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
        (th, radius.at(th) - r)
    };
    // Vertebra sits on the posterior midline at the cavity boundary.
    let post_cav = radius.at(FRAC_PI_2) - d_rib.at(FRAC_PI_2) - rib_wall;
    let canal_r = u(rng, 6.0, 8.0);
    let canal_y = by + post_cav + canal_r * 0.3;
    let vb_r = u(rng, 13.0, 18.0);
    let vb_y = canal_y - canal_r - vb_r - 1.5;
    let ant_cav_y = by - (radius.at(-FRAC_PI_2) - d_rib.at(-FRAC_PI_2) - rib_wall);
    let mx = bx + u(rng, -5.0, 10.0);
    let med_w = u(rng, 20.0, 34.0);
    let med_cy = (ant_cav_y + vb_y) / 2.0;
    let med_h = (vb_y - ant_cav_y) / 2.0 + 6.0;

    cv.fill(|x, y| {
        let (th, d) = depth_at(x, y);
        if d < 0.0 {
            return t::AIR;
        }
        if d < skin {
            return t::SKIN;
        }
        let mut z = skin + tsf.at(th);
        if d < z {
            return t::SUBCUT_FAT;
        }
        z += outer_t.at(th);
        if d < z {
            return if outer_pec.at(th) > 0.5 { t::PEC_MAJOR } else { t::MUSCLE };
        }
        z += scap_t.at(th);
        if d < z {
            return t::CORTEX;
        }
        z += fp.at(th);
        if d < z {
            return t::DEEP_FAT;
        }
        z += inner_t.at(th);
        if d < z {
            return if inner_pec.at(th) > 0.5 { t::PEC_MINOR } else { t::MUSCLE };
        }
        z += fr.at(th).max(0.0);
        if d < z {
            return t::DEEP_FAT;
        }
        let a = wrap(th + FRAC_PI_2);
        let r = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
        if d < z + rib_wall {
            let u_depth = d - z - rib_wall / 2.0;
            if a.abs() * r < sternum_hw {
                let e = (a.abs() * r / sternum_hw).max(u_depth.abs() / (rib_wall / 2.0));
                return if e > 0.8 { t::CORTEX } else { t::MARROW };
            }
            for &(ra, hl) in &ribs {
                let s = (a - ra) * r;
                let e = (s / hl).powi(2) + (u_depth / (rib_wall * 0.42)).powi(2);
                if e < 1.0 {
                    if ra.abs() < 0.55 {
                        return t::CARTILAGE;
                    }
                    return if e > 0.55 { t::CORTEX } else { t::MARROW };
                }
            }
            return t::MUSCLE; // intercostals
        }
        if super::raster::ellipse_r2(x, y, mx, med_cy, med_w, med_h, 0.0) < 1.0 {
            return t::MED_FAT;
        }
        t::LUNG
    });

    // Spine.
    let sx = bx;
    cv.ellipse(sx, canal_y + 4.0, canal_r + 6.0, canal_r + 4.0, 0.0, |_, _| Some(t::CORTEX));
    let sp_len = u(rng, 14.0, 20.0);
    cv.ellipse(sx, canal_y + canal_r + sp_len, 3.0, sp_len, 0.0, |_, r| {
        Some(if r < 0.3 { t::MARROW } else { t::CORTEX })
    });
    for s in [-1.0, 1.0] {
        cv.ellipse(sx + s * 18.0, canal_y + 3.0, 14.0, 5.0, s * 0.35, |_, r| {
            Some(if r < 0.4 { t::MARROW } else { t::CORTEX })
        });
    }
    cv.ellipse(sx, canal_y, canal_r, canal_r, 0.0, |_, _| Some(t::CSF));
    cv.ellipse(sx, vb_y, vb_r * 1.05, vb_r, 0.0, |_, r| {
        Some(if r < 0.8 { t::MARROW } else { t::CORTEX })
    });

    // Mediastinum contents.
    let tr_r = u(rng, 8.0, 11.0);
    let tr_x = mx - med_w * 0.15 + u(rng, -3.0, 3.0);
    let tr_y = vb_y - vb_r - tr_r - u(rng, 1.0, 5.0);
    let soft_med = |_: u8, _: f64| Some(t::SOFT);
    cv.ellipse(tr_x + u(rng, 6.0, 12.0), vb_y - vb_r - 4.0, 7.0, 5.0, 0.3, soft_med);
    cv.ellipse(tr_x, tr_y, tr_r, tr_r * 0.95, 0.0, |_, r| {
        Some(if r < 0.75 { t::AIRWAY } else { t::SOFT })
    });
    let arch = rng.gen_bool(0.3);
    let blood = |_: u8, _: f64| Some(t::BLOOD);
    let mut vessels: Vec<(f64, f64, f64)> = Vec::new();
    if arch {
        let a0 = (tr_x - u(rng, 15.0, 22.0), tr_y - tr_r - u(rng, 12.0, 20.0));
        let a1 = (tr_x + u(rng, 12.0, 18.0), tr_y + u(rng, 0.0, 8.0));
        cv.capsule(a0, a1, u(rng, 11.0, 15.0), blood);
        vessels.push((tr_x - u(rng, 20.0, 28.0), tr_y - tr_r - u(rng, 5.0, 12.0), u(rng, 8.0, 11.0)));
    } else {
        vessels.push((tr_x - u(rng, 8.0, 14.0), tr_y - tr_r - u(rng, 5.0, 10.0), u(rng, 5.0, 7.0)));
        vessels.push((tr_x + u(rng, 5.0, 10.0), tr_y - tr_r - u(rng, 4.0, 8.0), u(rng, 3.5, 5.0)));
        vessels.push((tr_x + u(rng, 14.0, 20.0), tr_y - u(rng, 0.0, 5.0), u(rng, 4.5, 6.5)));
        vessels.push((tr_x - u(rng, 18.0, 26.0), tr_y - tr_r - u(rng, 8.0, 15.0), u(rng, 6.0, 9.0)));
        let lb = (tr_x + 5.0, tr_y - tr_r - u(rng, 18.0, 25.0));
        cv.ellipse(lb.0, lb.1, u(rng, 15.0, 25.0), u(rng, 4.0, 6.0), u(rng, -0.3, 0.1), blood);
    }
    for &(x, y, r) in &vessels {
        cv.ellipse(x, y, r, r, 0.0, blood);
    }
    for _ in 0..rng.gen_range(0..5) {
        let (x, y) = (mx + u(rng, -med_w, med_w) * 0.7, med_cy + u(rng, -med_h, med_h) * 0.6);
        let r = u(rng, 3.0, 8.0);
        cv.ellipse(x, y, r, r * 0.7, u(rng, 0.0, 3.0), |o, _| (o == t::MED_FAT).then_some(t::NODE));
    }
    // Lung vessels: many small, few large.
    for _ in 0..rng.gen_range(60..160) {
        let x = bx + u(rng, -big_a, big_a);
        let y = by + u(rng, -big_b, big_b);
        let r = 0.6 + 3.5 * u(rng, 0.0, 1.0f64).powi(3);
        let ecc = u(rng, 1.0, 3.0);
        cv.ellipse(x, y, r * ecc, r, u(rng, 0.0, PI), |o, _| (o == t::LUNG).then_some(t::LUNG_VESSEL));
    }
    // Axillary lymph nodes in the axillary fat.
    for _ in 0..rng.gen_range(0..4) {
        let s = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
        let a = ax_c * s - FRAC_PI_2;
        let rr = radius.at(a) - skin - tsf.at(a) - ax_pk * 0.5;
        let (x, y) = (bx + rr * a.cos(), by + rr * a.sin());
        let r = u(rng, 2.5, 7.0);
        cv.ellipse(x, y, r, r * 0.6, u(rng, 0.0, PI), |o, _| (o == t::DEEP_FAT).then_some(t::NODE));
    }

    // Breasts: mounds on the anterior surface whose fat meets the
    // subcutaneous fat with no visible boundary.
    let female = rng.gen_bool(0.4);
    let gland_noise = ValueNoise::new(rng, [x0 - 10.0, y0 - 10.0, 0.0], [x0 + fov + 10.0, y0 + fov + 10.0, 1.0], 6.0);
    let gland_density = u(rng, 0.05, 0.35);
    let mut breast_info = None;
    if female {
        let size = u(rng, 0.6, 1.6);
        for s in [-1.0, 1.0] {
            let a = s * u(rng, 0.55, 0.8) - FRAC_PI_2;
            let rb = radius.at(a);
            let (cx, cy) = (bx + rb * a.cos(), by + rb * a.sin());
            let along = u(rng, 45.0, 75.0) * size.sqrt();
            let out = u(rng, 12.0, 35.0) * size;
            let rot = a + FRAC_PI_2; // ellipse b axis radial
            cv.ellipse(cx, cy, along, out, rot, |o, rho2| {
                if o == t::AIR {
                    let depth_m = (1.0 - rho2.sqrt()) * out;
                    return Some(if depth_m < skin { t::SKIN } else { t::BREAST_FAT });
                }
                (o == t::SUBCUT_FAT || o == t::SKIN).then_some(t::BREAST_FAT)
            });
            breast_info = Some(json!({"size": size}));
        }
        // Restore the deep part of the subcutaneous layer beneath the mound
        // and the skin under it, from the base geometry.
        let sc = cv.sub_cols();
        for sr in 0..n * 2 {
            for c in 0..sc {
                let i = sr * sc + c;
                if cv.labels[i] != t::BREAST_FAT {
                    continue;
                }
                let (x, y) = cv.sub_xy(sr, c);
                let (th, d) = depth_at(x, y);
                if d > skin + 0.45 * tsf.at(th) {
                    cv.labels[i] = t::SUBCUT_FAT;
                } else {
                    let g = gland_noise.at(x, y, 0.0) as f64;
                    if g > 1.0 - 2.0 * gland_density {
                        cv.labels[i] = t::BREAST_GLAND;
                    }
                }
            }
        }
    }
    // Arms at the sides in some scans; their fat and muscle are confounders.
    let arms_down = rng.gen_bool(0.3);
    if arms_down {
        for s in [-1.0, 1.0] {
            let aa = u(rng, 38.0, 52.0);
            let ab = u(rng, 45.0, 60.0);
            let ax = bx + s * (big_a + u(rng, -8.0, 15.0) + aa);
            let ay = by + u(rng, -10.0, 25.0);
            let arm_fat = u(rng, 4.0, 20.0);
            let hr = u(rng, 10.0, 13.0);
            let (hx, hy) = (ax + s * u(rng, -8.0, 8.0), ay + u(rng, -8.0, 8.0));
            cv.ellipse(ax, ay, aa, ab, 0.0, |o, rho2| {
                if o != t::AIR {
                    return None;
                }
                let depth = (1.0 - rho2.sqrt()) * aa.min(ab);
                Some(if depth < skin {
                    t::SKIN
                } else if depth < skin + arm_fat {
                    t::ARM_FAT
                } else {
                    t::MUSCLE
                })
            });
            cv.ellipse(hx, hy, hr, hr, 0.0, |_, r| Some(if r < 0.6 { t::MARROW } else { t::CORTEX }));
        }
    }
    // Table under the patient.
    let table_top = by + radius.at(FRAC_PI_2) + u(rng, 1.0, 8.0);
    cv.capsule((bx - 230.0, table_top + 5.0), (bx + 230.0, table_top + 5.0), 4.0, |o, _| {
        (o == t::AIR).then_some(t::TABLE)
    });

    // Tissue HU: fat shares one mean everywhere, muscle likewise.
    let fat = u(rng, -112.0, -85.0) as f32;
    let muscle = u(rng, 38.0, 58.0) as f32;
    let contrast = rng.gen_bool(0.2);
    let mut base = [0f32; t::N];
    base[t::AIR as usize] = -1000.0;
    base[t::SKIN as usize] = u(rng, 20.0, 60.0) as f32;
    for l in [t::SUBCUT_FAT, t::BREAST_FAT, t::DEEP_FAT, t::MED_FAT, t::ARM_FAT] {
        base[l as usize] = fat;
    }
    base[t::BREAST_GLAND as usize] = u(rng, 5.0, 40.0) as f32;
    for l in [t::PEC_MAJOR, t::PEC_MINOR, t::MUSCLE] {
        base[l as usize] = muscle;
    }
    base[t::CORTEX as usize] = u(rng, 650.0, 1000.0) as f32;
    base[t::MARROW as usize] = u(rng, 170.0, 300.0) as f32;
    base[t::CARTILAGE as usize] = u(rng, 70.0, 160.0) as f32;
    base[t::LUNG as usize] = u(rng, -880.0, -800.0) as f32;
    base[t::LUNG_VESSEL as usize] = u(rng, 20.0, 45.0) as f32;
    base[t::SOFT as usize] = u(rng, 25.0, 45.0) as f32;
    base[t::BLOOD as usize] = if contrast { u(rng, 150.0, 320.0) } else { u(rng, 35.0, 50.0) } as f32;
    base[t::AIRWAY as usize] = -990.0;
    base[t::TABLE as usize] = u(rng, -350.0, -150.0) as f32;
    base[t::CSF as usize] = u(rng, 5.0, 25.0) as f32;
    base[t::NODE as usize] = u(rng, 20.0, 45.0) as f32;
    let tex = ValueNoise::new(rng, [x0 - 10.0, y0 - 10.0, 0.0], [x0 + fov + 10.0, y0 + fov + 10.0, 1.0], 3.0);
    let marble = ValueNoise::new(rng, [x0 - 10.0, y0 - 10.0, 0.0], [x0 + fov + 10.0, y0 + fov + 10.0, 1.0], 1.8);
    let marbling = u(rng, 0.0, 0.35) as f32;
    let septa = u(rng, 0.0, 0.3) as f32;
    let hu_of = |l: u8, x: f64, y: f64| -> f32 {
        let b = base[l as usize];
        let tx = tex.at(x, y, 0.0);
        match l {
            t::PEC_MAJOR | t::PEC_MINOR | t::MUSCLE => {
                let m = marble.at(x, y, 0.0);
                if m > 1.0 - marbling {
                    // intramuscular fat streak
                    let k = ((m - (1.0 - marbling)) / marbling.max(1e-3) * 2.0).min(1.0);
                    b * (1.0 - k) + fat * k
                } else {
                    b + 6.0 * tx
                }
            }
            t::SUBCUT_FAT | t::BREAST_FAT | t::DEEP_FAT | t::MED_FAT | t::ARM_FAT => {
                let m = marble.at(x, y, 0.5);
                if m > 1.0 - septa * 0.5 {
                    b + 60.0 // fibrous septa
                } else {
                    b + 8.0 * tx
                }
            }
            t::LUNG => b + 35.0 * tx,
            t::MARROW => b + 40.0 * tx,
            t::BREAST_GLAND => b + 15.0 * tx,
            _ => b + 4.0 * tx,
        }
    };
    let sigma = u(rng, 8.0, 25.0);
    let signed = rng.gen_bool(0.5);
    let padding_hu = rng.gen_bool(0.4).then_some(if signed { -2000 } else { -1024 });
    let (hu, lab) = cv.render(rng, hu_of, sigma, padding_hu);

    let (targets, lo, hi): (&[u8], i16, i16) = match task {
        Task::Pma => (&[t::PEC_MAJOR, t::PEC_MINOR], -29, 150),
        _ => (&[t::SUBCUT_FAT], -190, -30),
    };
    let in_body = |l: u8| l != t::AIR && l != t::TABLE && l < 254;
    let mut mask = vec![0u8; n * n];
    let mut thresh = 0usize;
    for i in 0..n * n {
        let inr = hu[i] >= lo && hu[i] <= hi;
        if inr && targets.contains(&lab[i]) {
            mask[i] = 1;
        }
        if inr && in_body(lab[i]) {
            thresh += 1;
        }
    }
    let px_cm2 = spacing * spacing / 100.0;
    let value = mask.iter().filter(|&&m| m == 1).count() as f64 * px_cm2;
    let z = u(rng, -50.0, 150.0);
    Phantom {
        rows: n,
        cols: n,
        slices: 1,
        spacing: [spacing, spacing],
        thickness: if rng.gen_bool(0.5) { 1.25 } else { 2.5 },
        origin: [x0, y0, z],
        hu,
        mask,
        signed,
        padding_hu,
        value,
        risk: None,
        kvp: if rng.gen_bool(0.8) { 120.0 } else { 100.0 },
        extra: json!({
            "hu_range": [lo, hi],
            "threshold_area_cm2": thresh as f64 * px_cm2,
            "noise_sigma_hu": sigma,
            "body_half_axes_mm": [big_a, big_b],
            "subcut_fat_level_mm": fat_level,
            "pectoralis_peak_mm": pec_pk,
            "breast": breast_info,
            "arms_down": arms_down,
            "aortic_arch_level": arch,
            "contrast": contrast,
            "fov_mm": fov,
        }),
    }
}
