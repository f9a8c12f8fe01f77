//! JPEG Extended (Process 2+4, 1.2.840.10008.1.2.4.51) pixel data.
//!
//! **Input.** The encapsulated Pixel Data of one object in that transfer
//! syntax, its frame count and geometry (rows, columns, bits allocated and
//! stored).
//!
//! **Output.** All frames, decoded, as `rows * cols` samples per frame in
//! native byte order at `bits_allocated` (the layout `dicom-pixeldata` gives
//! for every other syntax), so the modality LUT in `to_hu` is shared.
//!
//! **Why not `dicom-pixeldata`.** Its JPEG path (jpeg-decoder 0.3) and
//! zune-jpeg decode 12-bit samples only for lossless JPEG; 12-bit DCT, the
//! reason .51 exists, fails. libjpeg-turbo 3.x has a 12-bit DCT decoder
//! (`tj3Decompress12`, the IJG code DCMTK's own 12-bit build derives from);
//! `turbojpeg-sys` builds it from its vendored source, so nothing is needed at
//! run time.
//!
//! **Invariants.** Each frame must be one greyscale JPEG image of exactly the
//! object's rows and columns, with a sample precision that fits BitsStored;
//! anything else is an error, never a guess. libjpeg warnings (truncated or
//! corrupt entropy data, which it would fill with grey) are errors too.
//!
//! **Failures.** A message for `VolumeError::Decode`.

use std::ffi::CStr;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use turbojpeg_sys as tj;

pub(crate) const UID: &str = "1.2.840.10008.1.2.4.51";

/// Geometry the decoded frames must have.
pub(crate) struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub frames: usize,
}

/// Decode every frame of an object's encapsulated Pixel Data.
pub(crate) fn decode(obj: &InMemDicomObject, layout: &Layout) -> Result<Vec<u8>, String> {
    let value = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| "no Pixel Data".to_string())?
        .value();
    let fragments = value
        .fragments()
        .ok_or_else(|| "Pixel Data is not encapsulated".to_string())?;
    let offsets = value.offset_table().unwrap_or(&[]);
    let frames = split_frames(fragments, offsets, layout.frames)?;
    let bytes_per_sample = layout.bits_allocated as usize / 8;
    let mut out = Vec::with_capacity(layout.rows * layout.cols * bytes_per_sample * frames.len());
    for (i, jpeg) in frames.iter().enumerate() {
        decode_frame(jpeg, layout, &mut out).map_err(|e| format!("frame {}: {e}", i + 1))?;
    }
    Ok(out)
}

/// Group fragments into frames (PS3.5 A.4): by the Basic Offset Table when
/// there is one; else one fragment per frame when the counts match; else a
/// new frame at each fragment that starts with an SOI marker, as DCMTK and
/// pydicom do for a table-less multi-fragment frame.
fn split_frames(fragments: &[Vec<u8>], offsets: &[u32], n_frames: usize) -> Result<Vec<Vec<u8>>, String> {
    let frames: Vec<Vec<u8>> = if !offsets.is_empty() {
        // Offsets count from the first fragment's item tag: 8 header bytes
        // per fragment item.
        let mut starts = Vec::with_capacity(fragments.len());
        let mut pos = 0u64;
        for f in fragments {
            starts.push(pos);
            pos += 8 + f.len() as u64;
        }
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(offsets.len());
        for (i, &off) in offsets.iter().enumerate() {
            let end = offsets.get(i + 1).map(|&o| o as u64).unwrap_or(u64::MAX);
            let mut frame = Vec::new();
            let mut found = false;
            for (f, &s) in fragments.iter().zip(&starts) {
                if s == off as u64 {
                    found = true;
                }
                if s >= off as u64 && s < end {
                    frame.extend_from_slice(f);
                }
            }
            if !found {
                return Err(format!("Basic Offset Table entry {off} is not at a fragment boundary"));
            }
            frames.push(frame);
        }
        frames
    } else if fragments.len() == n_frames {
        fragments.to_vec()
    } else {
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for f in fragments {
            match frames.last_mut() {
                Some(last) if !f.starts_with(&[0xFF, 0xD8]) => last.extend_from_slice(f),
                _ => frames.push(f.clone()),
            }
        }
        frames
    };
    if frames.len() != n_frames {
        return Err(format!(
            "{} JPEG frame(s) in {} fragment(s), NumberOfFrames says {n_frames}",
            frames.len(),
            fragments.len()
        ));
    }
    Ok(frames)
}

/// A TurboJPEG decompressor, destroyed on drop.
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Result<Self, String> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let h = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as libc::c_int) };
        if h.is_null() {
            return Err("cannot create a libjpeg-turbo decompressor".into());
        }
        Ok(Handle(h))
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: a live handle from tj3Init.
        unsafe { tj::tj3Get(self.0, param as libc::c_int) }
    }

    fn set(&self, param: tj::TJPARAM, value: i32) -> Result<(), String> {
        // SAFETY: a live handle from tj3Init.
        match unsafe { tj::tj3Set(self.0, param as libc::c_int, value) } {
            0 => Ok(()),
            _ => Err(self.error()),
        }
    }

    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the
        // handle, valid until the next call on it; copied at once.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

