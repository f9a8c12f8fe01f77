//! PDU framing (PS3.8 9.3): find PDU boundaries in a byte buffer before any
//! parsing, so a hostile length is refused before we allocate for it.
//!
//! `check` answers "incomplete, read more" or "a whole PDU of n bytes is
//! here"; `parse` hands a whole PDU to dicom-ul's reader. No I/O here.

use dicom_ul::pdu::{read_pdu, Pdu};

/// PDU header: type (1), reserved (1), length (4).
pub const HEADER_LEN: usize = 6;

/// Non-P-DATA PDUs (association negotiation) are bounded separately: they
/// carry no bulk data, and a large proposal list is still far below this.
pub const MAX_CONTROL_PDU: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unrecognized PDU type 0x{0:02X}")]
    UnknownType(u8),
    #[error("PDU of {len} bytes exceeds the limit of {max}")]
    TooLong { len: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

/// Whether `buf` starts with a whole PDU. `max_pdata` is the Maximum Length
/// we advertised (PS3.8 D.1): a P-DATA-TF whose length field exceeds it is
/// a protocol violation, not a reason to buffer more.
pub fn check(buf: &[u8], max_pdata: u32) -> Result<Option<usize>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let pdu_type = buf[0];
    let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
    let max = match pdu_type {
        0x04 => max_pdata,
        0x01..=0x03 => MAX_CONTROL_PDU,
        // release and abort PDUs have a fixed 4-byte body
        0x05..=0x07 => 4,
        other => return Err(FrameError::UnknownType(other)),
    };
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    let total = HEADER_LEN + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Parse one whole PDU (as delimited by [`check`]).
pub fn parse(pdu: &[u8]) -> Result<Pdu, FrameError> {
    let mut slice = pdu;
    match read_pdu(&mut slice, dicom_ul::pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(FrameError::Malformed("PDU body shorter than its items".into())),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_then_complete() {
        let release = [0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(check(&release[..3], 16384), Ok(None));
        assert_eq!(check(&release[..9], 16384), Ok(None));
        assert_eq!(check(&release, 16384), Ok(Some(10)));
        assert_eq!(parse(&release).unwrap(), Pdu::ReleaseRQ);
    }

    #[test]
    fn oversized_pdata_is_refused_from_the_header_alone() {
        let hdr = [0x04, 0, 0, 0x10, 0, 1];
        assert!(matches!(check(&hdr, 16384), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn garbage_type_is_refused() {
        assert_eq!(check(b"GET / HTTP/1.1", 16384), Err(FrameError::UnknownType(b'G')));
    }

    #[test]
    fn pdv_overrunning_its_pdu_is_malformed() {
        // P-DATA with one PDV item claiming 100 bytes but carrying 2
        let pdu = [0x04, 0, 0, 0, 0, 8, 0, 0, 0, 100, 1, 0x03, 0xAA, 0xBB];
        let n = check(&pdu, 16384).unwrap().unwrap();
        assert!(parse(&pdu[..n]).is_err());
    }
}
