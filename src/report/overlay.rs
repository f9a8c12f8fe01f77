//! Pixel rendering for the Secondary Capture overlays, apart from DICOM:
//! window the HU slice to grey, blend the localization map in a heat
//! colour, draw the candidate outline, burn in text.
//!
//! Everything is deterministic integer-ish arithmetic on `f32`, so the same
//! inputs give the same bytes (the SC UIDs are stable, so must the pixels be).

use ndarray::ArrayView2;

use super::font::{self, GLYPH_H, GLYPH_W};

/// Interleaved 8-bit RGB, row-major: what Photometric Interpretation RGB
/// with Planar Configuration 0 stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(rows: usize, cols: usize) -> RgbImage {
        RgbImage {
            rows,
            cols,
            data: vec![0; rows * cols * 3],
        }
    }

    pub fn get(&self, r: usize, c: usize) -> [u8; 3] {
        let i = (r * self.cols + c) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    pub fn set(&mut self, r: usize, c: usize, px: [u8; 3]) {
        let i = (r * self.cols + c) * 3;
        self.data[i..i + 3].copy_from_slice(&px);
    }

    /// `alpha` of `px` over what is there.
    pub fn blend(&mut self, r: usize, c: usize, px: [u8; 3], alpha: f32) {
        let old = self.get(r, c);
        let mix = |o: u8, n: u8| {
            (o as f32 * (1.0 - alpha) + n as f32 * alpha)
                .round()
                .clamp(0.0, 255.0) as u8
        };
        self.set(
            r,
            c,
            [mix(old[0], px[0]), mix(old[1], px[1]), mix(old[2], px[2])],
        );
    }
}

/// A VOI window (PS3.3 C.11.2.1.2.1, linear), in HU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f32,
    pub width: f32,
}

impl Window {
    pub const SOFT_TISSUE: Window = Window {
        center: 40.0,
        width: 400.0,
    };
    /// Calcium: wide enough that 130–1000 HU lesions stay distinct.
    pub const CALCIUM: Window = Window {
        center: 200.0,
        width: 800.0,
    };

    pub fn grey(&self, hu: f32) -> u8 {
        let lo = self.center - self.width / 2.0;
        ((hu - lo) / self.width * 255.0).round().clamp(0.0, 255.0) as u8
    }
}

/// How the map and the candidates are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverlayStyle {
    /// Map values at or below this are not drawn.
    pub map_threshold: f32,
    /// Opacity of the heat colour at map = 1.
    pub max_alpha: f32,
    pub outline: [u8; 3],
}

impl Default for OverlayStyle {
    fn default() -> OverlayStyle {
        OverlayStyle {
            map_threshold: 0.1,
            max_alpha: 0.55,
            outline: [0, 255, 0],
        }
    }
}

/// Heat ramp: red at the threshold through orange to yellow at 1.
fn heat(v: f32) -> [u8; 3] {
    let t = v.clamp(0.0, 1.0);
    [255, (t * 255.0).round() as u8, 0]
}

/// The windowed slice with the map (if any) and the candidate outline.
pub fn render_slice(
    hu: ArrayView2<f32>,
    map: Option<ArrayView2<f32>>,
    candidates: Option<ArrayView2<bool>>,
    window: Window,
    style: &OverlayStyle,
) -> RgbImage {
    let (rows, cols) = hu.dim();
    let mut img = RgbImage::new(rows, cols);
    for ((r, c), &v) in hu.indexed_iter() {
        let g = window.grey(v);
        img.set(r, c, [g, g, g]);
    }
    if let Some(map) = map {
        let span = (1.0 - style.map_threshold).max(f32::EPSILON);
        for ((r, c), &v) in map.indexed_iter() {
            if v > style.map_threshold {
                let t = ((v - style.map_threshold) / span).clamp(0.0, 1.0);
                img.blend(r, c, heat(t), style.max_alpha * (0.35 + 0.65 * t));
            }
        }
    }
    if let Some(cand) = candidates {
        // 1-pixel inner border: a candidate pixel with a 4-neighbour that is
        // not a candidate (or the image edge).
        for ((r, c), &m) in cand.indexed_iter() {
            if !m {
                continue;
            }
            let outside = |dr: isize, dc: isize| {
                let (y, x) = (r as isize + dr, c as isize + dc);
                y < 0
                    || x < 0
                    || y >= rows as isize
                    || x >= cols as isize
                    || !cand[[y as usize, x as usize]]
            };
            if outside(-1, 0) || outside(1, 0) || outside(0, -1) || outside(0, 1) {
                img.set(r, c, style.outline);
            }
        }
    }
    img
}

