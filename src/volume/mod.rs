//! Volume assembly: the files of one series → a HU volume with its geometry.
//!
//! **Input.** The spool paths of one series: single-frame CT Image Storage
//! files, or Enhanced CT (1.2.840.10008.5.1.4.1.1.2.1) multi-frame objects,
//! in any order.
//!
//! **Output.** A [`Volume`]: `hu[slice, row, col]` as `f32` Hounsfield units,
//! slices sorted along the plane normal, with pixel spacing, slice positions,
//! and the SOP Instance UID (and frame number) behind every slice, so that
//! a report can reference the exact images it measured (TID 1500 image
//! library).
//!
//! **HU.** PS3.3 C.7.6.3.1 / C.11.1 (Modality LUT): the stored value is masked
//! to BitsStored, sign-extended when PixelRepresentation = 1, then
//! `HU = stored × RescaleSlope + RescaleIntercept` (slope 1 and intercept 0
//! when absent). Enhanced CT takes slope/intercept per frame from the Pixel
//! Value Transformation functional group. We never use the decoder's VOI
//! (window) path: the numbers are the stored values, not display values.
//!
//! **Decoding.** All pixel data of the node is decoded in `decode` here:
//! `dicom-pixeldata` for every accepted transfer syntax except JPEG Extended
//! (.51, 12-bit DCT), which `jpeg_ext` decodes with libjpeg-turbo. The
//! header of every compressed frame is read first (`codestream`): a frame
//! that is not exactly Rows x Columns of one component never reaches a codec.
//!
//! **Padding.** A stored value equal to PixelPaddingValue (0028,0120) — or
//! within [PixelPaddingValue, PixelPaddingRangeLimit] when the limit is
//! present — lies outside the reconstructed field of view. It becomes
//! [`PADDING_HU`] (−1024, air) rather than its rescaled value (which would be
//! e.g. −33792 HU), and [`Volume::padding_voxels`] counts such voxels.
//!
//! **Geometry invariants** (checked, never repaired):
//! - all frames have the same Rows/Columns, PixelSpacing and orientation
//!   (direction cosines equal within 1e-3);
//! - slices are ordered by `dot(ImagePositionPatient, normal)`, not by
//!   InstanceNumber; two slices at the same position are refused
//!   ([`VolumeError::DuplicatePosition`], e.g. two phases in one series);
//! - the step between neighbouring slices is along the normal: more than
//!   [`VolumeOptions::max_tilt_deg`] off is a gantry tilt (or a sheared
//!   stack) and is refused with [`VolumeError::GantryTilt`];
//! - spacing is even: `(max − min) / median` above
//!   [`VolumeOptions::spacing_tolerance`] is [`VolumeError::UnevenSpacing`].
//!
//! A mis-scaled volume would give wrong biomarker values silently; refusing
//! is the only safe answer for the stages after this one.
//!
//! **Failure modes.** Every error is permanent for the given files
//! ([`VolumeError::is_retryable`] is true only for I/O). Decoders run under
//! `catch_unwind`, so a decoder panic becomes [`VolumeError::Decode`].
//! Objects whose SOP Instance UID is empty (shared/realct/abdomen-siemens-j2k)
//! are refused with [`VolumeError::MissingAttribute`]: a slice we cannot
//! reference cannot be reported on, and ingest never spools such objects.
//! A file whose Rows x Columns x NumberOfFrames overflows, or whose Rows or
//! Columns pass [`MAX_SIDE`], is refused with [`VolumeError::Unsupported`]
//! before any decoder runs; so is one whose pixel data cannot hold what its
//! header describes (native data shorter than Rows x Columns x frames, or
//! compressed data that would expand more than [`MAX_EXPANSION`] times).
//! A series whose files describe more than [`VolumeOptions::max_voxels`]
//! voxels in all is refused with [`VolumeError::TooLarge`], before the file
//! that passes the budget is decoded: memory is bounded per volume, not per
//! file, so an Enhanced CT object of any number of frames is read like the
//! same frames sent as single-frame files.

pub(crate) mod attrs;
mod codestream;
mod jpeg_ext;
pub mod acquisition;
pub mod coverage;
pub mod heart;
pub mod label;
pub mod landmark;
pub mod resample;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ndarray::{Array3, ArrayView2, Axis};

use crate::dicom::read::{open_dicom, OpenError, ReadDepth};
use attrs::{dot, frame_count, frame_floats, frame_plane, int, normal, text};

/// What padding voxels become; see the module doc.
pub const PADDING_HU: f32 = -1024.0;

