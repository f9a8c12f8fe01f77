//! Reading DICOM files (PS3.10) from disk, tolerant of one common defect.
//!
//! **Input.** A path to a PS3.10 file: 128-byte preamble, `DICM`, the file
//! meta group (0002,xxxx) in explicit VR little endian, then the data set.
//!
//! **Output.** A [`DefaultDicomObject`], either the header only (everything
//! before Pixel Data) or the whole object.
//!
//! **Why not just `dicom_object::open_file`.** dicom-rs 0.10.1 refuses a file
//! meta group whose AE-valued elements — Source / Sending / Receiving
//! Application Entity Title (0002,0016..0018) — are longer than the 16 bytes
//! PS3.5 6.2 allows. Real archives write such files (13 of the 16 encodings in
//! `shared/realct/chest-slice-encodings` carry an 18-space (0002,0016)), and
//! DCMTK and pydicom read them. Those elements are informational only, so on
//! exactly that error we rebuild the meta group without the over-long AE
//! elements (and with a corrected group length) and parse again. Any other
//! defect is reported as it is.
//!
//! **Failure modes.** [`OpenError::Io`] for file system errors,
//! [`OpenError::NotDicom`] when there is no `DICM` magic (e.g. a DICOMDIR is
//! still DICOM; a text file is not), [`OpenError::Parse`] for the rest.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions, ReadError};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a DICOM file (no DICM magic after the preamble)")]
    NotDicom { path: PathBuf },
    /// The registry cannot even parse this transfer syntax (e.g. the
    /// retired JPEG processes .53/.55); nothing of the data set is readable.
    #[error("{path}: unsupported transfer syntax {uid}")]
    UnsupportedTransferSyntax { path: PathBuf, uid: String },
    #[error("{path}: cannot parse: {message}")]
    Parse { path: PathBuf, message: String },
}

impl OpenError {
    /// A file that is not DICOM at all (as opposed to broken DICOM).
    pub fn is_not_dicom(&self) -> bool {
        matches!(self, OpenError::NotDicom { .. })
    }
}

/// How much of the data set to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadDepth {
    /// Everything before Pixel Data (7FE0,0010): cheap, for routing.
    Header,
    /// The whole object, for decoding pixels.
    Full,
}

/// Open a PS3.10 file; see the module doc for the tolerated defect.
pub fn open_dicom(path: &Path, depth: ReadDepth) -> Result<DefaultDicomObject, OpenError> {
    let options = || {
        let o = OpenFileOptions::new();
        match depth {
            ReadDepth::Header => o.read_until(tags::PIXEL_DATA),
            ReadDepth::Full => o,
        }
    };
    match options().open_file(path) {
        Ok(obj) => Ok(obj),
        Err(ReadError::ParseMetaDataSet { .. }) => {
            let bytes = std::fs::read(path).map_err(|source| OpenError::Io {
                path: path.to_owned(),
                source,
            })?;
            if !(bytes.len() >= 132 && &bytes[128..132] == b"DICM") {
                return Err(OpenError::NotDicom {
                    path: path.to_owned(),
                });
            }
            let Some(repaired) = repair_meta(&bytes) else {
                return Err(OpenError::Parse {
                    path: path.to_owned(),
                    message: "file meta group is malformed".into(),
                });
            };
            options()
                .read_preamble(ReadPreamble::Never)
                .from_reader(Cursor::new(repaired))
                .map_err(|e| classify(path, e))
        }
        Err(e) => Err(classify(path, e)),
    }
}

fn classify(path: &Path, e: ReadError) -> OpenError {
    match e {
        ReadError::OpenFile { source, .. } => OpenError::Io {
            path: path.to_owned(),
            source,
        },
        // dicom-rs reports a short or magic-less file as a read or meta
        // error; look at the bytes so the caller can tell "not DICOM" from
        // "broken DICOM".
        _ if !has_magic(path) => OpenError::NotDicom {
            path: path.to_owned(),
        },
        ReadError::ReadFile { source, .. } => OpenError::Io {
            path: path.to_owned(),
            source,
        },
        ReadError::ReadUnrecognizedTransferSyntax { uid, .. } => OpenError::UnsupportedTransferSyntax {
            path: path.to_owned(),
            uid,
        },
        ReadError::ReadUnsupportedTransferSyntax { uid, .. } => OpenError::UnsupportedTransferSyntax {
            path: path.to_owned(),
            uid: uid.to_string(),
        },
        other => OpenError::Parse {
            path: path.to_owned(),
            message: crate::error_chain(&other),
        },
    }
}

fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| &head[128..132] == b"DICM")
        .unwrap_or(false)
}


/// Rebuild `DICM` + meta group + data set without over-long AE elements in
/// the meta group. Returns `None` when the meta group cannot be walked.
///
/// The meta group is always explicit VR little endian (PS3.10 7.1).
fn repair_meta(bytes: &[u8]) -> Option<Vec<u8>> {
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.len() >= 4 && &bytes[0..4] == b"DICM" {
        4
    } else {
        return None;
    };
    let mut pos = start;
    let mut kept: Vec<&[u8]> = Vec::new();
    loop {
        if pos + 8 > bytes.len() {
            break;
        }
        let group = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let vr = &bytes[pos + 4..pos + 6];
        let (header_len, value_len) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            if pos + 12 > bytes.len() {
                return None;
            }
            let l = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().ok()?);
            (12usize, l as usize)
        } else {
            (8usize, u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize)
        };
        let end = pos.checked_add(header_len)?.checked_add(value_len)?;
        if end > bytes.len() {
            return None;
        }
        let too_long_ae = vr == b"AE" && value_len > 16;
        // The group length is recomputed below.
        if element != 0x0000 && !too_long_ae {
            kept.push(&bytes[pos..end]);
        }
        pos = end;
    }
    let group_len: usize = kept.iter().map(|e| e.len()).sum();
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(b"DICM");
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.extend_from_slice(&u32::try_from(group_len).ok()?.to_le_bytes());
    for e in kept {
        out.extend_from_slice(e);
    }
    out.extend_from_slice(&bytes[pos..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realct() -> Option<PathBuf> {
        crate::test_data::realct()
    }

    #[test]
    fn every_chest_encoding_opens_including_long_source_ae() {
        let Some(root) = realct() else { return };
        let dir = root.join("chest-slice-encodings");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let name = p.to_string_lossy();
            if name.ends_with(".53.dcm") || name.ends_with(".55.dcm") {
                let e = open_dicom(&p, ReadDepth::Header).unwrap_err();
                assert!(matches!(e, OpenError::UnsupportedTransferSyntax { .. }), "{e}");
                n += 1;
                continue;
            }
            let obj = open_dicom(&p, ReadDepth::Header).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                obj.element(tags::MODALITY).unwrap().to_str().unwrap().trim(),
                "CT"
            );
            assert!(obj.element_opt(tags::PIXEL_DATA).unwrap().is_none());
            n += 1;
        }
        assert_eq!(n, 16);
    }

    #[test]
    fn text_file_is_not_dicom() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("short.txt", "hello".to_string()), ("long.md", "# notes\n".repeat(40))] {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            let e = open_dicom(&p, ReadDepth::Header).unwrap_err();
            assert!(e.is_not_dicom(), "{e}");
        }
    }
}
