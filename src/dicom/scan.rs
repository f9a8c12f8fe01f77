//! A bounds check over an encoded dataset before anything parses it.
//!
//! dicom-rs allocates a value's declared length before reading it, so one
//! element claiming 4 GiB in a 6 kB message would cost 4 GiB. This walk
//! reads only element headers and checks every defined length against the
//! bytes that are actually there, descending into sequences and items, so
//! a lying length is refused in O(size) time with no allocation.
//!
//! It also refuses a binary value whose length is not a whole number of
//! values (a 15-byte UL): dicom-rs reads the whole values only and then
//! parses the rest of the dataset out of step, where any four bytes can
//! become a "length" this walk never saw.
//!
//! Input: a reader positioned at the dataset (no file meta) and its
//! transfer syntax's [`Layout`]. A deflated dataset is inflated here, as a
//! stream, and walked as it comes out.
//! Output: [`Scanned`]: the walked length and a copy of the few top-level
//! elements the caller asked to keep, small enough to hand to dicom-rs.
//! Invariants: memory is bounded whatever the input: element values are
//! skipped (seeked over, or read through a fixed buffer), never held, and a
//! kept element is at most [`MAX_KEPT_VALUE`] bytes, once per tag. The
//! walk stops at `max` bytes, inflated or not, and after [`MAX_ELEMENTS`]
//! element and item headers, so a deflate bomb costs at most `max` bytes
//! of inflating (or a few MB of tiny elements) and no memory.
//! Failures: [`ScanError`]; `Io` is a read error on our side, every other
//! variant is about the data.

use std::io::{self, BufReader, Read, Seek};

use dicom_core::dictionary::DataDictionary;
use dicom_core::Tag;
use dicom_dictionary_std::StandardDataDictionary;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("element ({group:04X},{element:04X}) at offset {offset} declares {len} bytes but only {left} remain")]
    Overrun {
        group: u16,
        element: u16,
        offset: u64,
        len: u32,
        left: u64,
    },
    #[error("element ({group:04X},{element:04X}) at offset {offset} has {len} bytes, not a multiple of its VR {vr}'s {size}-byte values")]
    Misaligned {
        group: u16,
        element: u16,
        offset: u64,
        len: u32,
        vr: String,
        size: usize,
    },
    #[error("dataset ends inside an element header at offset {0}")]
    TruncatedHeader(u64),
    #[error("undefined-length element or item whose content starts at offset {0} has no delimiter")]
    Unterminated(u64),
    #[error("sequences nested deeper than {0}")]
    TooDeep(usize),
    #[error("element ({group:04X},{element:04X}) has {len} bytes; a header attribute may have at most {MAX_KEPT_VALUE}")]
    HeaderValueTooLong { group: u16, element: u16, len: u32 },
    /// Past the caller's size limit (for a deflated dataset: once inflated).
    #[error("dataset {} more than {limit} bytes", if *.inflated { "inflates to" } else { "has" })]
    TooLarge { limit: u64, inflated: bool },
    #[error("dataset has more than {0} elements and items")]
    TooManyElements(u64),
    #[error("deflated dataset cannot be inflated: {0}")]
    Inflate(String),
    /// Reading our own copy failed: not the data's fault.
    #[error("cannot read the dataset: {message}")]
    Io { kind: io::ErrorKind, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    ImplicitLittle,
    ExplicitLittle,
    ExplicitBig,
}

impl Encoding {
    /// The native transfer syntax with this encoding: what a [`Scanned`]
    /// header copy is parsed with (it is never deflated or encapsulated).
    pub fn transfer_syntax(self) -> &'static str {
        match self {
            Encoding::ImplicitLittle => "1.2.840.10008.1.2",
            Encoding::ExplicitLittle => "1.2.840.10008.1.2.1",
            Encoding::ExplicitBig => "1.2.840.10008.1.2.2",
        }
    }
}

/// How a transfer syntax lays out its dataset bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub encoding: Encoding,
    /// Deflated Explicit VR Little Endian (PS3.5 A.5): the dataset is one
    /// raw deflate stream of explicit VR LE.
    pub deflated: bool,
}

pub const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

