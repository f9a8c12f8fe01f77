//! One axial upper-abdomen slice through the liver, with 0..5 liver tumours.
//!
//! Body wall (skin, subcutaneous fat, abdominal and back muscles, lower
//! ribs), visceral fat, liver with portal and hepatic veins, IVC, aorta,
//! spleen, kidneys, stomach, bowel loops, gallbladder, cysts, spine. The
//! contrast phase (none, arterial, portal venous) sets organ and vessel HU,
//! so vessels, cysts, gallbladder, kidneys and bowel sit in the tumour HU
//! range [-20, 200] as confounders. Tumours are hypodense, hyperdense or
//! rim-enhancing, 5-60 mm, clipped to the liver (so some sit at its edge).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::canvas::Canvas;
use super::raster::{bump, wrap, AngleProfile, ValueNoise};
use super::Phantom;

mod t {
    pub const AIR: u8 = 0;
    pub const SKIN: u8 = 1;
    pub const SUBCUT_FAT: u8 = 2;
    pub const MUSCLE: u8 = 3;
    pub const VISC_FAT: u8 = 4;
    pub const LIVER: u8 = 5;
    pub const TUMOUR: u8 = 6;
    pub const RIM: u8 = 7;
    pub const SPLEEN: u8 = 8;
    pub const KIDNEY: u8 = 9;
    pub const WALL: u8 = 10;
    pub const FLUID: u8 = 11;
    pub const GAS: u8 = 12;
    pub const AORTA: u8 = 13;
    pub const VEIN: u8 = 14;
    pub const CORTEX: u8 = 15;
    pub const MARROW: u8 = 16;
    pub const BILE: u8 = 17;
    pub const CYST: u8 = 18;
    pub const TABLE: u8 = 19;
    pub const ORAL: u8 = 20;
    pub const N: usize = 21;
}

fn u(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    rng.gen_range(lo..hi)
}

