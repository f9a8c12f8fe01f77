//! DIMSE command sets (PS3.7 9.3, E.1): the one place that encodes and
//! decodes them, for the SCP (ingest) and the SCU (outbox).
//!
//! Command sets are always implicit VR little endian and small, so this is a
//! hand-written, allocation-light codec over plain bytes: no I/O, bounded by
//! the input, and fuzzed (`fuzz/`). Unknown elements are skipped, lengths
//! that overrun are errors.

use std::fmt;

/// Command Field values (PS3.7 E.1-1) this node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandField {
    CStoreRq,
    CStoreRsp,
    CEchoRq,
    CEchoRsp,
    Other(u16),
}

impl CommandField {
    pub fn from_u16(v: u16) -> CommandField {
        match v {
            0x0001 => CommandField::CStoreRq,
            0x8001 => CommandField::CStoreRsp,
            0x0030 => CommandField::CEchoRq,
            0x8030 => CommandField::CEchoRsp,
            other => CommandField::Other(other),
        }
    }
    pub fn to_u16(self) -> u16 {
        match self {
            CommandField::CStoreRq => 0x0001,
            CommandField::CStoreRsp => 0x8001,
            CommandField::CEchoRq => 0x0030,
            CommandField::CEchoRsp => 0x8030,
            CommandField::Other(v) => v,
        }
    }
}

/// DIMSE statuses we send or expect (PS3.4 B.2.3, PS3.7 C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success,
    /// 0xA700: out of resources (disk below the watermark, I/O failure).
    OutOfResources,
    /// 0xA900: the dataset's SOP Class differs from the command's.
    DataSetDoesNotMatchSopClass,
    /// 0xC000: cannot understand (unparseable dataset, missing identifiers).
    CannotUnderstand,
    /// 0x0122: the SOP class is not the one negotiated for the context.
    SopClassNotSupported,
    /// 0x0211: unrecognized operation.
    UnrecognizedOperation,
    Other(u16),
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Success => 0x0000,
            Status::OutOfResources => 0xA700,
            Status::DataSetDoesNotMatchSopClass => 0xA900,
            Status::CannotUnderstand => 0xC000,
            Status::SopClassNotSupported => 0x0122,
            Status::UnrecognizedOperation => 0x0211,
            Status::Other(c) => c,
        }
    }
    pub fn from_code(c: u16) -> Status {
        match c {
            0x0000 => Status::Success,
            0xA700 => Status::OutOfResources,
            0xA900 => Status::DataSetDoesNotMatchSopClass,
            0xC000 => Status::CannotUnderstand,
            0x0122 => Status::SopClassNotSupported,
            0x0211 => Status::UnrecognizedOperation,
            c => Status::Other(c),
        }
    }
    /// Success or warning (0xB000, 0x0107, 0x0116): the instance is kept.
    pub fn is_success_or_warning(self) -> bool {
        let c = self.code();
        c == 0 || c == 0x0107 || c == 0x0116 || (c & 0xF000) == 0xB000
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04X}", self.code())
    }
}

/// CommandDataSetType value meaning "no dataset follows" (PS3.7 E.1-1).
pub const NO_DATASET: u16 = 0x0101;

/// The fields of a command set that any of our services reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    pub command_field: u16,
    pub message_id: Option<u16>,
    pub message_id_being_responded_to: Option<u16>,
    pub affected_sop_class_uid: Option<String>,
    pub affected_sop_instance_uid: Option<String>,
    pub data_set_type: Option<u16>,
    pub priority: Option<u16>,
    pub status: Option<u16>,
    pub error_comment: Option<String>,
}

