//! How a series was acquired, as its header says: what the out-of-distribution
//! guard (`inference::guard`) compares with a model card's validated input.
//!
//! Input: one image file of the series (the first of the slices a model
//! sees). Output: an [`Acquisition`]; every field is `None` (or empty) when
//! the file does not state it, and the guard treats "not stated" as unknown,
//! not as out of range. Only the header is read (up to Pixel Data).
//!
//! Enhanced (multi-frame) CT keeps kVp and geometry in functional groups;
//! only the top-level attributes are read here, so for those objects the
//! guard sees kVp as unknown and takes geometry from the assembled volume.
//!
//! Failure modes: the file cannot be opened ([`VolumeError::Open`]).

use std::path::Path;

use dicom_dictionary_std::tags;

use super::attrs::{floats, text};
use super::VolumeError;
use crate::dicom::read::{open_dicom, ReadDepth};

/// Acquisition attributes of one image (PS3.3 C.7.6.1, C.8.2.1, C.7.6.4).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Acquisition {
    /// ImageType values, upper case (`ORIGINAL`, `PRIMARY`, `AXIAL`, `LOCALIZER`, ...).
    pub image_type: Vec<String>,
    /// BodyPartExamined, upper case; `None` when absent or empty.
    pub body_part_examined: Option<String>,
    /// KVP.
    pub kvp: Option<f64>,
    /// ContrastBolusAgent; `None` when absent or empty (no contrast stated,
    /// which is not the same as "no contrast given").
    pub contrast_bolus_agent: Option<String>,
    /// SliceThickness (mm).
    pub slice_thickness: Option<f64>,
    /// PixelSpacing: between rows, between columns (mm).
    pub pixel_spacing: Option<[f64; 2]>,
    /// ImageOrientationPatient.
    pub orientation: Option<[f64; 6]>,
}

impl Acquisition {
    /// Read the header of `path`.
    pub fn read(path: &Path) -> Result<Acquisition, VolumeError> {
        let obj = open_dicom(path, ReadDepth::Header)?;
        let upper = |t| text(&obj, t).map(|s| s.to_ascii_uppercase());
        let first = |t| floats(&obj, t).and_then(|v| v.first().copied());
        Ok(Acquisition {
            image_type: upper(tags::IMAGE_TYPE)
                .map(|s| s.split('\\').map(|v| v.trim().to_owned()).collect())
                .unwrap_or_default(),
            body_part_examined: upper(tags::BODY_PART_EXAMINED),
            kvp: first(tags::KVP),
            contrast_bolus_agent: text(&obj, tags::CONTRAST_BOLUS_AGENT),
            slice_thickness: first(tags::SLICE_THICKNESS),
            pixel_spacing: floats(&obj, tags::PIXEL_SPACING).and_then(|v| (v.len() == 2).then(|| [v[0], v[1]])),
            orientation: floats(&obj, tags::IMAGE_ORIENTATION_PATIENT)
                .and_then(|v| (v.len() == 6).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_chest_header_and_a_localizer() {
        let Some(root) = crate::test_data::realct() else { return };
        let p = root.join("chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm");
        let a = Acquisition::read(&p).unwrap();
        assert_eq!(a.kvp, Some(120.0));
        assert_eq!(a.slice_thickness, Some(5.0));
        assert_eq!(a.image_type, ["ORIGINAL", "PRIMARY", "AXIAL"]);
        assert!(a.contrast_bolus_agent.is_none() && a.body_part_examined.is_none());
        let dir = root.join("head-philips/S1000");
        let f = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| !p.ends_with("DIRFILE"))
            .unwrap();
        assert!(Acquisition::read(&f).unwrap().image_type.iter().any(|t| t == "LOCALIZER"));
    }
}
