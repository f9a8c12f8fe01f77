//! DICOM attribute handling shared by every stage: identifier newtypes,
//! the SOP classes and transfer syntaxes we serve, and header extraction.
//!
//! Network encoding (PDUs, DIMSE command sets) lives in `ingest`; this module
//! knows about datasets only.

pub mod ct_writer;
pub mod dimse;
pub mod header;
pub mod scan;
pub mod read;

use std::fmt;
use std::path::{Component, Path, PathBuf};

use dicom_core::dictionary::UidType;
use serde::{Deserialize, Serialize};

/// A DICOM UID (PS3.5 9.1): components of digits separated by '.', no
/// empty component, no leading zero in a component other than "0", at most
/// 64 characters.
///
/// Constructed only through [`Uid::parse`] (deserialising goes through it
/// too), so a `Uid` can never be `.`, `..` or contain a separator. Paths are
/// still made only by [`uid_path`], which checks that on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Uid(String);

/// Why a string is not a UID. The messages never repeat the value: callers
/// that log it do so as an escaped field, since a refused UID is peer input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    #[error("UID is empty")]
    Empty,
    #[error("UID has {len} characters, more than 64")]
    TooLong { len: usize },
    #[error("UID has a character other than digits and '.' at position {at}")]
    BadChar { at: usize },
    #[error("UID component {component} is empty (leading, trailing or doubled '.')")]
    EmptyComponent { component: usize },
    #[error("UID component {component} has a leading zero")]
    LeadingZero { component: usize },
}

