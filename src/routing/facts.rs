//! What routing knows about a series: the header of its first instance (any
//! top-level keyword), values derived from all its instances, and — only when
//! a condition asks (`covers: liver`) — anatomy found from HU on a sparse
//! stack of its slices, computed once per series.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dicom_core::dictionary::UidDictionary;
use dicom_core::Tag;
use dicom_dictionary_std::{tags, StandardSopClassDictionary};
use dicom_object::InMemDicomObject;

use crate::dicom::header::InstanceHeader;
use crate::dicom::read::{open_dicom, OpenError, ReadDepth};
use crate::volume::attrs;
use crate::volume::coverage::{liver_coverage, LiverCoverage};
use crate::volume::Volume;

/// The sparse stack the anatomy checks decode: about one slice per
/// [`ANATOMY_STEP_MM`], at most [`ANATOMY_MAX_SLICES`]. Enough to place the
/// lung bases within a few mm; a fraction of a full decode.
pub const ANATOMY_STEP_MM: f64 = 5.0;
pub const ANATOMY_MAX_SLICES: usize = 64;

/// Within this angle of the patient z axis, a plane normal is axial.
pub const AXIAL_MAX_DEG: f64 = 10.0;

/// Values the node derives; the names are what `derived:` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// Instances (files) in the series.
    InstanceCount,
    /// Image planes: frames summed over instances (1 per single-frame image).
    SliceCount,
    /// SliceThickness of the first instance (mm); Enhanced CT: Pixel Measures.
    SliceThickness,
    /// Median distance between neighbouring distinct slice positions along
    /// the normal (mm); absent with fewer than two positions.
    SliceSpacing,
    /// The plane normal is within [`AXIAL_MAX_DEG`] of the patient z axis.
    Axial,
    /// ContrastBolusAgent (0018,0010) is non-empty.
    Contrast,
    Modality,
    /// SOP Class name from PS3.6 (e.g. "CT Image Storage"), or the UID when
    /// unknown; `equals` also accepts the UID.
    SopClass,
    /// ImageType values, for `contains`.
    ImageType,
}

impl Derived {
    const ALL: [Derived; 9] = [
        Derived::InstanceCount,
        Derived::SliceCount,
        Derived::SliceThickness,
        Derived::SliceSpacing,
        Derived::Axial,
        Derived::Contrast,
        Derived::Modality,
        Derived::SopClass,
        Derived::ImageType,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Derived::InstanceCount => "instance_count",
            Derived::SliceCount => "slice_count",
            Derived::SliceThickness => "slice_thickness",
            Derived::SliceSpacing => "slice_spacing",
            Derived::Axial => "axial",
            Derived::Contrast => "contrast",
            Derived::Modality => "modality",
            Derived::SopClass => "sop_class",
            Derived::ImageType => "image_type",
        }
    }

    pub fn parse(s: &str) -> Option<Derived> {
        Derived::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn names() -> Vec<&'static str> {
        Derived::ALL.iter().map(|d| d.name()).collect()
    }

    /// A placeholder of the kind this value has, for compile-time checks.
    pub(crate) fn value_kind(self) -> FactValue {
        match self {
            Derived::InstanceCount | Derived::SliceCount | Derived::SliceThickness | Derived::SliceSpacing => {
                FactValue::Number(vec![])
            }
            Derived::Axial | Derived::Contrast => FactValue::Bool(false),
            Derived::Modality | Derived::SopClass | Derived::ImageType => FactValue::Text(vec![]),
        }
    }
}

/// A value as conditions see it. Text keeps DICOM multi-values apart.
#[derive(Debug, Clone, PartialEq)]
pub enum FactValue {
    Text(Vec<String>),
    Number(Vec<f64>),
    Bool(bool),
}

impl fmt::Display for FactValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FactValue::Text(t) => f.write_str(&t.join("\\")),
            FactValue::Number(n) => {
                let parts: Vec<String> = n.iter().map(|v| format!("{}", (v * 1000.0).round() / 1000.0)).collect();
                f.write_str(&parts.join("\\"))
            }
            FactValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("series has no instances")]
    Empty,
    #[error(transparent)]
    Open(#[from] OpenError),
}

impl FactsError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, FactsError::Open(OpenError::Io { .. }))
    }
}

