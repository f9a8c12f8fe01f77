//! Anatomical coverage found from HU: does an axial CT volume cover the
//! liver, as an abdominal scan does? Routing asks it (`covers: liver`) for a
//! series whose headers say nothing about the body part.
//!
//! **Input.** A [`Volume`], typically a sparse one: routing decodes only
//! every k-th slice (about one per 5 mm, at most 64 slices). Pure code on the
//! HU array: no model, no I/O. Pixels are read on a decimated grid (about
//! 2.5 mm), so one slice costs about 128 × 128 reads.
//!
//! **Output.** A [`LiverCoverage`]: the numbers the rule looked at and
//! whether it holds; its `Display` is the explanation `route` shows.
//!
//! **The rule, and why.** The liver lies under the right hemidiaphragm: its
//! dome sits in the diaphragm's concavity, surrounded by the lung bases
//! (the costophrenic recesses), and the rest of it — on 3D-IRCADb patient 7
//! 89 of its 155 mm — lies below the level where the lungs have shrunk away.
//! In each slice, *lung* is the inside of the body (the largest region not
//! reached from the image border through air) at −950..−400 HU: lung
//! parenchyma. Bowel and stomach gas is below −950 HU and does not count
//! (only its partial-volume rim does, ~1 % of the cross-section); a slice
//! whose low-density inside (< −400 HU) is not mostly parenchyma holds gas,
//! not lung, and has no lung at all (a distended colon), and so has a slice
//! whose body is smaller than an adult trunk (under 250 cm²: a head, an
//! air-filled head phantom, a neck).
//! 1. *Lung bases.* The lungs' lowest level `z_base` is the most caudal slice
//!    of the run of slices around the largest lung share in which lung takes
//!    at least [`LUNG_SHARE_MIN`] of the body's cross-section. No such run:
//!    the diaphragm, and with it the liver's dome, is not in the volume (a
//!    head, a pelvis, a lower abdomen) → not covered.
//! 2. *Most of the liver.* The volume reaches at least [`BELOW_BASE_MIN_MM`]
//!    below `z_base`: with the dome above `z_base`, that holds the liver's
//!    widest part and its right lobe down to near its tip (IRCAD patient 7:
//!    80 mm below `z_base` plus the dome is 146 of its 155 mm).
//! 3. *An abdominal scan, not a chest scan that reaches the liver.* At least
//!    [`BELOW_SHARE_MIN`] of the volume's cranio-caudal extent is below
//!    `z_base`. A chest CT spends most of its length on the lungs, from the
//!    apices to the bases (25–30 cm), and may end at the kidneys, with most
//!    of the liver in it (chest-lidc0001: 105 mm below its lung bases, 32 %
//!    of its extent); an abdominal CT starts at most a few cm above the
//!    domes (IRCAD patient 7: 70 % below). A chest-abdomen-pelvis scan is
//!    mostly below the bases, and covers the liver: it passes.
//!
//! Numbers (sparse stack as routing samples it): IRCAD patient 7 `z_base`
//! 166.4 mm, 166 of 237 mm below (70 %) → covered; chest-lidc0001 `z_base`
//! −235 mm, 105 of 330 mm below (32 %) → not covered; the heads in
//! `realct/` have no lung bases, or are refused before (gantry tilt).
//!
//! **Failure modes.** None as errors: a volume the rule cannot judge (not an
//! axial stack, fewer than [`MIN_SLICES`] slices) is [`LiverCoverage`] with
//! `covered: false` and the reason. Patient z is from ImagePositionPatient
//! (LPS: +z is cranial), so feet-first scans read the same.

use std::fmt;

use ndarray::{Array2, ArrayView2};

use super::label::label8;
use super::Volume;

/// Outside air versus the body (skin, fat at −100 and above).
const AIR_HU: f32 = -500.0;
/// Lung parenchyma (about −850 HU) lies in [`LUNG_MIN_HU`, `LUNG_MAX_HU`);
/// gas in bowel and stomach is below it.
const LUNG_MIN_HU: f32 = -950.0;
const LUNG_MAX_HU: f32 = -400.0;
/// Lungs lie in a trunk: an adult's lower chest is at least ~25 x 17 cm
/// (~330 cm2), more than any head (up to ~230 cm2, the skull's outline). A
/// smaller body cross-section has no lung.
const TRUNK_MIN_CM2: f64 = 250.0;
/// Of a slice's low-density inside (< [`LUNG_MAX_HU`]), the share that must
/// be parenchyma for it to be lung rather than gas.
const PARENCHYMA_SHARE_MIN: f64 = 0.5;
/// The decimated grid's pixel size (mm).
const GRID_MM: f64 = 2.5;
/// Lung share of the body's cross-section that marks "still at the lungs".
pub const LUNG_SHARE_MIN: f64 = 0.10;
/// How far below the lung bases the volume must reach (mm).
pub const BELOW_BASE_MIN_MM: f64 = 80.0;
/// Share of the volume's cranio-caudal extent below the lung bases.
pub const BELOW_SHARE_MIN: f64 = 0.5;
/// Fewer slices than this cannot show an extent.
pub const MIN_SLICES: usize = 3;
/// Within this angle of patient z, a stack is axial.
const AXIAL_MAX_DEG: f64 = 25.0;

