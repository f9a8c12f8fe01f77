//! Agatston scoring as the CAC truth defines it (Agatston et al., JACC 1990),
//! restricted to a candidate region.
//!
//! Per slice: 8-connected components of pixels with HU ≥ 130 inside the
//! region; a component counts when its area is ≥ 1 mm². Its weight comes from
//! its peak HU (130-199 → 1, 200-299 → 2, 300-399 → 3, ≥ 400 → 4) and its
//! score is area × weight × slice thickness / 3 (the original protocol used
//! 3 mm slices). The total is the sum over components.

use serde::Serialize;

pub const THRESHOLD_HU: i16 = 130;
pub const MIN_AREA_MM2: f64 = 1.0;

/// One counted component.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// 0-based slice in file order.
    pub slice: usize,
    pub area_mm2: f64,
    pub peak_hu: i16,
    pub weight: u8,
    pub score: f64,
    /// In-slice pixel indices (row * cols + col).
    #[serde(skip)]
    pub pixels: Vec<usize>,
}

/// Density weight from the peak HU; 0 below the threshold.
pub fn weight(peak_hu: i16) -> u8 {
    match peak_hu {
        i16::MIN..=129 => 0,
        130..=199 => 1,
        200..=299 => 2,
        300..=399 => 3,
        _ => 4,
    }
}

/// Risk category of a total score: "0", "1-10", "11-100", "101-400", ">400".
pub fn risk_category(score: f64) -> &'static str {
    if score <= 0.0 {
        "0"
    } else if score <= 10.0 {
        "1-10"
    } else if score <= 100.0 {
        "11-100"
    } else if score <= 400.0 {
        "101-400"
    } else {
        ">400"
    }
}

/// Scores `hu` ([slices][rows][cols]) inside `region` (same layout; `None`
/// scores everywhere, the threshold-only answer).
pub fn score(
    hu: &[i16],
    region: Option<&[bool]>,
    dims: [usize; 3],
    pixel_area_mm2: f64,
    thickness_mm: f64,
) -> Vec<Component> {
    let [slices, rows, cols] = dims;
    let n = rows * cols;
    let mut out = Vec::new();
    let mut seen = vec![false; n];
    let mut stack = Vec::new();
    for s in 0..slices {
        let h = &hu[s * n..(s + 1) * n];
        let inside = |i: usize| h[i] >= THRESHOLD_HU && region.is_none_or(|r| r[s * n + i]);
        seen.iter_mut().for_each(|v| *v = false);
        for start in 0..n {
            if seen[start] || !inside(start) {
                continue;
            }
            seen[start] = true;
            stack.push(start);
            let mut pixels = Vec::new();
            while let Some(i) = stack.pop() {
                pixels.push(i);
                let (r, c) = (i / cols, i % cols);
                for dr in -1i64..=1 {
                    for dc in -1i64..=1 {
                        let (rr, cc) = (r as i64 + dr, c as i64 + dc);
                        if rr < 0 || cc < 0 || rr >= rows as i64 || cc >= cols as i64 {
                            continue;
                        }
                        let j = rr as usize * cols + cc as usize;
                        if !seen[j] && inside(j) {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
            let area = pixels.len() as f64 * pixel_area_mm2;
            // Tolerate float error so that e.g. 4 pixels of 0.25 mm² make 1 mm².
            if area + 1e-9 < MIN_AREA_MM2 {
                continue;
            }
            let peak = pixels.iter().map(|&i| h[i]).max().unwrap_or(i16::MIN);
            let w = weight(peak);
            pixels.sort_unstable();
            out.push(Component {
                slice: s,
                area_mm2: area,
                peak_hu: peak,
                weight: w,
                score: area * w as f64 * thickness_mm / 3.0,
                pixels,
            });
        }
    }
    out
}

pub fn total(components: &[Component]) -> f64 {
    components.iter().fold(0.0, |acc, c| acc + c.score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_edges() {
        assert_eq!(weight(129), 0);
        assert_eq!(weight(130), 1);
        assert_eq!(weight(199), 1);
        assert_eq!(weight(200), 2);
        assert_eq!(weight(299), 2);
        assert_eq!(weight(300), 3);
        assert_eq!(weight(399), 3);
        assert_eq!(weight(400), 4);
        assert_eq!(weight(3000), 4);
    }

    #[test]
    fn risk_boundaries() {
        assert_eq!(risk_category(0.0), "0");
        assert_eq!(risk_category(0.01), "1-10");
        assert_eq!(risk_category(10.0), "1-10");
        assert_eq!(risk_category(10.01), "11-100");
        assert_eq!(risk_category(100.0), "11-100");
        assert_eq!(risk_category(100.5), "101-400");
        assert_eq!(risk_category(400.0), "101-400");
        assert_eq!(risk_category(400.01), ">400");
    }

    fn img(px: &[(usize, i16)]) -> Vec<i16> {
        let mut v = vec![0i16; 100];
        for &(i, h) in px {
            v[i] = h;
        }
        v
    }

    #[test]
    fn area_threshold_and_connectivity() {
        // pixel 0.5 mm × 0.5 mm = 0.25 mm²: 3 pixels is below 1 mm², 4 is not.
        let three = img(&[(0, 500), (1, 500), (10, 500)]);
        assert!(score(&three, None, [1, 10, 10], 0.25, 3.0).is_empty());
        // diagonal neighbours join (8-connectivity)
        let four = img(&[(0, 500), (11, 500), (22, 500), (33, 135)]);
        let c = score(&four, None, [1, 10, 10], 0.25, 3.0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].weight, 4);
        assert!((c[0].score - 4.0).abs() < 1e-12);
        // 129 HU is not calcium and breaks the component
        let split = img(&[(0, 500), (11, 129), (22, 500)]);
        assert!(score(&split, None, [1, 10, 10], 1.0, 3.0).len() == 2);
    }

    #[test]
    fn thickness_scaling_and_region() {
        let v = img(&[(0, 250), (1, 250)]);
        let c = score(&v, None, [1, 10, 10], 1.0, 2.5);
        assert!((total(&c) - 2.0 * 2.0 * 2.5 / 3.0).abs() < 1e-12);
        let mut region = vec![false; 100];
        region[0] = true;
        let c = score(&v, Some(&region), [1, 10, 10], 1.0, 3.0);
        assert_eq!(c.len(), 1);
        assert!((c[0].area_mm2 - 1.0).abs() < 1e-12);
    }
}
