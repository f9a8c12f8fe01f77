//! Anatomical landmarks found from HU structure: the axial level "just above
//! the aortic arch", where PMA and SFA are measured.
//!
//! **Input.** An assembled [`Volume`] (HU, sorted slices, geometry). Pure
//! code on the HU array: no model, no ONNX, no I/O.
//!
//! **Output.** An [`ArchLevel`]: the index and patient z of the chosen slice,
//! with the carina and arch-top levels it was derived from.
//!
//! **Method** (every step is a property of chest anatomy that holds with or
//! without IV contrast, at any slice thickness up to ~5 mm):
//! 1. *Trachea.* In each axial slice, the air components (< −950 HU: air,
//!    below lung parenchyma at about −850; −900 in 5 mm slabs, where the
//!    lumen averages with its wall, see `air_threshold`) that do not touch
//!    the image border (outside air, which reaches the border), of
//!    0.15–8 cm², whose surrounding ring (1.5–4.2 mm out) is mostly soft
//!    tissue (> −500 HU): an airway has a wall, a lung pocket or air outside
//!    the skin does not.
//!    Going caudally from the top of the volume, the trachea starts as the
//!    one such component of at least 0.5 cm² within 35 mm of the body's
//!    left-right midline, and is followed slice to slice (centroid step
//!    < 8 mm and at most 3 mm left-right: the trachea runs along z, so an
//!    airway further to the side is a main bronchus, never the trachea's
//!    next cut). Hits may be up to 10 mm of z apart, for mucus, partial
//!    volume or noise breaking its air below −950 HU (chest-lidc0001 loses
//!    it over ~7 mm at the arch, −103 to −109 mm): a length in mm, so the
//!    same stretch is bridged at 1 mm as at 5 mm slices.
//! 2. *Carina.* The trachea ends where, within 25 mm of its last centroid,
//!    there are airways on both sides of it and none at it: the two main
//!    bronchi. They need not show in the same slice: at 1 mm one bronchus
//!    separates from the carinal ridge a slice or two before the other, so
//!    the sides seen since the last slice with an airway at the trachea's
//!    place count together (at most the 10 mm above). It counts only after
//!    at least 40 mm of followed trachea and
//!    with lung (< −400 HU, not reaching the border, ≥ 20 cm²) on both sides:
//!    a head (pharynx, sinuses) or an abdomen (bowel gas) has no such split.
//!    No carina: [`LandmarkError::NotFound`], the landmark is not there.
//! 3. *Top of the arch.* The arch passes along the patient-left side of the
//!    trachea, from anterior (ascending aorta) to posterior (descending
//!    aorta), just above the carina. So from the carina cranially, the box
//!    2–32 mm lateral of the tracheal wall on the patient-left side and
//!    ±15 mm antero-posterior of the trachea's centre is mostly vessel or
//!    soft tissue (> −20 HU: blood is ~40 HU without contrast, fat is
//!    −100): aorta, then the arch. Above the arch the same box holds the thin
//!    left carotid and subclavian arteries in fat and lung, and its fill drops
//!    well below half (chest-lidc0001: 0.72–0.91 below the top, 0.53 at the
//!    top, 0.31 one slice above, 0.17 higher). The top of the arch is the
//!    most cranial slice of the run of filled boxes (fill ≥ 0.5) that starts
//!    within 40 mm above the carina; gaps longer than 3 mm end the run.
//! 4. *The slice.* The first slice cranial of the arch top. When step 3
//!    finds no run (or one that ends less than 10 or more than 70 mm above
//!    the carina), the top of the arch is taken as the carina + 35 mm: in
//!    adults the carina lies at T4–T5 and the top of the arch about one and a
//!    half vertebral levels higher (on chest-lidc0001, carina −115 mm, arch
//!    top −80 mm). The offset is the fallback only; the HU finding wins.
//!
//! Patient left is +x (LPS); the column direction of the image tells which
//! way that is. Only axial stacks (normal within ~25° of z, rows along x)
//! are searched; anything else is [`LandmarkError::NotFound`].
//!
//! **Failure modes.** [`LandmarkError::NotFound`] with the reason: not
//! axial, no trachea, no carina, or the volume ends below the slice above
//! the arch. All are properties of the series (permanent).


use ndarray::ArrayView2;

use super::Volume;

/// Air inside airways; lung parenchyma (~−850) stays above it.
const AIR_HU: f32 = -950.0;
/// The same for a 5 mm slab ([`air_threshold`]).
const AIR_HU_5MM: f32 = -900.0;
/// Soft tissue (walls, mediastinum, the body outline) versus air and lung.
const TISSUE_HU: f32 = -500.0;
/// Lung and airways together, for the "lungs on both sides" check.
const LUNG_HU: f32 = -400.0;
/// Blood (with or without contrast) and soft tissue versus fat.
const VESSEL_HU: f32 = -20.0;

const AIRWAY_MIN_CM2: f64 = 0.15;
const AIRWAY_MAX_CM2: f64 = 8.0;
const TRACHEA_MIN_CM2: f64 = 0.5;
const RING_INNER_MM: f64 = 1.5;
const RING_OUTER_MM: f64 = 4.2;
const AIRWAY_RING_MIN: f64 = 0.5;
const TRACHEA_RING_MIN: f64 = 0.7;
const MIDLINE_MM: f64 = 35.0;
const TRACK_STEP_MM: f64 = 8.0;
const TRACK_GAP_MM: f64 = 10.01;
const BRONCHI_RADIUS_MM: f64 = 25.0;
const BRONCHI_DY_MM: f64 = 15.0;
const BRONCHI_DX_MM: f64 = 3.0;
const MIN_TRACHEA_MM: f64 = 40.0;
const LUNG_MIN_CM2: f64 = 20.0;
const LUNG_COMPONENT_MIN_CM2: f64 = 5.0;