impl Command {
    pub fn field(&self) -> CommandField {
        CommandField::from_u16(self.command_field)
    }
    pub fn has_dataset(&self) -> bool {
        self.data_set_type.is_some_and(|t| t != NO_DATASET)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command element ({group:04X},{element:04X}) overruns the command set")]
    Overrun { group: u16, element: u16 },
    #[error("command element ({group:04X},{element:04X}) has length {len}, expected {expected}")]
    BadLength {
        group: u16,
        element: u16,
        len: u32,
        expected: u32,
    },
    #[error("command set has an element outside group 0000: ({group:04X},{element:04X})")]
    NotCommandGroup { group: u16, element: u16 },
    #[error("command set has no CommandField (0000,0100)")]
    NoCommandField,
    #[error("command set ends in the middle of an element header")]
    TruncatedHeader,
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_end_matches(['\0', ' '])
        .trim_start()
        .to_owned()
}

fn u16_of(group: u16, element: u16, v: &[u8]) -> Result<u16, CommandError> {
    if v.len() != 2 {
        return Err(CommandError::BadLength {
            group,
            element,
            len: v.len() as u32,
            expected: 2,
        });
    }
    Ok(u16::from_le_bytes([v[0], v[1]]))
}

/// Decode an implicit VR little endian command set.
pub fn decode_command(mut bytes: &[u8]) -> Result<Command, CommandError> {
    let mut cmd = Command::default();
    let mut have_field = false;
    while !bytes.is_empty() {
        if bytes.len() < 8 {
            return Err(CommandError::TruncatedHeader);
        }
        let group = u16::from_le_bytes([bytes[0], bytes[1]]);
        let element = u16::from_le_bytes([bytes[2], bytes[3]]);
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if group != 0x0000 {
            return Err(CommandError::NotCommandGroup { group, element });
        }
        let rest = &bytes[8..];
        if len as usize > rest.len() {
            return Err(CommandError::Overrun { group, element });
        }
        let (v, tail) = rest.split_at(len as usize);
        bytes = tail;
        match element {
            0x0002 => cmd.affected_sop_class_uid = Some(text(v)),
            0x0100 => {
                cmd.command_field = u16_of(group, element, v)?;
                have_field = true;
            }
            0x0110 => cmd.message_id = Some(u16_of(group, element, v)?),
            0x0120 => cmd.message_id_being_responded_to = Some(u16_of(group, element, v)?),
            0x0700 => cmd.priority = Some(u16_of(group, element, v)?),
            0x0800 => cmd.data_set_type = Some(u16_of(group, element, v)?),
            0x0900 => cmd.status = Some(u16_of(group, element, v)?),
            0x0902 => cmd.error_comment = Some(text(v)),
            0x1000 => cmd.affected_sop_instance_uid = Some(text(v)),
            _ => {}
        }
    }
    if !have_field {
        return Err(CommandError::NoCommandField);
    }
    Ok(cmd)
}

/// Builds a command set; (0000,0000) CommandGroupLength is filled in by
/// [`CommandWriter::finish`]. Elements must be added in ascending tag order.
struct CommandWriter {
    buf: Vec<u8>,
}

impl CommandWriter {
    fn new() -> Self {
        // 12 bytes reserved for the group length element.
        CommandWriter {
            buf: vec![0; 12],
        }
    }
    fn element(&mut self, element: u16, value: &[u8], pad: u8) {
        let padded = value.len() + value.len() % 2;
        self.buf.extend_from_slice(&0u16.to_le_bytes());
        self.buf.extend_from_slice(&element.to_le_bytes());
        self.buf.extend_from_slice(&(padded as u32).to_le_bytes());
        self.buf.extend_from_slice(value);
        if value.len() % 2 == 1 {
            self.buf.push(pad);
        }
    }
    fn uid(&mut self, element: u16, uid: &str) {
        self.element(element, uid.as_bytes(), 0);
    }
    fn us(&mut self, element: u16, v: u16) {
        self.element(element, &v.to_le_bytes(), 0);
    }
    fn text(&mut self, element: u16, s: &str) {
        self.element(element, s.as_bytes(), b' ');
    }
    fn finish(mut self) -> Vec<u8> {
        let group_len = (self.buf.len() - 12) as u32;
        self.buf[0..4].copy_from_slice(&[0, 0, 0, 0]);
        self.buf[4..8].copy_from_slice(&4u32.to_le_bytes());
        self.buf[8..12].copy_from_slice(&group_len.to_le_bytes());
        self.buf
    }
}

/// A response to a C-STORE or C-ECHO request (PS3.7 9.3.1.2, 9.3.5.2):
/// it echoes the request's MessageID and affected UIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub command_field: CommandField,
    pub message_id_being_responded_to: u16,
    pub affected_sop_class_uid: String,
    pub affected_sop_instance_uid: Option<String>,
    pub status: Status,
    pub error_comment: Option<String>,
}