/// The default of [`VolumeOptions::max_voxels`]: 2^30 voxels, 4 GiB of f32
/// HU (4096 slices of 512x512; a whole-body CT of 0.6 mm slices is about
/// 3000). The budget is in voxels, not bytes of pixel data, because each
/// voxel becomes an `f32` whatever its stored size: a byte budget let an
/// 8-bit file describe 2^30 pixels, 4 GiB of HU (the `dicom_file` fuzz
/// target's RSS reached 3.7 GB).
pub const DEFAULT_MAX_VOXELS: u64 = 1 << 30;

/// How many times larger than its encapsulated bytes the decoded pixel data
/// of a compressed object may be, once it describes more than
/// [`EXPANSION_CHECK_PIXELS`]. Lossless CT compresses 2-4 times and lossy CT
/// rarely beyond 20; only a frame of one constant value (which JPEG-LS
/// codes in a few hundred bytes) comes near this. Without it, a few hundred
/// bytes of RLE or JPEG headers could make the decoders allocate, and the
/// volume hold, gigabytes that the file never contained.
pub const MAX_EXPANSION: u64 = 1000;

/// Below this many pixels (64 frames of 512x512) a compressed object is not
/// held to [`MAX_EXPANSION`]: it cannot cost much, and a single blank frame
/// may legitimately compress further.
pub const EXPANSION_CHECK_PIXELS: u64 = 1 << 24;

/// The largest Rows or Columns decoded (CT is 512-1024, some 2048). The
/// codecs take time in proportion to the image they are told to produce,
/// whatever the size of the data, and a 25608x24930 JPEG frame of 300 bytes
/// took jpeg-decoder more than 10 s.
pub const MAX_SIDE: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    #[error("no image files given")]
    Empty,
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{path}: {attribute} is missing or empty")]
    MissingAttribute { path: PathBuf, attribute: &'static str },
    /// Pixel data this build cannot decode, including transfer syntaxes the
    /// registry does not know at all.
    #[error("{path}: cannot decode pixel data ({transfer_syntax}): {message}")]
    Decode {
        path: PathBuf,
        transfer_syntax: String,
        message: String,
    },
    #[error("{path}: unsupported image: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// The series is larger than the volume budget; nothing past the budget
    /// was decoded.
    #[error("{path}: the series describes at least {voxels} voxels ({mib} MiB of HU), more than the {limit} one volume may hold (jobs.max_volume_mb)", mib = (voxels * 4) >> 20)]
    TooLarge { path: PathBuf, voxels: u64, limit: u64 },
    #[error("{path}: {what} differs from the first slice ({detail})")]
    Inconsistent {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("two slices at the same position {position_mm:.3} mm along the normal (several phases or acquisitions in one series?)")]
    DuplicatePosition { position_mm: f64 },
    #[error("gantry tilt or sheared stack: slices step {degrees:.1}° off the plane normal; refusing to resample")]
    GantryTilt { degrees: f64 },
    #[error("uneven slice spacing: {min_mm:.3} to {max_mm:.3} mm; refusing to treat it as a regular grid")]
    UnevenSpacing { min_mm: f64, max_mm: f64 },
    #[error("slice selection `{selection}`: {reason}")]
    Selection { selection: String, reason: String },
    /// The anatomical landmark a selection looks for is not in the series.
    #[error(transparent)]
    Landmark(#[from] landmark::LandmarkError),
}

impl VolumeError {
    /// Only an I/O error may succeed on a later try; everything else is a
    /// property of the files.
    pub fn is_retryable(&self) -> bool {
        matches!(self, VolumeError::Open(OpenError::Io { .. }))
    }
}

/// Tolerances for [`Volume::from_files_with`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VolumeOptions {
    /// Largest angle between a slice step and the normal still taken as
    /// "along the normal". Positions are written with ~0.01 mm precision, so
    /// 1° is far above rounding and far below any real tilt (typ. 10–30°).
    pub max_tilt_deg: f64,
    /// Relative spread `(max − min) / median` of slice steps still "even";
    /// the same meaning as `series.spacing_tolerance`.
    pub spacing_tolerance: f64,
    /// The most voxels (HU values, 4 bytes each) the files of one volume
    /// may describe together; `jobs.max_volume_mb`.
    pub max_voxels: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            max_tilt_deg: 1.0,
            spacing_tolerance: 0.1,
            max_voxels: DEFAULT_MAX_VOXELS,
        }
    }
}