const ARCH_BOX_NEAR_MM: f64 = 2.0;
const ARCH_BOX_FAR_MM: f64 = 32.0;
const ARCH_BOX_HALF_AP_MM: f64 = 15.0;
const ARCH_FILL_MIN: f64 = 0.5;
const ARCH_SEARCH_MM: f64 = 80.0;
const ARCH_FIRST_HIT_MM: f64 = 40.0;
const ARCH_GAP_MM: f64 = 3.01;
const ARCH_TOP_MIN_MM: f64 = 10.0;
const ARCH_TOP_MAX_MM: f64 = 70.0;
/// Fallback: the top of the arch above the carina (see the module doc).
pub const CARINA_TO_ARCH_TOP_MM: f64 = 35.0;

/// The slice just above the aortic arch and how it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchLevel {
    /// Index of the chosen slice in the volume's sorted stack.
    pub index: usize,
    /// Its patient z (ImagePositionPatient z, mm).
    pub z_mm: f64,
    /// Patient z of the carina (the slice where the trachea splits).
    pub carina_z_mm: f64,
    /// Patient z of the top of the arch as found from HU; `None` when the
    /// carina offset [`CARINA_TO_ARCH_TOP_MM`] was used instead.
    pub arch_top_z_mm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LandmarkError {
    #[error("the aortic arch is not in this series: {0}")]
    NotFound(String),
}

fn not_found(reason: impl Into<String>) -> LandmarkError {
    LandmarkError::NotFound(reason.into())
}

/// An airway candidate in one slice, in mm from the image's top-left corner.
#[derive(Debug, Clone, Copy)]
struct Airway {
    area_cm2: f64,
    x_mm: f64,
    y_mm: f64,
    ring_tissue: f64,
}

/// A slice's geometry for the 2-D steps.
#[derive(Clone, Copy)]
struct Grid {
    rows: usize,
    cols: usize,
    /// Between rows (y), between columns (x), mm.
    dy: f64,
    dx: f64,
}

impl Grid {
    fn area_cm2(&self, pixels: usize) -> f64 {
        pixels as f64 * self.dx * self.dy / 100.0
    }
}

/// The 4-connected components of `mask` that do not touch the image border,
/// each as its pixels (in no particular order: every use is a count, a sum
/// of whole numbers or the seeds of a breadth-first walk). Every step wants
/// only these: an airway or a lung is enclosed by the body. So what touches
/// the border, mostly the air around the body, is walked once from the
/// border and never listed (it was a twelfth of a 300-slice chest job).
fn enclosed_components(mask: &[bool], g: Grid) -> Vec<Vec<usize>> {
    if g.rows == 0 || g.cols == 0 {
        return Vec::new();
    }
    let mut seen = vec![false; mask.len()];
    let mut stack = Vec::new();
    // Depth first: the order of a component's pixels does not matter, and a
    // stack is cheaper than a queue.
    let mut fill = |start: usize, seen: &mut [bool], mut list: Option<&mut Vec<usize>>| {
        if !mask[start] || seen[start] {
            return;
        }
        seen[start] = true;
        stack.push(start);
        while let Some(p) = stack.pop() {
            if let Some(l) = list.as_deref_mut() {
                l.push(p);
            }
            let (r, col) = (p / g.cols, p % g.cols);
            let mut visit = |q: usize| {
                if mask[q] && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            };
            if r > 0 {
                visit(p - g.cols);
            }
            if r + 1 < g.rows {
                visit(p + g.cols);
            }
            if col > 0 {
                visit(p - 1);
            }
            if col + 1 < g.cols {
                visit(p + 1);
            }
        }
    };
    let last_row = (g.rows - 1) * g.cols;
    for c in 0..g.cols {
        fill(c, &mut seen, None);
        fill(last_row + c, &mut seen, None);
    }
    for r in 0..g.rows {
        fill(r * g.cols, &mut seen, None);
        fill(r * g.cols + g.cols - 1, &mut seen, None);
    }
    let mut out = Vec::new();
    for start in 0..mask.len() {
        if mask[start] && !seen[start] {
            let mut pixels = Vec::new();
            fill(start, &mut seen, Some(&mut pixels));
            out.push(pixels);
        }
    }
    out
}

/// Fraction of soft tissue in the ring between `RING_INNER_MM` and
/// `RING_OUTER_MM` (4-connected steps) around a component. `dist` is
/// scratch of one entry per pixel, all `u32::MAX`, and is left so: a
/// breadth-first walk in a hash map was a tenth of a thin chest's arch
/// level.
fn ring_tissue(hu: &[f32], pixels: &[usize], g: Grid, dist: &mut [u32]) -> f64 {
    let px = g.dx.min(g.dy);
    let inner = (RING_INNER_MM / px).round().max(1.0) as u32;
    let outer = ((RING_OUTER_MM / px).round() as u32).max(inner + 1);
    // Breadth first, so `queue` is also the list of pixels given a distance.
    let mut queue: Vec<usize> = Vec::with_capacity(pixels.len() * 4);
    for &p in pixels {
        dist[p] = 0;
        queue.push(p);
    }
    let (mut tissue, mut total) = (0usize, 0usize);
    let mut head = 0;
    while head < queue.len() {
        let p = queue[head];
        head += 1;
        let d = dist[p];
        if d > inner {
            total += 1;
            if hu[p] > TISSUE_HU {
                tissue += 1;
            }
        }
        if d == outer {
            continue;
        }
        let (r, c) = (p / g.cols, p % g.cols);
        let mut visit = |q: usize| {
            if dist[q] == u32::MAX {
                dist[q] = d + 1;
                queue.push(q);
            }
        };
        if r > 0 {
            visit(p - g.cols);
        }
        if r + 1 < g.rows {
            visit(p + g.cols);
        }
        if c > 0 {
            visit(p - 1);
        }
        if c + 1 < g.cols {
            visit(p + 1);
        }
    }
    for &p in &queue {
        dist[p] = u32::MAX;
    }
    if total == 0 {
        0.0
    } else {
        tissue as f64 / total as f64
    }
}