impl Layout {
    pub fn of(ts: &str) -> Layout {
        let (encoding, deflated) = match ts.trim_end_matches(['\0', ' ']) {
            "1.2.840.10008.1.2" => (Encoding::ImplicitLittle, false),
            "1.2.840.10008.1.2.2" => (Encoding::ExplicitBig, false),
            DEFLATED => (Encoding::ExplicitLittle, true),
            // every other accepted syntax encodes the dataset in explicit VR LE
            _ => (Encoding::ExplicitLittle, false),
        };
        Layout { encoding, deflated }
    }
}

const MAX_DEPTH: usize = 64;
/// Elements and items in one dataset, all levels together. A large enhanced
/// CT (10 000 frames of functional groups) has well under a million; the
/// limit bounds the walk of a highly compressible deflate stream of tiny
/// elements, which no length check can catch, to a fraction of a second.
pub const MAX_ELEMENTS: u64 = 4 << 20;
/// Header attributes are short strings and numbers; 64 KiB is the most an
/// explicit VR 16-bit length allows anyway.
pub const MAX_KEPT_VALUE: u32 = 64 * 1024;
/// Read buffer for the walk: element headers come from here, skipped values
/// of a deflated dataset pass through it.
const BUF: usize = 64 * 1024;

/// Size of one value of the binary VRs that dicom-rs decodes value by value.
fn value_size(vr: &[u8; 2]) -> Option<usize> {
    match vr {
        b"US" | b"SS" | b"OW" => Some(2),
        b"UL" | b"SL" | b"FL" | b"AT" | b"OL" | b"OF" => Some(4),
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => Some(8),
        _ => None,
    }
}
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Where the walk reads from: `skip` is a seek in a file or a buffer, and a
/// read-and-discard in an inflating stream.
trait Source {
    type Inner: Read;
    fn inner(&mut self) -> &mut Self::Inner;
    /// Skip up to `n` bytes; returns how many there were.
    fn skip(&mut self, n: u64) -> io::Result<u64>;
}

struct Seekable<R>(BufReader<R>);
impl<R: Read + Seek> Source for Seekable<R> {
    type Inner = BufReader<R>;
    fn inner(&mut self) -> &mut BufReader<R> {
        &mut self.0
    }
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        // Bounds are checked against the known length before any skip, so a
        // seek never passes the end. seek_relative keeps the buffer when it can.
        let n_i = i64::try_from(n).map_err(io::Error::other)?;
        self.0.seek_relative(n_i)?;
        Ok(n)
    }
}

struct Sequential<R>(BufReader<R>);
impl<R: Read> Source for Sequential<R> {
    type Inner = BufReader<R>;
    fn inner(&mut self) -> &mut BufReader<R> {
        &mut self.0
    }
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut (&mut self.0).take(n), &mut io::sink())
    }
}

/// Marks errors of the reader under the inflater, so they are told apart
/// from the inflater's own complaints about the data.
#[derive(Debug)]
struct SourceError(io::Error);
impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for SourceError {}

struct Marked<R>(R);
impl<R: Read> Read for Marked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| io::Error::new(e.kind(), SourceError(e)))
    }
}

/// The result of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes walked: the dataset's length, inflated if it was deflated.
    pub len: u64,
    /// The kept top-level elements, encoded as they came (for a deflated
    /// dataset: as explicit VR LE), in tag order; parse them with
    /// [`Layout::encoding`]'s [`Encoding::transfer_syntax`].
    pub kept: Vec<u8>,
}

struct Walker<'k, S> {
    src: S,
    enc: Encoding,
    pos: u64,
    /// The dataset's limit; only consulted where its end is not known.
    max: u64,
    deflated: bool,
    keep: &'k dyn Fn(Tag) -> bool,
    kept: Vec<(Tag, Vec<u8>)>,
    /// Element and item headers read so far.
    count: u64,
}

