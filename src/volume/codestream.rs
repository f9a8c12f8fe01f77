//! The image size an encapsulated frame declares, read before a decoder runs.
//!
//! **Why.** The codecs behind `dicom-pixeldata` (jpeg-decoder, CharLS,
//! OpenJPEG) and libjpeg-turbo size their output from the codestream's own
//! header, not from Rows and Columns. A 1 kB JPEG Baseline object that says
//! 8x8 in its dataset and 25608x24930 in its frame header made jpeg-decoder
//! allocate 640 MB and run for more than 10 s (the `dicom_file` fuzz target's
//! `timeout-59c957…`); the `MAX_SIDE` and voxel-budget checks on Rows and Columns cannot
//! see that. So every frame's header is read here first, and one that does
//! not describe exactly the dataset's image is refused.
//!
//! **Input.** The fragments of encapsulated Pixel Data and the transfer
//! syntax's codestream family. A frame starts at a fragment that begins with
//! the family's start marker; the header is read across the fragments that
//! follow it, since a frame may be split anywhere (PS3.5 A.4).
//!
//! **Checked.** Width = Columns, height = Rows, one component (the volume
//! only takes greyscale), a sample precision of at most 16 bits. Anything the
//! header parser cannot follow is refused too: a decoder must never be the
//! first to read a header.

/// The codestream inside each fragment, by transfer syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// ISO 10918 (Baseline, Extended, Lossless) and ISO 14495 (JPEG-LS):
    /// SOI, then marker segments up to a start-of-frame.
    Jpeg,
    /// ISO 15444 (JPEG 2000, HTJ2K): SOC and SIZ, optionally inside a JP2 file.
    J2k,
}

impl Family {
    pub(crate) fn of(transfer_syntax: &str) -> Option<Family> {
        match transfer_syntax {
            "1.2.840.10008.1.2.4.50"
            | "1.2.840.10008.1.2.4.51"
            | "1.2.840.10008.1.2.4.57"
            | "1.2.840.10008.1.2.4.70"
            | "1.2.840.10008.1.2.4.80"
            | "1.2.840.10008.1.2.4.81" => Some(Family::Jpeg),
            "1.2.840.10008.1.2.4.90"
            | "1.2.840.10008.1.2.4.91"
            | "1.2.840.10008.1.2.4.201"
            | "1.2.840.10008.1.2.4.202"
            | "1.2.840.10008.1.2.4.203" => Some(Family::J2k),
            _ => None,
        }
    }

    fn starts_frame(self, fragment: &[u8]) -> bool {
        match self {
            Family::Jpeg => fragment.starts_with(&[0xFF, 0xD8]),
            Family::J2k => fragment.starts_with(&[0xFF, 0x4F]) || fragment.starts_with(&JP2_SIGNATURE),
        }
    }
}

/// What one frame's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub cols: u32,
    pub rows: u32,
    pub components: u32,
    pub precision: u32,
}

const JP2_SIGNATURE: [u8; 12] = [0, 0, 0, 0x0C, b'j', b'P', b' ', b' ', 0x0D, 0x0A, 0x87, 0x0A];

/// Refuse the Pixel Data unless every frame header describes a `rows` x
/// `cols` greyscale image. At least one frame must start in the first
/// fragment, so no decoder gets a stream whose header was not read here.
pub(crate) fn check(family: Family, fragments: &[Vec<u8>], rows: usize, cols: usize) -> Result<(), String> {
    match fragments.first() {
        None => return Err("encapsulated Pixel Data has no fragments".into()),
        Some(first) if !family.starts_frame(first) => {
            return Err(format!("the first fragment does not start a {family:?} codestream"))
        }
        Some(_) => {}
    }
    for (i, fragment) in fragments.iter().enumerate() {
        if !family.starts_frame(fragment) {
            continue;
        }
        let mut bytes = Bytes::new(&fragments[i..]);
        let h = match family {
            Family::Jpeg => jpeg_header(&mut bytes),
            Family::J2k => j2k_header(&mut bytes),
        }
        .map_err(|e| format!("fragment {}: {e}", i + 1))?;
        if h.cols as usize != cols || h.rows as usize != rows {
            return Err(format!(
                "fragment {}: the codestream is {}x{}, the dataset says {cols}x{rows} (columns x rows)",
                i + 1,
                h.cols,
                h.rows
            ));
        }
        if h.components != 1 {
            return Err(format!(
                "fragment {}: {} components, a CT image has one",
                i + 1,
                h.components
            ));
        }
        if !(1..=16).contains(&h.precision) {
            return Err(format!("fragment {}: sample precision {}", i + 1, h.precision));
        }
    }
    Ok(())
}