fn centroid(pixels: &[usize], g: Grid) -> (f64, f64) {
    let n = pixels.len() as f64;
    let (mut sx, mut sy) = (0.0, 0.0);
    for &p in pixels {
        sy += (p / g.cols) as f64;
        sx += (p % g.cols) as f64;
    }
    (sx / n * g.dx, sy / n * g.dy)
}

/// Airway candidates of one slice and the body's left-right midline (mm).
fn airways(hu: &[f32], g: Grid, air_hu: f32) -> (Vec<Airway>, Option<f64>) {
    let mut first = usize::MAX;
    let mut last = 0;
    for row in hu.chunks_exact(g.cols) {
        if let Some(c) = row.iter().position(|v| *v > TISSUE_HU) {
            first = first.min(c);
            last = last.max(g.cols - 1 - row.iter().rev().position(|v| *v > TISSUE_HU).expect("one was found"));
        }
    }
    if first == usize::MAX {
        return (Vec::new(), None);
    }
    let midline = (first + last) as f64 / 2.0 * g.dx;
    let air: Vec<bool> = hu.iter().map(|v| *v < air_hu).collect();
    let mut out = Vec::new();
    let mut dist = Vec::new();
    for pixels in enclosed_components(&air, g) {
        let area = g.area_cm2(pixels.len());
        if !(AIRWAY_MIN_CM2..=AIRWAY_MAX_CM2).contains(&area) {
            continue;
        }
        if dist.is_empty() {
            dist = vec![u32::MAX; hu.len()];
        }
        let ring = ring_tissue(hu, &pixels, g, &mut dist);
        if ring < AIRWAY_RING_MIN {
            continue;
        }
        let (x_mm, y_mm) = centroid(&pixels, g);
        out.push(Airway {
            area_cm2: area,
            x_mm,
            y_mm,
            ring_tissue: ring,
        });
    }
    (out, Some(midline))
}

/// Lung area (cm²) on each side of `x_mm`: enclosed components below
/// [`LUNG_HU`] of at least [`LUNG_COMPONENT_MIN_CM2`].
fn lungs_each_side(hu: &[f32], g: Grid, x_mm: f64) -> (f64, f64) {
    let lung: Vec<bool> = hu.iter().map(|v| *v < LUNG_HU).collect();
    let (mut low, mut high) = (0usize, 0usize);
    for pixels in enclosed_components(&lung, g) {
        if g.area_cm2(pixels.len()) < LUNG_COMPONENT_MIN_CM2 {
            continue;
        }
        for &p in &pixels {
            if ((p % g.cols) as f64) * g.dx < x_mm {
                low += 1;
            } else {
                high += 1;
            }
        }
    }
    (g.area_cm2(low), g.area_cm2(high))
}

/// Fraction of vessel/soft-tissue HU in the box beside the trachea on the
/// patient-left side (see step 3 of the module doc).
fn arch_fill(slice: ArrayView2<'_, f32>, g: Grid, trachea: &Airway, left_sign: f64) -> f64 {
    let radius = (trachea.area_cm2 * 100.0 / std::f64::consts::PI).sqrt();
    let a = trachea.x_mm + left_sign * (radius + ARCH_BOX_NEAR_MM);
    let b = trachea.x_mm + left_sign * (radius + ARCH_BOX_FAR_MM);
    let (x0, x1) = (a.min(b), a.max(b));
    let (y0, y1) = (trachea.y_mm - ARCH_BOX_HALF_AP_MM, trachea.y_mm + ARCH_BOX_HALF_AP_MM);
    let clamp_c = |x: f64| ((x / g.dx).round().max(0.0) as usize).min(g.cols);
    let clamp_r = |y: f64| ((y / g.dy).round().max(0.0) as usize).min(g.rows);
    let (c0, c1, r0, r1) = (clamp_c(x0), clamp_c(x1), clamp_r(y0), clamp_r(y1));
    let (mut filled, mut total) = (0usize, 0usize);
    for r in r0..r1 {
        for c in c0..c1 {
            total += 1;
            if slice[[r, c]] > VESSEL_HU {
                filled += 1;
            }
        }
    }
    if total == 0 {
        0.0
    } else {
        filled as f64 / total as f64
    }
}

fn dist(a: &Airway, x: f64, y: f64) -> f64 {
    (a.x_mm - x).hypot(a.y_mm - y)
}

/// The airway air threshold for slices `thickness_mm` thick: [`AIR_HU`] up
/// to 2.5 mm, rising linearly to [`AIR_HU_5MM`] at 5 mm and staying there.
/// A slab averages an airway's lumen with the wall above and below it where
/// the airway runs oblique to z, as the main bronchi do at the carina; the
/// thicker the slab, the more. In chest-lidc0001 averaged into 5 mm slabs the
/// left main bronchus never reaches −950 HU, so only one bronchus was seen
/// and no carina found; at −900 both show. Lung parenchyma (about −850, and
/// −950 only in emphysema) stays above −900, and an airway also needs its
/// ring of wall ([`AIRWAY_RING_MIN`]), which a pocket of lung has not.
fn air_threshold(thickness_mm: Option<f64>) -> f32 {
    let t = thickness_mm.filter(|t| t.is_finite()).unwrap_or(0.0);
    let w = ((t - 2.5) / 2.5).clamp(0.0, 1.0) as f32;
    AIR_HU + (AIR_HU_5MM - AIR_HU) * w
}