/// Everything a condition can ask about one series.
#[derive(Debug, Clone)]
pub struct SeriesFacts {
    pub series_instance_uid: String,
    /// Header (no pixel data) of the first instance: lowest InstanceNumber,
    /// then path.
    pub first: InMemDicomObject,
    pub first_path: PathBuf,
    pub instance_count: usize,
    pub slice_count: usize,
    pub slice_spacing: Option<f64>,
    pub normal: Option<[f64; 3]>,
    /// The series' files, sorted along the normal when the index headers
    /// have positions; what the anatomy checks decode from.
    pub files: Vec<PathBuf>,
    /// [`SeriesFacts::liver_coverage`], once computed.
    liver: OnceLock<Result<LiverCoverage, String>>,
}

impl SeriesFacts {
    /// Read the first instance's header and derive the rest from the index
    /// headers; `instances` are `(path, header)` as
    /// `SeriesIndex::series_instances` gives them, with paths already joined
    /// to the spool root.
    pub fn load(instances: &[(PathBuf, InstanceHeader)]) -> Result<SeriesFacts, FactsError> {
        let (first_path, _) = instances
            .iter()
            .min_by(|a, b| {
                let key = |h: &InstanceHeader| h.instance_number.unwrap_or(i32::MAX);
                key(&a.1).cmp(&key(&b.1)).then_with(|| a.0.cmp(&b.0))
            })
            .ok_or(FactsError::Empty)?;
        let first = open_dicom(first_path, ReadDepth::Header)?.into_inner();
        let mut facts = Self::from_parts(first, first_path, instances.iter().map(|(_, h)| h));
        let along = |h: &InstanceHeader| match (&h.geometry, facts.normal) {
            (Some(g), Some(n)) => attrs::dot(&g.position, &n),
            _ => 0.0,
        };
        let mut sorted: Vec<(f64, &PathBuf)> = instances.iter().map(|(p, h)| (along(h), p)).collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        facts.files = sorted.into_iter().map(|(_, p)| p.clone()).collect();
        Ok(facts)
    }

    /// [`SeriesFacts::load`] for `SeriesIndex::series_instances` output,
    /// whose paths are relative to the spool root.
    pub fn load_spooled(spool_root: &Path, instances: &[(PathBuf, InstanceHeader)]) -> Result<SeriesFacts, FactsError> {
        let abs: Vec<(PathBuf, InstanceHeader)> = instances
            .iter()
            .map(|(p, h)| (spool_root.join(p), h.clone()))
            .collect();
        Self::load(&abs)
    }