/// A CT volume in HU with the geometry needed to measure in mm and to
/// reference the source images.
#[derive(Debug, Clone)]
pub struct Volume {
    /// `[slice, row, col]`, slices ascending along [`Volume::normal`].
    pub hu: Array3<f32>,
    /// PixelSpacing: between rows, between columns (mm).
    pub pixel_spacing: [f64; 2],
    /// `dot(ImagePositionPatient, normal)` of every slice (mm), ascending.
    pub slice_positions: Vec<f64>,
    /// ImagePositionPatient of every slice.
    pub positions: Vec<[f64; 3]>,
    /// SliceThickness of the first slice (mm), when given.
    pub slice_thickness: Option<f64>,
    /// Mean distance between neighbouring slices (mm); `None` for one slice.
    pub spacing_mm: Option<f64>,
    /// ImagePositionPatient of slice 0.
    pub origin: [f64; 3],
    /// ImageOrientationPatient: row then column direction cosines.
    pub orientation: [f64; 6],
    /// Unit normal, row × column.
    pub normal: [f64; 3],
    /// SOP Instance UID behind every slice.
    pub sop_instance_uids: Vec<String>,
    /// 1-based frame number within its instance for multi-frame objects,
    /// `None` for single-frame images (PS3.3 C.10.5 Referenced Frame Number).
    pub frame_numbers: Vec<Option<u32>>,
    /// The file every slice came from.
    pub source_paths: Vec<PathBuf>,
    /// Voxels that held PixelPaddingValue and were set to [`PADDING_HU`].
    pub padding_voxels: usize,
    /// The coarsest HU step any slice can represent: max |RescaleSlope|.
    /// 8-bit lossy encodings of CT carry slopes of ~32 HU, too coarse for
    /// HU-threshold biomarkers; callers decide what step they accept.
    pub hu_step: f64,
    /// The aortic arch level, found once: the jobs of a series share its
    /// volume (`job::volumes`) and the PMA, SFA and CAC routes all ask.
    pub arch: ArchCache,
}

/// [`Volume::arch_level`]'s memo. A clone starts empty: a clone is how a
/// volume with other HU is made (`Volume { hu, ..v.clone() }`), and the
/// level of the old HU would be wrong for it.
#[derive(Debug, Default)]
pub struct ArchCache(pub(crate) std::sync::OnceLock<Result<landmark::ArchLevel, landmark::LandmarkError>>);

impl Clone for ArchCache {
    fn clone(&self) -> ArchCache {
        ArchCache::default()
    }
}

/// How to pick one 2-D slice for a model that works on a single image.
/// Serialised (snake_case) in the job store, where a job keeps the
/// selection its route had when the job was created.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SliceSelection {
    /// The series must have exactly one image; that one.
    Single,
    /// Index `(n − 1) / 2` in the sorted stack.
    Middle,
    /// This index in the sorted stack (0 = lowest along the normal).
    Index(usize),
    /// The slice whose ImagePositionPatient z (patient axis, mm) is nearest;
    /// refused when z is more than half a spacing (or thickness) outside
    /// the stack.
    ZMm(f64),
    /// The axial slice just above the aortic arch, found from HU structure
    /// ([`landmark::above_aortic_arch`]); a single-image series is that
    /// image, as with `Single`.
    AboveAorticArch,
    /// Every slice, each measured on its own (the job stage's volume path);
    /// a single-image series is that image, as with `Single`. No one slice
    /// of several is picked: [`Volume::select`] refuses it.
    All,
}

impl std::fmt::Display for SliceSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SliceSelection::Single => f.write_str("single"),
            SliceSelection::Middle => f.write_str("middle"),
            SliceSelection::Index(i) => write!(f, "index {i}"),
            SliceSelection::ZMm(z) => write!(f, "z_mm {z}"),
            SliceSelection::AboveAorticArch => f.write_str("above_aortic_arch"),
            SliceSelection::All => f.write_str("all"),
        }
    }
}

/// One decoded frame before sorting.
struct Frame {
    hu: Vec<f32>,
    position: [f64; 3],
    orientation: [f64; 6],
    pixel_spacing: [f64; 2],
    thickness: Option<f64>,
    rows: usize,
    cols: usize,
    sop_instance_uid: String,
    frame_number: Option<u32>,
    path: PathBuf,
    padding: usize,
    slope: f64,
}

impl Volume {
    /// An axial stack for tests: slices 1 mm apart along z, identity
    /// orientation, placeholder UIDs and paths.
    #[cfg(test)]
    pub fn test_stack(hu: Array3<f32>, pixel_spacing: [f64; 2], slice_thickness: f64) -> Volume {
        let slices = hu.dim().0;
        Volume {
            hu,
            pixel_spacing,
            slice_positions: (0..slices).map(|i| i as f64).collect(),
            positions: (0..slices).map(|i| [0.0, 0.0, i as f64]).collect(),
            slice_thickness: Some(slice_thickness),
            spacing_mm: None,
            origin: [0.0; 3],
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            normal: [0.0, 0.0, 1.0],
            sop_instance_uids: vec!["1.2.3".into(); slices],
            frame_numbers: vec![None; slices],
            source_paths: vec![PathBuf::from("/nonexistent"); slices],
            padding_voxels: 0,
            hu_step: 1.0,
            arch: Default::default(),
        }
    }