/// The slice just above the aortic arch (module doc), or why it is not in
/// the volume.
pub fn above_aortic_arch(vol: &Volume) -> Result<ArchLevel, LandmarkError> {
    let n = vol.slices();
    if n < 2 {
        return Err(not_found("a single slice has no trachea to follow"));
    }
    // Axial, rows along patient x: the column direction is ±x.
    if vol.normal[2].abs() < 0.9 || vol.orientation[0].abs() < 0.9 {
        return Err(not_found(format!(
            "not an axial stack (ImageOrientationPatient {:?})",
            vol.orientation
        )));
    }
    let left_sign = vol.orientation[0].signum();
    let (rows, cols) = (vol.hu.shape()[1], vol.hu.shape()[2]);
    let g = Grid {
        rows,
        cols,
        dy: vol.pixel_spacing[0],
        dx: vol.pixel_spacing[1],
    };
    let z = |i: usize| vol.positions[i][2];
    // SliceThickness is what each slice averages; the spacing stands in
    // only when it is absent (thin slices far apart average nothing).
    let air_hu = air_threshold(vol.slice_thickness.or(vol.spacing_mm.map(f64::abs)));
    let mut cranial: Vec<usize> = (0..n).collect();
    cranial.sort_by(|a, b| z(*b).total_cmp(&z(*a)));

    struct Track {
        start_z: f64,
        last: Airway,
        last_z: f64,
        /// Airways seen on the lower-x and higher-x side of the trachea's
        /// place since the last slice with one at it (step 2).
        sides: (bool, bool),
        /// (slice index, trachea) for every slice it was seen in.
        seen: Vec<(usize, Airway)>,
    }
    let mut track: Option<Track> = None;
    let mut longest = 0.0f64;
    let mut carina: Option<(usize, Track)> = None;
    // A slice's airways do not depend on the track: they are found a batch
    // of slices ahead, side by side, and the track reads them in order. The
    // other jobs of the series wait for this level, so it is on their path.
    let threads = crate::par::threads();
    let mut ahead = std::collections::VecDeque::new();
    for (k, &i) in cranial.iter().enumerate() {
        if ahead.is_empty() {
            let batch = &cranial[k..(k + threads * AIRWAY_BATCH_PER_THREAD).min(n)];
            ahead.extend(airways_of(vol, batch, g, air_hu, threads));
        }
        let (cands, midline) = ahead.pop_front().expect("a batch starts at this slice");
        let slice = vol.slice(i).expect("index from 0..n");
        let hu = slice.as_standard_layout();
        let hu = hu.as_slice().expect("standard layout");
        let Some(mut t) = track.take() else {
            let Some(mid) = midline else { continue };
            let starts: Vec<&Airway> = cands
                .iter()
                .filter(|a| {
                    a.area_cm2 >= TRACHEA_MIN_CM2
                        && a.ring_tissue >= TRACHEA_RING_MIN
                        && (a.x_mm - mid).abs() < MIDLINE_MM
                })
                .collect();
            if let [a] = starts[..] {
                track = Some(Track {
                    start_z: z(i),
                    last: *a,
                    last_z: z(i),
                    sides: (false, false),
                    seen: vec![(i, *a)],
                });
            }
            continue;
        };
        let (px, py) = (t.last.x_mm, t.last.y_mm);
        let near: Vec<&Airway> = cands
            .iter()
            .filter(|a| dist(a, px, py) < BRONCHI_RADIUS_MM && (a.y_mm - py).abs() < BRONCHI_DY_MM)
            .collect();
        let at_trachea = |a: &&&Airway| (a.x_mm - px).abs() <= BRONCHI_DX_MM;
        let centred = near.iter().any(|a| at_trachea(&a));
        if centred {
            t.sides = (false, false);
        } else {
            t.sides.0 |= near.iter().any(|a| a.x_mm < px - BRONCHI_DX_MM);
            t.sides.1 |= near.iter().any(|a| a.x_mm > px + BRONCHI_DX_MM);
        }
        let split = !centred && t.sides.0 && t.sides.1;
        longest = longest.max(t.start_z - z(i));
        if split && t.start_z - z(i) >= MIN_TRACHEA_MM {
            let (lo, hi) = lungs_each_side(hu, g, px);
            if lo >= LUNG_MIN_CM2 && hi >= LUNG_MIN_CM2 {
                carina = Some((i, t));
                break;
            }
        }
        let closest = near
            .iter()
            .filter(|a| at_trachea(a) && dist(a, px, py) < TRACK_STEP_MM)
            .min_by(|a, b| dist(a, px, py).total_cmp(&dist(b, px, py)));
        if let Some(a) = closest {
            t.last = **a;
            t.last_z = z(i);
            t.seen.push((i, **a));
            track = Some(t);
        } else if t.last_z - z(i) <= TRACK_GAP_MM {
            track = Some(t);
        }
    }
    let Some((carina_index, t)) = carina else {
        return Err(not_found(if longest < MIN_TRACHEA_MM {
            format!("no trachea (an air column inside the body near the midline) of {MIN_TRACHEA_MM} mm or more")
        } else {
            "the trachea was followed but no carina (its split into the main bronchi, with lung on both sides) was found"
                .to_owned()
        }));
    };
    let carina_z = z(carina_index);

    // Step 3: from the carina cranially, the run of filled boxes on the
    // patient-left of the trachea.
    let trachea_at = |zi: f64| -> &Airway {
        &t.seen
            .iter()
            .min_by(|a, b| (z(a.0) - zi).abs().total_cmp(&(z(b.0) - zi).abs()))
            .expect("a track has at least its first slice")
            .1
    };
    let mut top: Option<f64> = None;
    for &i in cranial.iter().rev() {
        let zi = z(i);
        if zi <= carina_z {
            continue;
        }
        if zi - carina_z > ARCH_SEARCH_MM {
            break;
        }
        let fill = arch_fill(vol.slice(i).expect("index from 0..n"), g, trachea_at(zi), left_sign);
        match top {
            None if fill >= ARCH_FILL_MIN => {
                if zi - carina_z > ARCH_FIRST_HIT_MM {
                    break;
                }
                top = Some(zi);
            }
            Some(_) if fill >= ARCH_FILL_MIN => top = Some(zi),
            Some(t) if zi - t > ARCH_GAP_MM => break,
            _ => {}
        }
    }
    let found = top.filter(|t| (ARCH_TOP_MIN_MM..=ARCH_TOP_MAX_MM).contains(&(t - carina_z)));
    let arch_top = found.unwrap_or(carina_z + CARINA_TO_ARCH_TOP_MM);
    // Step 4: the first slice cranial of the arch top.
    let above = cranial
        .iter()
        .rev()
        .copied()
        .find(|&i| z(i) > arch_top + 1e-3)
        .filter(|&i| z(i) - arch_top <= vol.spacing_mm.unwrap_or(5.0).abs() + 1e-3)
        .ok_or_else(|| {
            not_found(format!(
                "the volume ends at z = {:.1} mm, not above the top of the arch (z = {arch_top:.1} mm; carina at {carina_z:.1} mm)",
                z(cranial[0])
            ))
        })?;
    Ok(ArchLevel {
        index: above,
        z_mm: z(above),
        carina_z_mm: carina_z,
        arch_top_z_mm: found,
    })
}