pub(crate) fn generate(rng: &mut ChaCha8Rng, size: usize) -> Phantom {
    use std::f64::consts::{FRAC_PI_2, PI};
    let n = size;
    let spacing = (u(rng, 0.65, 0.9) * 512.0 / n as f64 * 1e4).round() / 1e4;
    let fov = spacing * n as f64;
    let x0 = -fov / 2.0 + spacing / 2.0;
    let y0 = -fov / 2.0 + spacing / 2.0 + u(rng, -20.0, 20.0);
    let mut cv = Canvas::new(n, n, spacing, x0, y0);
    let bx = u(rng, -15.0, 15.0);
    let by = y0 + fov / 2.0 + u(rng, -20.0, 15.0);
    let big_a = u(rng, 130.0, 185.0);
    let big_b = big_a * u(rng, 0.68, 0.88);
    let wob = AngleProfile::smooth(rng, 0.0, 0.025, 4);
    let radius = AngleProfile::from_fn(|th| {
        let (s, c) = th.sin_cos();
        big_a * big_b / ((big_b * c).powi(2) + (big_a * s).powi(2)).sqrt() * (1.0 + wob.at(th))
    });
    let skin = u(rng, 1.5, 2.5);
    let fat_m = (u(rng, 8f64.ln(), 55f64.ln())).exp();
    let tsf = AngleProfile::smooth(rng, fat_m, fat_m * 0.3, 5);
    let mthick = u(rng, 7.0, 14.0);
    let erec = u(rng, 30.0, 45.0);
    let wall = AngleProfile::from_fn(|th| {
        let aa = wrap(th + FRAC_PI_2).abs();
        mthick * (1.0 - 0.4 * bump(aa, 0.35, 0.2)) + erec * bump(aa, PI, 0.45)
    });
    let cav = |x: f64, y: f64| -> (f64, f64, f64) {
        let th = (y - by).atan2(x - bx);
        let r = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
        (th, r, radius.at(th) - r)
    };
    let ai = big_a - fat_m - mthick;
    let bi = big_b - fat_m - mthick;
    // Liver: right lobe + left lobe extension.
    let liv = (bx - ai * u(rng, 0.35, 0.5), by - bi * u(rng, 0.0, 0.15), ai * u(rng, 0.5, 0.62), bi * u(rng, 0.7, 0.85));
    let lob = (bx - ai * u(rng, 0.05, 0.2), by - bi * u(rng, 0.35, 0.5), ai * u(rng, 0.25, 0.45), bi * u(rng, 0.22, 0.32));
    let spine_y = by + bi - u(rng, 5.0, 15.0);
    let vb_r = u(rng, 16.0, 21.0);
    cv.fill(|x, y| {
        let (th, _, d) = cav(x, y);
        if d < 0.0 {
            return t::AIR;
        }
        if d < skin {
            return t::SKIN;
        }
        let mut z = skin + tsf.at(th).max(3.0);
        if d < z {
            return t::SUBCUT_FAT;
        }
        z += wall.at(th);
        if d < z {
            // lower ribs in the lateral wall
            let aa = wrap(th + FRAC_PI_2).abs();
            if aa > 0.9 && aa < 2.3 && (d - z + wall.at(th) * 0.5).abs() < 4.0 && ((aa * 9.0).fract() < 0.35) {
                return t::CORTEX;
            }
            return t::MUSCLE;
        }
        let in_l = super::raster::ellipse_r2(x, y, liv.0, liv.1, liv.2, liv.3, 0.2) < 1.0
            || super::raster::ellipse_r2(x, y, lob.0, lob.1, lob.2, lob.3, -0.3) < 1.0;
        if in_l && d > z + 1.0 {
            return t::LIVER;
        }
        t::VISC_FAT
    });
    let only = |set: &'static [u8], new: u8| move |o: u8, _: f64| set.contains(&o).then_some(new);
    let soft_in: &'static [u8] = &[t::VISC_FAT, t::MUSCLE];
    // Spine, psoas.
    cv.ellipse(bx, spine_y, vb_r, vb_r * 0.9, 0.0, |_, r| Some(if r < 0.8 { t::MARROW } else { t::CORTEX }));
    cv.ellipse(bx, spine_y + vb_r + 8.0, 8.0, 7.0, 0.0, |_, _| Some(t::FLUID));
    cv.ellipse(bx, spine_y + vb_r + 25.0, 4.0, 14.0, 0.0, |_, _| Some(t::CORTEX));
    for s in [-1.0, 1.0] {
        cv.ellipse(bx + s * 25.0, spine_y + vb_r + 6.0, 16.0, 5.0, s * 0.3, |_, _| Some(t::CORTEX));
        cv.ellipse(bx + s * (vb_r + 10.0), spine_y - 2.0, u(rng, 8.0, 14.0), u(rng, 10.0, 16.0), 0.0, only(soft_in, t::MUSCLE));
    }
    // Kidneys, spleen, stomach, bowel.
    let both_kidneys = rng.gen_bool(0.6);
    for s in [-1.0, 1.0] {
        if s < 0.0 && !both_kidneys {
            continue;
        }
        let (kx, ky) = (bx + s * u(rng, 50.0, 70.0), spine_y - u(rng, 0.0, 15.0));
        let kr = u(rng, 20.0, 30.0);
        cv.ellipse(kx, ky, kr, kr * 1.2, s * 0.5, |o, _| (o != t::CORTEX && o != t::MARROW).then_some(t::KIDNEY));
    }
    let sp = (bx + ai * u(rng, 0.55, 0.75), by + bi * u(rng, 0.2, 0.45));
    cv.ellipse(sp.0, sp.1, u(rng, 22.0, 38.0), u(rng, 35.0, 60.0), u(rng, -0.8, -0.3), only(&[t::VISC_FAT], t::SPLEEN));
    let st = (bx + ai * u(rng, 0.25, 0.45), by - bi * u(rng, 0.15, 0.45));
    let (sa, sb) = (u(rng, 30.0, 55.0), u(rng, 25.0, 40.0));
    let gas_level = st.1 - sb * u(rng, 0.2, 1.0);
    let oral = rng.gen_bool(0.2);
    cv.ellipse(st.0, st.1, sa, sb, 0.3, |o, r| {
        if o != t::VISC_FAT && o != t::LIVER {
            return None;
        }
        Some(if r > 0.8 { t::WALL } else { t::FLUID })
    });
    // air-fluid level: anterior part of the lumen is gas
    let sc = cv.sub_cols();
    for sr in 0..2 * n {
        for c in 0..sc {
            let i = sr * sc + c;
            if cv.labels[i] == t::FLUID {
                let (x, y) = cv.sub_xy(sr, c);
                if super::raster::ellipse_r2(x, y, st.0, st.1, sa, sb, 0.3) < 0.8 {
                    cv.labels[i] = if y < gas_level { t::GAS } else if oral { t::ORAL } else { t::FLUID };
                }
            }
        }
    }
    for _ in 0..rng.gen_range(2..8) {
        let (x, y) = (bx + u(rng, -0.2, 0.6) * ai, by + u(rng, -0.8, 0.1) * bi);
        let r = u(rng, 8.0, 18.0);
        let content = match rng.gen_range(0..10) {
            0..=4 => t::FLUID,
            5..=7 => t::GAS,
            _ => t::ORAL,
        };
        cv.ellipse(x, y, r, r * u(rng, 0.6, 1.0), u(rng, 0.0, PI), |o, rr| {
            (o == t::VISC_FAT).then_some(if rr > 0.75 { t::WALL } else { content })
        });
    }
    // Vessels.
    let ar = u(rng, 9.0, 13.0);
    cv.ellipse(bx + u(rng, 5.0, 15.0), spine_y - vb_r - ar - 2.0, ar, ar, 0.0, |_, _| Some(t::AORTA));
    let ivc = (bx - u(rng, 18.0, 30.0), spine_y - vb_r - u(rng, 8.0, 16.0));
    cv.ellipse(ivc.0, ivc.1, u(rng, 10.0, 14.0), u(rng, 7.0, 10.0), 0.3, |_, _| Some(t::VEIN));
    let liver_only: &'static [u8] = &[t::LIVER];
    let pv = (bx - ai * u(rng, 0.15, 0.3), by - bi * u(rng, -0.05, 0.15));
    cv.ellipse(pv.0, pv.1, u(rng, 6.0, 9.0), u(rng, 5.0, 7.0), u(rng, 0.0, PI), only(liver_only, t::VEIN));
    for _ in 0..rng.gen_range(3..9) {
        let a = u(rng, 0.0, 2.0 * PI);
        let l = u(rng, 20.0, 70.0);
        let r = u(rng, 1.5, 5.0);
        let p1 = (pv.0 + l * a.cos(), pv.1 + l * a.sin());
        cv.capsule(pv, p1, r, only(liver_only, t::VEIN));
    }
    // Gallbladder and cysts: fluid-density confounders inside/next to the liver.
    if rng.gen_bool(0.4) {
        let (x, y) = (liv.0 + liv.2 * u(rng, 0.2, 0.6), liv.1 - liv.3 * u(rng, 0.4, 0.8));
        cv.ellipse(x, y, u(rng, 12.0, 20.0), u(rng, 15.0, 30.0), u(rng, 0.0, PI), only(&[t::LIVER, t::VISC_FAT], t::BILE));
    }
    let mut cysts = 0;
    for _ in 0..rng.gen_range(0..3) {
        if rng.gen_bool(0.5) {
            let (x, y) = (liv.0 + liv.2 * u(rng, -0.6, 0.6), liv.1 + liv.3 * u(rng, -0.6, 0.6));
            let r = u(rng, 3.0, 9.0);
            cv.ellipse(x, y, r, r, 0.0, only(liver_only, t::CYST));
            cysts += 1;
        }
    }
    // Phase-dependent HU.
    let phase = match rng.gen_range(0..10) {
        0..=2 => "non-contrast",
        3..=5 => "arterial",
        _ => "portal-venous",
    };
    let (liver, aorta, vein, spleen, kidney) = match phase {
        "non-contrast" => (u(rng, 50.0, 65.0), u(rng, 35.0, 50.0), u(rng, 35.0, 50.0), u(rng, 40.0, 50.0), u(rng, 25.0, 35.0)),
        "arterial" => (u(rng, 65.0, 85.0), u(rng, 220.0, 350.0), u(rng, 100.0, 160.0), u(rng, 80.0, 120.0), u(rng, 150.0, 220.0)),
        _ => (u(rng, 95.0, 120.0), u(rng, 140.0, 190.0), u(rng, 150.0, 200.0), u(rng, 100.0, 125.0), u(rng, 140.0, 190.0)),
    };
    // Tumours: centres drawn from liver sub-samples.
    let liver_px: Vec<usize> = (0..cv.labels.len()).filter(|&i| cv.labels[i] == t::LIVER).collect();
    let n_t = if rng.gen_bool(0.15) || liver_px.is_empty() { 0 } else { 1 + (u(rng, 0.0, 1.0).powi(2) * 5.0) as usize };
    let mut tumours = Vec::new();
    let mut tumour_hu = Vec::new();
    for k in 0..n_t {
        let i = liver_px[rng.gen_range(0..liver_px.len())];
        let (x, y) = cv.sub_xy(i / sc, i % sc);
        let dia = (u(rng, 5f64.ln(), 60f64.ln())).exp();
        let kind = match rng.gen_range(0..20) {
            0..=11 => "hypodense",
            12..=16 => "hyperdense",
            _ => "rim-enhancing",
        };
        let (core, rim) = match kind {
            "hypodense" => ((liver - u(rng, 25.0, 70.0)).clamp(8.0, 50.0), None),
            "hyperdense" => (u(rng, 120.0, 180.0), None),
            _ => (u(rng, 15.0, 40.0), Some((u(rng, 110.0, 160.0), u(rng, 0.6, 0.85)))),
        };
        let ecc = u(rng, 0.75, 1.0);
        let rot = u(rng, 0.0, PI);
        let (a, b) = (dia / 2.0, dia / 2.0 * ecc);
        let lab_core = t::TUMOUR; // core label
        cv.ellipse(x, y, a, b, rot, |o, r2| {
            if o != t::LIVER && o != t::VEIN && o != t::CYST {
                return None;
            }
            match rim {
                Some((_, inner)) if r2 > inner * inner => Some(t::RIM),
                _ => Some(lab_core),
            }
        });
        tumour_hu.push((core, rim.map(|r| r.0)));
        tumours.push(json!({"index": k, "kind": kind, "diameter_mm": dia, "core_hu": core, "rim_hu": rim.map(|r| r.0), "centre_mm": [x, y]}));
    }
    // Table.
    let table_top = by + radius.at(FRAC_PI_2) + u(rng, 1.0, 8.0);
    cv.capsule((bx - 230.0, table_top + 5.0), (bx + 230.0, table_top + 5.0), 4.0, |o, _| (o == t::AIR).then_some(t::TABLE));

    let fat = u(rng, -115.0, -85.0);
    let mut base = [0f64; t::N];
    base[t::AIR as usize] = -1000.0;
    base[t::SKIN as usize] = u(rng, 20.0, 60.0);
    base[t::SUBCUT_FAT as usize] = fat;
    base[t::VISC_FAT as usize] = fat + u(rng, -5.0, 10.0);
    base[t::MUSCLE as usize] = u(rng, 38.0, 58.0);
    base[t::LIVER as usize] = liver;
    base[t::SPLEEN as usize] = spleen;
    base[t::KIDNEY as usize] = kidney;
    base[t::WALL as usize] = u(rng, 30.0, 60.0);
    base[t::FLUID as usize] = u(rng, 0.0, 20.0);
    base[t::GAS as usize] = -950.0;
    base[t::AORTA as usize] = aorta;
    base[t::VEIN as usize] = vein;
    base[t::CORTEX as usize] = u(rng, 600.0, 950.0);
    base[t::MARROW as usize] = u(rng, 150.0, 280.0);
    base[t::BILE as usize] = u(rng, 0.0, 20.0);
    base[t::CYST as usize] = u(rng, -2.0, 12.0);
    base[t::TABLE as usize] = u(rng, -350.0, -150.0);
    base[t::ORAL as usize] = u(rng, 150.0, 400.0);
    let tex = ValueNoise::new(rng, [x0 - 10.0, y0 - 10.0, 0.0], [x0 + fov + 10.0, y0 + fov + 10.0, 1.0], 3.0);
    let tum_tex = ValueNoise::new(rng, [x0 - 10.0, y0 - 10.0, 0.0], [x0 + fov + 10.0, y0 + fov + 10.0, 1.0], 2.0);
    // Tumour HU per position: nearest tumour's core/rim (tumours rarely overlap).
    let tum_centres: Vec<(f64, f64, f64, Option<f64>)> = tumours
        .iter()
        .zip(&tumour_hu)
        .map(|(j, &(c, r))| (j["centre_mm"][0].as_f64().unwrap_or(0.0), j["centre_mm"][1].as_f64().unwrap_or(0.0), c, r))
        .collect();
    let nearest = |x: f64, y: f64| {
        tum_centres
            .iter()
            .min_by(|a, b| ((a.0 - x).powi(2) + (a.1 - y).powi(2)).total_cmp(&((b.0 - x).powi(2) + (b.1 - y).powi(2))))
            .copied()
    };
    let hu_of = |l: u8, x: f64, y: f64| -> f32 {
        let tx = tex.at(x, y, 0.0) as f64;
        (match l {
            t::TUMOUR => nearest(x, y).map_or(40.0, |n| n.2) + 10.0 * tum_tex.at(x, y, 0.0) as f64,
            t::RIM => nearest(x, y).and_then(|n| n.3).unwrap_or(130.0) + 8.0 * tx,
            t::LIVER => liver + 5.0 * tx,
            t::SUBCUT_FAT | t::VISC_FAT => base[l as usize] + 8.0 * tx,
            t::MARROW => base[l as usize] + 40.0 * tx,
            t::SPLEEN => spleen + if phase == "arterial" { 25.0 * tex.at(x * 2.0, y * 2.0, 0.0) as f64 } else { 4.0 * tx },
            _ => base[l as usize] + 4.0 * tx,
        }) as f32
    };
    let sigma = u(rng, 8.0, 25.0);
    let signed = rng.gen_bool(0.5);
    let padding_hu = rng.gen_bool(0.4).then_some(if signed { -2000 } else { -1024 });
    let (hu, lab) = cv.render(rng, hu_of, sigma, padding_hu);
    let mut mask = vec![0u8; n * n];
    let mut thresh = 0usize;
    for i in 0..n * n {
        let inr = hu[i] >= -20 && hu[i] <= 200;
        if inr && (lab[i] == t::TUMOUR || lab[i] == t::RIM) {
            mask[i] = 1;
        }
        if inr && lab[i] == t::LIVER {
            thresh += 1;
        }
    }
    let px_cm2 = spacing * spacing / 100.0;
    let value = mask.iter().filter(|&&m| m == 1).count() as f64 * px_cm2;
    Phantom {
        rows: n,
        cols: n,
        slices: 1,
        spacing: [spacing, spacing],
        thickness: if rng.gen_bool(0.5) { 2.5 } else { 5.0 },
        origin: [x0, y0, u(rng, -300.0, -150.0)],
        hu,
        mask,
        signed,
        padding_hu,
        value,
        risk: None,
        kvp: if rng.gen_bool(0.8) { 120.0 } else { 100.0 },
        extra: json!({
            "tumours": tumours,
            "hu_range": [-20, 200],
            "phase": phase,
            "liver_hu": liver,
            "cysts": cysts,
            "liver_in_range_area_cm2": thresh as f64 * px_cm2,
            "noise_sigma_hu": sigma,
            "fov_mm": fov,
        }),
    }
}
