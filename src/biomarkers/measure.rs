//! From a model's map to a measurement: the map aggregated inside the
//! candidates (area), over the Agatston lesions (agatston), or the model's
//! output summed (direct). Pure: running the model is `inference::measure`.
//!
//! Input: HU `[S,R,C]` in patient order, the model output `[S,1,H,W]`, the
//! pixel geometry and the card's `candidates:` and `aggregation:` sections.
//! Output: the value, risk category (Agatston), lesions, and the map and
//! candidates at native resolution. Invariant: the map is resampled back by
//! nearest neighbour (see the module header of `biomarkers`).

use ndarray::{Array3, ArrayView3, ArrayView4, Axis, Zip};
use serde::{Deserialize, Serialize};

use super::agatston::{self, Lesion, RiskCategory};
use super::aggregate::upsample_volume;
use super::candidates::{candidate_mask, CandidateSpec};
use crate::volume::heart::{Exclusion, HeartRegion};
use crate::volume::label::label8;

/// The card's `aggregation:` section: how the map becomes a value.
#[derive(Debug, Clone, Deserialize)]
pub struct AggregationSpec {
    /// "area", "agatston" or "direct".
    pub kind: String,
    #[serde(default = "one")]
    pub unit_scale: f64,
    /// Agatston only: "lesion_threshold" (a lesion counts fully when the mean
    /// map over it reaches `lesion_threshold`) or "soft" (mean map × score).
    #[serde(default)]
    pub lesion_aggregation: Option<String>,
    #[serde(default)]
    pub lesion_threshold: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl AggregationSpec {
    pub fn is_agatston(&self) -> bool {
        self.kind == "agatston"
    }
}

/// Pixel geometry the aggregation needs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PixelGeometry {
    /// Row spacing, column spacing (mm).
    pub pixel_spacing: [f64; 2],
    pub slice_thickness_mm: f64,
}

impl PixelGeometry {
    pub fn pixel_area_mm2(&self) -> f64 {
        self.pixel_spacing[0] * self.pixel_spacing[1]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LesionResult {
    #[serde(flatten)]
    pub lesion: Lesion,
    /// Mean of the native-resolution map over the lesion.
    pub mean_map: f64,
    /// Whether the lesion counts toward the score.
    pub counted: bool,
    /// Why the lesion cannot be coronary (it lies outside the heart region,
    /// `volume::heart`); such a lesion is never counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excluded: Option<Exclusion>,
}

/// One biomarker value with what it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub value: f64,
    pub unit: String,
    pub risk_category: Option<RiskCategory>,
    pub lesions: Vec<LesionResult>,
    /// Localization map at native resolution `[S,R,C]`.
    #[serde(skip)]
    pub map: Array3<f32>,
    #[serde(skip)]
    pub candidates: Array3<bool>,
    pub model: String,
    pub model_version: String,
    pub execution_provider: &'static str,
    /// A 2-D area measured on every slice of a volume (route `slices: all`):
    /// `value` is then the volume (mL) and this has the per-slice areas and
    /// the largest cross-section. `None` for one slice or a 3-D model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<super::burden::VolumeBurden>,
}

/// What the aggregation yields; the model's identity completes it into a
/// [`Measurement`].
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub value: f64,
    pub risk_category: Option<RiskCategory>,
    pub lesions: Vec<LesionResult>,
    /// `[S,R,C]`; empty for "direct".
    pub map: Array3<f32>,
    /// `[S,R,C]`; empty for "direct".
    pub candidates: Array3<bool>,
}

/// The candidate mask of `hu` (`[S,R,C]`) that [`aggregate`] measures the
/// map inside: Agatston's lesions for a CAC card, the HU heuristic
/// ([`candidate_mask`]) otherwise. Needs no model, so `dataset export` writes
/// the very mask a model's output will be summed over.
pub fn model_candidates(
    hu: ArrayView3<f32>,
    geom: PixelGeometry,
    spec: &CandidateSpec,
    aggregation: &AggregationSpec,
) -> Array3<bool> {
    let area = geom.pixel_area_mm2();
    if aggregation.is_agatston() {
        let (_, labels) = agatston::lesions(hu, None, spec.lesion_rule(), area, geom.slice_thickness_mm);
        return labels.mapv(|l| l > 0);
    }
    candidate_mask(hu, spec, area)
}