/// Slices a thread finds the airways of in one go, ahead of the track: the
/// slices past the carina in the last batch are work thrown away.
const AIRWAY_BATCH_PER_THREAD: usize = 8;

/// [`airways`] of the slices `idx` of `vol`, in that order, shared out
/// between `threads`.
fn airways_of(vol: &Volume, idx: &[usize], g: Grid, air_hu: f32, threads: usize) -> Vec<(Vec<Airway>, Option<f64>)> {
    let one = |i: usize| {
        let slice = vol.slice(i).expect("an index of the volume");
        let hu = slice.as_standard_layout();
        airways(hu.as_slice().expect("standard layout"), g, air_hu)
    };
    crate::par::map_runs(idx, threads, |run| run.iter().map(|&i| one(i)).collect::<Vec<_>>()).into_iter().flatten().collect()
}

/// What one axial slice shows of the airway at the level above the aortic
/// arch (see [`trachea_in_slice`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TracheaCut {
    /// Cross-section of the trachea (cm²), when one was found.
    pub area_cm2: Option<f64>,
    /// [`mediastinum_width`] (mm).
    pub mediastinum_mm: f64,
    /// Lung on the two sides of it (cm²): lower x, higher x.
    pub lungs_cm2: (f64, f64),
}

/// Bronchi, not a trachea: two airways side by side (within this much
/// antero-posterior, at least [`BRONCHI_PAIR_DX_MM`] apart left-right).
const BRONCHI_PAIR_DY_MM: f64 = 15.0;
const BRONCHI_PAIR_DX_MM: f64 = 10.0;

/// 3×3 box mean (edge pixels average the neighbours they have): one slice
/// cannot be followed along z to bridge noise, so the air threshold is
/// applied to a smoothed slice. Without it, tracheal air at −990 HU with
/// 30–40 HU of noise breaks into fragments below [`AIRWAY_MIN_CM2`].
fn box3(slice: ArrayView2<'_, f32>) -> Vec<f32> {
    let (rows, cols) = slice.dim();
    let mut out = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (mut sum, mut n) = (0.0f32, 0.0f32);
            for rr in r.saturating_sub(1)..(r + 2).min(rows) {
                for cc in c.saturating_sub(1)..(c + 2).min(cols) {
                    sum += slice[[rr, cc]];
                    n += 1.0;
                }
            }
            out[r * cols + c] = sum / n;
        }
    }
    out
}

/// The mediastinum of one slice: the left-right gap between the inner edges
/// of the two lungs, 90th percentile over the rows that cut both (mm), with
/// the lung area on each side (cm²). `None` without lung on both sides of
/// the body's midline.
pub fn mediastinum_width(slice: ArrayView2<'_, f32>, pixel_spacing: [f64; 2]) -> Option<(f64, (f64, f64))> {
    let (rows, cols) = slice.dim();
    let g = Grid { rows, cols, dy: pixel_spacing[0], dx: pixel_spacing[1] };
    let hu = box3(slice);
    let (_, midline) = airways(&hu, g, AIR_HU);
    mediastinum_of(&hu, g, midline?)
}

/// [`mediastinum_width`] of a smoothed slice (`box3`) whose midline (mm) is
/// known, so that [`trachea_in_slice`] smooths and walks its airways once.
fn mediastinum_of(hu: &[f32], g: Grid, midline: f64) -> Option<(f64, (f64, f64))> {
    let (rows, cols) = (g.rows, g.cols);
    let mid = (midline / g.dx).round() as usize;
    let lung: Vec<bool> = hu.iter().map(|v| *v < LUNG_HU).collect();
    let mut keep = vec![false; lung.len()];
    for pixels in enclosed_components(&lung, g) {
        if g.area_cm2(pixels.len()) >= LUNG_COMPONENT_MIN_CM2 {
            for p in pixels {
                keep[p] = true;
            }
        }
    }
    let (mut low, mut high) = (0usize, 0usize);
    let mut gaps = Vec::new();
    for r in 0..rows {
        let row = &keep[r * cols..(r + 1) * cols];
        let inner_low = (0..mid.min(cols)).rev().find(|&c| row[c]);
        let inner_high = (mid.min(cols)..cols).find(|&c| row[c]);
        low += row[..mid.min(cols)].iter().filter(|v| **v).count();
        high += row[mid.min(cols)..].iter().filter(|v| **v).count();
        if let (Some(a), Some(b)) = (inner_low, inner_high) {
            gaps.push((b - a) as f64 * g.dx);
        }
    }
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    let p90 = gaps[((gaps.len() - 1) as f64 * 0.9).round() as usize];
    Some((p90, (g.area_cm2(low), g.area_cm2(high))))
}