/// Agatston weight colours (weight 1..4): yellow, orange, red, magenta,
/// hotter for denser calcium, all distinct from the grey image.
pub const WEIGHT_COLOURS: [[u8; 3]; 4] = [[255, 255, 0], [255, 150, 0], [255, 30, 30], [255, 0, 255]];
/// Lesions that do not count (excluded by anatomy, or the map too low).
pub const UNCOUNTED_COLOUR: [u8; 3] = [110, 110, 110];

/// Outline labelled lesions: every pixel outside all lesions (label 0) that
/// touches a lesion (8-neighbourhood) takes that lesion's colour, so the
/// calcium itself stays as the window shows it. `style_of(label)` gives a
/// lesion's (priority, colour), or `None` to leave it undrawn; where two
/// lesions' outlines meet, the higher priority wins.
pub fn outline_lesions(img: &mut RgbImage, labels: ArrayView2<u32>, style_of: impl Fn(u32) -> Option<(u8, [u8; 3])>) {
    let (rows, cols) = labels.dim();
    for r in 0..rows {
        for c in 0..cols {
            if labels[[r, c]] != 0 {
                continue;
            }
            let mut best: Option<(u8, [u8; 3])> = None;
            for dr in -1isize..=1 {
                for dc in -1isize..=1 {
                    let (y, x) = (r as isize + dr, c as isize + dc);
                    if y < 0 || x < 0 || y >= rows as isize || x >= cols as isize {
                        continue;
                    }
                    let l = labels[[y as usize, x as usize]];
                    if l == 0 {
                        continue;
                    }
                    if let Some(s) = style_of(l) {
                        if best.is_none_or(|b| s.0 > b.0) {
                            best = Some(s);
                        }
                    }
                }
            }
            if let Some((_, colour)) = best {
                img.set(r, c, colour);
            }
        }
    }
}

/// Pixel scale for burned-in text: about 1/64 of the width per glyph
/// cell, at least 1, and small enough that `longest` characters fit.
pub fn text_scale(cols: usize, longest: usize) -> usize {
    let want = (cols / 256).max(1);
    let fit = cols / ((GLYPH_W + 1) * longest.max(1) + 4);
    want.min(fit).max(1)
}

/// Burn `text` in at (`row`, `col`) on a darkened box so it reads on any
/// background. Clipped at the image edges.
pub fn draw_text(
    img: &mut RgbImage,
    row: usize,
    col: usize,
    text: &str,
    scale: usize,
    colour: [u8; 3],
) {
    let n = text.chars().count();
    let (h, w) = ((GLYPH_H + 2) * scale, ((GLYPH_W + 1) * n + 1) * scale);
    for r in row..(row + h).min(img.rows) {
        for c in col..(col + w).min(img.cols) {
            img.blend(r, c, [0, 0, 0], 0.6);
        }
    }
    for (i, ch) in text.chars().enumerate() {
        let x0 = col + (1 + i * (GLYPH_W + 1)) * scale;
        for gy in 0..GLYPH_H {
            for gx in 0..GLYPH_W {
                if !font::pixel(ch, gx, gy) {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (r, c) = (row + (1 + gy) * scale + dy, x0 + gx * scale + dx);
                        if r < img.rows && c < img.cols {
                            img.set(r, c, colour);
                        }
                    }
                }
            }
        }
    }
}

