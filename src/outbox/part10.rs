//! Where the dataset of a Part-10 file starts (PS3.10 7.1), and what its
//! file meta says, without reading the dataset.
//!
//! The outbox sends the dataset bytes as they are on disk when the
//! negotiated transfer syntax is the file's, so it only needs the offset
//! past the file meta group.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Info {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Byte offset of the first dataset element.
    pub dataset_offset: u64,
    pub file_len: u64,
}

impl Part10Info {
    pub fn dataset_len(&self) -> u64 {
        self.file_len - self.dataset_offset
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Part10Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a DICOM Part-10 file: {message}")]
    NotPart10 { path: String, message: String },
}

/// Blocking, but reads only the preamble and the meta group (a few hundred
/// bytes).
pub fn inspect(path: &Path) -> Result<Part10Info, Part10Error> {
    let p = || path.display().to_string();
    let io = |source| Part10Error::Io { path: p(), source };
    let bad = |message: String| Part10Error::NotPart10 { path: p(), message };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut head = [0u8; 132];
    let n = read_up_to(&mut f, &mut head).map_err(io)?;
    // PS3.10 7.1: 128-byte preamble then "DICM". Also accept a bare meta
    // group (no preamble), which some writers produce.
    let magic_at: u64 = if n >= 132 && &head[128..132] == b"DICM" {
        128
    } else if n >= 4 && &head[0..4] == b"DICM" {
        0
    } else {
        return Err(bad("no DICM magic".into()));
    };
    f.seek(SeekFrom::Start(magic_at)).map_err(io)?;
    let meta = dicom_object::meta::FileMetaTable::from_reader(BufReader::new(&mut f))
        .map_err(|e| bad(format!("bad file meta: {e}")))?;
    // magic (4) + the (0002,0000) UL element, explicit VR (12) + the group.
    let dataset_offset = magic_at + 4 + 12 + u64::from(meta.information_group_length);
    if dataset_offset > file_len {
        return Err(bad(format!(
            "meta group length {} runs past the end of the file",
            meta.information_group_length
        )));
    }
    Ok(Part10Info {
        sop_class_uid: meta.media_storage_sop_class_uid().to_owned(),
        sop_instance_uid: meta.media_storage_sop_instance_uid().to_owned(),
        transfer_syntax: meta.transfer_syntax().to_owned(),
        dataset_offset,
        file_len,
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Re-encode the dataset of `path` in `ts` (in memory). For a peer that
/// accepted only implicit VR LE when our file is explicit; report files are
/// small, so the whole dataset in memory is acceptable here.
pub fn transcode(path: &Path, ts: &str) -> Result<Vec<u8>, String> {
    use dicom_encoding::TransferSyntaxIndex;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| format!("transfer syntax {ts} unknown"))?;
    let obj = dicom_object::open_file(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| format!("cannot encode {} in {}: {e}", path.display(), ts.uid()))?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dicom_core::{dicom_value, DataElement, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::meta::FileMetaTableBuilder;
    use dicom_object::InMemDicomObject;

    pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
    pub const CT_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.2";

    /// A small Part-10 image in explicit VR LE with `side`×`side` 8-bit pixels.
    pub fn write_image(path: &Path, sop_class: &str, sop_instance: &str, side: u16) -> Vec<u8> {
        let pixels: Vec<u8> = (0..usize::from(side) * usize::from(side))
            .map(|i| (i % 251) as u8)
            .collect();
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, sop_class),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, sop_instance),
            DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.10.1"),
            DataElement::new(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                "1.2.826.0.1.3680043.10.2",
            ),
            DataElement::new(tags::MODALITY, VR::CS, "OT"),
            DataElement::new(tags::CONVERSION_TYPE, VR::CS, "WSD"),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, [1])),
            DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, [side])),
            DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, [side])),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, [8])),
            DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, [8])),
            DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, [7])),
            DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, dicom_value!(U16, [0])),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                dicom_core::PrimitiveValue::U8(pixels.clone().into()),
            ),
        ]);
        let file = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_VR_LE))
            .unwrap();
        file.write_to_file(path).unwrap();
        pixels
    }

    #[test]
    fn finds_the_dataset_after_the_meta_group() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.dcm");
        write_image(&p, SECONDARY_CAPTURE, "1.2.3.4", 4);
        let info = inspect(&p).unwrap();
        assert_eq!(info.sop_class_uid, SECONDARY_CAPTURE);
        assert_eq!(info.sop_instance_uid, "1.2.3.4");
        assert_eq!(info.transfer_syntax, EXPLICIT_VR_LE);
        // The dataset starts with (0008,0016) SOPClassUID, explicit VR "UI".
        let bytes = std::fs::read(&p).unwrap();
        let ds = &bytes[info.dataset_offset as usize..];
        assert_eq!(&ds[..6], &[0x08, 0x00, 0x16, 0x00, b'U', b'I']);
        assert_eq!(info.dataset_len(), ds.len() as u64);
    }

    #[test]
    fn junk_is_not_part10() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("junk");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(inspect(&p), Err(Part10Error::NotPart10 { .. })));
        assert!(matches!(
            inspect(&d.path().join("gone")),
            Err(Part10Error::Io { .. })
        ));
    }

    #[test]
    fn transcodes_to_implicit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.dcm");
        write_image(&p, SECONDARY_CAPTURE, "1.2.3.4", 4);
        let ds = transcode(&p, IMPLICIT_VR_LE).unwrap();
        // implicit: tag then a 4-byte length, no VR
        assert_eq!(&ds[..4], &[0x08, 0x00, 0x16, 0x00]);
        assert_eq!(
            u32::from_le_bytes([ds[4], ds[5], ds[6], ds[7]]) as usize,
            SECONDARY_CAPTURE.len() + 1
        );
    }
}
