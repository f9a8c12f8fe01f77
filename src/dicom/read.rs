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
//! **Lying lengths.** dicom-rs allocates (and zero-fills) a value's declared
//! length before it reads the value, so one element claiming 3.7 GB in a
//! 900-byte file cost 3.7 GB (found by the `dicom_file` fuzz target).
//! Before dicom-rs sees a file, every declared length in its meta group
//! (walked as dicom-rs walks it) and data set ([`crate::dicom::scan`]) is
//! checked against the bytes that are there. A deflated data set is
//! inflated for that check, up to [`MAX_INFLATED`] bytes.
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
    let bytes = std::fs::read(path).map_err(|source| OpenError::Io {
        path: path.to_owned(),
        source,
    })?;
    let refuse = |message: String| OpenError::Parse {
        path: path.to_owned(),
        message,
    };
    check_declared_lengths(&bytes).map_err(refuse)?;
    // Parsed from the file, not from `bytes`: after the check the copy is
    // dropped, so a full read holds one copy of a large file, not two.
    drop(bytes);
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
            // The repaired meta group has a true group length, so dicom-rs
            // may now start the data set elsewhere than in the first check.
            check_declared_lengths(&repaired).map_err(refuse)?;
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


/// Largest data set a deflated file may inflate to; past it the file is
/// refused. Deflate is used for small non-image objects in practice, and
/// the check holds the inflated copy in memory.
pub const MAX_INFLATED: u64 = 256 << 20;

/// Explicit VR (PS3.5 7.1.2) with a 16-bit length; every other VR, and an
/// unknown one, has 2 reserved bytes and a 32-bit length.
fn short_length_vr(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"AE" | b"AS" | b"AT" | b"CS" | b"DA" | b"DS" | b"DT" | b"FL" | b"FD" | b"IS" | b"LO" | b"LT" | b"PN"
            | b"SH" | b"SL" | b"SS" | b"ST" | b"TM" | b"UI" | b"UL" | b"US"
    )
}

