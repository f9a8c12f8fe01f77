//! The header attributes later stages need, read once at ingest.
//!
//! Kept as plain data so the series tracker and router never touch a DICOM
//! object: the spool file stays the source of truth and this is its summary.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde::{Deserialize, Serialize};

use super::{Uid, UidError};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeaderError {
    #[error("{attribute} is missing or empty")]
    Missing { attribute: &'static str },
    /// `value` is the refused value, escaped and cut to 80 characters: it is
    /// peer input, fit for a log line but not for a path or a terminal.
    #[error("{attribute} {value} is not a valid UID: {source}")]
    BadUid {
        attribute: &'static str,
        value: String,
        source: UidError,
    },
}

/// Geometry of one image plane (PS3.3 C.7.6.2), in patient mm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceGeometry {
    /// ImagePositionPatient: centre of the first transmitted pixel.
    pub position: [f64; 3],
    /// ImageOrientationPatient: row then column direction cosines.
    pub orientation: [f64; 6],
    /// PixelSpacing: row spacing (between rows), column spacing.
    pub pixel_spacing: Option<[f64; 2]>,
    pub slice_thickness: Option<f64>,
    pub rows: Option<u16>,
    pub columns: Option<u16>,
}

impl SliceGeometry {
    /// Unit normal of the plane (row × column).
    pub fn normal(&self) -> [f64; 3] {
        let r = &self.orientation[0..3];
        let c = &self.orientation[3..6];
        let n = [
            r[1] * c[2] - r[2] * c[1],
            r[2] * c[0] - r[0] * c[2],
            r[0] * c[1] - r[1] * c[0],
        ];
        let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
        if len == 0.0 {
            return n;
        }
        [n[0] / len, n[1] / len, n[2] / len]
    }
}

/// What the index keeps for every stored instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceHeader {
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
    pub study_instance_uid: Uid,
    pub series_instance_uid: Uid,
    pub modality: Option<String>,
    pub instance_number: Option<i32>,
    pub acquisition_number: Option<i32>,
    pub images_in_acquisition: Option<u32>,
    pub number_of_frames: Option<u32>,
    pub image_type: Vec<String>,
    pub series_description: Option<String>,
    pub geometry: Option<SliceGeometry>,
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok()??.to_str().ok()?;
    let v = v.trim_end_matches(['\0', ' ']).trim_start();
    (!v.is_empty()).then(|| v.to_owned())
}

fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag).ok()??.to_multi_float64().ok()
}

fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats(obj, tag)?.first().copied()
}

fn int<T: std::str::FromStr>(obj: &InMemDicomObject, tag: Tag) -> Option<T> {
    text(obj, tag)?.trim().parse().ok()
}

fn uid(obj: &InMemDicomObject, tag: Tag, attribute: &'static str) -> Result<Uid, HeaderError> {
    let raw = text(obj, tag).ok_or(HeaderError::Missing { attribute })?;
    Uid::parse(&raw).map_err(|source| HeaderError::BadUid { attribute, value: escaped(&raw), source })
}

/// `raw` quoted, cut to 80 characters and escaped to printable ASCII, so it
/// can go into a log line or a DIMSE Error Comment (default repertoire).
pub fn escaped(raw: &str) -> String {
    let cut: String = raw.chars().take(80).flat_map(char::escape_default).collect();
    let more = if raw.chars().nth(80).is_some() { "..." } else { "" };
    format!("\"{cut}\"{more}")
}