/// Aggregate the model output `out` (`[S,1,H,W]`) over `hu` (`[S,R,C]`).
pub fn aggregate(
    hu: ArrayView3<f32>,
    out: ArrayView4<f32>,
    geom: PixelGeometry,
    spec: &CandidateSpec,
    aggregation: &AggregationSpec,
) -> Aggregate {
    let (n, rows, cols) = hu.dim();
    if aggregation.kind == "direct" {
        let v: f64 = out.iter().map(|&x| x as f64).sum();
        return Aggregate {
            value: v,
            risk_category: aggregation.is_agatston().then(|| RiskCategory::from_score(v)),
            lesions: vec![],
            map: Array3::zeros((0, 0, 0)),
            candidates: Array3::from_elem((0, 0, 0), false),
        };
    }

    let map = upsample_volume(out, (rows, cols));
    let area = geom.pixel_area_mm2();
    if aggregation.is_agatston() {
        let (lesions, labels) = agatston::lesions(hu, None, spec.lesion_rule(), area, geom.slice_thickness_mm);
        // Each lesion's map sum, and the candidates, in one pass over the
        // volume's slices side by side (a 110-slab chest: 29 M voxels, 88 ms
        // on one core). A lesion lies in one slice, labelled 1..m there, and
        // the lesions come slice by slice; so each slice's sums are its own,
        // added in the same voxel order as one thread would, and the runs'
        // sums, concatenated, are in lesion order.
        let mut per_slice = vec![0usize; n];
        for l in &lesions {
            per_slice[l.slice] += 1;
        }
        let mut candidates = Array3::from_elem((n, rows, cols), false);
        let runs = crate::par::map_slice_runs(candidates.view_mut(), crate::par::threads(), |first, mut run| {
            let mut sums = Vec::new();
            for (j, cand) in run.axis_iter_mut(Axis(0)).enumerate() {
                let s = first + j;
                let base = sums.len();
                sums.resize(base + per_slice[s], 0f64);
                Zip::from(cand).and(labels.index_axis(Axis(0), s)).and(map.index_axis(Axis(0), s)).for_each(
                    |c, &lab, &m| {
                        if lab > 0 {
                            *c = true;
                            sums[base + lab as usize - 1] += m as f64;
                        }
                    },
                );
            }
            sums
        });
        let sums = runs.concat();
        debug_assert_eq!(sums.len(), lesions.len());
        let threshold = aggregation.lesion_threshold.unwrap_or(0.5);
        let soft = aggregation.lesion_aggregation.as_deref() == Some("soft");
        let mut value = 0.0;
        let results: Vec<LesionResult> = lesions
            .into_iter()
            .zip(sums)
            .map(|(l, sum)| {
                let mean_map = sum / l.n_pixels as f64;
                let counted = mean_map >= threshold;
                value += if soft {
                    mean_map * l.score
                } else if counted {
                    l.score
                } else {
                    0.0
                };
                LesionResult {
                    lesion: l,
                    mean_map,
                    counted,
                    excluded: None,
                }
            })
            .collect();
        return Aggregate {
            value,
            risk_category: Some(RiskCategory::from_score(value)),
            lesions: results,
            map,
            candidates,
        };
    }
    let candidates = model_candidates(hu, geom, spec, aggregation);
    let sum: f64 = map
        .iter()
        .zip(candidates.iter())
        .filter(|(_, &c)| c)
        .map(|(&m, _)| m as f64)
        .sum();
    Aggregate {
        value: sum * area * aggregation.unit_scale,
        risk_category: None,
        lesions: vec![],
        map,
        candidates,
    }
}