/// A byte reader over a fragment and the ones after it.
struct Bytes<'a> {
    fragments: &'a [Vec<u8>],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn new(fragments: &'a [Vec<u8>]) -> Self {
        Bytes { fragments, pos: 0 }
    }

    fn u8(&mut self) -> Result<u8, String> {
        loop {
            let (first, rest) = self
                .fragments
                .split_first()
                .ok_or("the codestream ends inside its header")?;
            if let Some(&b) = first.get(self.pos) {
                self.pos += 1;
                return Ok(b);
            }
            self.fragments = rest;
            self.pos = 0;
        }
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes([self.u8()?, self.u8()?, self.u8()?, self.u8()?]))
    }

    fn skip(&mut self, mut n: u64) -> Result<(), String> {
        while n > 0 {
            let (first, rest) = self
                .fragments
                .split_first()
                .ok_or("the codestream ends inside its header")?;
            let left = (first.len() - self.pos.min(first.len())) as u64;
            if n < left {
                self.pos += n as usize;
                return Ok(());
            }
            n -= left;
            self.fragments = rest;
            self.pos = 0;
        }
        Ok(())
    }
}

/// SOI, then marker segments until the first start-of-frame (SOF0-15 but
/// DHT, JPG and DAC; SOF55 for JPEG-LS). A scan or EOI before it is refused.
fn jpeg_header(b: &mut Bytes) -> Result<Header, String> {
    if b.u16()? != 0xFFD8 {
        return Err("no JPEG SOI marker".into());
    }
    loop {
        if b.u8()? != 0xFF {
            return Err("a JPEG marker segment is out of step".into());
        }
        let mut marker = b.u8()?;
        // Any number of 0xFF fill bytes may precede a marker (ISO 10918-1 B.1.1.2).
        while marker == 0xFF {
            marker = b.u8()?;
        }
        match marker {
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => return sof(b),
            0xF7 => return sof(b),
            0x01 | 0xD0..=0xD7 => continue,
            0xD9 | 0xDA => return Err(format!("JPEG marker FF{marker:02X} before any frame header")),
            _ => {
                let len = b.u16()?;
                if len < 2 {
                    return Err(format!("JPEG marker FF{marker:02X} has length {len}"));
                }
                b.skip(len as u64 - 2)?;
            }
        }
    }
}

fn sof(b: &mut Bytes) -> Result<Header, String> {
    let _len = b.u16()?;
    let precision = b.u8()? as u32;
    let rows = b.u16()? as u32;
    let cols = b.u16()? as u32;
    let components = b.u8()? as u32;
    Ok(Header {
        cols,
        rows,
        components,
        precision,
    })
}