    pub fn from_files(paths: &[PathBuf]) -> Result<Volume, VolumeError> {
        Self::from_files_with(paths, &VolumeOptions::default())
    }

    pub fn from_files_with(paths: &[PathBuf], opts: &VolumeOptions) -> Result<Volume, VolumeError> {
        if paths.is_empty() {
            return Err(VolumeError::Empty);
        }
        let threads = crate::par::threads().min(paths.len() / MIN_FILES_PER_THREAD).max(1);
        let frames = match (threads > 1).then(|| read_all_parallel(paths, opts, threads)).flatten() {
            Some(frames) => frames,
            // One thread, or something failed: read in order, one file after
            // the other, so an error is the one a single reader meets first
            // (which file passes the budget depends on the order).
            None => read_all(paths, opts)?,
        };
        assemble(frames, opts)
    }

    pub fn slices(&self) -> usize {
        self.hu.len_of(Axis(0))
    }

    /// One slice of the sorted stack.
    pub fn slice(&self, index: usize) -> Option<ArrayView2<'_, f32>> {
        (index < self.slices()).then(|| self.hu.index_axis(Axis(0), index))
    }

    /// [`landmark::above_aortic_arch`] of this volume, computed on first use.
    pub fn arch_level(&self) -> Result<&landmark::ArchLevel, landmark::LandmarkError> {
        self.arch.0.get_or_init(|| landmark::above_aortic_arch(self)).as_ref().map_err(Clone::clone)
    }

    /// The index [`SliceSelection`] picks, or why it cannot.
    pub fn select(&self, selection: &SliceSelection) -> Result<usize, VolumeError> {
        let n = self.slices();
        let refuse = |reason: String| VolumeError::Selection {
            selection: selection.to_string(),
            reason,
        };
        match *selection {
            SliceSelection::Single if n == 1 => Ok(0),
            SliceSelection::Single => Err(refuse(format!("the series has {n} slices, not exactly 1"))),
            SliceSelection::Middle => Ok((n - 1) / 2),
            SliceSelection::AboveAorticArch if n == 1 => Ok(0),
            SliceSelection::AboveAorticArch => Ok(self.arch_level()?.index),
            SliceSelection::All if n == 1 => Ok(0),
            SliceSelection::All => Err(refuse(format!("{n} slices are measured each, not one picked"))),
            SliceSelection::Index(i) if i < n => Ok(i),
            SliceSelection::Index(i) => Err(refuse(format!("index {i} is outside 0..{n}"))),
            SliceSelection::ZMm(z) => {
                let (best, dist) = self
                    .positions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i, (p[2] - z).abs()))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .ok_or_else(|| refuse("the volume is empty".into()))?;
                let half = self.spacing_mm.or(self.slice_thickness).unwrap_or(1.0) / 2.0;
                if dist > half + 1e-6 {
                    return Err(refuse(format!(
                        "nearest slice is {dist:.2} mm away (z = {:.2} mm)",
                        self.positions[best][2]
                    )));
                }
                Ok(best)
            }
        }
    }
}

fn missing(path: &Path, attribute: &'static str) -> VolumeError {
    VolumeError::MissingAttribute {
        path: path.to_owned(),
        attribute,
    }
}

/// Fewer files a thread than this are read by one: a thread's start costs
/// more than it saves there.
const MIN_FILES_PER_THREAD: usize = 8;

/// The files in order, one at a time: the decoded object is dropped before
/// the next is read, so peak memory is about one volume.
fn read_all(paths: &[PathBuf], opts: &VolumeOptions) -> Result<Vec<Frame>, VolumeError> {
    let used = AtomicU64::new(0);
    read_run(paths, Budget { used: &used, limit: opts.max_voxels })
}

/// The frames of `paths`, read in order within `budget`.
fn read_run(paths: &[PathBuf], budget: Budget<'_>) -> Result<Vec<Frame>, VolumeError> {
    let mut frames = Vec::new();
    for p in paths {
        read_frames(p, &mut frames, budget)?;
    }
    Ok(frames)
}

