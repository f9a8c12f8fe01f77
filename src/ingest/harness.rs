//! A sans-IO driver over the same parsers the association uses: bytes in,
//! PDUs, commands and datasets out. The fuzz target and the corpus replay
//! test call it, so every parser on the PDU → command/dataset path is
//! exercised without sockets.
//!
//! A received dataset goes through [`crate::spool::check_dataset`], the
//! check the spool makes before acknowledging: for Deflated Explicit VR
//! Little Endian that is the capped inflate and the length walk. A dataset
//! that passes is then parsed whole by dicom-rs too, as later stages read
//! spooled files, to show the walk leaves dicom-rs nothing to choke on.

use std::io::Cursor;

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::Pdu;

use super::assembler::{Assembler, Event};
use super::framing::{self, Frame};
use super::negotiation::{self, Policy};
use crate::dicom::dimse::{decode_command, Command};
use crate::spool::Incoming;

/// The harness's `node.max_dataset_mb`: datasets (inflated ones too) past
/// this are refused as the node refuses them; small, so fuzzing iterations
/// stay fast and a bomb seed shows the cap.
pub const MAX_DATASET: usize = 1 << 20;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub pdus: usize,
    pub commands: usize,
    /// Datasets that passed the spool's check.
    pub datasets: usize,
    /// Why each other dataset was refused (a failure status, not an abort).
    pub refused: Vec<String>,
    /// The first error that would end the association, as its message.
    pub error: Option<String>,
}