/// What the rule measured on one volume, and its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct LiverCoverage {
    pub covered: bool,
    /// Patient z of the most cranial and most caudal slice (mm).
    pub top_z_mm: f64,
    pub bottom_z_mm: f64,
    /// The lung bases' level, when the volume has lungs.
    pub base_z_mm: Option<f64>,
    /// The largest lung share of a slice's body cross-section.
    pub max_lung_share: f64,
    /// Slices looked at.
    pub slices: usize,
    /// Why the rule does not hold (`None` when it holds).
    pub failed: Option<String>,
}

impl LiverCoverage {
    /// Extent below the lung bases (mm), when there are lung bases.
    pub fn below_base_mm(&self) -> Option<f64> {
        self.base_z_mm.map(|b| b - self.bottom_z_mm)
    }

    fn refused(vol_slices: usize, why: String) -> LiverCoverage {
        LiverCoverage {
            covered: false,
            top_z_mm: f64::NAN,
            bottom_z_mm: f64::NAN,
            base_z_mm: None,
            max_lung_share: 0.0,
            slices: vol_slices,
            failed: Some(why),
        }
    }
}

impl fmt::Display for LiverCoverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.covered { "liver covered" } else { "liver not covered" };
        if self.top_z_mm.is_nan() {
            return write!(f, "{verdict}: {}", self.failed.as_deref().unwrap_or(""));
        }
        let extent = self.top_z_mm - self.bottom_z_mm;
        write!(
            f,
            "{verdict}: {} slices z {:.1}..{:.1} mm, largest lung share {:.0} %",
            self.slices,
            self.bottom_z_mm,
            self.top_z_mm,
            self.max_lung_share * 100.0
        )?;
        if let (Some(b), Some(below)) = (self.base_z_mm, self.below_base_mm()) {
            let share = if extent > 0.0 { below / extent * 100.0 } else { 0.0 };
            write!(f, ", lung bases at z {b:.1} mm, {below:.0} of {extent:.0} mm below them ({share:.0} %)")?;
        }
        match &self.failed {
            Some(why) => write!(f, ": {why}"),
            None => write!(
                f,
                " (needs lung bases, ≥ {BELOW_BASE_MIN_MM:.0} mm and ≥ {:.0} % below them)",
                BELOW_SHARE_MIN * 100.0
            ),
        }
    }
}

/// Body cross-section and lung area of one slice, in decimated pixels.
/// `pixel_mm`: the decimated grid's pixel size.
fn lung_share(slice: ArrayView2<'_, f32>, stride: usize, pixel_mm: f64) -> f64 {
    let (rows, cols) = slice.dim();
    let (r2, c2) = (rows.div_ceil(stride), cols.div_ceil(stride));
    let hu = Array2::from_shape_fn((r2, c2), |(r, c)| slice[[r * stride, c * stride]]);
    // Outside air: air components that reach the image border.
    let (air, n_air) = label8(hu.mapv(|v| v < AIR_HU).view());
    let mut outside = vec![false; n_air + 1];
    for r in 0..r2 {
        for c in 0..c2 {
            if r == 0 || c == 0 || r + 1 == r2 || c + 1 == c2 {
                outside[air[[r, c]] as usize] = true;
            }
        }
    }
    outside[0] = false;
    // The body: the largest region outside air does not reach (the table
    // and a stray arm are smaller, or joined to it and counted alike).
    let inside = Array2::from_shape_fn((r2, c2), |(r, c)| !outside[air[[r, c]] as usize]);
    let (parts, n) = label8(inside.view());
    if n == 0 {
        return 0.0;
    }
    let mut sizes = vec![0usize; n + 1];
    parts.iter().for_each(|&l| sizes[l as usize] += 1);
    let body = (1..=n).max_by_key(|&l| sizes[l]).unwrap_or(1) as u32;
    if (sizes[body as usize] as f64) * pixel_mm * pixel_mm / 100.0 < TRUNK_MIN_CM2 {
        return 0.0;
    }
    let (mut lung, mut low) = (0usize, 0usize);
    for (l, v) in parts.iter().zip(hu.iter()) {
        if *l == body && *v < LUNG_MAX_HU {
            low += 1;
            if *v >= LUNG_MIN_HU {
                lung += 1;
            }
        }
    }
    // Lungs are parenchyma with some air in the airways; gas (bowel,
    // stomach, an air-filled phantom) is air with a parenchyma-like rim.
    if (lung as f64) < PARENCHYMA_SHARE_MIN * low as f64 {
        return 0.0;
    }
    lung as f64 / sizes[body as usize].max(1) as f64
}

