//! Minimal NumPy `.npy` (format 1.0) reading and writing, C order only:
//! the exchange format with the Python training code (golden set, maps),
//! and `.npz` writing (a zip of `.npy` members, deflated: [`NpzWriter`]) for
//! a volume's maps, which are mostly zeros.

use std::io::{self, Write};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a supported .npy file: {0}")]
    Format(String),
}

/// Element types we exchange.
pub trait Element: Copy {
    const DESCR: &'static str;
    fn write_le(self, out: &mut Vec<u8>);
}
impl Element for f32 {
    const DESCR: &'static str = "<f4";
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl Element for u8 {
    const DESCR: &'static str = "|u1";
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}

pub fn write<T: Element>(path: &Path, shape: &[usize], data: impl IntoIterator<Item = T>) -> Result<(), NpyError> {
    let file = std::fs::File::create(path)?;
    write_to(file, shape, data)?;
    Ok(())
}

/// The `.npy` bytes of an array, to `w`.
fn write_to<T: Element, W: Write>(mut w: W, shape: &[usize], data: impl IntoIterator<Item = T>) -> io::Result<W> {
    let shape_txt = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape_txt}, }}", T::DESCR);
    // magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    // Written through a 1 MiB buffer, not assembled whole: a volume's map
    // (600 x 512 x 512 f32) is 630 MB, and a copy of it would double the
    // job's peak memory.
    const BUF: usize = 1 << 20;
    let mut out = Vec::with_capacity(BUF + 16);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        v.write_le(&mut out);
        if out.len() >= BUF {
            w.write_all(&out)?;
            out.clear();
        }
    }
    w.write_all(&out)?;
    Ok(w)
}

/// A `.npz` file (what `numpy.savez_compressed` writes): a zip whose members
/// are `<name>.npy`, deflated. Each member is compressed in memory as it is
/// added (the raw array is streamed through the encoder, never held whole),
/// so this suits arrays that compress well; no zip64, so a member's raw size
/// must stay under 4 GiB. The fastest deflate level: a job's maps are mostly
/// zeros, and level 6 spent 3x the CPU (5 % of a 300-slice CAC job) to make
/// a 0.4 MB file 0.2 MB.
pub struct NpzWriter {
    file: std::fs::File,
    offset: u64,
    central: Vec<u8>,
    entries: u16,
}