impl InstanceHeader {
    /// Every top-level attribute [`InstanceHeader::from_dataset`] reads, plus
    /// the character set its text is decoded with: ingest parses only these
    /// (see [`crate::dicom::scan`]), so a large dataset is never held whole.
    pub const TAGS: &'static [Tag] = &[
        tags::SPECIFIC_CHARACTER_SET,
        tags::IMAGE_TYPE,
        tags::SOP_CLASS_UID,
        tags::SOP_INSTANCE_UID,
        tags::MODALITY,
        tags::SERIES_DESCRIPTION,
        tags::SLICE_THICKNESS,
        tags::STUDY_INSTANCE_UID,
        tags::SERIES_INSTANCE_UID,
        tags::ACQUISITION_NUMBER,
        tags::INSTANCE_NUMBER,
        tags::IMAGE_POSITION_PATIENT,
        tags::IMAGE_ORIENTATION_PATIENT,
        tags::IMAGES_IN_ACQUISITION,
        tags::NUMBER_OF_FRAMES,
        tags::ROWS,
        tags::COLUMNS,
        tags::PIXEL_SPACING,
    ];

    pub fn reads(tag: Tag) -> bool {
        Self::TAGS.contains(&tag)
    }

    pub fn from_dataset(obj: &InMemDicomObject) -> Result<InstanceHeader, HeaderError> {
        let geometry = match (
            floats(obj, tags::IMAGE_POSITION_PATIENT),
            floats(obj, tags::IMAGE_ORIENTATION_PATIENT),
        ) {
            (Some(p), Some(o)) if p.len() == 3 && o.len() == 6 => Some(SliceGeometry {
                position: [p[0], p[1], p[2]],
                orientation: [o[0], o[1], o[2], o[3], o[4], o[5]],
                pixel_spacing: floats(obj, tags::PIXEL_SPACING)
                    .filter(|s| s.len() == 2)
                    .map(|s| [s[0], s[1]]),
                slice_thickness: float(obj, tags::SLICE_THICKNESS),
                rows: obj
                    .element_opt(tags::ROWS)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_int::<u16>().ok()),
                columns: obj
                    .element_opt(tags::COLUMNS)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_int::<u16>().ok()),
            }),
            _ => None,
        };
        Ok(InstanceHeader {
            sop_class_uid: uid(obj, tags::SOP_CLASS_UID, "SOPClassUID")?,
            sop_instance_uid: uid(obj, tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
            study_instance_uid: uid(obj, tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
            series_instance_uid: uid(obj, tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
            modality: text(obj, tags::MODALITY),
            instance_number: int(obj, tags::INSTANCE_NUMBER),
            acquisition_number: int(obj, tags::ACQUISITION_NUMBER),
            images_in_acquisition: int(obj, tags::IMAGES_IN_ACQUISITION),
            number_of_frames: int(obj, tags::NUMBER_OF_FRAMES),
            image_type: text(obj, tags::IMAGE_TYPE)
                .map(|s| s.split('\\').map(|p| p.trim().to_owned()).collect())
                .unwrap_or_default(),
            series_description: text(obj, tags::SERIES_DESCRIPTION),
            geometry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::escaped;

    #[test]
    fn escaped_values_are_quoted_printable_ascii_and_cut() {
        assert_eq!(escaped(".."), "\"..\"");
        assert_eq!(escaped("1\n2\u{e9}\0"), "\"1\\n2\\u{e9}\\u{0}\"");
        let long = "9".repeat(100);
        assert_eq!(escaped(&long), format!("\"{}\"...", "9".repeat(80)));
    }

    /// Ingest parses only [`InstanceHeader::TAGS`]; an attribute read here
    /// but missing from the list would silently read as absent.
    #[test]
    fn tags_list_every_attribute_from_dataset_reads() {
        let src = include_str!("header.rs");
        let body = &src[src.find("pub fn from_dataset").unwrap()..];
        let body = &body[..body.find("\n    }\n").unwrap()];
        let list = &src[src.find("pub const TAGS").unwrap()..];
        let list = &list[..list.find("];").unwrap()];
        let re = regex::Regex::new(r"tags::([A-Z_]+)").unwrap();
        let read: Vec<&str> = re.captures_iter(body).map(|c| c.get(1).unwrap().as_str()).collect();
        assert!(read.len() >= 17, "from_dataset reads {} tags?", read.len());
        for t in read {
            assert!(list.contains(&format!("tags::{t},")), "InstanceHeader::TAGS lacks {t}");
        }
    }
}