/// The rule of the module doc on `vol`.
pub fn liver_coverage(vol: &Volume) -> LiverCoverage {
    let n = vol.slices();
    if n < MIN_SLICES {
        return LiverCoverage::refused(n, format!("{n} slice(s): too few to show a cranio-caudal extent"));
    }
    if vol.normal[2].abs() < AXIAL_MAX_DEG.to_radians().cos() {
        return LiverCoverage::refused(n, "not an axial stack".into());
    }
    let fine = vol.pixel_spacing[0].min(vol.pixel_spacing[1]);
    let stride = ((GRID_MM / fine).round() as usize).max(1);
    let pixel_mm = (vol.pixel_spacing[0] * vol.pixel_spacing[1]).sqrt() * stride as f64;
    // (patient z, lung share), cranial first.
    let mut levels: Vec<(f64, f64)> = (0..n)
        .filter_map(|i| Some((vol.positions[i][2], lung_share(vol.slice(i)?, stride, pixel_mm))))
        .collect();
    levels.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top = levels[0].0;
    let bottom = levels[levels.len() - 1].0;
    // The largest lung share; on a tie the most cranial slice.
    let (peak, max_share) = levels
        .iter()
        .enumerate()
        .fold((0, f64::MIN), |best, (i, l)| if l.1 > best.1 { (i, l.1) } else { best });
    let mut out = LiverCoverage {
        covered: false,
        top_z_mm: top,
        bottom_z_mm: bottom,
        base_z_mm: None,
        max_lung_share: max_share,
        slices: n,
        failed: None,
    };
    if max_share < LUNG_SHARE_MIN {
        out.failed = Some(format!(
            "no lung bases (lung under {:.0} % of the body in every slice): the liver's dome is not in it",
            LUNG_SHARE_MIN * 100.0
        ));
        return out;
    }
    // Caudally from the largest lung share while the lungs still fill a
    // tenth: isolated gas rims lower down cannot extend the run.
    let base = levels[peak..]
        .iter()
        .take_while(|l| l.1 >= LUNG_SHARE_MIN)
        .last()
        .map(|l| l.0)
        .unwrap_or(levels[peak].0);
    out.base_z_mm = Some(base);
    let below = base - bottom;
    let extent = top - bottom;
    if below < BELOW_BASE_MIN_MM {
        out.failed = Some(format!(
            "the volume ends {below:.0} mm below the lung bases, under the {BELOW_BASE_MIN_MM:.0} mm that hold most of the liver"
        ));
    } else if below < BELOW_SHARE_MIN * extent {
        out.failed = Some(format!(
            "mostly above the lung bases ({:.0} % below, under {:.0} %): a chest scan, not an abdominal one",
            below / extent * 100.0,
            BELOW_SHARE_MIN * 100.0
        ));
    } else {
        out.covered = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    /// A synthetic axial volume, 1 mm pixels, 5 mm slices from z = 0
    /// upwards: a 240 x 180 mm elliptic body (339 cm2) of soft tissue in air, with
    /// two lungs (−850 HU) in the slices `lung(z)` says, and bowel gas
    /// (−1000 HU) everywhere in `gas` slices.
    fn synthetic(n: usize, lung: impl Fn(f64) -> f64, gas: bool) -> Volume {
        let size = 256;
        let mut hu = Array3::<f32>::from_elem((n, size, size), -1000.0);
        let mut positions = Vec::new();
        for s in 0..n {
            let z = s as f64 * 5.0;
            positions.push([0.0, 0.0, z]);
            // fraction of the lung ellipses' full size at this level
            let f = lung(z).clamp(0.0, 1.0);
            for r in 0..size {
                for c in 0..size {
                    let (y, x) = (r as f64 - 128.0, c as f64 - 128.0);
                    if (x / 120.0).powi(2) + (y / 90.0).powi(2) > 1.0 {
                        continue;
                    }
                    let mut v = 40.0;
                    for cx in [-45.0, 45.0] {
                        if f > 0.0 && ((x - cx) / (35.0 * f.sqrt())).powi(2) + (y / (55.0 * f.sqrt())).powi(2) <= 1.0 {
                            v = -850.0;
                        }
                    }
                    if gas && ((x - 20.0) / 15.0).powi(2) + ((y - 20.0) / 15.0).powi(2) <= 1.0 {
                        v = -1000.0;
                    }
                    hu[[s, r, c]] = v;
                }
            }
        }
        Volume {
            hu,
            pixel_spacing: [1.0, 1.0],
            slice_positions: positions.iter().map(|p| p[2]).collect(),
            positions: positions.clone(),
            slice_thickness: Some(5.0),
            spacing_mm: Some(5.0),
            origin: positions[0],
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            normal: [0.0, 0.0, 1.0],
            sop_instance_uids: vec![String::new(); n],
            frame_numbers: vec![None; n],
            source_paths: vec![Default::default(); n],
            padding_voxels: 0,
            hu_step: 1.0,
            arch: Default::default(),
        }
    }

    /// Lungs full above `base`, none below: a sharp diaphragm.
    fn lungs_above(base: f64) -> impl Fn(f64) -> f64 {
        move |z| if z >= base { 1.0 } else { 0.0 }
    }

    #[test]
    fn abdomen_with_lung_bases_on_top_is_covered() {
        // 0..195 mm, lungs from 150 mm up: 150 of 195 mm below.
        let c = liver_coverage(&synthetic(40, lungs_above(150.0), true));
        assert!(c.covered, "{c}");
        assert_eq!(c.base_z_mm, Some(150.0));
        assert!(c.to_string().starts_with("liver covered"), "{c}");
    }

    #[test]
    fn chest_reaching_the_upper_abdomen_is_not() {
        // 0..295 mm, lungs from 100 mm to the top: 100 mm below (enough
        // liver) but only a third of the extent.
        let c = liver_coverage(&synthetic(60, lungs_above(100.0), false));
        assert!(!c.covered);
        assert!(c.failed.as_deref().unwrap().contains("chest scan"), "{c}");
    }

    #[test]
    fn too_little_below_the_lung_bases_is_not() {
        // 0..95 mm, lungs from 60 mm: 60 mm below, 63 % of the extent.
        let c = liver_coverage(&synthetic(20, lungs_above(60.0), false));
        assert!(!c.covered);
        assert!(c.failed.as_deref().unwrap().contains("60 mm below"), "{c}");
    }

    #[test]
    fn no_lungs_means_no_dome() {
        // Only bowel gas (below −950 HU): no lung bases, however long.
        let c = liver_coverage(&synthetic(40, |_| 0.0, true));
        assert!(!c.covered && c.base_z_mm.is_none(), "{c}");
        assert!(c.max_lung_share < 0.02, "{c}");
        assert!(c.to_string().contains("no lung bases"), "{c}");
    }

    #[test]
    fn a_head_sized_body_has_no_lungs() {
        // The same "lungs" in a 180 mm-wide body (about 170 cm2): not a trunk.
        let mut v = synthetic(40, lungs_above(150.0), false);
        v.pixel_spacing = [0.75, 0.75];
        let c = liver_coverage(&v);
        assert!(!c.covered && c.max_lung_share == 0.0, "{c}");
    }

    #[test]
    fn few_or_non_axial_slices_are_not_judged() {
        let c = liver_coverage(&synthetic(2, lungs_above(0.0), false));
        assert!(!c.covered && c.to_string().contains("too few"), "{c}");
        let mut v = synthetic(5, lungs_above(0.0), false);
        v.normal = [0.0, 1.0, 0.0];
        assert!(liver_coverage(&v).to_string().contains("not an axial stack"));
    }

    #[test]
    fn the_run_of_lung_ends_at_the_first_gap() {
        // A lung-like patch low down (isolated) does not drag the bases down.
        let c = liver_coverage(&synthetic(40, |z| if z >= 150.0 || (20.0..=25.0).contains(&z) { 1.0 } else { 0.0 }, false));
        assert_eq!(c.base_z_mm, Some(150.0), "{c}");
        assert!(c.covered, "{c}");
    }

    fn real(dir: &str) -> Option<Volume> {
        let root = crate::test_data::realct()?.parent()?.join(dir);
        let root = crate::test_data::require(root, dir)?;
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&root).ok()?.map(|e| e.unwrap().path()).collect();
        files.sort();
        Some(Volume::from_files(&files).unwrap())
    }

    #[test]
    fn real_abdomen_is_covered_and_real_chest_is_not() {
        let Some(liver) = real("realct-labelled/liver-ircad07/ct") else { return };
        let c = liver_coverage(&liver);
        eprintln!("ircad07: {c}");
        assert!(c.covered, "{c}");
        let Some(chest) = real("realct-labelled/chest-lidc0001/ct") else { return };
        let c = liver_coverage(&chest);
        eprintln!("lidc0001: {c}");
        assert!(!c.covered, "{c}");
        // it has lungs and reaches the kidneys; it fails as a chest scan
        assert!(c.below_base_mm().unwrap() >= BELOW_BASE_MIN_MM, "{c}");
        assert!(c.failed.as_deref().unwrap().contains("chest scan"), "{c}");
    }
}