impl<S: Source> Walker<'_, S> {
    fn io(&self, e: io::Error) -> ScanError {
        let ours = e.get_ref().is_some_and(|i| i.is::<SourceError>());
        if self.deflated && !ours {
            ScanError::Inflate(e.to_string())
        } else {
            ScanError::Io { kind: e.kind(), message: e.to_string() }
        }
    }

    /// Read up to `buf.len()` bytes; fewer only at the end of the data.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ScanError> {
        let mut got = 0;
        while got < buf.len() {
            match self.src.inner().read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        self.pos += got as u64;
        Ok(got)
    }

    fn u16(&self, b: &[u8]) -> u16 {
        let b = [b[0], b[1]];
        match self.enc {
            Encoding::ExplicitBig => u16::from_be_bytes(b),
            _ => u16::from_le_bytes(b),
        }
    }
    fn u32(&self, b: &[u8]) -> u32 {
        let b = [b[0], b[1], b[2], b[3]];
        match self.enc {
            Encoding::ExplicitBig => u32::from_be_bytes(b),
            _ => u32::from_le_bytes(b),
        }
    }

    /// A value of `len` bytes starts here: is it within its container (a
    /// known end) or within the limit (an unknown one)?
    fn check_bound(&self, group: u16, element: u16, offset: u64, len: u32, end: Option<u64>) -> Result<(), ScanError> {
        match end {
            Some(end) => {
                let left = end - self.pos;
                if u64::from(len) > left {
                    return Err(ScanError::Overrun { group, element, offset, len, left });
                }
            }
            None => {
                if self.pos + u64::from(len) > self.max {
                    return Err(ScanError::TooLarge { limit: self.max, inflated: self.deflated });
                }
            }
        }
        Ok(())
    }

    fn skip(&mut self, group: u16, element: u16, offset: u64, len: u32) -> Result<(), ScanError> {
        let got = self.src.skip(u64::from(len)).map_err(|e| self.io(e))?;
        self.pos += got;
        if got < u64::from(len) {
            return Err(ScanError::Overrun { group, element, offset, len, left: got });
        }
        Ok(())
    }

    /// Walk elements up to `end` (None: the end of the data); stops at a
    /// delimiter when `until_delimiter` (undefined-length item or sequence),
    /// which must then come before the end. `fragments`: items hold
    /// encapsulated pixel data, not elements.
    fn elements(&mut self, end: Option<u64>, depth: usize, until_delimiter: bool, fragments: bool) -> Result<(), ScanError> {
        if depth > MAX_DEPTH {
            return Err(ScanError::TooDeep(MAX_DEPTH));
        }
        // The end of the container or of the data is fine unless a delimiter
        // was due first.
        let opened = self.pos;
        let ended = || if until_delimiter { Err(ScanError::Unterminated(opened)) } else { Ok(()) };
        loop {
            let at = self.pos;
            if end.is_some_and(|e| at >= e) {
                return ended();
            }
            if end.is_some_and(|e| e - at < 8) {
                return Err(ScanError::TruncatedHeader(at));
            }
            let mut h = [0u8; 12];
            match self.read(&mut h[..8])? {
                0 => return ended(),
                8 => {}
                _ => return Err(ScanError::TruncatedHeader(at)),
            }
            if end.is_none() && self.pos > self.max {
                return Err(ScanError::TooLarge { limit: self.max, inflated: self.deflated });
            }
            self.count += 1;
            if self.count > MAX_ELEMENTS {
                return Err(ScanError::TooManyElements(MAX_ELEMENTS));
            }
            // Item and delimiter tags are always little endian in LE syntaxes and
            // follow the dataset's byte order in big endian.
            let group = self.u16(&h[0..2]);
            let element = self.u16(&h[2..4]);
            if group == 0xFFFE {
                let len = self.u32(&h[4..8]);
                match element {
                    0xE00D | 0xE0DD if until_delimiter => return Ok(()),
                    0xE000 => {
                        self.item_body(at, end, len, depth, fragments)?;
                        continue;
                    }
                    // Any other (FFFE,xxxx) is read by dicom-rs as a value of
                    // `len` bytes, so it is bounded like one.
                    _ if len != UNDEFINED => {
                        self.check_bound(group, element, at, len, end)?;
                        self.skip(group, element, at, len)?;
                        continue;
                    }
                    _ => continue,
                }
            }
            let (vr, len, header) = match self.enc {
                Encoding::ImplicitLittle => {
                    // As dicom-rs's implicit decoder: group lengths are UL,
                    // other tags take the dictionary's VR (unknown: UN).
                    let vr = if element == 0x0000 {
                        Some(*b"UL")
                    } else {
                        StandardDataDictionary
                            .by_tag(Tag(group, element))
                            .and_then(|e| e.vr.relaxed().to_string().as_bytes().try_into().ok())
                    };
                    (vr, self.u32(&h[4..8]), 8)
                }
                _ => {
                    let vr = [h[4], h[5]];
                    // PS3.5 7.1.2: these VRs have a 16-bit length; every other
                    // VR, and an unknown one (read as UN by dicom-rs, as here),
                    // has 2 reserved bytes and a 32-bit length.
                    let short = matches!(
                        &vr,
                        b"AE" | b"AS" | b"AT" | b"CS" | b"DA" | b"DS" | b"DT" | b"FL" | b"FD" | b"IS" | b"LO"
                            | b"LT" | b"PN" | b"SH" | b"SL" | b"SS" | b"ST" | b"TM" | b"UI" | b"UL" | b"US"
                    );
                    if short {
                        (Some(vr), u32::from(self.u16(&h[6..8])), 8)
                    } else {
                        if end.is_some_and(|e| e - at < 12) {
                            return Err(ScanError::TruncatedHeader(at));
                        }
                        if self.read(&mut h[8..12])? < 4 {
                            return Err(ScanError::TruncatedHeader(at));
                        }
                        (Some(vr), self.u32(&h[8..12]), 12)
                    }
                }
            };
            if len == UNDEFINED {
                // SQ, UN with undefined length, or encapsulated pixel data: items follow.
                let pixel_data = group == 0x7FE0 && element == 0x0010;
                // dicom-rs reads any undefined-length element as a sequence in
                // the dataset's own encoding (its VR discarded), and so do we.
                self.elements(end, depth + 1, true, pixel_data)?;
                continue;
            }
            self.check_bound(group, element, at, len, end)?;
            if let Some(size) = vr.as_ref().and_then(value_size) {
                if len as usize % size != 0 {
                    let vr = vr.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
                    return Err(ScanError::Misaligned { group, element, offset: at, len, vr, size });
                }
            }
            if vr == Some(*b"SQ") {
                let inner_end = self.pos + u64::from(len);
                self.elements(Some(inner_end), depth + 1, false, false)?;
                continue;
            }
            let tag = Tag(group, element);
            if depth == 0 && (self.keep)(tag) {
                if len > MAX_KEPT_VALUE {
                    return Err(ScanError::HeaderValueTooLong { group, element, len });
                }
                let mut raw = Vec::with_capacity(header + len as usize);
                raw.extend_from_slice(&h[..header]);
                raw.resize(header + len as usize, 0);
                if self.read(&mut raw[header..])? < len as usize {
                    let left = (self.pos - at) - header as u64;
                    return Err(ScanError::Overrun { group, element, offset: at, len, left });
                }
                // A repeated tag replaces the earlier one, as in dicom-rs's
                // object; so at most one copy per kept tag is held.
                match self.kept.iter_mut().find(|(t, _)| *t == tag) {
                    Some((_, v)) => *v = raw,
                    None => self.kept.push((tag, raw)),
                }
                continue;
            }
            self.skip(group, element, at, len)?;
        }
    }

    fn item_body(&mut self, at: u64, end: Option<u64>, len: u32, depth: usize, fragment: bool) -> Result<(), ScanError> {
        if len == UNDEFINED {
            return self.elements(end, depth + 1, true, false);
        }
        self.check_bound(0xFFFE, 0xE000, at, len, end)?;
        // Items of encapsulated pixel data hold fragments, not elements; a
        // fragment's bytes need no walk, only the bound just checked.
        if fragment {
            self.skip(0xFFFE, 0xE000, at, len)
        } else {
            let inner_end = self.pos + u64::from(len);
            self.elements(Some(inner_end), depth + 1, false, false)
        }
    }

    fn finish(mut self) -> Scanned {
        self.kept.sort_by_key(|(t, _)| *t);
        Scanned {
            len: self.pos,
            kept: self.kept.into_iter().flat_map(|(_, v)| v).collect(),
        }
    }
}