/// [`read_all`] with the files cut into `threads` runs read side by side
/// (decoding is most of a job's load: a 300-slice chest took 0.8 s on one
/// core, and the other jobs of the series wait for it). The frames come back
/// in file order, as from [`read_all`]. The voxel budget is one counter the
/// threads reserve from before they decode, so the frames stay bounded by
/// it; peak memory is the volume plus one decoded file per thread (one file
/// in all for [`read_all`]).
/// `None` when any file failed (or the budget ran out): the caller reads
/// again in order for the error, a path only bad series take.
fn read_all_parallel(paths: &[PathBuf], opts: &VolumeOptions, threads: usize) -> Option<Vec<Frame>> {
    let used = AtomicU64::new(0);
    let budget = Budget { used: &used, limit: opts.max_voxels };
    let runs = crate::par::map_runs(paths, threads, |run| read_run(run, budget).ok());
    let mut frames = Vec::new();
    for run in runs {
        frames.extend(run?);
    }
    Some(frames)
}

/// The voxels reserved so far for a volume's frames (shared by the threads
/// that read it), and how many it may hold.
#[derive(Debug, Clone, Copy)]
struct Budget<'a> {
    used: &'a AtomicU64,
    limit: u64,
}

/// Reads one file's frames into `out`, once its voxels fit the budget.
fn read_frames(path: &Path, out: &mut Vec<Frame>, budget: Budget<'_>) -> Result<(), VolumeError> {
    let obj = match open_dicom(path, ReadDepth::Full) {
        Ok(obj) => obj,
        Err(OpenError::UnsupportedTransferSyntax { path, uid }) => {
            return Err(VolumeError::Decode {
                path,
                transfer_syntax: ts_name(&uid),
                message: "no decoder for this transfer syntax".into(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let ts = obj.meta().transfer_syntax().trim_end_matches('\0').to_owned();
    let sop_instance_uid = text(&obj, tags::SOP_INSTANCE_UID).ok_or_else(|| missing(path, "SOPInstanceUID"))?;
    let spp = int(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let photometric = text(&obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if spp != 1 || !photometric.starts_with("MONOCHROME") {
        return Err(VolumeError::Unsupported {
            path: path.to_owned(),
            reason: format!("{spp} samples per pixel, {photometric:?}: not a greyscale CT image"),
        });
    }
    let rows = int(&obj, tags::ROWS).filter(|v| *v > 0).ok_or_else(|| missing(path, "Rows"))? as usize;
    let cols = int(&obj, tags::COLUMNS).filter(|v| *v > 0).ok_or_else(|| missing(path, "Columns"))? as usize;
    let bits_allocated = int(&obj, tags::BITS_ALLOCATED).ok_or_else(|| missing(path, "BitsAllocated"))?;
    let bits_stored = int(&obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    let signed = int(&obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    if !matches!(bits_allocated, 8 | 16) || !(1..=bits_allocated).contains(&bits_stored) {
        return Err(VolumeError::Unsupported {
            path: path.to_owned(),
            reason: format!("BitsAllocated {bits_allocated}, BitsStored {bits_stored}"),
        });
    }
    let n_frames = frame_count(&obj);
    let multi = attrs::has_functional_groups(&obj);
    let padding = padding_range(&obj, signed);

    // Rows, Columns and NumberOfFrames are the sender's numbers: their
    // product can overflow, and then no real pixel data matches it.
    let Some((frame_len, total_len)) = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(bits_allocated as usize / 8))
        .and_then(|f| Some((f, f.checked_mul(n_frames)?)))
    else {
        return Err(VolumeError::Unsupported {
            path: path.to_owned(),
            reason: format!("{n_frames} frame(s) of {rows}x{cols} is more pixel data than memory can hold"),
        });
    };
    // The decoders allocate, and spend time on, what the header describes
    // before they look at the data: a 2 kB RLE file claiming 65535x65535
    // took 8 GiB. So the size is bounded before any of them runs.
    if rows > MAX_SIDE || cols > MAX_SIDE {
        return Err(VolumeError::Unsupported {
            path: path.to_owned(),
            reason: format!("{rows}x{cols} pixels: more than the {MAX_SIDE} rows or columns of a CT image"),
        });
    }
    let pixels = (rows * cols) as u64 * n_frames as u64;
    // Reserved before the decoder runs, whether it passes or not: a refused
    // series is read no further.
    let before = budget
        .used
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_add(pixels)))
        .expect("the update always returns Some");
    let total = before.saturating_add(pixels);
    if total > budget.limit {
        return Err(VolumeError::TooLarge {
            path: path.to_owned(),
            voxels: total,
            limit: budget.limit,
        });
    }
    check_pixel_data_size(&obj, total_len as u64, pixels).map_err(|reason| VolumeError::Unsupported {
        path: path.to_owned(),
        reason: format!("{n_frames} frame(s) of {rows}x{cols} at {bits_allocated} bits: {reason}"),
    })?;
    let layout = jpeg_ext::Layout {
        rows,
        cols,
        bits_allocated: bits_allocated as u16,
        bits_stored: bits_stored as u16,
        frames: n_frames,
    };
    let decoded = decode(&obj, path, &ts, &layout)?;
    let data = decoded.data();
    if data.len() < total_len {
        return Err(VolumeError::Decode {
            path: path.to_owned(),
            transfer_syntax: ts,
            message: format!(
                "decoded {} bytes, expected {total_len} for {n_frames} frame(s) of {rows}x{cols}",
                data.len(),
            ),
        });
    }

    for f in 0..n_frames {
        let (position, orientation) = frame_plane(&obj, f);
        let position = position.ok_or_else(|| missing(path, "ImagePositionPatient"))?;
        let orientation = orientation.ok_or_else(|| missing(path, "ImageOrientationPatient"))?;
        let spacing = frame_floats(&obj, f, tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)
            .filter(|s| s.len() == 2 && s[0] > 0.0 && s[1] > 0.0)
            .ok_or_else(|| missing(path, "PixelSpacing"))?;
        let thickness = frame_floats(&obj, f, tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS)
            .and_then(|v| v.first().copied());
        let group = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
        let slope = frame_floats(&obj, f, group, tags::RESCALE_SLOPE)
            .and_then(|v| v.first().copied())
            .unwrap_or(1.0);
        let intercept = frame_floats(&obj, f, group, tags::RESCALE_INTERCEPT)
            .and_then(|v| v.first().copied())
            .unwrap_or(0.0);
        let bytes = &data[f * frame_len..(f + 1) * frame_len];
        let (hu, pad) = to_hu(bytes, bits_allocated as u32, bits_stored as u32, signed, slope, intercept, padding);
        out.push(Frame {
            hu,
            position,
            orientation,
            pixel_spacing: [spacing[0], spacing[1]],
            thickness,
            rows,
            cols,
            sop_instance_uid: sop_instance_uid.clone(),
            frame_number: multi.then_some(f as u32 + 1),
            path: path.to_owned(),
            padding: pad,
            slope,
        });
    }
    Ok(())
}

/// Whether the Pixel Data element can hold what the header describes
/// (`decoded_len` bytes, `pixels` pixels), before a decoder sizes its output
/// from the header: native data must be that long, and compressed data may
/// not claim to expand more than [`MAX_EXPANSION`] times.
fn check_pixel_data_size(obj: &InMemDicomObject, decoded_len: u64, pixels: u64) -> Result<(), String> {
    let Some(value) = obj.element(tags::PIXEL_DATA).ok().map(|e| e.value()) else {
        return Err("no Pixel Data".into());
    };
    if let Some(fragments) = value.fragments() {
        let stored: u64 = fragments.iter().map(|f| f.len() as u64).sum();
        if pixels > EXPANSION_CHECK_PIXELS && stored.saturating_mul(MAX_EXPANSION) < decoded_len {
            return Err(format!(
                "{stored} bytes of compressed pixel data cannot hold {decoded_len} bytes of image (more than {MAX_EXPANSION} times)"
            ));
        }
    } else if let Some(primitive) = value.primitive() {
        let stored = primitive.calculate_byte_len() as u64;
        if stored < decoded_len {
            return Err(format!("Pixel Data holds {stored} bytes, the image needs {decoded_len}"));
        }
    }
    Ok(())
}

/// Decoded pixel data of one object, whichever decoder produced it.
enum Decoded<'a> {
    Pixeldata(dicom_pixeldata::DecodedPixelData<'a>),
    Owned(Vec<u8>),
}

impl Decoded<'_> {
    fn data(&self) -> &[u8] {
        match self {
            Decoded::Pixeldata(d) => d.data(),
            Decoded::Owned(v) => v,
        }
    }
}

/// The one place pixel data is decoded: `dicom-pixeldata` for every accepted
/// syntax but JPEG Extended, which it cannot decode at 12 bits (`jpeg_ext`).
fn decode<'a>(
    obj: &'a dicom_object::DefaultDicomObject,
    path: &Path,
    ts: &str,
    layout: &jpeg_ext::Layout,
) -> Result<Decoded<'a>, VolumeError> {
    use dicom_pixeldata::PixelDecoder;
    let fail = |message: String| VolumeError::Decode {
        path: path.to_owned(),
        transfer_syntax: ts_name(ts),
        message,
    };
    // The codecs size their output from the codestream's header, not from
    // Rows and Columns: read every frame header before any of them runs.
    if let Some(family) = codestream::Family::of(ts) {
        let fragments = obj
            .element(tags::PIXEL_DATA)
            .ok()
            .and_then(|e| e.value().fragments())
            .ok_or_else(|| fail("an encapsulated transfer syntax without encapsulated Pixel Data".into()))?;
        codestream::check(family, fragments, layout.rows, layout.cols).map_err(fail)?;
    }
    // Some codecs assert on malformed input; a panic must not take the
    // worker down with it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if ts == jpeg_ext::UID {
            jpeg_ext::decode(obj, layout).map(Decoded::Owned)
        } else {
            obj.decode_pixel_data().map(Decoded::Pixeldata).map_err(|e| e.to_string())
        }
    }));
    match result {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(fail("the decoder panicked".into())),
    }
}