/// SOC then SIZ (ISO 15444-1 A.5.1, which must come first), or a JP2 file
/// whose contiguous codestream box holds them.
fn j2k_header(b: &mut Bytes) -> Result<Header, String> {
    let first = b.u16()?;
    if first == 0x0000 {
        // JP2: boxes of (length, type) until 'jp2c' (ISO 15444-1 I.4).
        b.skip(10)?;
        loop {
            let len = b.u32()? as u64;
            let kind = b.u32()?;
            if kind == u32::from_be_bytes(*b"jp2c") {
                if b.u16()? != 0xFF4F {
                    return Err("the JP2 codestream box does not start with SOC".into());
                }
                break;
            }
            let body = match len {
                0 => return Err("a JP2 box before the codestream runs to the end".into()),
                1 => {
                    let xl = (b.u32()? as u64) << 32 | b.u32()? as u64;
                    xl.checked_sub(16).ok_or(format!("a JP2 box of length {xl}"))?
                }
                n if n >= 8 => n - 8,
                n => return Err(format!("a JP2 box of length {n}")),
            };
            b.skip(body)?;
        }
    } else if first != 0xFF4F {
        return Err("no JPEG 2000 SOC marker".into());
    }
    if b.u16()? != 0xFF51 {
        return Err("JPEG 2000 SOC is not followed by SIZ".into());
    }
    let _lsiz = b.u16()?;
    let _rsiz = b.u16()?;
    let (xsiz, ysiz, x0, y0) = (b.u32()?, b.u32()?, b.u32()?, b.u32()?);
    b.skip(16)?; // tile size and tile origin
    let components = b.u16()? as u32;
    let precision = (b.u8()? & 0x7F) as u32 + 1;
    if x0 >= xsiz || y0 >= ysiz {
        return Err(format!(
            "JPEG 2000 image origin {x0},{y0} is outside its size {xsiz}x{ysiz}"
        ));
    }
    Ok(Header {
        cols: xsiz - x0,
        rows: ysiz - y0,
        components,
        precision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(precision: u8, rows: u16, cols: u16, components: u8) -> Vec<u8> {
        let mut v = vec![
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xFF, 0xC0, 0x00, 0x0B, precision,
        ];
        v.extend(rows.to_be_bytes());
        v.extend(cols.to_be_bytes());
        v.extend([components, 1, 0x11, 0]);
        v.extend([0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9]);
        v
    }

    fn j2k(xsiz: u32, ysiz: u32, x0: u32, y0: u32, components: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for n in [xsiz, ysiz, x0, y0, xsiz, ysiz, 0, 0] {
            v.extend(n.to_be_bytes());
        }
        v.extend(components.to_be_bytes());
        v.extend([0x0F, 1, 1]);
        v
    }

    #[test]
    fn jpeg_size_must_be_the_datasets() {
        let ok = vec![jpeg(12, 512, 512, 1)];
        assert_eq!(check(Family::Jpeg, &ok, 512, 512), Ok(()));
        // The fuzz finding: 8x8 in the dataset, 25608x24930 in the frame header.
        let err = check(Family::Jpeg, &[jpeg(8, 0x6162, 0x6408, 1)], 8, 8).unwrap_err();
        assert!(err.contains("25608x24930"), "{err}");
        assert!(check(Family::Jpeg, &[jpeg(8, 8, 8, 3)], 8, 8)
            .unwrap_err()
            .contains("3 components"));
        assert!(check(Family::Jpeg, &[jpeg(0, 8, 8, 1)], 8, 8).is_err());
    }

    #[test]
    fn a_header_split_over_fragments_is_followed() {
        let whole = jpeg(16, 64, 32, 1);
        for cut in 2..whole.len() {
            let frags = vec![whole[..cut].to_vec(), whole[cut..].to_vec()];
            assert_eq!(check(Family::Jpeg, &frags, 64, 32), Ok(()), "cut at {cut}");
            assert!(check(Family::Jpeg, &frags, 32, 64).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn every_frame_is_checked_and_the_first_fragment_must_start_one() {
        let frames = vec![jpeg(8, 4, 4, 1), vec![1, 2, 3], jpeg(8, 4, 5, 1)];
        assert!(check(Family::Jpeg, &frames, 4, 4)
            .unwrap_err()
            .starts_with("fragment 3"));
        assert!(check(Family::Jpeg, &[vec![0, 0xFF, 0xD8]], 4, 4).is_err());
        assert!(check(Family::Jpeg, &[], 4, 4).is_err());
    }

    #[test]
    fn truncated_or_out_of_step_headers_are_refused() {
        let whole = jpeg(8, 4, 4, 1);
        // The frame header's last field (components) is byte 17.
        for cut in 2..17 {
            assert!(
                check(Family::Jpeg, &[whole[..cut].to_vec()], 4, 4).is_err(),
                "cut at {cut}"
            );
        }
        // A scan before any frame header, and a segment length under 2.
        assert!(check(Family::Jpeg, &[vec![0xFF, 0xD8, 0xFF, 0xDA, 0, 2]], 4, 4).is_err());
        assert!(check(Family::Jpeg, &[vec![0xFF, 0xD8, 0xFF, 0xE1, 0, 1]], 4, 4).is_err());
    }

    #[test]
    fn j2k_size_is_the_image_area_less_its_origin() {
        assert_eq!(check(Family::J2k, &[j2k(512, 512, 0, 0, 1)], 512, 512), Ok(()));
        assert_eq!(check(Family::J2k, &[j2k(520, 530, 8, 18, 1)], 512, 512), Ok(()));
        assert!(check(Family::J2k, &[j2k(60000, 60000, 0, 0, 1)], 8, 8)
            .unwrap_err()
            .contains("60000x60000"));
        assert!(check(Family::J2k, &[j2k(8, 8, 8, 0, 1)], 8, 8).is_err());
        assert!(check(Family::J2k, &[j2k(8, 8, 0, 0, 3)], 8, 8).is_err());
    }

    #[test]
    fn j2k_inside_a_jp2_file_is_read_from_its_codestream_box() {
        let mut jp2 = JP2_SIGNATURE.to_vec();
        jp2.extend([0, 0, 0, 20]);
        jp2.extend(b"ftypjp2 \0\0\0\0jp2 ");
        let stream = j2k(16, 8, 0, 0, 1);
        jp2.extend((8 + stream.len() as u32).to_be_bytes());
        jp2.extend(b"jp2c");
        jp2.extend(&stream);
        assert_eq!(check(Family::J2k, std::slice::from_ref(&jp2), 8, 16), Ok(()));
        assert!(check(Family::J2k, &[jp2], 16, 8).is_err());
    }
}