/// Walk the dataset of `len` bytes at `reader`'s position, laid out as
/// `layout` says, keeping the top-level elements `keep` selects. `max` is
/// the most bytes the dataset may have (inflated, when deflated).
pub fn scan<R: Read + Seek>(reader: R, len: u64, layout: Layout, max: u64, keep: &dyn Fn(Tag) -> bool) -> Result<Scanned, ScanError> {
    if layout.deflated {
        // The stream ends where the inflater says; `len` only stops it from
        // reading past the received bytes.
        let inflate = flate2::read::DeflateDecoder::new(Marked(reader.take(len)));
        walk(Sequential(BufReader::with_capacity(BUF, inflate)), layout, max, keep, None)
    } else {
        if len > max {
            return Err(ScanError::TooLarge { limit: max, inflated: false });
        }
        walk(Seekable(BufReader::with_capacity(BUF, reader)), layout, max, keep, Some(len))
    }
}

/// Walk the top-level dataset from `src`; `len` is its end where known (a
/// deflated stream ends where the inflater says).
fn walk<S: Source>(src: S, layout: Layout, max: u64, keep: &dyn Fn(Tag) -> bool, len: Option<u64>) -> Result<Scanned, ScanError> {
    let mut w = Walker {
        src,
        enc: layout.encoding,
        pos: 0,
        max,
        deflated: layout.deflated,
        keep,
        kept: Vec::new(),
        count: 0,
    };
    w.elements(len, 0, false, false)?;
    Ok(w.finish())
}