fn ts_name(uid: &str) -> String {
    use dicom_encoding::TransferSyntaxIndex;
    match dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{uid} {}", ts.name()),
        None => format!("{uid}, unknown transfer syntax"),
    }
}

/// Stored values in `[lo, hi]` are padding (PS3.3 C.7.5.1.1.2), compared after
/// masking and sign extension.
fn padding_range(obj: &InMemDicomObject, signed: bool) -> Option<(i32, i32)> {
    let norm = |v: i64| -> i32 {
        // US-or-SS elements may have been read as US; reinterpret.
        let v = if signed && v > i16::MAX as i64 && v <= u16::MAX as i64 {
            v - 65536
        } else {
            v
        };
        v as i32
    };
    let pad = norm(int(obj, tags::PIXEL_PADDING_VALUE)?);
    let limit = int(obj, tags::PIXEL_PADDING_RANGE_LIMIT).map(norm).unwrap_or(pad);
    Some((pad.min(limit), pad.max(limit)))
}

/// Modality LUT on one frame: mask, sign-extend, rescale. Decoded data is in
/// native byte order (dicom-pixeldata converts big endian sources).
///
/// Written as plain loops over blocks of a preallocated buffer (stored
/// values, then rescale, then padding) so that the compiler vectorises
/// them: the per-pixel closure with a captured counter they replaced was an
/// eighth of a 300-slice chest job's CPU. Same arithmetic (f64 multiply and
/// add, then f32), so the same bits
/// (`tests::to_hu_matches_the_scalar_rule_on_every_value`).
fn to_hu(
    bytes: &[u8],
    bits_allocated: u32,
    bits_stored: u32,
    signed: bool,
    slope: f64,
    intercept: f64,
    padding: Option<(i32, i32)>,
) -> (Vec<f32>, usize) {
    // bits_stored is 1..=16 (checked where the frame is read): shifting the
    // stored bits to the top of an i32 and back sign-extends them.
    let shift = 32 - bits_stored;
    let mask = u32::MAX >> shift;
    let width = if bits_allocated == 16 { 2 } else { 1 };
    let n = bytes.len() / width;
    // No padding: an empty range, and no padding pass.
    let (lo, hi) = padding.unwrap_or((1, 0));
    let mut hu = vec![0f32; n];
    let mut pad_count = 0usize;
    // Blocks of stored values on the stack: simple loops over slices
    // vectorise where one loop over a decoding iterator did not.
    const BLOCK: usize = 512;
    let mut stored = [0i32; BLOCK];
    for (out, raw) in hu.chunks_mut(BLOCK).zip(bytes.chunks(BLOCK * width)) {
        let stored = &mut stored[..out.len()];
        match (width, signed) {
            (2, true) => {
                for (s, c) in stored.iter_mut().zip(raw.chunks_exact(2)) {
                    *s = (((u16::from_ne_bytes([c[0], c[1]]) as u32) << shift) as i32) >> shift;
                }
            }
            (2, false) => {
                for (s, c) in stored.iter_mut().zip(raw.chunks_exact(2)) {
                    *s = (u16::from_ne_bytes([c[0], c[1]]) as u32 & mask) as i32;
                }
            }
            (_, true) => {
                for (s, b) in stored.iter_mut().zip(raw) {
                    *s = (((*b as u32) << shift) as i32) >> shift;
                }
            }
            (_, false) => {
                for (s, b) in stored.iter_mut().zip(raw) {
                    *s = (*b as u32 & mask) as i32;
                }
            }
        }
        for (o, s) in out.iter_mut().zip(stored.iter()) {
            *o = (*s as f64 * slope + intercept) as f32;
        }
        if lo <= hi {
            let mut block_pads = 0u32;
            for (o, s) in out.iter_mut().zip(stored.iter()) {
                let pad = lo <= *s && *s <= hi;
                block_pads += pad as u32;
                *o = if pad { PADDING_HU } else { *o };
            }
            pad_count += block_pads as usize;
        }
    }
    (hu, pad_count)
}