/// Exclude the Agatston lesions of `m` that lie outside the heart region:
/// a lesion with more than half of its pixels excluded takes the most common
/// reason among them and is not counted; `value` and `risk_category` are
/// recomputed the way [`aggregate`] computes them (the same sum in the same
/// order, so nothing excluded leaves them bit-identical). No-op for
/// non-Agatston measurements or a region of another shape.
pub fn exclude_lesions(m: &mut Measurement, region: &HeartRegion, aggregation: &AggregationSpec) {
    let reasons = &region.reasons;
    if !aggregation.is_agatston() || m.candidates.dim() != reasons.dim() || m.lesions.is_empty() {
        return;
    }
    // The candidates are the kept lesions; labelling them per slice numbers
    // them as `agatston::lesions` did (raster order of the first pixel).
    let n = m.candidates.dim().0;
    let first_of_slice = agatston::first_of_slice(&m.lesions.iter().map(|l| l.lesion.clone()).collect::<Vec<_>>(), n);
    const KINDS: [Exclusion; 7] = [
        Exclusion::AboveArch,
        Exclusion::OutsideMediastinum,
        Exclusion::Bone,
        Exclusion::ContrastBlood,
        Exclusion::Aorta,
        Exclusion::AorticRoot,
        Exclusion::ChestWall,
    ];
    let mut votes = vec![[0usize; KINDS.len()]; m.lesions.len()];
    for s in 0..n {
        if first_of_slice[s] == usize::MAX {
            continue;
        }
        let (lab, _) = label8(m.candidates.index_axis(Axis(0), s));
        for ((r, c), &l) in lab.indexed_iter() {
            if l == 0 {
                continue;
            }
            if let Some(e) = reasons[[s, r, c]] {
                let k = KINDS.iter().position(|&x| x == e).expect("every reason is listed");
                votes[first_of_slice[s] + l as usize - 1][k] += 1;
            }
        }
    }
    for (l, v) in m.lesions.iter_mut().zip(&votes) {
        if 2 * v.iter().sum::<usize>() > l.lesion.n_pixels {
            let k = (0..KINDS.len()).max_by_key(|&k| (v[k], std::cmp::Reverse(k))).expect("non-empty");
            l.excluded = Some(KINDS[k]);
            l.counted = false;
        }
    }
    let soft = aggregation.lesion_aggregation.as_deref() == Some("soft");
    let mut value = 0.0;
    for l in &m.lesions {
        value += if soft {
            if l.excluded.is_none() {
                l.mean_map * l.lesion.score
            } else {
                0.0
            }
        } else if l.counted {
            l.lesion.score
        } else {
            0.0
        };
    }
    m.value = value;
    m.risk_category = Some(RiskCategory::from_score(value));
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array4};

    fn spec(kind: &str) -> AggregationSpec {
        AggregationSpec {
            kind: kind.into(),
            unit_scale: 0.01,
            lesion_aggregation: None,
            lesion_threshold: None,
        }
    }

    /// A CAC measurement made of an aggregate, as `inference::measure` makes one.
    fn cac_measurement(a: Aggregate) -> Measurement {
        Measurement {
            value: a.value,
            unit: "{Agatston}".into(),
            risk_category: a.risk_category,
            lesions: a.lesions,
            map: a.map,
            candidates: a.candidates,
            model: "cac".into(),
            model_version: "0".into(),
            execution_provider: "cpu",
            volume: None,
        }
    }

    #[test]
    fn area_is_map_inside_candidates_times_pixel_area() {
        // 4×4 at 40 HU, a 2×2 block of fat (not a candidate); the model map
        // is 2×2 and upsamples by nearest.
        let mut hu = Array3::<f32>::from_elem((1, 4, 4), 40.0);
        hu.slice_mut(s![0, 0..2, 0..2]).fill(-100.0);
        let mut out = Array4::<f32>::from_elem((1, 1, 2, 2), 0.5);
        out[[0, 0, 1, 1]] = 1.0;
        let geom = PixelGeometry {
            pixel_spacing: [0.5, 2.0],
            slice_thickness_mm: 5.0,
        };
        let cand = CandidateSpec {
            hu_min: -29.0,
            hu_max: Some(150.0),
            min_area_mm2: 0.0,
        };
        let a = aggregate(hu.view(), out.view(), geom, &cand, &spec("area"));
        // 8 candidate pixels at 0.5 and 4 at 1.0, 1 mm² each, × 0.01
        assert!((a.value - (8.0 * 0.5 + 4.0) * 0.01).abs() < 1e-12);
        assert_eq!(a.candidates.iter().filter(|&&c| c).count(), 12);
        assert!(a.risk_category.is_none());
    }

    #[test]
    fn agatston_counts_lesions_whose_mean_map_reaches_the_threshold() {
        let mut hu = Array3::<f32>::zeros((1, 4, 4));
        hu.slice_mut(s![0, 0..2, 0..2]).fill(250.0); // 4 mm², weight 2
        hu.slice_mut(s![0, 3..4, 2..4]).fill(450.0); // 2 mm², weight 4, apart
        let mut out = Array4::<f32>::zeros((1, 1, 2, 2));
        out[[0, 0, 0, 0]] = 0.9;
        out[[0, 0, 1, 1]] = 0.2;
        let geom = PixelGeometry {
            pixel_spacing: [1.0, 1.0],
            slice_thickness_mm: 3.0,
        };
        let cand = CandidateSpec {
            hu_min: 130.0,
            hu_max: None,
            min_area_mm2: 1.0,
        };
        let a = aggregate(hu.view(), out.view(), geom, &cand, &spec("agatston"));
        assert_eq!(a.lesions.len(), 2);
        assert!(a.lesions[0].counted && !a.lesions[1].counted);
        assert!((a.value - 8.0).abs() < 1e-12);
        assert_eq!(a.risk_category, Some(RiskCategory::Minimal));
    }

    #[test]
    fn only_the_coronary_calcium_counts_when_the_map_says_all_of_it_does() {
        use crate::volume::heart::{slice_exclusion, synthetic_chest_slice, SliceFrame};
        // Three identical slices of a chest with calcium in a coronary, the
        // aortic wall, a rib, the vertebra and the sternum; the model's map
        // is 1 everywhere, so without anatomy every lesion would count.
        let (slice, [coronary, ..]) = synthetic_chest_slice();
        let hu = ndarray::stack![Axis(0), slice, slice, slice];
        let out = Array4::<f32>::ones((3, 1, 16, 16));
        let geom = PixelGeometry { pixel_spacing: [1.0, 1.0], slice_thickness_mm: 3.0 };
        let cand = CandidateSpec { hu_min: 130.0, hu_max: None, min_area_mm2: 1.0 };
        let a = aggregate(hu.view(), out.view(), geom, &cand, &spec("agatston"));
        let mut m = cac_measurement(a);
        assert_eq!(m.lesions.len(), 15, "five lesions per slice");
        assert!(m.lesions.iter().all(|l| l.counted));
        let frame = SliceFrame { dy: 1.0, dx: 1.0, left: 1.0, posterior: 1.0 };
        let one = slice_exclusion(slice.view(), frame);
        let region = HeartRegion { reasons: ndarray::stack![Axis(0), one, one, one], opacified_px: vec![0; 3] };
        exclude_lesions(&mut m, &region, &spec("agatston"));
        let counted: Vec<_> = m.lesions.iter().filter(|l| l.counted).collect();
        assert_eq!(counted.len(), 3);
        // the coronary plaque: 9 px at 450 HU (weight 4), 9 × 4 × 3 / 3 each
        assert!(counted.iter().all(|l| l.lesion.n_pixels == 9 && l.excluded.is_none()));
        assert!((m.value - 3.0 * 36.0).abs() < 1e-9, "{}", m.value);
        assert_eq!(m.risk_category, Some(RiskCategory::Moderate));
        let mut reasons: Vec<_> = m.lesions.iter().filter_map(|l| l.excluded.map(|e| e.as_str())).collect();
        reasons.sort();
        reasons.dedup();
        assert_eq!(reasons, ["aorta", "bone", "outside_mediastinum"]);
        // the excluded lesions say why in the JSON, the counted ones do not
        let j = serde_json::to_value(&m.lesions).unwrap();
        assert_eq!(j.as_array().unwrap().iter().filter(|l| l.get("excluded").is_some()).count(), 12);
        let _ = coronary;
    }

    #[test]
    fn excluding_nothing_leaves_the_value_bit_identical() {
        let (slice, _) = crate::volume::heart::synthetic_chest_slice();
        let hu = ndarray::stack![Axis(0), slice];
        let out = Array4::<f32>::from_elem((1, 1, 16, 16), 0.7);
        let geom = PixelGeometry { pixel_spacing: [0.7, 0.7], slice_thickness_mm: 2.5 };
        let cand = CandidateSpec { hu_min: 130.0, hu_max: None, min_area_mm2: 1.0 };
        let a = aggregate(hu.view(), out.view(), geom, &cand, &spec("agatston"));
        let mut m = cac_measurement(a);
        let before = m.value;
        let region = HeartRegion { reasons: Array3::from_elem(hu.dim(), None), opacified_px: vec![0; hu.dim().0] };
        exclude_lesions(&mut m, &region, &spec("agatston"));
        assert_eq!(m.value.to_bits(), before.to_bits());
        assert!(m.lesions.iter().all(|l| l.counted && l.excluded.is_none()));
    }

    /// The mask `dataset export` writes is the one the aggregation sums
    /// inside, for both kinds.
    #[test]
    fn model_candidates_are_the_aggregations_candidates() {
        let (slice, _) = crate::volume::heart::synthetic_chest_slice();
        let hu = ndarray::stack![Axis(0), slice, slice];
        let out = Array4::<f32>::from_elem((2, 1, 16, 16), 0.7);
        let geom = PixelGeometry { pixel_spacing: [0.7, 0.7], slice_thickness_mm: 2.5 };
        for (kind, cand) in [
            ("agatston", CandidateSpec { hu_min: 130.0, hu_max: None, min_area_mm2: 1.0 }),
            ("area", CandidateSpec { hu_min: -29.0, hu_max: Some(150.0), min_area_mm2: 0.0 }),
        ] {
            let a = aggregate(hu.view(), out.view(), geom, &cand, &spec(kind));
            let c = model_candidates(hu.view(), geom, &cand, &spec(kind));
            assert!(c.iter().any(|&b| b), "{kind}: no candidates in the synthetic chest");
            assert_eq!(c, a.candidates, "{kind}");
        }
    }
}