/// Check every declared length in `dataset` (no file meta) against its size.
pub fn check_lengths(dataset: &[u8], enc: Encoding) -> Result<(), ScanError> {
    let layout = Layout { encoding: enc, deflated: false };
    scan(io::Cursor::new(dataset), dataset.len() as u64, layout, u64::MAX, &|_| false).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(tag: (u16, u16), vr: &[u8; 2], v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        if matches!(vr, b"OB" | b"SQ" | b"OW") {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(v);
        out
    }

    #[test]
    fn honest_dataset_passes_and_a_lying_pixel_length_fails() {
        let mut d = el((0x0008, 0x0060), b"CS", b"CT");
        d.extend(el((0x7FE0, 0x0010), b"OW", &[0; 16]));
        assert_eq!(check_lengths(&d, Encoding::ExplicitLittle), Ok(()));
        let n = d.len();
        d[n - 20..n - 16].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(matches!(check_lengths(&d, Encoding::ExplicitLittle), Err(ScanError::Overrun { group: 0x7FE0, .. })));
    }

    #[test]
    fn lies_inside_a_defined_length_sequence_are_found() {
        let inner = el((0x0008, 0x0100), b"SH", b"AB");
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        item.extend(inner);
        let mut d = el((0x0008, 0x1140), b"SQ", &item);
        assert_eq!(check_lengths(&d, Encoding::ExplicitLittle), Ok(()));
        // inner SH claims 0x7000 bytes: bounded by its item, it overruns
        let at = d.len() - 4;
        d[at..at + 2].copy_from_slice(&0x7000u16.to_le_bytes());
        assert!(check_lengths(&d, Encoding::ExplicitLittle).is_err());
    }

    #[test]
    fn undefined_length_sequences_and_truncation() {
        let mut d = vec![0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        d.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend(el((0x0008, 0x0100), b"SH", b"AB"));
        d.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        d.extend(el((0x0008, 0x0060), b"CS", b"CT"));
        assert_eq!(check_lengths(&d, Encoding::ExplicitLittle), Ok(()));
        assert!(check_lengths(&d[..d.len() - 3], Encoding::ExplicitLittle).is_err());
    }

    #[test]
    fn an_unknown_vr_has_a_32_bit_length_as_the_parser_reads_it() {
        // VR bytes 0xD8D8: dicom-rs reads UN, so 2 reserved bytes + u32 length.
        let mut d = vec![0x08, 0x00, 0x18, 0x00, 0xD8, 0xD8, 0x00, 0x00];
        d.extend(0x7FFF_FFF0u32.to_le_bytes());
        assert!(matches!(check_lengths(&d, Encoding::ExplicitLittle), Err(ScanError::Overrun { .. })));
    }

    #[test]
    fn implicit_vr_uses_the_dictionary_for_sequences() {
        let mut d = Vec::new();
        d.extend([0x08, 0x00, 0x60, 0x00, 2, 0, 0, 0, b'C', b'T']);
        d.extend([0xE0, 0x7F, 0x10, 0x00, 0xF0, 0xFF, 0xFF, 0xFF]);
        assert!(matches!(check_lengths(&d, Encoding::ImplicitLittle), Err(ScanError::Overrun { .. })));
    }

    #[test]
    fn a_binary_value_that_is_not_whole_values_is_refused() {
        // 15 bytes of UL: dicom-rs reads 12 and parses the rest out of step.
        let mut d = el((0x0028, 0x0010), b"US", &[0, 2]);
        d.extend(el((0x0018, 0x9219), b"SS", &[1, 0, 2]));
        assert!(matches!(check_lengths(&d, Encoding::ExplicitLittle), Err(ScanError::Misaligned { size: 2, .. })));
        // implicit VR: the dictionary says (0028,0030) is DS (text, any length)
        // and a group length is UL
        let mut imp = vec![0x28, 0x00, 0x00, 0x00, 15, 0, 0, 0];
        imp.extend([0u8; 15]);
        assert!(matches!(check_lengths(&imp, Encoding::ImplicitLittle), Err(ScanError::Misaligned { size: 4, .. })));
        let mut ok = vec![0x28, 0x00, 0x30, 0x00, 5, 0, 0, 0];
        ok.extend(b"0.5\\1");
        assert_eq!(check_lengths(&ok[..13], Encoding::ImplicitLittle), Ok(()));
    }

    fn deflate(raw: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(raw).unwrap();
        e.finish().unwrap()
    }

    const DEFLATED_LAYOUT: Layout = Layout { encoding: Encoding::ExplicitLittle, deflated: true };

    fn scan_slice(d: &[u8], layout: Layout, max: u64, keep: &dyn Fn(Tag) -> bool) -> Result<Scanned, ScanError> {
        scan(io::Cursor::new(d), d.len() as u64, layout, max, keep)
    }

    #[test]
    fn kept_elements_come_back_in_tag_order_and_the_rest_is_skipped() {
        let mut d = el((0x0020, 0x000D), b"UI", b"1.2.3\0");
        d.extend(el((0x0008, 0x0060), b"CS", b"CT"));
        d.extend(el((0x0009, 0x0010), b"OB", &[7; 300]));
        d.extend(el((0x7FE0, 0x0010), b"OW", &[0; 64]));
        let keep = |t: Tag| t == Tag(0x0008, 0x0060) || t == Tag(0x0020, 0x000D);
        let s = scan_slice(&d, Layout::of("1.2.840.10008.1.2.1"), u64::MAX, &keep).unwrap();
        assert_eq!(s.len, d.len() as u64);
        let mut want = el((0x0008, 0x0060), b"CS", b"CT");
        want.extend(el((0x0020, 0x000D), b"UI", b"1.2.3\0"));
        assert_eq!(s.kept, want);
        // nested copies of a kept tag are not top-level attributes
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        let inner = el((0x0008, 0x0060), b"CS", b"MR");
        item.extend((inner.len() as u32).to_le_bytes());
        item.extend(inner);
        let mut n = el((0x0008, 0x1140), b"SQ", &item);
        n.extend(el((0x0008, 0x0060), b"CS", b"CT"));
        n.extend(el((0x0008, 0x0060), b"CS", b"PT"));
        let s = scan_slice(&n, Layout::of("1.2.840.10008.1.2.1"), u64::MAX, &keep).unwrap();
        assert_eq!(s.kept, el((0x0008, 0x0060), b"CS", b"PT"), "one copy per tag, the last, as dicom-rs keeps");
    }

    #[test]
    fn an_oversized_header_value_is_refused_not_held() {
        let mut d = vec![0x08, 0x00, 0x3E, 0x10, b'U', b'N', 0, 0];
        d.extend((MAX_KEPT_VALUE + 2).to_le_bytes());
        d.extend(vec![b'A'; MAX_KEPT_VALUE as usize + 2]);
        let keep = |t: Tag| t == Tag(0x0008, 0x103E);
        let e = scan_slice(&d, Layout::of("1.2.840.10008.1.2.1"), u64::MAX, &keep).unwrap_err();
        assert!(matches!(e, ScanError::HeaderValueTooLong { element: 0x103E, .. }), "{e}");
    }

    #[test]
    fn a_sequence_without_its_delimiter_is_unterminated() {
        let mut d = vec![0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        d.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend(el((0x0008, 0x0100), b"SH", b"AB"));
        assert!(matches!(check_lengths(&d, Encoding::ExplicitLittle), Err(ScanError::Unterminated(_))));
        assert!(matches!(
            scan_slice(&deflate(&d), DEFLATED_LAYOUT, 1 << 20, &|_| false),
            Err(ScanError::Unterminated(_))
        ));
    }

    #[test]
    fn a_deflated_dataset_is_walked_as_its_inflated_bytes() {
        let mut d = el((0x0008, 0x0060), b"CS", b"CT");
        d.extend(el((0x7FE0, 0x0010), b"OW", &[0; 4096]));
        let keep = |t: Tag| t == Tag(0x0008, 0x0060);
        let z = deflate(&d);
        assert!(z.len() < d.len());
        let s = scan_slice(&z, DEFLATED_LAYOUT, 1 << 20, &keep).unwrap();
        assert_eq!((s.len, s.kept), (d.len() as u64, el((0x0008, 0x0060), b"CS", b"CT")));
        // the same lies are found inside the stream
        let n = d.len();
        d[n - 4100..n - 4096].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(scan_slice(&deflate(&d), DEFLATED_LAYOUT, 1 << 20, &keep), Err(ScanError::Overrun { .. })));
        // corrupt compressed bytes (a final block of the reserved type 3) are
        // the data's fault, not a read error of ours
        let e = scan_slice(&[0x07, 0, 0, 0], DEFLATED_LAYOUT, 1 << 20, &keep).unwrap_err();
        assert!(matches!(e, ScanError::Inflate(_)), "{e}");
    }

    /// A bomb stops at the cap: honest element lengths, so only inflating
    /// finds out, and it stops at `max`; a declared length past the cap stops
    /// before inflating it.
    #[test]
    fn a_deflate_bomb_stops_at_the_cap() {
        let max = 4u64 << 20;
        let mut d = el((0x0008, 0x0060), b"CS", b"CT");
        for i in 0..64u16 {
            d.extend(el((0x0009, 0x1000 + i), b"OB", &vec![0; 1 << 20]));
        }
        let z = deflate(&d);
        assert!(z.len() < 128 * 1024, "{} compressed bytes", z.len());
        let e = scan_slice(&z, DEFLATED_LAYOUT, max, &|_| false).unwrap_err();
        assert_eq!(e, ScanError::TooLarge { limit: max, inflated: true });
        let mut lie = el((0x0008, 0x0060), b"CS", b"CT");
        lie.extend([0x09, 0x00, 0x00, 0x10, b'O', b'B', 0, 0]);
        lie.extend(0xFFFF_FFF0u32.to_le_bytes());
        let e = scan_slice(&deflate(&lie), DEFLATED_LAYOUT, max, &|_| false).unwrap_err();
        assert_eq!(e, ScanError::TooLarge { limit: max, inflated: true });
        // nothing but zeros reads as empty elements of tag (0000,0000): no
        // length to catch, so the element count is what stops it, early
        let e = scan_slice(&deflate(&vec![0; 64 << 20]), DEFLATED_LAYOUT, 1 << 30, &|_| false).unwrap_err();
        assert_eq!(e, ScanError::TooManyElements(MAX_ELEMENTS));
        assert_eq!(
            scan_slice(&deflate(&vec![0; 8 << 20]), DEFLATED_LAYOUT, max, &|_| false).unwrap_err(),
            ScanError::TooLarge { limit: max, inflated: true }
        );
        // not deflated: the received size itself is the measure
        assert_eq!(
            scan_slice(&d, Layout::of("1.2.840.10008.1.2.1"), max, &|_| false).unwrap_err(),
            ScanError::TooLarge { limit: max, inflated: false }
        );
    }
}
