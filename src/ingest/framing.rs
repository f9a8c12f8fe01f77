//! PDU framing (PS3.8 9.3): find PDU boundaries in a byte buffer before any
//! parsing, so a hostile length is refused before we allocate for it.
//!
//! `check` answers "incomplete, read more" or "a whole PDU of n bytes is
//! here"; `parse` splits a P-DATA-TF into PDVs that borrow the PDU's bytes
//! and hands every other PDU to dicom-ul's reader. No I/O here.
//!
//! P-DATA is parsed here rather than by dicom-ul because its reader copies
//! each PDV into a fresh `Vec`: a copy and an allocation of up to our max
//! PDU for every PDU of every instance (14 % of the node's ingest CPU in a
//! perf profile, issue 15).

use dicom_ul::pdu::{read_pdu, PDataValueType, Pdu};

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

/// One presentation data value item (PS3.8 9.3.5.1), borrowed from its PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdv<'a> {
    pub presentation_context_id: u8,
    pub value_type: PDataValueType,
    pub is_last: bool,
    pub data: &'a [u8],
}

/// A whole PDU: the items of a P-DATA-TF, or any other PDU as dicom-ul reads it.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    PData(Vec<Pdv<'a>>),
    Control(Pdu),
}

/// Parse one whole PDU (as delimited by [`check`]).
pub fn parse(pdu: &[u8]) -> Result<Frame<'_>, FrameError> {
    if pdu.first() == Some(&0x04) {
        return pdata(pdu).map(Frame::PData);
    }
    parse_control(pdu).map(Frame::Control)
}

/// The items of a P-DATA-TF, by the rules of dicom-ul's reader: every item
/// has its 4-byte length, a context id and a message control header, and
/// fits in the PDU; the whole PDU is refused before any item is used.
fn pdata(pdu: &[u8]) -> Result<Vec<Pdv<'_>>, FrameError> {
    let malformed = |what: &str| FrameError::Malformed(what.to_owned());
    let mut rest = pdu.get(HEADER_LEN..).ok_or_else(|| malformed("P-DATA-TF shorter than its header"))?;
    let mut items = Vec::with_capacity(2);
    while !rest.is_empty() {
        if rest.len() < 6 {
            return Err(malformed("PDV item shorter than its header"));
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 2 {
            return Err(FrameError::Malformed(format!("PDV item length {len} is below 2")));
        }
        let body = rest.get(4..4 + len).ok_or_else(|| malformed("PDV item overruns its PDU"))?;
        let header = body[1];
        items.push(Pdv {
            presentation_context_id: body[0],
            value_type: if header & 0x01 != 0 { PDataValueType::Command } else { PDataValueType::Data },
            is_last: header & 0x02 != 0,
            data: &body[2..],
        });
        rest = &rest[4 + len..];
    }
    Ok(items)
}

fn parse_control(pdu: &[u8]) -> Result<Pdu, FrameError> {
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
    use dicom_ul::pdu::PDataValue;

    impl<'a> From<&'a PDataValue> for Pdv<'a> {
        fn from(p: &'a PDataValue) -> Pdv<'a> {
            Pdv {
                presentation_context_id: p.presentation_context_id,
                value_type: p.value_type.clone(),
                is_last: p.is_last,
                data: &p.data,
            }
        }
    }

    #[test]
    fn incomplete_then_complete() {
        let release = [0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(check(&release[..3], 16384), Ok(None));
        assert_eq!(check(&release[..9], 16384), Ok(None));
        assert_eq!(check(&release, 16384), Ok(Some(10)));
        assert_eq!(parse(&release).unwrap(), Frame::Control(Pdu::ReleaseRQ));
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

    /// The borrowed P-DATA parse agrees with dicom-ul's reader, item for
    /// item, and refuses what it refuses.
    #[test]
    fn pdata_items_match_dicom_uls_reader() {
        let values = vec![
            PDataValue { presentation_context_id: 1, value_type: PDataValueType::Command, is_last: true, data: b"cmd".to_vec() },
            PDataValue { presentation_context_id: 3, value_type: PDataValueType::Data, is_last: false, data: vec![7; 300] },
            PDataValue { presentation_context_id: 3, value_type: PDataValueType::Data, is_last: true, data: vec![] },
        ];
        let mut pdu = Vec::new();
        dicom_ul::pdu::write_pdu(&mut pdu, &Pdu::PData { data: values.clone() }).unwrap();
        let Frame::PData(items) = parse(&pdu).unwrap() else { panic!("not P-DATA") };
        let expected: Vec<Pdv> = values.iter().map(Pdv::from).collect();
        assert_eq!(items, expected);
        assert_eq!(parse_control(&pdu).unwrap(), Pdu::PData { data: values });

        // ...without copying: every item's data lies inside the PDU's bytes.
        let inside = pdu.as_ptr_range();
        for item in &items {
            let d = item.data.as_ptr_range();
            assert!(inside.start <= d.start && d.end <= inside.end, "item data was copied");
        }

        // an empty P-DATA-TF has no items, as in dicom-ul
        assert_eq!(parse(&[0x04, 0, 0, 0, 0, 0]).unwrap(), Frame::PData(vec![]));
        for bad in [
            &[0x04, 0, 0, 0, 0, 6, 0, 0, 0, 1, 1, 3][..],                // item length 1
            &[0x04, 0, 0, 0, 0, 5, 0, 0, 0, 2, 1][..],                   // item header cut short
            &[0x04, 0, 0, 0, 0, 9, 0, 0, 0, 2, 1, 3, 0, 0, 0][..],       // a second item cut short
            &[0x04, 0, 0, 0, 0, 8, 0, 0, 0, 5, 1, 3, 9, 9][..],          // an item overrunning the PDU
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
            assert!(parse_control(bad).is_err(), "dicom-ul accepts {bad:?}");
        }
    }
}
