//! A sans-IO driver over the same parsers the association uses: bytes in,
//! PDUs, commands and datasets out. The fuzz target and the corpus replay
//! test call it, so every parser on the PDU → command/dataset path is
//! exercised without sockets.

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::Pdu;

use super::assembler::{Assembler, Event};
use super::framing;
use super::negotiation::{self, Policy};
use crate::dimse::decode_command;

/// Datasets larger than this are not parsed by the harness (the real path
/// streams them to disk); keeps fuzzing iterations fast.
const MAX_DATASET: usize = 1 << 20;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub pdus: usize,
    pub commands: usize,
    pub datasets: usize,
    /// The first error that would end the association, as its message.
    pub error: Option<String>,
}

/// Feed a byte stream as if a peer sent it, up to the first fatal error.
pub fn drive(mut bytes: &[u8], max_pdu: u32) -> Outcome {
    let mut out = Outcome::default();
    let mut assembler = Assembler::default();
    let mut accepted: Vec<(u8, String)> = Vec::new();
    let mut dataset: Vec<u8> = Vec::new();
    let mut data_ctx = None;
    loop {
        let n = match framing::check(bytes, max_pdu) {
            Ok(Some(n)) => n,
            Ok(None) => return out,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        let pdu = match framing::parse(&bytes[..n]) {
            Ok(p) => p,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        bytes = &bytes[n..];
        out.pdus += 1;
        match pdu {
            Pdu::AssociationRQ(rq) => {
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
            Pdu::PData { data } => {
                for pdv in &data {
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
                                    data_ctx = Some(ctx);
                                }
                            }
                            Err(e) => {
                                out.error = Some(e.to_string());
                                return out;
                            }
                        },
                        Some(Event::Data { bytes, last, .. }) => {
                            if dataset.len() + bytes.len() <= MAX_DATASET {
                                dataset.extend_from_slice(bytes);
                            }
                            if last {
                                let ts = data_ctx
                                    .and_then(|c| accepted.iter().find(|(id, _)| *id == c))
                                    .and_then(|(_, ts)| TransferSyntaxRegistry.get(ts));
                                let scanned = ts.and_then(|t| crate::dicom::scan::Encoding::of(t.uid()));
                                let ts = ts.filter(|_| {
                                    scanned.is_some_and(|enc| crate::dicom::scan::check_lengths(&dataset, enc).is_ok())
                                });
                                if let Some(ts) = ts {
                                    // A failure here is a status, not a fatal error.
                                    if InMemDicomObject::read_dataset_with_ts(&dataset[..], ts).is_ok() {
                                        out.datasets += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Pdu::ReleaseRQ | Pdu::AbortRQ { .. } => return out,
            _ => {
                out.error = Some("unexpected PDU".into());
                return out;
            }
        }
    }
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

    /// Replays the whole corpus (including what the fuzzer added) so CI
    /// exercises it even where the fuzzer itself does not run.
    #[test]
    fn corpus_replays_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pdu_stream");
        let n = std::fs::read_dir(&dir)
            .expect("fuzz corpus is checked in")
            .map(|e| drive(&std::fs::read(e.unwrap().path()).unwrap(), 16384))
            .count();
        assert!(n >= 7, "corpus has {n} entries");
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
