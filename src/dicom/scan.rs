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

use dicom_core::dictionary::DataDictionary;
use dicom_core::Tag;
use dicom_dictionary_std::StandardDataDictionary;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("element ({group:04X},{element:04X}) at offset {offset} declares {len} bytes but only {left} remain")]
    Overrun {
        group: u16,
        element: u16,
        offset: usize,
        len: u32,
        left: usize,
    },
    #[error("element ({group:04X},{element:04X}) at offset {offset} has {len} bytes, not a multiple of its VR {vr}'s {size}-byte values")]
    Misaligned {
        group: u16,
        element: u16,
        offset: usize,
        len: u32,
        vr: String,
        size: usize,
    },
    #[error("dataset ends inside an element header at offset {0}")]
    TruncatedHeader(usize),
    #[error("sequences nested deeper than {0}")]
    TooDeep(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    ImplicitLittle,
    ExplicitLittle,
    ExplicitBig,
}

impl Encoding {
    /// The encoding of a transfer syntax's dataset, or None when it cannot
    /// be walked in place (deflate: the bytes are compressed).
    pub fn of(ts: &str) -> Option<Encoding> {
        match ts.trim_end_matches(['\0', ' ']) {
            "1.2.840.10008.1.2" => Some(Encoding::ImplicitLittle),
            "1.2.840.10008.1.2.2" => Some(Encoding::ExplicitBig),
            "1.2.840.10008.1.2.1.99" => None,
            // every other accepted syntax encodes the dataset in explicit VR LE
            _ => Some(Encoding::ExplicitLittle),
        }
    }
}

const MAX_DEPTH: usize = 64;

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

struct Walker<'a> {
    buf: &'a [u8],
    enc: Encoding,
}

impl Walker<'_> {
    fn u16(&self, at: usize) -> u16 {
        let b = [self.buf[at], self.buf[at + 1]];
        match self.enc {
            Encoding::ExplicitBig => u16::from_be_bytes(b),
            _ => u16::from_le_bytes(b),
        }
    }
    fn u32(&self, at: usize) -> u32 {
        let b = [self.buf[at], self.buf[at + 1], self.buf[at + 2], self.buf[at + 3]];
        match self.enc {
            Encoding::ExplicitBig => u32::from_be_bytes(b),
            _ => u32::from_le_bytes(b),
        }
    }

    /// Walk elements in `[pos, end)`; stops early at a delimiter when
    /// `until_delimiter` (undefined-length item or sequence). Returns the
    /// position after what it consumed.
    fn elements(&self, mut pos: usize, end: usize, depth: usize, until_delimiter: bool, fragments: bool) -> Result<usize, ScanError> {
        if depth > MAX_DEPTH {
            return Err(ScanError::TooDeep(MAX_DEPTH));
        }
        while pos < end {
            if end - pos < 8 {
                return Err(ScanError::TruncatedHeader(pos));
            }
            // Item and delimiter tags are always little endian in LE syntaxes and
            // follow the dataset's byte order in big endian.
            let group = self.u16(pos);
            let element = self.u16(pos + 2);
            if group == 0xFFFE {
                let len = self.u32(pos + 4);
                pos += 8;
                match element {
                    0xE00D | 0xE0DD if until_delimiter => return Ok(pos),
                    0xE000 => {
                        pos = self.item_body(pos, end, len, depth, fragments)?;
                        continue;
                    }
                    // Any other (FFFE,xxxx) is read by dicom-rs as a value of
                    // `len` bytes, so it is bounded like one.
                    _ if len != UNDEFINED => {
                        if len as usize > end - pos {
                            return Err(ScanError::Overrun { group, element, offset: pos - 8, len, left: end - pos });
                        }
                        pos += len as usize;
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
                    (vr, self.u32(pos + 4), 8)
                }
                _ => {
                    let vr = [self.buf[pos + 4], self.buf[pos + 5]];
                    // PS3.5 7.1.2: these VRs have a 16-bit length; every other
                    // VR, and an unknown one (read as UN by dicom-rs, as here),
                    // has 2 reserved bytes and a 32-bit length.
                    let short = matches!(
                        &vr,
                        b"AE" | b"AS" | b"AT" | b"CS" | b"DA" | b"DS" | b"DT" | b"FL" | b"FD" | b"IS" | b"LO"
                            | b"LT" | b"PN" | b"SH" | b"SL" | b"SS" | b"ST" | b"TM" | b"UI" | b"UL" | b"US"
                    );
                    if short {
                        (Some(vr), self.u16(pos + 6) as u32, 8)
                    } else {
                        if end - pos < 12 {
                            return Err(ScanError::TruncatedHeader(pos));
                        }
                        (Some(vr), self.u32(pos + 8), 12)
                    }
                }
            };
            let start = pos;
            pos += header;
            if len == UNDEFINED {
                // SQ, UN with undefined length, or encapsulated pixel data: items follow.
                let pixel_data = group == 0x7FE0 && element == 0x0010;
                // dicom-rs reads any undefined-length element as a sequence in
                // the dataset's own encoding (its VR discarded), and so do we.
                pos = self.elements(pos, end, depth + 1, true, pixel_data)?;
                continue;
            }
            let left = end - pos;
            if len as usize > left {
                return Err(ScanError::Overrun { group, element, offset: start, len, left });
            }
            if let Some(size) = vr.as_ref().and_then(value_size) {
                if len as usize % size != 0 {
                    let vr = vr.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
                    return Err(ScanError::Misaligned { group, element, offset: start, len, vr, size });
                }
            }
            if vr == Some(*b"SQ") {
                self.elements(pos, pos + len as usize, depth + 1, false, false)?;
            }
            pos += len as usize;
        }
        Ok(pos)
    }

    fn item_body(&self, pos: usize, end: usize, len: u32, depth: usize, fragment: bool) -> Result<usize, ScanError> {
        if len == UNDEFINED {
            return self.elements(pos, end, depth + 1, true, false);
        }
        let left = end - pos;
        if len as usize > left {
            return Err(ScanError::Overrun { group: 0xFFFE, element: 0xE000, offset: pos - 8, len, left });
        }
        // Items of encapsulated pixel data hold fragments, not elements; a
        // fragment's bytes need no walk, only the bound just checked.
        if !fragment {
            self.elements(pos, pos + len as usize, depth + 1, false, false)?;
        }
        Ok(pos + len as usize)
    }
}

/// Check every declared length in `dataset` (no file meta) against its size.
pub fn check_lengths(dataset: &[u8], enc: Encoding) -> Result<(), ScanError> {
    Walker { buf: dataset, enc }.elements(0, dataset.len(), 0, false, false).map(|_| ())
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
}
