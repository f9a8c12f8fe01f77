//! Biomarkers from a localization map (Cano-Espinosa et al., IEEE TMI 2020):
//! HU heuristics mark candidates, the map picks among them, and the value is
//! the map aggregated inside the candidates.
//!
//! Pure math on volumes, no ONNX: the model is run by `inference::measure`,
//! which hands the map here.
//!
//! Input: HU `[slices, rows, cols]` in patient order, the pixel geometry,
//! the model's output and the card's candidate and aggregation sections.
//! Output: the value, the native-resolution map and candidates, and
//! per-lesion detail for Agatston ([`agatston`], also the phantoms' truth).
//!
//! This is the Rust twin of `models/training/biomarker_training/candidates.py`;
//! `models/golden/` pins the two together (see the parity test in
//! `inference`). Conventions shared with it:
//! - candidate HU ranges are inclusive at both ends;
//! - CAC lesions are 2D 8-connected components per slice of HU ≥ 130 with
//!   area ≥ 1 mm²; weight from peak HU: [130,200)→1, [200,300)→2,
//!   [300,400)→3, ≥400→4; score = area × weight × thickness / 3;
//! - model input: clip → area (box) resample with torch adaptive-pool bins
//!   → (x − subtract) / divide;
//! - map back to native: nearest, native index i reads model index
//!   (i × model_n) / native_n.

pub mod agatston;
pub mod aggregate;
pub mod burden;
pub mod candidates;
pub mod measure;

pub use agatston::{Lesion, RiskCategory};
pub use burden::{volume_burden, VolumeBurden};
pub use aggregate::{area_resample, normalise_slice, upsample_nearest};
pub use candidates::{candidate_mask, CandidateSpec};
pub use measure::{aggregate, exclude_lesions, model_candidates, Aggregate, AggregationSpec, LesionResult, Measurement, PixelGeometry};