impl Response {
    pub fn to_request(req: &Command, status: Status, error_comment: Option<String>) -> Response {
        Response {
            command_field: CommandField::from_u16(req.command_field | 0x8000),
            message_id_being_responded_to: req.message_id.unwrap_or(0),
            affected_sop_class_uid: req.affected_sop_class_uid.clone().unwrap_or_default(),
            affected_sop_instance_uid: req.affected_sop_instance_uid.clone(),
            status,
            // ErrorComment is LO: 64 characters at most.
            error_comment: error_comment.map(|c| c.chars().take(64).collect()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = CommandWriter::new();
        w.uid(0x0002, &self.affected_sop_class_uid);
        w.us(0x0100, self.command_field.to_u16());
        w.us(0x0120, self.message_id_being_responded_to);
        w.us(0x0800, NO_DATASET);
        w.us(0x0900, self.status.code());
        if let Some(c) = &self.error_comment {
            w.text(0x0902, c);
        }
        if let Some(i) = &self.affected_sop_instance_uid {
            w.uid(0x1000, i);
        }
        w.finish()
    }
}

/// A C-STORE-RQ (PS3.7 9.3.1.1), for the SCU side.
pub fn encode_c_store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    let mut w = CommandWriter::new();
    w.uid(0x0002, sop_class);
    w.us(0x0100, CommandField::CStoreRq.to_u16());
    w.us(0x0110, message_id);
    w.us(0x0700, 0); // priority MEDIUM
    w.us(0x0800, 0x0000); // a dataset follows
    w.uid(0x1000, sop_instance);
    w.finish()
}

/// A C-ECHO-RQ (PS3.7 9.3.5.1), for the SCU side and tests.
pub fn encode_c_echo_rq(message_id: u16) -> Vec<u8> {
    let mut w = CommandWriter::new();
    w.uid(0x0002, crate::dicom::VERIFICATION);
    w.us(0x0100, CommandField::CEchoRq.to_u16());
    w.us(0x0110, message_id);
    w.us(0x0800, NO_DATASET);
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_rq_round_trips() {
        let b = encode_c_store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45");
        let c = decode_command(&b).unwrap();
        assert_eq!(c.field(), CommandField::CStoreRq);
        assert_eq!(c.message_id, Some(7));
        assert_eq!(c.affected_sop_class_uid.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(c.affected_sop_instance_uid.as_deref(), Some("1.2.3.45"));
        assert!(c.has_dataset());
        // group length counts every byte after the group length element
        let gl = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        assert_eq!(gl, b.len() - 12);
    }

    #[test]
    fn response_echoes_request_identity() {
        let req = decode_command(&encode_c_store_rq(513, "1.2.3", "4.5.6")).unwrap();
        let rsp = Response::to_request(&req, Status::DataSetDoesNotMatchSopClass, Some("x".repeat(80)));
        let back = decode_command(&rsp.encode()).unwrap();
        assert_eq!(back.field(), CommandField::CStoreRsp);
        assert_eq!(back.message_id_being_responded_to, Some(513));
        assert_eq!(back.affected_sop_class_uid.as_deref(), Some("1.2.3"));
        assert_eq!(back.affected_sop_instance_uid.as_deref(), Some("4.5.6"));
        assert_eq!(back.status, Some(0xA900));
        assert_eq!(back.error_comment.as_deref().map(str::len), Some(64));
        assert!(!back.has_dataset());
    }

    #[test]
    fn echo_has_no_dataset() {
        let c = decode_command(&encode_c_echo_rq(1)).unwrap();
        assert_eq!(c.field(), CommandField::CEchoRq);
        assert!(!c.has_dataset());
    }

    #[test]
    fn overrun_and_truncation_are_errors() {
        let mut b = encode_c_echo_rq(1);
        let n = b.len();
        b.truncate(n - 1);
        assert!(decode_command(&b).is_err());
        let mut b = encode_c_echo_rq(1);
        b[4] = 0xff; // group length element claims 255 bytes
        assert!(matches!(decode_command(&b), Err(CommandError::BadLength { .. }) | Err(CommandError::Overrun { .. })));
        assert_eq!(decode_command(&[]), Err(CommandError::NoCommandField));
        assert_eq!(decode_command(&[0; 5]), Err(CommandError::TruncatedHeader));
    }
}