/// At the level just above the aortic arch the mediastinum is the trachea,
/// the oesophagus and the great vessels: the lungs come within a few cm of
/// each other (chest-lidc0001: 46 mm at the arch, 47-67 mm down to the
/// carina; phantoms 42-73 mm). At the heart they are 10 cm or more apart
/// (chest-lidc0001 at -160 mm: 103 mm; chest-lungmask: 130 mm).
pub const MEDIASTINUM_MAX_MM: f64 = 85.0;

/// Whether one axial slice is at the level just above the aortic arch. For
/// a single-image series this is the only level check there is: one slice
/// cannot be followed along z as [`above_aortic_arch`] does. It is, when
/// there is lung (at least [`LUNG_MIN_CM2`]) on both sides of the midline and
/// either
/// - the slice cuts the trachea: on the slice smoothed by a 3×3 box mean
///   (tracheal air at −990 HU with 30–40 HU of noise otherwise breaks into
///   fragments), an airway candidate of step 1 of the module doc, of at
///   least [`TRACHEA_MIN_CM2`], within [`MIDLINE_MM`] of the body's midline,
///   and not one of two side by side (the main bronchi, below the carina); or
/// - the mediastinum is narrow: [`mediastinum_width`] at most
///   [`MEDIASTINUM_MAX_MM`] (the arch itself can hide the trachea in the
///   training phantoms).
///
/// Refused: no lung on one side (neck, head, abdomen), or a wide mediastinum
/// with no trachea (the heart).
pub fn trachea_in_slice(slice: ArrayView2<'_, f32>, pixel_spacing: [f64; 2]) -> Result<TracheaCut, LandmarkError> {
    let (rows, cols) = slice.dim();
    let g = Grid { rows, cols, dy: pixel_spacing[0], dx: pixel_spacing[1] };
    let hu = box3(slice);
    let (cands, midline) = airways(&hu, g, AIR_HU);
    let Some((mid, (width, lungs))) = midline.and_then(|m| Some((m, mediastinum_of(&hu, g, m)?))) else {
        return Err(not_found("no lung on both sides of the body's midline (neck, head or abdomen?)"));
    };
    if lungs.0 < LUNG_MIN_CM2 || lungs.1 < LUNG_MIN_CM2 {
        return Err(not_found(format!(
            "too little lung on one side ({:.1} and {:.1} cm2, at least {LUNG_MIN_CM2} each): neck or lung bases?",
            lungs.0, lungs.1
        )));
    }
    let mut near: Vec<&Airway> = cands
        .iter()
        .filter(|a| a.area_cm2 >= TRACHEA_MIN_CM2 && (a.x_mm - mid).abs() < MIDLINE_MM)
        .collect();
    near.sort_by(|a, b| b.area_cm2.total_cmp(&a.area_cm2));
    let pair = near.iter().enumerate().any(|(i, a)| {
        near[i + 1..]
            .iter()
            .any(|b| (a.y_mm - b.y_mm).abs() < BRONCHI_PAIR_DY_MM && (a.x_mm - b.x_mm).abs() >= BRONCHI_PAIR_DX_MM)
    });
    let trachea = if pair { None } else { near.first().map(|t| t.area_cm2) };
    if trachea.is_none() && width > MEDIASTINUM_MAX_MM {
        return Err(not_found(format!(
            "{} and the lungs are {width:.0} mm apart (at most {MEDIASTINUM_MAX_MM:.0} mm above the arch): heart level?",
            if pair { "two main bronchi, no trachea," } else { "no trachea" }
        )));
    }
    Ok(TracheaCut { area_cm2: trachea, mediastinum_mm: width, lungs_cm2: lungs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{realct, require};
    use std::path::{Path, PathBuf};

    /// Against a plain labelling that keeps every component and drops those
    /// with a border pixel afterwards, on random masks of several densities
    /// (sparse: many small components; dense: one that percolates to the
    /// border) and shapes.
    #[test]
    fn enclosed_components_are_the_components_without_a_border_pixel() {
        fn reference(mask: &[bool], rows: usize, cols: usize) -> Vec<Vec<usize>> {
            let mut label = vec![usize::MAX; mask.len()];
            let mut comps: Vec<Vec<usize>> = Vec::new();
            for start in 0..mask.len() {
                if !mask[start] || label[start] != usize::MAX {
                    continue;
                }
                let id = comps.len();
                let mut todo = vec![start];
                label[start] = id;
                let mut pixels = Vec::new();
                while let Some(p) = todo.pop() {
                    pixels.push(p);
                    let (r, c) = (p / cols, p % cols);
                    let mut n = Vec::new();
                    if r > 0 { n.push(p - cols) }
                    if r + 1 < rows { n.push(p + cols) }
                    if c > 0 { n.push(p - 1) }
                    if c + 1 < cols { n.push(p + 1) }
                    for q in n {
                        if mask[q] && label[q] == usize::MAX {
                            label[q] = id;
                            todo.push(q);
                        }
                    }
                }
                comps.push(pixels);
            }
            let border = |p: usize| p / cols == 0 || p % cols == 0 || p / cols + 1 == rows || p % cols + 1 == cols;
            comps.retain(|c| !c.iter().any(|&p| border(p)));
            comps
        }
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let mut checked = 0;
        for (rows, cols) in [(1, 1), (1, 7), (7, 1), (2, 2), (3, 3), (17, 23), (64, 64)] {
            for density in [10u32, 40, 55, 70, 95] {
                let mask: Vec<bool> = (0..rows * cols).map(|_| next() % 100 < density).collect();
                let g = Grid { rows, cols, dy: 1.0, dx: 1.0 };
                let mut got = enclosed_components(&mask, g);
                let mut want = reference(&mask, rows, cols);
                for c in got.iter_mut().chain(want.iter_mut()) {
                    c.sort_unstable();
                }
                checked += want.len();
                assert_eq!(got, want, "{rows}x{cols} at {density} %");
            }
        }
        assert!(checked > 50, "the masks had {checked} enclosed components");
    }

    fn dcm_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(prefix) && !name.starts_with("DIRFILE")
            })
            .collect();
        v.sort();
        v
    }

    /// Reference level for shared/realct-labelled/chest-lidc0001 (LIDC-IDRI-0001,
    /// 2.5 mm slices, z −340..−10 mm, IV contrast), read by eye from axial
    /// renderings of z −120..−20 mm (soft-tissue window, zoomed on the
    /// mediastinum): at −80 mm the contrast-filled arch is one tube running
    /// from anterior to posterior on the patient-left of the trachea; at
    /// −77.5 mm only its three branches (brachiocephalic, left carotid, left
    /// subclavian) are cut as round vessels. The top of the arch is at
    /// −80 mm, so the slice just above it is at z = −77.5 mm. The carina
    /// (trachea split into the main bronchi, lung window) is at −112.5 to
    /// −115 mm.
    pub(crate) const LIDC0001_ABOVE_ARCH_Z_MM: f64 = -77.5;

    /// The real chest CT chest-lidc0001 from ../shared, or `None` (skipped
    /// outside CI, a failure in CI) where it is absent.
    fn lidc0001() -> Option<Volume> {
        let dir = require(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/realct-labelled/chest-lidc0001/ct"),
            "real chest CT chest-lidc0001",
        )?;
        Some(Volume::from_files(&dcm_files(&dir, "")).unwrap())
    }

    #[test]
    fn finds_the_slice_above_the_arch_on_a_real_chest_ct() {
        let Some(vol) = lidc0001() else {
            return;
        };
        let level = above_aortic_arch(&vol).unwrap();
        eprintln!("{level:?}");
        assert!(
            (level.z_mm - LIDC0001_ABOVE_ARCH_Z_MM).abs() <= 15.0,
            "{level:?} vs reference z {LIDC0001_ABOVE_ARCH_Z_MM}"
        );
        assert!((level.carina_z_mm - -113.75).abs() <= 5.0, "{level:?}");
        assert_eq!(level.z_mm, vol.positions[level.index][2]);
        // Found from HU, not from the fallback offset.
        assert!(level.arch_top_z_mm.is_some(), "{level:?}");
    }

    /// The method must not depend on IV contrast: the same scan with every
    /// contrast-enhanced voxel (150..600 HU: vessels and heart, some
    /// cancellous bone) set to unenhanced blood (40 HU) gives the same level
    /// within a slice or two.
    #[test]
    fn finds_the_same_level_without_contrast() {
        let Some(mut vol) = lidc0001() else {
            return;
        };
        vol.hu
            .mapv_inplace(|v| if (150.0..600.0).contains(&v) { 40.0 } else { v });
        let level = above_aortic_arch(&vol).unwrap();
        eprintln!("{level:?}");
        assert!((level.z_mm - LIDC0001_ABOVE_ARCH_Z_MM).abs() <= 5.0, "{level:?}");
    }

    /// The same scan along z as another scanner would reconstruct it: `zs`
    /// (ascending) by linear interpolation of HU between the two neighbouring
    /// slices, or every `k` slices averaged into one thick slice.
    fn resampled(vol: &Volume, zs: &[f64]) -> Volume {
        let z: Vec<f64> = vol.positions.iter().map(|p| p[2]).collect();
        assert!(z.windows(2).all(|w| w[0] < w[1]), "ascending z");
        let slices: Vec<ndarray::Array2<f32>> = zs
            .iter()
            .map(|&zi| {
                let k = z.partition_point(|v| *v <= zi).saturating_sub(1).min(z.len() - 2);
                let w = ((zi - z[k]) / (z[k + 1] - z[k])) as f32;
                &vol.slice(k).unwrap() * (1.0 - w) + &vol.slice(k + 1).unwrap() * w
            })
            .collect();
        with_slices(vol, slices, zs)
    }

    fn thick(vol: &Volume, k: usize) -> Volume {
        let n = vol.slices() / k;
        let slices: Vec<ndarray::Array2<f32>> = (0..n)
            .map(|j| (0..k).map(|i| vol.slice(j * k + i).unwrap().to_owned()).reduce(|a, b| a + b).unwrap() / k as f32)
            .collect();
        let zs: Vec<f64> =
            (0..n).map(|j| (0..k).map(|i| vol.positions[j * k + i][2]).sum::<f64>() / k as f64).collect();
        with_slices(vol, slices, &zs)
    }

    /// `vol` without its first `k` slices.
    fn shifted(vol: &Volume, k: usize) -> Volume {
        let slices: Vec<ndarray::Array2<f32>> = (k..vol.slices()).map(|i| vol.slice(i).unwrap().to_owned()).collect();
        let zs: Vec<f64> = vol.positions[k..].iter().map(|p| p[2]).collect();
        with_slices(vol, slices, &zs)
    }

    fn with_slices(vol: &Volume, slices: Vec<ndarray::Array2<f32>>, zs: &[f64]) -> Volume {
        let views: Vec<_> = slices.iter().map(|s| s.view()).collect();
        let mut out = vol.clone();
        out.hu = ndarray::stack(ndarray::Axis(0), &views).unwrap();
        let [x, y, _] = vol.positions[0];
        out.positions = zs.iter().map(|&z| [x, y, z]).collect();
        out.slice_positions = zs.to_vec();
        out.spacing_mm = Some(zs[1] - zs[0]);
        out.slice_thickness = out.spacing_mm;
        let n = zs.len();
        out.sop_instance_uids = (0..n).map(|i| format!("2.25.{i}")).collect();
        out.frame_numbers = vec![None; n];
        out.source_paths = vec![PathBuf::new(); n];
        out
    }

    /// Issue 11: thin-slice chest CT (lung screening is 0.6–1.25 mm) and
    /// thick (5 mm) reconstructions must give the level of the native 2.5 mm scan.
    /// At 1.1 mm the trachea used to be lost where its air breaks up at the
    /// arch (~7 mm, bridged at 2.5 mm only by the sampling), and it was then
    /// followed down one main bronchus, which showed a slice before the other.
    #[test]
    fn finds_the_level_at_1_to_5_mm_slices() {
        let Some(vol) = lidc0001() else {
            return;
        };
        let (z0, z1) = (vol.positions[0][2], vol.positions[vol.slices() - 1][2]);
        let linspace = |n: usize| -> Vec<f64> { (0..n).map(|i| z0 + (z1 - z0) * i as f64 / (n - 1) as f64).collect() };
        let step = |d: f64| -> Vec<f64> { (0..).map(|i| z0 + d * i as f64).take_while(|z| *z <= z1).collect() };
        for (name, v) in [
            ("300 slices of 1.1 mm (bench chest300)", resampled(&vol, &linspace(300))),
            ("1.25 mm", resampled(&vol, &step(1.25))),
            ("1.0 mm from z + 0.5", resampled(&vol, &step(1.0)[1..].iter().map(|z| z - 0.5).collect::<Vec<_>>())),
            // 5 mm slabs, the two ways of pairing the 2.5 mm slices. The left
            // main bronchus, oblique to z, never reaches −950 HU in them.
            ("5 mm slabs (pairs averaged)", thick(&vol, 2)),
            ("5 mm slabs from the second slice", thick(&shifted(&vol, 1), 2)),
        ] {
            let level = above_aortic_arch(&v).unwrap_or_else(|e| panic!("{name}: {e}"));
            eprintln!("{name}: {level:?}");
            assert!((level.z_mm - LIDC0001_ABOVE_ARCH_Z_MM).abs() <= 15.0, "{name}: {level:?}");
            assert!((level.carina_z_mm - -113.75).abs() <= 5.0, "{name}: {level:?}");
            assert!(level.arch_top_z_mm.is_some(), "{name}: {level:?}");
        }
    }

    /// The CAC route's 3 mm slabs of a thin chest (`resample::slabs`) take
    /// the level found on the thin slices (`resample::carry_arch_level`),
    /// so the heart region cuts everything above the carina. The bench's
    /// chest300nc (300 × 1.1 mm, contrast taken out) showed no carina in its
    /// own slabs, and calcium in the neck counted as coronary.
    #[test]
    fn thin_slices_give_their_level_to_the_cac_slabs() {
        let Some(vol) = lidc0001() else {
            return;
        };
        let (z0, z1) = (vol.positions[0][2], vol.positions[vol.slices() - 1][2]);
        let zs: Vec<f64> = (0..300).map(|i| z0 + (z1 - z0) * i as f64 / 299.0).collect();
        let mut thin = resampled(&vol, &zs);
        thin.hu.mapv_inplace(|v| if (150.0..600.0).contains(&v) { 40.0 } else { v });
        let source = above_aortic_arch(&thin).unwrap();
        let slabs = crate::volume::resample::slabs(&thin, 3.0).unwrap();
        eprintln!("slabs on their own: {:?}", above_aortic_arch(&slabs));
        crate::volume::resample::carry_arch_level(&thin, &slabs);
        let level = slabs.arch_level().unwrap().clone();
        assert_eq!(level.carina_z_mm, source.carina_z_mm);
        assert_eq!(level.z_mm, slabs.positions[level.index][2]);
        assert!((level.z_mm - source.z_mm).abs() <= 1.5, "{level:?} vs {source:?}");
        let region = crate::volume::heart::heart_region(&slabs).unwrap();
        let above: Vec<usize> = (0..slabs.slices())
            .filter(|&i| slabs.positions[i][2] > level.carina_z_mm + crate::volume::heart::ABOVE_CARINA_MM)
            .collect();
        assert!(above.len() > 20, "{} slabs above the carina", above.len());
        for i in above {
            assert!(
                region.reasons.index_axis(ndarray::Axis(0), i).iter().all(|r| *r == Some(crate::volume::heart::Exclusion::AboveArch)),
                "slab {i} at z {} is above the carina and not cut",
                slabs.positions[i][2]
            );
        }
    }

    #[test]
    fn a_head_ct_has_no_aortic_arch() {
        let Some(root) = realct() else { return };
        let vol = Volume::from_files(&dcm_files(&root.join("head-philips/S2010"), "I")).unwrap();
        let err = above_aortic_arch(&vol).unwrap_err();
        assert!(
            err.to_string().starts_with("the aortic arch is not in this series"),
            "{err}"
        );
    }

    #[test]
    fn a_small_abdominal_volume_has_no_aortic_arch() {
        let Some(root) = realct() else { return };
        let vol = Volume::from_files(&dcm_files(&root.join("abdomen-ge-3slice"), "")).unwrap();
        let err = above_aortic_arch(&vol).unwrap_err();
        assert!(err.to_string().contains("no trachea"), "{err}");
    }
}