/// Height in pixels of one text line at `scale`, spacing included.
pub fn line_height(scale: usize) -> usize {
    (GLYPH_H + 3) * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn outlines_lie_outside_the_lesion_in_its_colour() {
        let mut img = RgbImage::new(8, 8);
        let mut labels = Array2::<u32>::zeros((8, 8));
        for (r, c) in [(2, 2), (2, 3), (3, 2), (3, 3)] {
            labels[[r, c]] = 1;
        }
        labels[[6, 6]] = 2;
        outline_lesions(&mut img, labels.view(), |l| match l {
            1 => Some((5, WEIGHT_COLOURS[3])),
            _ => Some((0, UNCOUNTED_COLOUR)),
        });
        // the 8-neighbourhood ring of lesion 1 is magenta, its interior untouched
        for r in 1..=4 {
            for c in 1..=4 {
                let inside = (2..=3).contains(&r) && (2..=3).contains(&c);
                assert_eq!(img.get(r, c), if inside { [0, 0, 0] } else { WEIGHT_COLOURS[3] }, "({r},{c})");
            }
        }
        assert_eq!(img.get(5, 5), UNCOUNTED_COLOUR);
        assert_eq!(img.get(6, 6), [0, 0, 0]);
        assert_eq!(img.get(0, 0), [0, 0, 0]);
        // where two outlines meet, the counted (higher priority) one wins
        let mut img = RgbImage::new(1, 3);
        let labels = ndarray::array![[1u32, 0, 2]];
        outline_lesions(&mut img, labels.view(), |l| {
            Some(if l == 1 { (0, UNCOUNTED_COLOUR) } else { (3, WEIGHT_COLOURS[1]) })
        });
        assert_eq!(img.get(0, 1), WEIGHT_COLOURS[1]);
    }

    #[test]
    fn window_maps_edges_to_black_and_white() {
        let w = Window::SOFT_TISSUE;
        assert_eq!(w.grey(-160.0), 0);
        assert_eq!(w.grey(240.0), 255);
        assert_eq!(w.grey(-1000.0), 0);
        assert_eq!(w.grey(40.0), 128);
    }

    #[test]
    fn outline_is_the_inner_border_and_map_tints_only_above_threshold() {
        let hu = Array2::<f32>::from_elem((8, 8), 40.0);
        let mut cand = Array2::from_elem((8, 8), false);
        for r in 2..6 {
            for c in 2..6 {
                cand[[r, c]] = true;
            }
        }
        let mut map = Array2::<f32>::zeros((8, 8));
        map[[0, 0]] = 0.05;
        map[[0, 7]] = 0.9;
        let style = OverlayStyle::default();
        let img = render_slice(
            hu.view(),
            Some(map.view()),
            Some(cand.view()),
            Window::SOFT_TISSUE,
            &style,
        );
        assert_eq!(img.get(2, 2), style.outline);
        assert_eq!(img.get(2, 4), style.outline);
        assert_eq!(img.get(3, 3), [128, 128, 128], "interior stays grey");
        assert_eq!(img.get(0, 0), [128, 128, 128], "below threshold: untouched");
        let p = img.get(0, 7);
        assert!(p[0] > p[2] + 50, "heat colour: {p:?}");
    }

    #[test]
    fn text_is_drawn_and_clipped() {
        let mut img = RgbImage::new(20, 30);
        draw_text(&mut img, 0, 0, "NOT FOR DIAGNOSTIC USE", 1, [255, 255, 0]);
        assert!(img.data.chunks(3).any(|p| p == [255, 255, 0]));
        assert_eq!(text_scale(512, 40), 2);
        assert_eq!(text_scale(512, 100), 1);
    }
}