fn decode_frame(jpeg: &[u8], layout: &Layout, out: &mut Vec<u8>) -> Result<(), String> {
    let h = Handle::new()?;
    // A corrupt or truncated frame decodes "successfully" with a warning and
    // grey where data is missing: that must not reach a measurement.
    h.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 1)?;
    // SAFETY: jpeg is a live slice of jpeg.len() bytes.
    if unsafe { tj::tj3DecompressHeader(h.0, jpeg.as_ptr(), jpeg.len() as tj::size_t) } != 0 {
        return Err(h.error());
    }
    let (w, ht) = (
        h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    if w as usize != layout.cols || ht as usize != layout.rows {
        return Err(format!(
            "JPEG is {w}x{ht}, the object says {}x{} (columns x rows)",
            layout.cols, layout.rows
        ));
    }
    if h.get(tj::TJPARAM_TJPARAM_COLORSPACE) != tj::TJCS_TJCS_GRAY as i32 {
        return Err("JPEG is not single-component greyscale".into());
    }
    if h.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0 {
        return Err("lossless JPEG in a JPEG Extended (.51) object".into());
    }
    let precision = h.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision as u16 > layout.bits_stored.max(8) || precision as u16 > layout.bits_allocated {
        return Err(format!(
            "JPEG sample precision {precision} does not fit BitsStored {} / BitsAllocated {}",
            layout.bits_stored, layout.bits_allocated
        ));
    }
    let n = layout.rows * layout.cols;
    let gray = tj::TJPF_TJPF_GRAY as libc::c_int;
    match precision {
        8 => {
            let mut buf = vec![0u8; n];
            // SAFETY: buf holds cols*rows one-byte greyscale samples, the
            // size checked against the header above; pitch is cols.
            let rc = unsafe {
                tj::tj3Decompress8(h.0, jpeg.as_ptr(), jpeg.len() as tj::size_t, buf.as_mut_ptr(), layout.cols as libc::c_int, gray)
            };
            if rc != 0 {
                return Err(h.error());
            }
            match layout.bits_allocated {
                8 => out.extend_from_slice(&buf),
                _ => out.extend(buf.iter().flat_map(|&v| (v as u16).to_ne_bytes())),
            }
        }
        12 => {
            let mut buf = vec![0i16; n];
            // SAFETY: buf holds cols*rows 12-bit samples (one c_short each),
            // the size checked against the header above; pitch is in samples.
            let rc = unsafe {
                tj::tj3Decompress12(h.0, jpeg.as_ptr(), jpeg.len() as tj::size_t, buf.as_mut_ptr(), layout.cols as libc::c_int, gray)
            };
            if rc != 0 {
                return Err(h.error());
            }
            // Samples are 0..4095: the stored bit pattern, which `to_hu`
            // masks and sign-extends as for any other syntax.
            out.extend(buf.iter().flat_map(|&v| (v as u16).to_ne_bytes()));
        }
        p => return Err(format!("JPEG sample precision {p}: JPEG Extended allows 8 or 12")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soi(rest: &[u8]) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn frames_split_by_soi_without_offset_table() {
        let frags = vec![soi(&[1]), vec![2, 3], soi(&[4]), vec![5]];
        let f = split_frames(&frags, &[], 2).unwrap();
        assert_eq!(f, vec![vec![0xFF, 0xD8, 1, 2, 3], vec![0xFF, 0xD8, 4, 5]]);
        assert!(split_frames(&frags, &[], 3).unwrap_err().contains("NumberOfFrames says 3"));
    }

    #[test]
    fn frames_split_by_offset_table() {
        // Fragment items: 8 + 3, 8 + 2, 8 + 3 bytes: frames start at 0 and 21.
        let frags = vec![soi(&[1]), vec![2, 3], soi(&[4])];
        let f = split_frames(&frags, &[0, 21], 2).unwrap();
        assert_eq!(f, vec![vec![0xFF, 0xD8, 1, 2, 3], vec![0xFF, 0xD8, 4]]);
        assert!(split_frames(&frags, &[0, 20], 2).unwrap_err().contains("fragment boundary"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let layout = Layout { rows: 2, cols: 2, bits_allocated: 16, bits_stored: 12, frames: 1 };
        let mut out = Vec::new();
        let e = decode_frame(&[0xFF, 0xD8, 0xFF, 0xC1, 0, 1, 2], &layout, &mut out).unwrap_err();
        assert!(!e.is_empty());
        assert!(out.is_empty());
    }
}