/// Check every length a PS3.10 file declares against the bytes that follow
/// it, in the order dicom-rs reads them: the meta group, which dicom-rs
/// reads element by element until its group length (0002,0000) is used up,
/// then the data set in the meta group's transfer syntax. Bytes without
/// the `DICM` magic, or whose meta group does not start with its group
/// length, pass: dicom-rs refuses those before it reads any value.
fn check_declared_lengths(bytes: &[u8]) -> Result<(), String> {
    use crate::dicom::scan::{check_lengths, Encoding};
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.len() >= 4 && &bytes[0..4] == b"DICM" {
        4
    } else {
        return Ok(());
    };
    let head = |pos: usize| bytes.get(pos..pos + 8);
    let Some(h) = head(start) else { return Ok(()) };
    if h[..4] != [0x02, 0x00, 0x00, 0x00] {
        return Ok(());
    }
    // dicom-rs takes the group length whatever VR it is written with (a
    // fuzzed `UI` here once let a 3 GB value through unchecked), so the
    // header is read by its VR's length form, as for every other element.
    let (header, len) = if short_length_vr(&h[4..6]) {
        (8, usize::from(u16::from_le_bytes([h[6], h[7]])))
    } else {
        let Some(l) = bytes.get(start + 8..start + 12) else { return Ok(()) };
        (12, u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize)
    };
    if len != 4 {
        return Err(format!("file meta group length (0002,0000) has {len} bytes, not 4"));
    }
    let Some(v) = bytes.get(start + header..start + header + 4) else {
        return Err("file meta group ends inside its group length".into());
    };
    let group_len = u64::from(u32::from_le_bytes(v.try_into().expect("4 bytes")));
    let mut pos = start + header + 4;
    let mut consumed = 0u64;
    let mut ts = String::new();
    while consumed < group_len {
        let h = head(pos).ok_or_else(|| format!("file meta group ends inside an element header at offset {pos}"))?;
        let element = u16::from_le_bytes([h[2], h[3]]);
        let (header, len) = if short_length_vr(&h[4..6]) {
            (8, u64::from(u16::from_le_bytes([h[6], h[7]])))
        } else {
            let l = bytes
                .get(pos + 8..pos + 12)
                .ok_or_else(|| format!("file meta group ends inside an element header at offset {pos}"))?;
            (12, u64::from(u32::from_le_bytes(l.try_into().expect("4 bytes"))))
        };
        let left = (bytes.len() - pos - header) as u64;
        if len > left {
            return Err(format!(
                "file meta element (0002,{element:04X}) at offset {pos} declares {len} bytes but only {left} remain"
            ));
        }
        let value = &bytes[pos + header..pos + header + len as usize];
        if element == 0x0010 {
            ts = String::from_utf8_lossy(value).trim_end_matches(['\0', ' ']).to_owned();
        }
        pos += header + len as usize;
        consumed += header as u64 + len;
    }
    let dataset = &bytes[pos..];
    let checked = match ts.as_str() {
        "1.2.840.10008.1.2" => check_lengths(dataset, Encoding::ImplicitLittle),
        "1.2.840.10008.1.2.2" => check_lengths(dataset, Encoding::ExplicitBig),
        "1.2.840.10008.1.2.1.99" => {
            use std::io::Read;
            let mut inflated = Vec::new();
            // One byte past the cap tells "at the cap" from "over it".
            flate2::read::DeflateDecoder::new(dataset)
                .take(MAX_INFLATED + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| format!("deflated data set cannot be inflated: {e}"))?;
            if inflated.len() as u64 > MAX_INFLATED {
                return Err(format!("deflated data set inflates to more than {MAX_INFLATED} bytes"));
            }
            check_lengths(&inflated, Encoding::ExplicitLittle)
        }
        // Every other syntax encodes its data set in explicit VR little
        // endian (encapsulated pixel data included).
        _ => check_lengths(dataset, Encoding::ExplicitLittle),
    };
    checked.map_err(|e| format!("data set: {e}"))
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
        // The same length form as the check (`short_length_vr`): an unknown
        // or long-form VR read with a 2-byte length here once hid a 4 GB
        // declared length from the check that follows.
        let (header_len, value_len) = if short_length_vr(vr) {
            (8usize, u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize)
        } else {
            if pos + 12 > bytes.len() {
                return None;
            }
            let l = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().ok()?);
            (12usize, l as usize)
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

    /// A PS3.10 file: preamble, meta group (group length and transfer
    /// syntax only), then `dataset`.
    fn part10(ts: &str, dataset: &[u8]) -> Vec<u8> {
        let mut ts = ts.as_bytes().to_vec();
        if ts.len() % 2 == 1 {
            ts.push(0);
        }
        let mut meta = vec![0x02, 0x00, 0x10, 0x00, b'U', b'I'];
        meta.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        meta.extend_from_slice(&ts);
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(dataset);
        out
    }

    /// (0008,0060) CS "CT" then an element whose 32-bit length claims
    /// 0xE000_0000 bytes, in explicit VR little endian.
    fn lying_dataset() -> Vec<u8> {
        let mut d = vec![0x08, 0x00, 0x60, 0x00, b'C', b'S', 2, 0, b'C', b'T'];
        d.extend_from_slice(&[0x53, 0x51, 0x00, 0x00, b'U', b'N', 0, 0]);
        d.extend_from_slice(&0xE000_0000u32.to_le_bytes());
        d.extend_from_slice(&[0; 16]);
        d
    }

    /// Fuzz finding (fuzz/corpus/dicom_file/regress-oom-lying-length): one
    /// element declaring 3.7 GB in a 912-byte file made dicom-rs allocate
    /// 3.7 GB before it found the file short. Refused before dicom-rs runs,
    /// for both depths, with the element named.
    #[test]
    fn a_lying_length_is_refused_before_dicom_rs_allocates_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lie.dcm");
        std::fs::write(&p, part10("1.2.840.10008.1.2.1", &lying_dataset())).unwrap();
        for depth in [ReadDepth::Header, ReadDepth::Full] {
            let e = open_dicom(&p, depth).unwrap_err();
            assert!(matches!(e, OpenError::Parse { .. }), "{e}");
            assert!(e.to_string().contains("(5153,0000)") && e.to_string().contains("declares"), "{e}");
        }
        // The same honest file opens.
        let mut honest = lying_dataset();
        honest.truncate(10);
        std::fs::write(&p, part10("1.2.840.10008.1.2.1", &honest)).unwrap();
        let obj = open_dicom(&p, ReadDepth::Full).unwrap();
        assert_eq!(obj.element(tags::MODALITY).unwrap().to_str().unwrap(), "CT");
    }

    #[test]
    fn a_lying_length_inside_a_deflated_data_set_is_refused() {
        use std::io::Write;
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&lying_dataset()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lie.dcm");
        std::fs::write(&p, part10("1.2.840.10008.1.2.1.99", &z.finish().unwrap())).unwrap();
        let e = open_dicom(&p, ReadDepth::Header).unwrap_err();
        assert!(e.to_string().contains("declares"), "{e}");
    }

    #[test]
    fn a_lying_meta_element_is_refused() {
        let mut f = part10("1.2.840.10008.1.2.1", &lying_dataset()[..10]);
        // the transfer syntax UID's 16-bit length, now past the file's end
        f[144 + 6..144 + 8].copy_from_slice(&0xFFF0u16.to_le_bytes());
        let e = check_declared_lengths(&f).unwrap_err();
        assert!(e.contains("(0002,0010)"), "{e}");
    }

    #[test]
    fn a_group_length_with_another_vr_does_not_skip_the_check() {
        // fuzz/corpus/dicom_file/regress-oom-group-length-vr: (0002,0000)
        // written as UI; dicom-rs read on and allocated a 3 GB value.
        let mut f = part10("1.2.840.10008.1.2.1", &lying_dataset());
        assert_eq!(&f[132..138], &[0x02, 0x00, 0x00, 0x00, b'U', b'L']);
        f[136..138].copy_from_slice(b"UI");
        assert!(check_declared_lengths(&f).is_err());
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
