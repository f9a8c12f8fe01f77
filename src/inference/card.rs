//! Model cards (`models/<name>.yaml`): everything needed to turn HU into the
//! model's input and its output into a biomarker, written by the training
//! code (`models/training/biomarker_training/export.py`). Unknown keys are
//! allowed: cards also carry training provenance and metrics for people.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::biomarkers::{AggregationSpec, CandidateSpec};

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("cannot read model card {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("model card {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("model card {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("ONNX file {path} has sha256 {actual}, the card says {expected}")]
    Digest { path: PathBuf, expected: String, actual: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Code {
    pub scheme: String,
    pub value: String,
    pub meaning: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Unit {
    pub ucum: String,
    pub meaning: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BiomarkerSpec {
    pub concept: Code,
    pub unit: Unit,
    pub finding_site: Code,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Scale {
    pub subtract: f64,
    pub divide: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InputSpec {
    pub size: [usize; 2],
    pub hu_clip: [f64; 2],
    pub scale: Scale,
    /// "single": one 2D slice; "all": every slice of the volume as a batch.
    pub slices: String,
    #[serde(default = "default_input_name")]
    pub input_name: String,
    #[serde(default = "default_output_name")]
    pub output_name: String,
}

fn default_input_name() -> String {
    "input".into()
}
fn default_output_name() -> String {
    "map".into()
}

/// PS3.3 C.8.20.2 Segmentation Type of the SEG this model's results get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum SegmentationType {
    /// One bit per pixel: the pixels the biomarker counts, the map at
    /// `threshold` inside the candidates.
    #[default]
    #[serde(rename = "BINARY")]
    Binary,
    /// The map inside the candidates as a probability, 0..=255 (Maximum
    /// Fractional Value 255).
    #[serde(rename = "FRACTIONAL")]
    Fractional,
}

/// The card's `segmentation:` section. Every key has a default, so cards
/// without it still get a SEG: BINARY at 0.5, category "Anatomical
/// Structure" (SCT 91723000), type = `biomarker.finding_site`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SegmentationSpec {
    #[serde(rename = "type")]
    pub kind: SegmentationType,
    /// BINARY: a pixel is in the segment when map >= threshold (and it is a
    /// candidate). Agatston cards ignore it: their segment is the lesions
    /// that count, by `aggregation.lesion_threshold`.
    pub threshold: f64,
    /// Segment Label (LO); default: the property type's meaning.
    pub label: Option<String>,
    /// Segmented Property Category (CID 7150).
    pub category: Option<Code>,
    /// Segmented Property Type (CID 7151 and others); default: the finding site.
    pub property_type: Option<Code>,
    /// Anatomic Region Sequence (CID 4031 / 7166); none by default.
    pub anatomic_region: Option<Code>,
    /// Algorithm Family Code (CID 7162); default (123110, DCM, "Artificial Intelligence").
    pub algorithm_family: Option<Code>,
}

impl Default for SegmentationSpec {
    fn default() -> SegmentationSpec {
        SegmentationSpec {
            kind: SegmentationType::Binary,
            threshold: 0.5,
            label: None,
            category: None,
            property_type: None,
            anatomic_region: None,
            algorithm_family: None,
        }
    }
}

/// A closed range `[min, max]` as the card writes it.
pub type Range = [f64; 2];

/// The card's `validated_input:` section: the input the model was validated
/// on. Every key is optional; an absent key is not checked. An attribute the
/// series does not state (no KVP, no BodyPartExamined, no ContrastBolusAgent)
/// is unknown and passes: the pixel checks (HU calibration, level) still run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatedInput {
    /// PixelSpacing, both values (mm).
    pub pixel_spacing_mm: Option<Range>,
    /// SliceThickness of the images the model sees (mm); the slice spacing
    /// when no thickness is stated.
    pub slice_thickness_mm: Option<Range>,
    /// KVP.
    pub kvp: Option<Range>,
    /// `any`, or `non_contrast`: a series whose ContrastBolusAgent names an
    /// agent is refused; one that names none is unknown and passes.
    #[serde(default)]
    pub contrast: ContrastRule,
    /// Accepted BodyPartExamined values (upper case, PS3.16 Annex L terms);
    /// empty: any.
    #[serde(default)]
    pub body_part_examined: Vec<String>,
    /// `axial`: the image normal within ~25° of the patient z axis, and no
    /// LOCALIZER in ImageType.
    pub orientation: Option<String>,
    /// `above_aortic_arch`: the slice the model sees cuts the trachea with
    /// lung on both sides (`volume::landmark::trachea_in_slice`).
    pub level: Option<String>,
    pub hu_calibration: Option<HuCalibration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ContrastRule {
    #[default]
    Any,
    NonContrast,
}

/// One HU peak a calibrated scanner shows: the mode of the voxels inside
/// `window_hu` must lie within `tolerance_hu` of `expected_hu`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HuPeak {
    pub expected_hu: f64,
    pub window_hu: Range,
    pub tolerance_hu: f64,
}

/// `validated_input.hu_calibration`: the air and fat peaks of the HU
/// histogram of the slices the model sees (`inference::guard`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HuCalibration {
    /// Absent: not checked (a heart-centred calcium-scoring field of view
    /// holds no air outside the body, only lung).
    pub air: Option<HuPeak>,
    pub fat: Option<HuPeak>,
    /// Fewer voxels than this inside a peak's window: the peak is missing,
    /// and the input is refused (every validated input has air and fat).
    pub min_voxels: usize,
    /// The share of the window's voxels within ±12.5 HU of the mode; below
    /// it the "peak" is flat (noise, or a non-CT image), and refused.
    pub min_peak_fraction: f64,
}

/// The card's `validated_output:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatedOutput {
    /// The biomarker value, in the card's unit.
    pub value: Option<Range>,
    /// The largest share of the map's mass (sum of the map at native
    /// resolution) that may lie outside the candidates. The value counts the
    /// map only inside candidates; a map mostly outside them is a model that
    /// does not see its anatomy.
    pub max_map_mass_outside_candidates: Option<f64>,
    /// Below this much map mass (mm², map summed times pixel area) the share
    /// is not judged: an empty map (no calcium, no tumour) is plausible.
    #[serde(default)]
    pub min_map_mass_mm2: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelCard {
    pub name: String,
    pub version: String,
    pub task: String,
    #[serde(default)]
    pub method: Option<String>,
    pub onnx: String,
    pub sha256: String,
    pub input: InputSpec,
    pub candidates: CandidateSpec,
    pub aggregation: AggregationSpec,
    pub biomarker: BiomarkerSpec,
    /// How the localization is written as a DICOM Segmentation; absent: a
    /// BINARY segment at 0.5 of the finding site (see [`SegmentationSpec`]).
    #[serde(default)]
    pub segmentation: SegmentationSpec,
    /// The input the model was validated on (`inference::guard` checks every
    /// job against it); absent: no input checks (site cards written before
    /// the section existed keep working).
    #[serde(default)]
    pub validated_input: Option<ValidatedInput>,
    /// What a plausible output looks like; absent: no output checks.
    #[serde(default)]
    pub validated_output: Option<ValidatedOutput>,
    /// Where the card was read from; the ONNX path is relative to it.
    #[serde(skip)]
    pub path: PathBuf,
}

impl ModelCard {
    pub fn load(path: &Path) -> Result<ModelCard, CardError> {
        let text = std::fs::read_to_string(path).map_err(|source| CardError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut card: ModelCard = serde_yaml::from_str(&text).map_err(|source| CardError::Parse {
            path: path.to_owned(),
            source,
        })?;
        card.path = path.to_owned();
        let bad = |message: String| CardError::Invalid {
            path: path.to_owned(),
            message,
        };
        if !matches!(card.aggregation.kind.as_str(), "area" | "agatston" | "direct") {
            return Err(bad(format!("unknown aggregation kind `{}`", card.aggregation.kind)));
        }
        if !matches!(card.input.slices.as_str(), "single" | "all") {
            return Err(bad(format!("unknown input.slices `{}`", card.input.slices)));
        }
        if card.input.size.contains(&0) || card.input.scale.divide == 0.0 {
            return Err(bad("input.size and input.scale.divide must be non-zero".into()));
        }
        let t = card.segmentation.threshold;
        if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            return Err(bad(format!("segmentation.threshold {t} is not within 0..=1")));
        }
        if let Some(v) = &card.validated_input {
            let ranges = [("pixel_spacing_mm", v.pixel_spacing_mm), ("slice_thickness_mm", v.slice_thickness_mm), ("kvp", v.kvp)];
            for (key, r) in ranges {
                if let Some([lo, hi]) = r {
                    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                        return Err(bad(format!("validated_input.{key} [{lo}, {hi}] is not a range")));
                    }
                }
            }
            if v.orientation.as_deref().is_some_and(|o| o != "axial") {
                return Err(bad("validated_input.orientation must be `axial`".into()));
            }
            if v.level.as_deref().is_some_and(|l| l != "above_aortic_arch") {
                return Err(bad("validated_input.level must be `above_aortic_arch`".into()));
            }
        }
        Ok(card)
    }

    pub fn onnx_path(&self) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(&self.onnx)
    }

    /// The ONNX file must be the one the card describes.
    pub fn verify_digest(&self) -> Result<(), CardError> {
        let p = self.onnx_path();
        let bytes = std::fs::read(&p).map_err(|source| CardError::Read { path: p.clone(), source })?;
        let actual = format!("{:x}", Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(self.sha256.trim()) {
            return Err(CardError::Digest {
                path: p,
                expected: self.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    pub fn is_agatston(&self) -> bool {
        self.aggregation.is_agatston()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The four shipped cards carry their `segmentation:` section; a card
    /// without one gets the documented default; a threshold outside 0..=1
    /// is refused when the card is loaded.
    #[test]
    fn segmentation_section_defaults_and_bounds() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let want = [
            ("pma", SegmentationType::Binary, "60005003"),
            ("sfa", SegmentationType::Binary, "55603005"),
            ("cac", SegmentationType::Binary, "29483008"),
            ("liver", SegmentationType::Fractional, "108369006"),
        ];
        for (name, kind, property) in want {
            let card = ModelCard::load(&models.join(format!("{name}.yaml"))).unwrap();
            assert_eq!(card.segmentation.kind, kind, "{name}");
            assert_eq!(card.segmentation.property_type.as_ref().unwrap().value, property, "{name}");
            assert!(card.segmentation.category.is_some() && card.segmentation.anatomic_region.is_some());
        }
        let text = std::fs::read_to_string(models.join("pma.yaml")).unwrap();
        let start = text.find("\nsegmentation:").unwrap();
        let end = start + 1 + text[start + 1..].find("\ntraining:").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("bare.yaml");
        std::fs::write(&bare, format!("{}{}", &text[..start], &text[end..])).unwrap();
        let card = ModelCard::load(&bare).unwrap();
        assert_eq!(card.segmentation, SegmentationSpec::default());
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, text.replace("  threshold: 0.5\n", "  threshold: 1.5\n")).unwrap();
        assert!(matches!(ModelCard::load(&bad), Err(CardError::Invalid { .. })));
    }
}