fn angle_deg(cos: f64) -> f64 {
    cos.clamp(-1.0, 1.0).acos().to_degrees()
}

fn assemble(mut frames: Vec<Frame>, opts: &VolumeOptions) -> Result<Volume, VolumeError> {
    let first = frames.first().ok_or(VolumeError::Empty)?;
    let (rows, cols, orientation, pixel_spacing) = (first.rows, first.cols, first.orientation, first.pixel_spacing);
    let n = normal(&orientation);
    for f in &frames {
        let bad = |what: &'static str, detail: String| VolumeError::Inconsistent {
            path: f.path.clone(),
            what,
            detail,
        };
        if (f.rows, f.cols) != (rows, cols) {
            return Err(bad("image size", format!("{}x{} vs {rows}x{cols}", f.rows, f.cols)));
        }
        if f.orientation.iter().zip(&orientation).any(|(a, b)| (a - b).abs() > 1e-3) {
            let angle = angle_deg(dot(&normal(&f.orientation), &n));
            return Err(bad("ImageOrientationPatient", format!("{:?}, normal {angle:.2}° apart", f.orientation)));
        }
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-9);
        if rel(f.pixel_spacing[0], pixel_spacing[0]) > 1e-3 || rel(f.pixel_spacing[1], pixel_spacing[1]) > 1e-3 {
            return Err(bad("PixelSpacing", format!("{:?} vs {pixel_spacing:?}", f.pixel_spacing)));
        }
    }
    frames.sort_by(|a, b| dot(&a.position, &n).total_cmp(&dot(&b.position, &n)));
    let slice_positions: Vec<f64> = frames.iter().map(|f| dot(&f.position, &n)).collect();
    let mut steps = Vec::with_capacity(frames.len().saturating_sub(1));
    let mut max_tilt: f64 = 0.0;
    for w in frames.windows(2) {
        let d = [
            w[1].position[0] - w[0].position[0],
            w[1].position[1] - w[0].position[1],
            w[1].position[2] - w[0].position[2],
        ];
        let along = dot(&d, &n);
        if along.abs() < 1e-3 {
            return Err(VolumeError::DuplicatePosition {
                position_mm: dot(&w[0].position, &n),
            });
        }
        let len = dot(&d, &d).sqrt();
        max_tilt = max_tilt.max(angle_deg(along.abs() / len));
        steps.push(along);
    }
    if max_tilt > opts.max_tilt_deg {
        return Err(VolumeError::GantryTilt { degrees: max_tilt });
    }
    let spacing_mm = if steps.is_empty() {
        None
    } else {
        let min = steps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = steps.iter().copied().fold(0.0, f64::max);
        let mut sorted = steps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if (max - min) / median > opts.spacing_tolerance {
            return Err(VolumeError::UnevenSpacing { min_mm: min, max_mm: max });
        }
        Some(steps.iter().sum::<f64>() / steps.len() as f64)
    };

    let mut hu = Array3::<f32>::zeros((frames.len(), rows, cols));
    let padding_voxels = frames.iter().map(|f| f.padding).sum();
    let hu_step = frames.iter().map(|f| f.slope.abs()).fold(0.0, f64::max);
    // Each frame's pixels are freed once copied, so assembling a 600-slice
    // volume holds about one volume, not two. The copy runs on every core:
    // it is where the volume's pages are first touched, and on one thread
    // those page faults were an eighth of a 300-slice chest job's CPU, all of
    // it on the job's critical path.
    let pixels: Vec<Mutex<Vec<f32>>> = frames.iter_mut().map(|f| Mutex::new(std::mem::take(&mut f.hu))).collect();
    crate::par::map_slice_runs(hu.view_mut(), crate::par::threads(), |first, mut run| {
        for (k, mut dst) in run.outer_iter_mut().enumerate() {
            let src = std::mem::take(&mut *pixels[first + k].lock().unwrap_or_else(|p| p.into_inner()));
            let dst = dst.as_slice_mut().expect("a slice of a standard-layout array is contiguous");
            assert_eq!(src.len(), dst.len(), "frame length was checked against rows x cols");
            dst.copy_from_slice(&src);
        }
    });
    Ok(Volume {
        hu,
        pixel_spacing,
        positions: frames.iter().map(|f| f.position).collect(),
        slice_positions,
        slice_thickness: frames[0].thickness,
        spacing_mm,
        origin: frames[0].position,
        orientation,
        normal: n,
        sop_instance_uids: frames.iter().map(|f| f.sop_instance_uid.clone()).collect(),
        frame_numbers: frames.iter().map(|f| f.frame_number).collect(),
        source_paths: frames.iter().map(|f| f.path.clone()).collect(),
        padding_voxels,
        hu_step,
        arch: Default::default(),
    })
}

#[cfg(test)]
pub(crate) mod tests;