/// Counts and checksums what passes through to the deflate encoder.
struct Crc<W: Write> {
    inner: W,
    crc: flate2::Crc,
    /// Our own count: `flate2::Crc::amount` is a `u32` that wraps past
    /// 4 GiB, so it cannot tell that an entry needs zip64.
    raw: u64,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.raw += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl NpzWriter {
    pub fn create(path: &Path) -> Result<NpzWriter, NpyError> {
        Ok(NpzWriter { file: std::fs::File::create(path)?, offset: 0, central: Vec::new(), entries: 0 })
    }

    /// Add `<name>.npy`.
    pub fn add<T: Element>(&mut self, name: &str, shape: &[usize], data: impl IntoIterator<Item = T>) -> Result<(), NpyError> {
        let enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        let Crc { inner, crc, raw } = write_to(Crc { inner: enc, crc: flate2::Crc::new(), raw: 0 }, shape, data)?;
        let packed = inner.finish()?;
        let sum = crc.sum();
        let too_big = || NpyError::Format(format!("{name}: over 4 GiB, which needs zip64"));
        let raw = u32::try_from(raw).map_err(|_| too_big())?;
        let packed_len = u32::try_from(packed.len()).map_err(|_| too_big())?;
        let at = u32::try_from(self.offset).map_err(|_| too_big())?;
        let fname = format!("{name}.npy");
        // Version 2.0, deflate (8), time 00:00 of 1980-01-01 (DOS date 0x21).
        let common = |out: &mut Vec<u8>| {
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&8u16.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&0x21u16.to_le_bytes());
            out.extend_from_slice(&sum.to_le_bytes());
            out.extend_from_slice(&packed_len.to_le_bytes());
            out.extend_from_slice(&raw.to_le_bytes());
            out.extend_from_slice(&(fname.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
        };
        let mut local = 0x04034b50u32.to_le_bytes().to_vec();
        common(&mut local);
        local.extend_from_slice(fname.as_bytes());
        self.file.write_all(&local)?;
        self.file.write_all(&packed)?;
        self.central.extend_from_slice(&0x02014b50u32.to_le_bytes());
        self.central.extend_from_slice(&20u16.to_le_bytes());
        common(&mut self.central);
        // comment length, disk number, internal attributes (2 bytes each),
        // external attributes (4), then the local header's offset
        self.central.extend_from_slice(&[0u8; 6]);
        self.central.extend_from_slice(&0u32.to_le_bytes());
        self.central.extend_from_slice(&at.to_le_bytes());
        self.central.extend_from_slice(fname.as_bytes());
        self.offset += (local.len() + packed.len()) as u64;
        self.entries += 1;
        Ok(())
    }

    /// Write the central directory and close the file.
    pub fn finish(mut self) -> Result<(), NpyError> {
        let at = u32::try_from(self.offset).map_err(|_| NpyError::Format("npz over 4 GiB".into()))?;
        let mut end = 0x06054b50u32.to_le_bytes().to_vec();
        end.extend_from_slice(&[0u8; 4]);
        end.extend_from_slice(&self.entries.to_le_bytes());
        end.extend_from_slice(&self.entries.to_le_bytes());
        end.extend_from_slice(&(self.central.len() as u32).to_le_bytes());
        end.extend_from_slice(&at.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.file.write_all(&self.central)?;
        self.file.write_all(&end)?;
        Ok(())
    }
}

/// Read any of `<f4 <f8 |u1 |b1 <i2 <i4 <i8` as f64.
pub fn read_f64(path: &Path) -> Result<ArrayD<f64>, NpyError> {
    let bytes = std::fs::read(path)?;
    parse_f64(&bytes).map_err(|e| match e {
        NpyError::Format(m) => NpyError::Format(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// [`read_f64`] on the bytes of a file. Any byte string gets a value or a
/// [`NpyError::Format`], never a panic: the fuzz target `npy` drives it.
pub fn parse_f64(bytes: &[u8]) -> Result<ArrayD<f64>, NpyError> {
    let bad = |m: &str| NpyError::Format(m.to_owned());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    // Versions 2 and 3 have a 4-byte header length, so a 10- or 11-byte
    // file has no room for it.
    let (hlen, start) = match (bytes[6], bytes.get(8..12)) {
        (1, _) => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        (2 | 3, Some(l)) => (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12),
        (2 | 3, None) => return Err(bad("short header")),
        _ => return Err(bad("unknown version")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or_else(|| bad("short header"))?)
        .map_err(|_| bad("header not UTF-8"))?;
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let field = |key: &str| -> Option<&str> {
        let i = header.find(key)? + key.len();
        Some(header[i..].trim_start_matches([':', ' ', '\'']))
    };
    let descr = field("'descr'").and_then(|s| s.split('\'').next()).ok_or_else(|| bad("no descr"))?;
    let shape_txt = field("'shape'").and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_txt
        .trim_start_matches('(')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + hlen..];
    // A shape is text in the file: its product can exceed any real array.
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape has more elements than memory can hold"))?;
    let vals: Vec<f64> = match descr {
        "<f4" => data.chunks_exact(4).take(n).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        "<f8" => data.chunks_exact(8).take(n).map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8"))).collect(),
        "|u1" | "|b1" => data.iter().take(n).map(|&b| b as f64).collect(),
        "<i2" => data.chunks_exact(2).take(n).map(|c| i16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        "<i4" => data.chunks_exact(4).take(n).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        "<i8" => data.chunks_exact(8).take(n).map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")) as f64).collect(),
        other => return Err(bad(&format!("dtype {other} not supported"))),
    };
    if vals.len() != n {
        return Err(bad("data shorter than its shape"));
    }
    ArrayD::from_shape_vec(IxDyn(&shape), vals).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member past 4 GiB must be refused (no zip64), so the count that
    /// decides it must not wrap as `flate2::Crc::amount` (a `u32`) does.
    #[test]
    fn the_member_count_does_not_wrap_at_4_gib() {
        let chunk = vec![0u8; 1 << 24];
        let mut c = Crc { inner: std::io::sink(), crc: flate2::Crc::new(), raw: 0 };
        for _ in 0..257 {
            c.write_all(&chunk).unwrap();
        }
        assert_eq!(c.raw, 257 << 24);
        assert_eq!(c.crc.amount() as u64, (257u64 << 24) & 0xffff_ffff, "flate2's own count wraps");
        assert!(u32::try_from(c.raw).is_err());
    }

    #[test]
    fn npz_members_are_deflated_npy_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.npz");
        let mut z = NpzWriter::create(&p).unwrap();
        z.add("map", &[2, 300], (0..600).map(|i| (i % 7 == 0) as u8 * 200)).unwrap();
        z.add("candidates", &[3], [1u8, 0, 1]).unwrap();
        z.finish().unwrap();
        let b = std::fs::read(&p).unwrap();
        // Walk the local headers: name, sizes, CRC, and the inflated member parses.
        let (mut at, mut names) = (0usize, vec![]);
        while b[at..at + 4] == 0x04034b50u32.to_le_bytes() {
            let u16_at = |o: usize| u16::from_le_bytes([b[at + o], b[at + o + 1]]) as usize;
            let u32_at = |o: usize| u32::from_le_bytes(b[at + o..at + o + 4].try_into().unwrap());
            assert_eq!(u16_at(8), 8, "deflate");
            let (crc, packed, raw, nlen) = (u32_at(14), u32_at(18) as usize, u32_at(22) as usize, u16_at(26));
            let name = String::from_utf8(b[at + 30..at + 30 + nlen].to_vec()).unwrap();
            let data = &b[at + 30 + nlen..at + 30 + nlen + packed];
            let mut npy = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::DeflateDecoder::new(data), &mut npy).unwrap();
            assert_eq!(npy.len(), raw);
            let mut c = flate2::Crc::new();
            c.update(&npy);
            assert_eq!(c.sum(), crc);
            let a = parse_f64(&npy).unwrap();
            if name == "map.npy" {
                assert_eq!((a.shape(), a[[0, 7]], a[[0, 8]]), (&[2usize, 300][..], 200.0, 0.0));
                assert!(packed < raw / 4, "{packed} of {raw}");
            }
            names.push(name);
            at += 30 + nlen + packed;
        }
        assert_eq!(names, ["map.npy", "candidates.npy"]);
        // Then the central directory and its end record, pointing at it; each
        // entry points at its local header and names its member.
        let end = b.len() - 22;
        assert_eq!(b[end..end + 4], 0x06054b50u32.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[end + 16..end + 20].try_into().unwrap()) as usize, at);
        let mut offsets = vec![];
        while b[at..at + 4] == 0x02014b50u32.to_le_bytes() {
            let nlen = u16::from_le_bytes([b[at + 28], b[at + 29]]) as usize;
            offsets.push(u32::from_le_bytes(b[at + 42..at + 46].try_into().unwrap()) as usize);
            assert!(names.contains(&String::from_utf8(b[at + 46..at + 46 + nlen].to_vec()).unwrap()));
            at += 46 + nlen;
        }
        assert_eq!(at, end);
        assert_eq!(offsets.len(), 2);
        assert!(offsets.iter().all(|&o| b[o..o + 4] == 0x04034b50u32.to_le_bytes()));
    }

    #[test]
    fn round_trip_and_numpy_reads_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.npy");
        write(&p, &[2, 3], (0..6).map(|i| i as f32 * 0.5)).unwrap();
        let a = read_f64(&p).unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a[[1, 2]], 2.5);
        let bytes = std::fs::read(&p).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
    }

    /// Fuzz finding (fuzz/corpus/npy/regress-short-v2-header): a version 2
    /// file cut off inside its 4-byte header length indexed past the end.
    #[test]
    fn a_version_2_file_too_short_for_its_header_length_is_refused() {
        for len in 10..12 {
            let mut b = b"\x93NUMPY\x02\x00\x00\x00".to_vec();
            b.truncate(len);
            let e = parse_f64(&b).unwrap_err();
            assert!(e.to_string().contains("short header"), "{e}");
        }
    }

    /// Fuzz finding (fuzz/corpus/npy/regress-shape-overflow): a shape whose
    /// element count overflows usize panicked under overflow checks and
    /// wrapped without them.
    #[test]
    fn a_shape_with_more_elements_than_usize_is_refused() {
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967297), }";
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(&[0; 16]);
        let e = parse_f64(&b).unwrap_err();
        assert!(e.to_string().contains("more elements than memory can hold"), "{e}");
    }

    #[test]
    fn errors_from_a_file_name_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("short.npy");
        std::fs::write(&p, b"\x93NUMPY\x03\x00\x00\x00").unwrap();
        let e = read_f64(&p).unwrap_err().to_string();
        assert!(e.contains("short.npy") && e.contains("short header"), "{e}");
    }
}
