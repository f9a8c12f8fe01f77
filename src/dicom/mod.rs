//! DICOM attribute handling shared by every stage: identifier newtypes,
//! the SOP classes and transfer syntaxes we serve, and header extraction.
//!
//! Network encoding (PDUs, DIMSE command sets) lives in `ingest`; this module
//! knows about datasets only.

pub mod ct_writer;
pub mod header;
pub mod scan;
pub mod read;

use std::fmt;

use dicom_core::dictionary::UidType;
use serde::{Deserialize, Serialize};

/// A DICOM UID (PS3.5 9): digits and dots, at most 64 characters.
///
/// Constructed only through [`Uid::parse`], so every UID that reaches the
/// spool or the index is safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Uid(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    #[error("UID is empty")]
    Empty,
    #[error("UID is longer than 64 characters")]
    TooLong,
    #[error("UID has a character other than digits and '.'")]
    BadChar,
}

impl Uid {
    /// Trims the trailing NUL/space padding the standard allows (PS3.5 9.1).
    pub fn parse(raw: &str) -> Result<Uid, UidError> {
        let s = raw.trim_end_matches(['\0', ' ']).trim_start();
        if s.is_empty() {
            return Err(UidError::Empty);
        }
        if s.len() > 64 {
            return Err(UidError::TooLong);
        }
        if !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(UidError::BadChar);
        }
        Ok(Uid(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An application entity title, trimmed of its space padding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AeTitle(String);

impl AeTitle {
    pub fn new(raw: &str) -> AeTitle {
        AeTitle(raw.trim().to_owned())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Storage SOP classes: every SOP class in the standard dictionary whose name
/// says Storage, less the ones that are not C-STORE services (Storage
/// Commitment, the Media Storage Directory, Storage Management).
pub fn is_storage_sop_class(uid: &str) -> bool {
    use dicom_core::dictionary::UidDictionary;
    let uid = uid.trim_end_matches(['\0', ' ']);
    dicom_dictionary_std::StandardSopClassDictionary
        .by_uid(uid)
        .is_some_and(|e| {
            matches!(e.r#type, UidType::SopClass)
                && e.name.contains("Storage")
                && !e.name.contains("Commitment")
                && !e.name.contains("Directory")
                && !e.name.contains("Storage Management")
        })
}

/// Transfer syntaxes we accept, in our order of preference, with why.
///
/// Each is one whose pixel data `dicom-pixeldata` (features `openjp2`,
/// `charls`) decodes, or, for JPEG Extended (.51, 12-bit DCT), libjpeg-turbo
/// (`volume::jpeg_ext`); checked against `shared/realct/chest-slice-encodings`.
/// Left out on purpose, so the peer learns at negotiation rather than after
/// we acknowledged something we cannot analyse:
/// - .53/.55 (retired JPEG processes): unknown to the registry;
/// - video and JPIP syntaxes: not CT.
pub const ACCEPTED_TRANSFER_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.1",    // explicit VR little endian
    "1.2.840.10008.1.2",      // implicit VR little endian
    "1.2.840.10008.1.2.2",    // explicit VR big endian (retired, still sent)
    "1.2.840.10008.1.2.1.99", // deflated explicit VR little endian
    "1.2.840.10008.1.2.5",    // RLE lossless
    "1.2.840.10008.1.2.4.70", // JPEG lossless SV1
    "1.2.840.10008.1.2.4.57", // JPEG lossless
    "1.2.840.10008.1.2.4.50", // JPEG baseline (lossy)
    "1.2.840.10008.1.2.4.51", // JPEG extended (lossy, 12-bit)
    "1.2.840.10008.1.2.4.80", // JPEG-LS lossless
    "1.2.840.10008.1.2.4.81", // JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91", // JPEG 2000
];

pub fn is_accepted_transfer_syntax(uid: &str) -> bool {
    ACCEPTED_TRANSFER_SYNTAXES.contains(&uid.trim_end_matches(['\0', ' ']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_trims_padding_and_rejects_traversal() {
        assert_eq!(Uid::parse("1.2.3\0").unwrap().as_str(), "1.2.3");
        assert_eq!(Uid::parse("../etc"), Err(UidError::BadChar));
        assert_eq!(Uid::parse(""), Err(UidError::Empty));
        assert_eq!(Uid::parse(&"1".repeat(65)), Err(UidError::TooLong));
    }

    #[test]
    fn storage_classes_cover_ct_sr_sc_pr_but_not_dicomdir() {
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2")); // CT
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2.1")); // Enhanced CT
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.7")); // SC
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.88.34")); // Comprehensive 3D SR
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.11.1")); // GSPS
        assert!(!is_storage_sop_class("1.2.840.10008.1.3.10")); // DICOMDIR
        assert!(!is_storage_sop_class("1.2.840.10008.1.20.1")); // storage commitment
        assert!(!is_storage_sop_class(VERIFICATION));
    }
}
