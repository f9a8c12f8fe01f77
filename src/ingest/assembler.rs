//! Reassembles DIMSE messages from PDVs, whatever the fragmentation
//! (PS3.8 9.3.5.1, E.2): a command may span many PDVs and PDUs, a dataset
//! many more. Commands are buffered (they are small and bounded); dataset
//! fragments are passed through as they come so they can be streamed to
//! disk. No I/O here.

use dicom_ul::pdu::PDataValueType;

use super::framing::Pdv;

/// Command sets are a few hundred bytes; anything this large is hostile.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole command set arrived on context `ctx`.
    Command { ctx: u8, bytes: Vec<u8> },
    /// A piece of the dataset that belongs to the last command.
    Data { ctx: u8, bytes: &'a [u8], last: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    #[error("PDV on presentation context {0}, which was not accepted")]
    UnknownContext(u8),
    #[error("command set exceeds {MAX_COMMAND_BYTES} bytes")]
    CommandTooLong,
    #[error("dataset PDV before any command")]
    DataWithoutCommand,
    #[error("PDV on context {got} while a message on context {expected} is in progress")]
    ContextSwitch { expected: u8, got: u8 },
    #[error("command PDV while a dataset is in progress")]
    CommandDuringData,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    Command { ctx: u8, buf: Vec<u8> },
    /// The service said a dataset follows this command.
    AwaitData { ctx: u8 },
    Data { ctx: u8 },
}

#[derive(Debug, Default)]
pub struct Assembler {
    state: State,
}

impl Assembler {
    /// Feed one PDV. `accepted` says whether a context id was negotiated.
    pub fn push<'a>(
        &mut self,
        pdv: &Pdv<'a>,
        accepted: impl Fn(u8) -> bool,
    ) -> Result<Option<Event<'a>>, AssemblyError> {
        let ctx = pdv.presentation_context_id;
        if !accepted(ctx) {
            return Err(AssemblyError::UnknownContext(ctx));
        }
        match (std::mem::take(&mut self.state), &pdv.value_type) {
            (State::Idle, PDataValueType::Command) => self.command(ctx, Vec::new(), pdv),
            (State::Command { ctx: c, .. }, _) if c != ctx => {
                Err(AssemblyError::ContextSwitch { expected: c, got: ctx })
            }
            (State::Command { buf, .. }, PDataValueType::Command) => self.command(ctx, buf, pdv),
            (State::Command { .. }, PDataValueType::Data) => Err(AssemblyError::DataWithoutCommand),
            (State::Idle, PDataValueType::Data) => Err(AssemblyError::DataWithoutCommand),
            (State::AwaitData { ctx: c } | State::Data { ctx: c }, PDataValueType::Data) => {
                if c != ctx {
                    return Err(AssemblyError::ContextSwitch { expected: c, got: ctx });
                }
                self.state = if pdv.is_last { State::Idle } else { State::Data { ctx } };
                Ok(Some(Event::Data {
                    ctx,
                    bytes: pdv.data,
                    last: pdv.is_last,
                }))
            }
            (State::AwaitData { .. } | State::Data { .. }, PDataValueType::Command) => {
                Err(AssemblyError::CommandDuringData)
            }
        }
    }

    fn command<'a>(
        &mut self,
        ctx: u8,
        mut buf: Vec<u8>,
        pdv: &Pdv<'a>,
    ) -> Result<Option<Event<'a>>, AssemblyError> {
        if buf.len() + pdv.data.len() > MAX_COMMAND_BYTES {
            return Err(AssemblyError::CommandTooLong);
        }
        buf.extend_from_slice(pdv.data);
        if pdv.is_last {
            Ok(Some(Event::Command { ctx, bytes: buf }))
        } else {
            self.state = State::Command { ctx, buf };
            Ok(None)
        }
    }

    /// The service read the command and expects its dataset next.
    pub fn expect_data(&mut self, ctx: u8) {
        self.state = State::AwaitData { ctx };
    }

    /// True while a message is only partly received.
    pub fn in_progress(&self) -> bool {
        !matches!(self.state, State::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdv(ctx: u8, cmd: bool, last: bool, data: &[u8]) -> Pdv<'_> {
        Pdv {
            presentation_context_id: ctx,
            value_type: if cmd { PDataValueType::Command } else { PDataValueType::Data },
            is_last: last,
            data,
        }
    }

    #[test]
    fn command_in_many_fragments_then_streamed_data() {
        let mut a = Assembler::default();
        let ok = |c| c == 1;
        assert_eq!(a.push(&pdv(1, true, false, b"ab"), ok).unwrap(), None);
        assert_eq!(
            a.push(&pdv(1, true, true, b"c"), ok).unwrap(),
            Some(Event::Command { ctx: 1, bytes: b"abc".to_vec() })
        );
        a.expect_data(1);
        let p = pdv(1, false, false, b"x");
        assert_eq!(a.push(&p, ok).unwrap(), Some(Event::Data { ctx: 1, bytes: b"x", last: false }));
        let p = pdv(1, false, true, b"y");
        assert_eq!(a.push(&p, ok).unwrap(), Some(Event::Data { ctx: 1, bytes: b"y", last: true }));
        assert!(!a.in_progress());
    }

    #[test]
    fn protocol_violations_are_errors() {
        let ok = |c| c == 1 || c == 3;
        let mut a = Assembler::default();
        assert_eq!(a.push(&pdv(5, true, true, b""), ok), Err(AssemblyError::UnknownContext(5)));
        let mut a = Assembler::default();
        assert_eq!(a.push(&pdv(1, false, true, b""), ok), Err(AssemblyError::DataWithoutCommand));
        let mut a = Assembler::default();
        a.push(&pdv(1, true, false, b"a"), ok).unwrap();
        assert!(matches!(a.push(&pdv(3, true, true, b""), ok), Err(AssemblyError::ContextSwitch { .. })));
        let mut a = Assembler::default();
        a.expect_data(1);
        assert_eq!(a.push(&pdv(1, true, true, b""), ok), Err(AssemblyError::CommandDuringData));
        let mut a = Assembler::default();
        let big = vec![0u8; MAX_COMMAND_BYTES + 1];
        assert_eq!(a.push(&pdv(1, true, false, &big), ok), Err(AssemblyError::CommandTooLong));
    }
}