/// Feed a byte stream as if a peer sent it, up to the first fatal error.
pub fn drive(mut bytes: &[u8], max_pdu: u32) -> Outcome {
    let mut out = Outcome::default();
    let mut assembler = Assembler::default();
    let mut accepted: Vec<(u8, String)> = Vec::new();
    let mut dataset: Vec<u8> = Vec::new();
    let mut too_large = false;
    let mut data_ctx = None;
    let mut store: Option<Command> = None;
    loop {
        let n = match framing::check(bytes, max_pdu) {
            Ok(Some(n)) => n,
            Ok(None) => return out,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        let frame = match framing::parse(&bytes[..n]) {
            Ok(p) => p,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        bytes = &bytes[n..];
        out.pdus += 1;
        match frame {
            Frame::Control(Pdu::AssociationRQ(rq)) => {
                let policy = Policy {
                    ae_title: "BIOMARKER",
                    allowed_callers: &[],
                    max_pdu,
                    peer: std::net::IpAddr::from([127, 0, 0, 1]),
                };
                if let Ok(a) = negotiation::negotiate(&rq, &policy) {
                    accepted = a.contexts.into_iter().map(|c| (c.id, c.transfer_syntax)).collect();
                }
            }
            Frame::PData(pdvs) => {
                for pdv in &pdvs {
                    let event = match assembler.push(pdv, |id| accepted.iter().any(|(c, _)| *c == id)) {
                        Ok(e) => e,
                        Err(e) => {
                            out.error = Some(e.to_string());
                            return out;
                        }
                    };
                    match event {
                        None => {}
                        Some(Event::Command { ctx, bytes }) => match decode_command(&bytes) {
                            Ok(cmd) => {
                                out.commands += 1;
                                if cmd.has_dataset() {
                                    assembler.expect_data(ctx);
                                    dataset.clear();
                                    too_large = false;
                                    data_ctx = Some(ctx);
                                    store = Some(cmd);
                                }
                            }
                            Err(e) => {
                                out.error = Some(e.to_string());
                                return out;
                            }
                        },
                        Some(Event::Data { bytes, last, .. }) => {
                            // As the association: past the limit the bytes are dropped.
                            if dataset.len() + bytes.len() <= MAX_DATASET {
                                dataset.extend_from_slice(bytes);
                            } else {
                                too_large = true;
                            }
                            if last {
                                let ts = data_ctx
                                    .and_then(|c| accepted.iter().find(|(id, _)| *id == c))
                                    .map(|(_, ts)| ts.clone())
                                    .unwrap_or_default();
                                match check(store.take(), &dataset, &ts, too_large) {
                                    Ok(()) => out.datasets += 1,
                                    Err(reason) => out.refused.push(reason),
                                }
                            }
                        }
                    }
                }
            }
            Frame::Control(Pdu::ReleaseRQ | Pdu::AbortRQ { .. }) => return out,
            _ => {
                out.error = Some("unexpected PDU".into());
                return out;
            }
        }
    }
}

/// The spool's check, then (when it passed) dicom-rs over the whole dataset.
fn check(cmd: Option<Command>, dataset: &[u8], ts: &str, too_large: bool) -> Result<(), String> {
    if too_large {
        return Err(format!("dataset exceeds the harness's {MAX_DATASET} bytes"));
    }
    let cmd = cmd.ok_or("data without a command")?;
    let incoming = Incoming {
        sop_class_uid: cmd.affected_sop_class_uid.unwrap_or_default(),
        sop_instance_uid: cmd.affected_sop_instance_uid.unwrap_or_default(),
        transfer_syntax: ts.to_owned(),
        max_dataset_bytes: MAX_DATASET as u64,
    };
    crate::spool::check_dataset(Cursor::new(dataset), dataset.len() as u64, &incoming).map_err(|e| e.to_string())?;
    if let Some(ts) = TransferSyntaxRegistry.get(ts) {
        // A failure here is a status, not a fatal error.
        let _ = InMemDicomObject::read_dataset_with_ts(dataset, ts);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pdu_stream").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The hand-made seeds each end the way the association would.
    #[test]
    fn seeds_have_their_defined_outcomes() {
        let v = drive(&seed("valid_echo_store_release"), 16384);
        assert_eq!((v.commands, v.datasets, v.error), (2, 1, None));
        let g = drive(&seed("garbage"), 16384).error.unwrap();
        assert!(g.contains("unrecognized PDU type"), "{g}");
        let o = drive(&seed("oversized_pdata"), 16384).error.unwrap();
        assert!(o.contains("exceeds the limit"), "{o}");
        let u = drive(&seed("unaccepted_context"), 16384).error.unwrap();
        assert!(u.contains("not accepted"), "{u}");
        let t = drive(&seed("truncated_pdu"), 16384);
        assert_eq!(t.error, None, "a truncated PDU is incomplete, not an error, until the socket closes");
        for bad in ["truncated_dataset", "overrun_element"] {
            let d = drive(&seed(bad), 16384);
            assert_eq!((d.commands, d.datasets, d.error), (1, 0, None), "{bad}: a status, not an abort");
        }
    }

    /// Deflated datasets take the same check as the node's: inflated with the
    /// limit as cap, then walked.
    #[test]
    fn deflated_seeds_are_inflated_capped_and_walked() {
        for ok in ["deflated_store", "deflated_stored_blocks"] {
            let d = drive(&seed(ok), 16384);
            assert_eq!((d.commands, d.datasets, d.error), (1, 1, None), "{ok}: {:?}", d.refused);
        }
        let b = drive(&seed("deflate_bomb"), 16384);
        assert_eq!((b.datasets, b.error), (0, None));
        assert_eq!(b.refused, [format!("dataset inflates to more than node.max_dataset_mb ({} MiB)", MAX_DATASET >> 20)]);
        let c = drive(&seed("deflate_corrupt"), 16384);
        assert_eq!((c.datasets, c.error), (0, None));
        assert!(c.refused[0].contains("cannot be inflated"), "{:?}", c.refused);
    }

    /// Replays the whole corpus (including what the fuzzer added) so CI
    /// exercises it even where the fuzzer itself does not run.
    #[test]
    fn corpus_replays_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pdu_stream");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("fuzz corpus is checked in") {
            drive(&std::fs::read(e.unwrap().path()).unwrap(), 16384);
            n += 1;
        }
        assert!(n >= 11, "corpus has {n} entries");
    }

    /// `FUZZ_INPUT=path cargo test --release --lib replay_one -- --ignored`:
    /// replay one fuzzer artifact (memory is what to watch).
    #[test]
    #[ignore]
    fn replay_one() {
        if let Some(p) = std::env::var_os("FUZZ_INPUT") {
            let o = drive(&std::fs::read(p).unwrap(), 16384);
            eprintln!("{o:?}");
        }
    }
}