impl Uid {
    /// Trims the trailing NUL/space padding the standard allows (PS3.5 9.1),
    /// then checks the rest strictly.
    pub fn parse(raw: &str) -> Result<Uid, UidError> {
        let s = raw.trim_end_matches(['\0', ' ']).trim_start();
        if s.is_empty() {
            return Err(UidError::Empty);
        }
        if s.len() > 64 {
            return Err(UidError::TooLong { len: s.len() });
        }
        if let Some(at) = s.bytes().position(|b| !(b.is_ascii_digit() || b == b'.')) {
            return Err(UidError::BadChar { at });
        }
        for (i, c) in s.split('.').enumerate() {
            let component = i + 1;
            if c.is_empty() {
                return Err(UidError::EmptyComponent { component });
            }
            if c.len() > 1 && c.starts_with('0') {
                return Err(UidError::LeadingZero { component });
            }
        }
        Ok(Uid(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Uid {
    type Error = UidError;
    fn try_from(s: String) -> Result<Uid, UidError> {
        Uid::parse(&s)
    }
}

impl From<Uid> for String {
    fn from(u: Uid) -> String {
        u.0
    }
}

/// A path that [`uid_path`] refused to build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{part:?} cannot be a path component under {}: {why}", root.display())]
pub struct PathEscape {
    pub root: PathBuf,
    pub part: String,
    pub why: &'static str,
}

/// The one way a path is made from received identifiers:
/// `root/<uid>/<uid>/.../<tail>/...`. Every part, UID or not, must be one
/// normal path component (no separator, not `.` or `..`, no NUL), and the
/// result is checked to sit exactly that many components below `root`, so
/// no input can name a file outside `root` or `root` itself.
///
/// `tail` is for names the caller adds (a route name, `g1`, `<uid>.dcm`):
/// they are checked the same way, because route names come from config and
/// file names are formatted from UIDs.
pub fn uid_path(root: &Path, uids: &[&Uid], tail: &[&str]) -> Result<PathBuf, PathEscape> {
    let escape = |part: &str, why| PathEscape { root: root.to_owned(), part: part.to_owned(), why };
    let mut out = root.to_path_buf();
    let parts = uids.iter().map(|u| u.as_str()).chain(tail.iter().copied());
    let mut n = 0usize;
    for part in parts {
        if part.is_empty() {
            return Err(escape(part, "empty"));
        }
        if part.contains(['/', '\\', '\0']) {
            return Err(escape(part, "contains a path separator or NUL"));
        }
        let mut comps = Path::new(part).components();
        match (comps.next(), comps.next()) {
            (Some(Component::Normal(c)), None) if c == part => {}
            _ => return Err(escape(part, "is not a single plain file name")),
        }
        out.push(part);
        n += 1;
    }
    // The proof, independent of the checks above: nothing was popped or
    // replaced, so the result is strictly inside `root`.
    if n == 0 || !out.starts_with(root) || out.components().count() != root.components().count() + n {
        return Err(escape(&out.display().to_string(), "does not stay under the root"));
    }
    Ok(out)
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

/// Identifies this implementation in the A-ASSOCIATE-AC (PS3.7 D.3.3.2) and
/// in the file meta of every Part 10 file the node writes (spool, reports).
pub const IMPLEMENTATION_CLASS_UID: &str = "1.2.826.0.1.3680043.10.1484.1";
pub const IMPLEMENTATION_VERSION: &str = concat!("BMNODE_", env!("CARGO_PKG_VERSION"));

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
    fn uid_trims_padding_and_accepts_ps35_uids() {
        assert_eq!(Uid::parse("1.2.3\0").unwrap().as_str(), "1.2.3");
        assert_eq!(Uid::parse("1.2.3 ").unwrap().as_str(), "1.2.3");
        for ok in ["0", "0.0", "1.2.840.10008.5.1.4.1.1.2", "2.25.10", "1.20.300", "9"] {
            assert_eq!(Uid::parse(ok).unwrap().as_str(), ok);
        }
        let max = format!("1.{}", "2".repeat(62));
        assert_eq!(max.len(), 64);
        assert!(Uid::parse(&max).is_ok());
        // the padding does not count against the 64
        assert!(Uid::parse(&format!("{max}\0")).is_ok());
    }

    #[test]
    fn uid_refuses_everything_ps35_forbids_with_its_own_error() {
        use UidError::*;
        let cases: &[(&str, UidError)] = &[
            ("", Empty),
            ("\0", Empty),
            (".", EmptyComponent { component: 1 }),
            ("..", EmptyComponent { component: 1 }),
            ("1..2", EmptyComponent { component: 2 }),
            (".1", EmptyComponent { component: 1 }),
            ("1.", EmptyComponent { component: 2 }),
            ("1.2.", EmptyComponent { component: 3 }),
            ("01.2", LeadingZero { component: 1 }),
            ("1.02", LeadingZero { component: 2 }),
            ("1.00", LeadingZero { component: 2 }),
            ("../etc", BadChar { at: 2 }),
            ("1/2", BadChar { at: 1 }),
            ("1.2\\3", BadChar { at: 3 }),
            ("1.2a", BadChar { at: 3 }),
            ("1.2\u{0}3", BadChar { at: 3 }),
            ("1 .2", BadChar { at: 1 }),
        ];
        for (raw, want) in cases {
            assert_eq!(Uid::parse(raw).as_ref(), Err(want), "{raw:?}");
        }
        let long = format!("1.{}", "2".repeat(63));
        assert_eq!(Uid::parse(&long), Err(TooLong { len: 65 }));
        assert_eq!(Uid::parse(&"1".repeat(65)), Err(TooLong { len: 65 }));
    }

    #[test]
    fn uid_deserialises_only_through_parse() {
        let u: Uid = serde_json::from_str("\"1.2.3\"").unwrap();
        assert_eq!(u.as_str(), "1.2.3");
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"1.2.3\"");
        for bad in ["\"..\"", "\".\"", "\"1..2\"", "\"a\""] {
            assert!(serde_json::from_str::<Uid>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uid_path_stays_under_its_root() {
        let root = Path::new("/data/spool");
        let (a, b) = (Uid::parse("1.2").unwrap(), Uid::parse("1.2.3").unwrap());
        assert_eq!(
            uid_path(root, &[&a, &b], &["1.2.3.4.dcm"]).unwrap(),
            Path::new("/data/spool/1.2/1.2.3/1.2.3.4.dcm")
        );
        assert_eq!(uid_path(root, &[&a], &["route", "g1"]).unwrap(), Path::new("/data/spool/1.2/route/g1"));
        // a relative root works the same
        assert_eq!(uid_path(Path::new("out"), &[&a], &[]).unwrap(), Path::new("out/1.2"));
        for bad in ["..", ".", "", "a/b", "/etc", "a\\b", "x\0", "../x", "a/", "./a"] {
            let e = uid_path(root, &[&a], &[bad]).unwrap_err();
            assert_eq!(e.part, bad, "{bad:?}");
        }
        // nothing to join is refused: the root itself is not a place for data
        assert!(uid_path(root, &[], &[]).is_err());
    }

    #[test]
    fn uid_path_refuses_a_uid_that_bypassed_parse() {
        // Only reachable from inside this module; proves the check does not
        // rely on Uid::parse having run.
        for raw in ["..", ".", "a/../../b", "/abs"] {
            let u = Uid(raw.to_owned());
            assert!(uid_path(Path::new("/r"), &[&u], &[]).is_err(), "{raw:?}");
        }
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