    /// Build from an already-read first header and the headers of all
    /// instances (including the first).
    pub fn from_parts<'a>(
        first: InMemDicomObject,
        first_path: &Path,
        headers: impl Iterator<Item = &'a InstanceHeader>,
    ) -> SeriesFacts {
        let headers: Vec<&InstanceHeader> = headers.collect();
        let mut positions: Vec<[f64; 3]> = Vec::new();
        let mut orientation: Option<[f64; 6]> = None;
        let mut slice_count = 0;
        for h in &headers {
            slice_count += h.number_of_frames.unwrap_or(1).max(1) as usize;
            if let Some(g) = &h.geometry {
                positions.push(g.position);
                orientation.get_or_insert(g.orientation);
            }
        }
        // Enhanced CT keeps geometry in functional groups, which the index
        // header does not see.
        if attrs::has_functional_groups(&first) {
            // Frames past the Per-Frame items all take the Shared item's
            // plane, which the first of them already added; stopping there
            // keeps a NumberOfFrames of 2^31 from costing 2^31 lookups.
            let per_frame = attrs::items(&first, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).len();
            for f in 0..attrs::frame_count(&first).min(per_frame + 1) {
                let (p, o) = attrs::frame_plane(&first, f);
                positions.extend(p);
                if orientation.is_none() {
                    orientation = o;
                }
            }
        }
        let normal = orientation.map(|o| attrs::normal(&o));
        let slice_spacing = normal.and_then(|n| {
            let mut d: Vec<f64> = positions.iter().map(|p| attrs::dot(p, &n)).collect();
            d.sort_by(f64::total_cmp);
            d.dedup_by(|a, b| (*a - *b).abs() < 1e-3);
            let mut steps: Vec<f64> = d.windows(2).map(|w| w[1] - w[0]).collect();
            steps.sort_by(f64::total_cmp);
            steps.get(steps.len() / 2).copied()
        });
        SeriesFacts {
            series_instance_uid: attrs::text(&first, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
            first,
            first_path: first_path.to_owned(),
            instance_count: headers.len(),
            slice_count,
            slice_spacing,
            normal,
            files: Vec::new(),
            liver: OnceLock::new(),
        }
    }

    /// Whether the series covers the liver as an abdominal CT does
    /// ([`crate::volume::coverage`]), from HU on a sparse stack of its
    /// slices: decoded on the first call only, so a route table that never
    /// asks costs nothing. `Err` says why it could not be judged (no files,
    /// a volume that does not assemble: tilt, uneven spacing, undecodable).
    pub fn liver_coverage(&self) -> &Result<LiverCoverage, String> {
        self.liver.get_or_init(|| {
            if self.files.is_empty() {
                return Err("no image files to look at".into());
            }
            let step = match self.slice_spacing {
                Some(s) if s > 0.0 => (ANATOMY_STEP_MM / s).ceil() as usize,
                _ => 1,
            };
            let step = step.max(self.files.len().div_ceil(ANATOMY_MAX_SLICES)).max(1);
            let sparse: Vec<PathBuf> = self.files.iter().step_by(step).cloned().collect();
            Volume::from_files(&sparse)
                .map(|v| liver_coverage(&v))
                .map_err(|e| format!("cannot assemble the volume: {e}"))
        })
    }

    /// The liver coverage if a condition has asked for it, for `route`.
    pub fn liver_coverage_if_computed(&self) -> Option<&Result<LiverCoverage, String>> {
        self.liver.get()
    }

    /// A top-level attribute of the first instance; `None` when absent or
    /// empty. Sequences are "present" when they have items, with no text.
    pub fn attribute(&self, tag: Tag) -> Option<FactValue> {
        let e = self.first.element_opt(tag).ok()??;
        if let Some(items) = e.items() {
            return (!items.is_empty()).then(|| FactValue::Text(vec![format!("<{} item(s)>", items.len())]));
        }
        let s = e.to_str().ok()?;
        let values: Vec<String> = s
            .split('\\')
            .map(|v| v.trim_matches(['\0', ' ']).to_owned())
            .collect();
        (!values.iter().all(|v| v.is_empty())).then_some(FactValue::Text(values))
    }

    pub fn derived(&self, d: Derived) -> Option<FactValue> {
        let num = |v: f64| FactValue::Number(vec![v]);
        match d {
            Derived::InstanceCount => Some(num(self.instance_count as f64)),
            Derived::SliceCount => Some(num(self.slice_count as f64)),
            Derived::SliceThickness => attrs::frame_floats(&self.first, 0, tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS)
                .and_then(|v| v.first().copied())
                .map(num),
            Derived::SliceSpacing => self.slice_spacing.map(num),
            Derived::Axial => self
                .normal
                .map(|n| FactValue::Bool(n[2].abs() >= AXIAL_MAX_DEG.to_radians().cos())),
            Derived::Contrast => Some(FactValue::Bool(self.attribute(tags::CONTRAST_BOLUS_AGENT).is_some())),
            Derived::Modality => self.attribute(tags::MODALITY),
            Derived::SopClass => {
                let uid = attrs::text(&self.first, tags::SOP_CLASS_UID)?;
                let uid = uid.trim_end_matches('\0').to_owned();
                let name = StandardSopClassDictionary
                    .by_uid(&uid)
                    .map(|e| e.name.to_owned());
                Some(FactValue::Text(vec![name.unwrap_or(uid)]))
            }
            Derived::ImageType => self.attribute(tags::IMAGE_TYPE),
        }
    }
}

/// SOP class names for `sop_class` comparisons: a UID in the config is
/// turned into the name the fact carries.
pub(crate) fn sop_class_name(uid_or_name: &str) -> String {
    StandardSopClassDictionary
        .by_uid(uid_or_name)
        .map(|e| e.name.to_owned())
        .unwrap_or_else(|| uid_or_name.to_owned())
}
