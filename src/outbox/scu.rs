//! The Storage SCU: one association per destination batch (PS3.4 B,
//! PS3.7 9.1.1, PS3.8 7).
//!
//! Input: claimed items of one destination. Output: one [`Outcome`] per
//! item, reported as soon as it is known, so a crash mid-batch loses at most
//! the item on the wire (which is re-sent; a C-STORE of the same SOP
//! Instance UID is idempotent for a PACS).
//!
//! Association set-up and PDU codec are dicom-ul's (`establish_async`, or
//! `establish_tls_async` for a TLS destination, `send`, `receive`); the
//! DIMSE command sets are ours ([`crate::dicom::dimse`]).
//! We send P-DATA PDUs ourselves rather than through `AsyncPDataWriter`:
//! the writer needs a multi-thread runtime and hides the PDU boundaries we
//! want to size from the peer's Maximum Length (PS3.8 D.1).

use std::path::PathBuf;
use std::time::Duration;

use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::association::AsyncClientAssociation;
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJResult, PDataValue, PDataValueType, PresentationContextNegotiated,
};
use dicom_ul::Pdu;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

use super::part10::{self, Part10Info, EXPLICIT_VR_LE, IMPLICIT_VR_LE};
use super::policy::{classify_status, StatusClass};
use crate::fault::Fault;
use super::store::OutboxItem;
use super::Destination;
use crate::dicom::dimse::{self, CommandField};

/// The Maximum Length we advertise for receiving: only C-STORE-RSPs and
/// A-RELEASE come back, so the dicom-ul default is plenty.
const LOCAL_MAX_PDU: u32 = 16_378;
/// We never put more than this in one PDU, whatever the peer accepts: it
/// bounds our memory per association (a peer may advertise 0, unlimited).
const SEND_CAP: u32 = 1 << 20;
/// PS3.8 9.3.5.1: item length (4), context id (1), message control header (1).
const PDV_HEADER: u32 = 6;
/// PS3.8 9.3.2.2: presentation context ids are odd, 1..=255.
const MAX_CONTEXTS: usize = 128;
/// A command set bigger than this is a broken peer, not a C-STORE-RSP.
const MAX_COMMAND: usize = 64 * 1024;

/// What became of one item on this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success or warning: the peer kept the instance.
    Stored {
        status: u16,
        comment: Option<String>,
    },
    Failed {
        fault: Fault,
        status: Option<u16>,
        reason: String,
    },
    /// Never completed on the wire because we are shutting down: the
    /// attempt does not count.
    NotAttempted,
}

impl Outcome {
    fn permanent(reason: String) -> Outcome {
        Outcome::Failed {
            fault: Fault::Permanent,
            status: None,
            reason,
        }
    }
}

/// Failures that end the association; every item not yet answered shares it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("association rejected ({result}): {reason}")]
    Rejected {
        result: &'static str,
        permanent: bool,
        reason: String,
    },
    #[error("peer accepted none of the proposed presentation contexts")]
    NoContexts,
    #[error("cannot associate: {0}")]
    Associate(String),
    #[error("timed out: no A-ASSOCIATE response within {0:?}")]
    AssociateTimeout(Duration),
    #[error("peer aborted the association ({0})")]
    Aborted(String),
    #[error("no C-STORE-RSP within {0:?}")]
    DimseTimeout(Duration),
    #[error("network: {0}")]
    Network(String),
    /// dicom-ul's per-read/per-write timeout (our DIMSE timeout).
    #[error("timed out waiting for the peer: {0}")]
    Timeout(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("local: {0}")]
    Local(String),
    #[error("shutting down")]
    Cancelled,
}

impl LinkError {
    /// A-ASSOCIATE-RJ permanent and "no context accepted" are the peer's
    /// considered answer; the rest is the link or the peer's state.
    pub fn fault(&self) -> Fault {
        match self {
            LinkError::Rejected {
                permanent: true, ..
            }
            | LinkError::NoContexts => Fault::Permanent,
            _ => Fault::Transient,
        }
    }

    fn outcome(&self, context: &str) -> Outcome {
        match self {
            LinkError::Cancelled => Outcome::NotAttempted,
            e => Outcome::Failed {
                fault: e.fault(),
                status: None,
                reason: format!("{context}{e}"),
            },
        }
    }
}

/// `e: source: source...`: dicom-ul's snafu errors put the useful part
/// (e.g. "Connection refused") in the source chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn ul_error(e: dicom_ul::association::Error) -> LinkError {
    use dicom_ul::association::Error as E;
    match e {
        E::Rejected { association_rj, .. } => {
            let permanent = association_rj.result == AssociationRJResult::Permanent;
            LinkError::Rejected {
                result: if permanent { "permanent" } else { "transient" },
                permanent,
                reason: association_rj.source.to_string(),
            }
        }
        E::NoAcceptedPresentationContexts { .. } => LinkError::NoContexts,
        E::Aborted { .. } => LinkError::Aborted("A-ABORT".into()),
        // A certificate the peer or we refuse surfaces as `Connect`, with
        // rustls' reason in the chain.
        e @ (E::Connect { .. } | E::ToAddress { .. } | E::TlsHandshake { .. } | E::TlsConnection { .. }) => {
            LinkError::Associate(chain(&e))
        }
        e @ E::Timeout { .. } => LinkError::Timeout(chain(&e)),
        // dicom-ul's guess after the A-ASSOCIATE response could not be read;
        // timeouts cannot reach here (see `send_batch`).
        E::TlsNotSupported => LinkError::Network(
            "no A-ASSOCIATE response: the peer closed the connection or answered with something other than a PDU (a TLS port?)".into(),
        ),
        e @ (E::WireRead { .. } | E::WireSend { .. } | E::ConnectionClosed { .. }) => {
            LinkError::Network(chain(&e))
        }
        e => LinkError::Protocol(chain(&e)),
    }
}

/// How the dataset goes on the wire for a negotiated transfer syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The file's bytes after the meta group, unchanged.
    AsIs,
    /// Re-encoded in memory (explicit ↔ implicit VR little endian only).
    Transcode(String),
}

pub fn plan(file_ts: &str, accepted_ts: &str) -> Result<Plan, String> {
    let le = [EXPLICIT_VR_LE, IMPLICIT_VR_LE];
    if file_ts == accepted_ts {
        Ok(Plan::AsIs)
    } else if le.contains(&file_ts) && le.contains(&accepted_ts) {
        Ok(Plan::Transcode(accepted_ts.to_owned()))
    } else {
        Err(format!(
            "peer accepted transfer syntax {accepted_ts}, the file is {file_ts} and we do not transcode that"
        ))
    }
}

/// One presentation context per SOP class (PS3.8 9.3.2.2): explicit VR LE
/// first, then implicit VR LE (which every SCP must accept, PS3.5 10.1),
/// then any other syntax a file of that class is in, so such a file can
/// still go as it is. At most 128 classes; the caller leaves the rest for
/// the next association.
pub fn proposed_contexts<'a>(
    files: impl IntoIterator<Item = &'a Part10Info>,
) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for f in files {
        let i = match out.iter().position(|(c, _)| *c == f.sop_class_uid) {
            Some(i) => i,
            None if out.len() < MAX_CONTEXTS => {
                out.push((
                    f.sop_class_uid.clone(),
                    vec![EXPLICIT_VR_LE.into(), IMPLICIT_VR_LE.into()],
                ));
                out.len() - 1
            }
            None => continue,
        };
        if !out[i].1.contains(&f.transfer_syntax) {
            out[i].1.push(f.transfer_syntax.clone());
        }
    }
    out
}

/// Who we talk to and how long we wait.
pub struct Peer<'a> {
    pub destination: &'a str,
    pub dest: &'a Destination,
    pub calling_ae: &'a str,
    pub connect_timeout: Duration,
    pub dimse_timeout: Duration,
}

/// The item's file, checked against what the item says it is: a mix-up
/// here would send the wrong instance under a stable UID, so it is permanent.
pub(super) fn check_file(item: &OutboxItem) -> Result<Part10Info, String> {
    let info = part10::inspect(&item.path).map_err(|e| e.to_string())?;
    if info.sop_instance_uid != item.sop_instance_uid || info.sop_class_uid != item.sop_class_uid {
        return Err(format!(
            "file meta of {} says SOP {} / {}, the item says {} / {}",
            item.path.display(),
            info.sop_class_uid,
            info.sop_instance_uid,
            item.sop_class_uid,
            item.sop_instance_uid
        ));
    }
    Ok(info)
}

type Assoc<S> = AsyncClientAssociation<S>;

/// What an association runs over: TCP, or TLS on TCP.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Deliver `items` (all of one destination) on one association.
/// `record` is called exactly once per item, in order of outcome.
pub async fn send_batch(
    peer: &Peer<'_>,
    items: &[OutboxItem],
    cancel: &CancellationToken,
    record: &mut (dyn FnMut(&OutboxItem, Outcome) + Send),
) {
    let mut ready = Vec::with_capacity(items.len());
    for it in items {
        match check_file(it) {
            Ok(info) => ready.push((it, info)),
            Err(reason) => record(it, Outcome::permanent(reason)),
        }
    }
    if ready.is_empty() {
        return;
    }
    let contexts = proposed_contexts(ready.iter().map(|(_, i)| i));
    let mut opts = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.to_owned())
        .called_ae_title(peer.dest.ae_title.clone())
        .max_pdu_length(LOCAL_MAX_PDU)
        .connection_timeout(peer.connect_timeout)
        // No dicom-ul read timeout: with its `async-tls` feature, any error
        // reading the A-ASSOCIATE response, a timeout included, comes back
        // as `TlsNotSupported`. Our own timers bound every read instead:
        // `budget` the set-up, `dimse_timeout` each response and the release.
        .write_timeout(peer.dimse_timeout);
    for (class, tss) in &contexts {
        opts = opts.with_presentation_context(class.clone(), tss.clone());
    }
    let budget = peer.connect_timeout + peer.dimse_timeout;
    let addr = (peer.dest.host.as_str(), peer.dest.port);
    // Two arms because the association's type differs by transport; the
    // delivery after it is one generic function.
    match &peer.dest.tls {
        None => {
            let est = establish(opts.establish_async(addr), budget, cancel).await;
            deliver(est, peer, &ready, &contexts, cancel, record).await
        }
        Some(tls) => {
            let opts = opts.tls_config(tls.config.clone()).server_name(&tls.server_name);
            let est = establish(opts.establish_tls_async(addr), budget, cancel).await;
            deliver(est, peer, &ready, &contexts, cancel, record).await
        }
    }
}

/// TCP connect, TLS handshake if any, and A-ASSOCIATE, all within `budget`.
async fn establish<S>(
    fut: impl std::future::Future<Output = Result<Assoc<S>, dicom_ul::association::Error>>,
    budget: Duration,
    cancel: &CancellationToken,
) -> Result<Assoc<S>, LinkError> {
    tokio::select! {
        _ = cancel.cancelled() => Err(LinkError::Cancelled),
        r = tokio::time::timeout(budget, fut) => match r {
            Err(_) => Err(LinkError::AssociateTimeout(budget)),
            Ok(r) => r.map_err(ul_error),
        }
    }
}

/// Everything after association set-up: one C-STORE per ready item, then
/// A-RELEASE, or A-ABORT when the link broke.
async fn deliver<S: Stream>(
    established: Result<Assoc<S>, LinkError>,
    peer: &Peer<'_>,
    ready: &[(&OutboxItem, Part10Info)],
    contexts: &[(String, Vec<String>)],
    cancel: &CancellationToken,
    record: &mut (dyn FnMut(&OutboxItem, Outcome) + Send),
) {
    let mut assoc = match established {
        Ok(a) => a,
        Err(e) => {
            if !matches!(e, LinkError::Cancelled) {
                super::events::AssociationFailed {
                    destination: peer.destination,
                    called_ae: &peer.dest.ae_title,
                    items: ready.len(),
                    reason: &e.to_string(),
                }
                .emit();
            }
            for (it, _) in ready {
                record(it, e.outcome(""));
            }
            return;
        }
    };
    let max_pdv = (assoc
        .acceptor_max_pdu_length()
        .min(SEND_CAP)
        .saturating_sub(PDV_HEADER))
    .max(1) as usize;
    let mut message_id: u16 = 0;
    let mut broken: Option<LinkError> = None;
    for (it, info) in ready {
        if let Some(e) = &broken {
            record(it, e.outcome("not sent, association lost: "));
            continue;
        }
        if cancel.is_cancelled() {
            broken = Some(LinkError::Cancelled);
            record(it, Outcome::NotAttempted);
            continue;
        }
        let Some(pc) = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.abstract_syntax == info.sop_class_uid)
            .cloned()
        else {
            let reason = if contexts.iter().any(|(c, _)| *c == info.sop_class_uid) {
                format!(
                    "peer rejected the presentation context for SOP class {}",
                    info.sop_class_uid
                )
            } else {
                // Over 128 SOP classes in one batch: the next one takes it.
                record(it, Outcome::NotAttempted);
                continue;
            };
            record(it, Outcome::permanent(reason));
            continue;
        };
        let accepted_ts = pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_owned();
        let payload = match plan(&info.transfer_syntax, &accepted_ts) {
            Ok(Plan::AsIs) => Payload::File {
                path: it.path.clone(),
                offset: info.dataset_offset,
                len: info.dataset_len(),
            },
            Ok(Plan::Transcode(ts)) => {
                let path = it.path.clone();
                match tokio::task::spawn_blocking(move || part10::transcode(&path, &ts)).await {
                    Ok(Ok(bytes)) => Payload::Memory(bytes),
                    Ok(Err(reason)) => {
                        record(it, Outcome::permanent(reason));
                        continue;
                    }
                    Err(e) => {
                        record(
                            it,
                            Outcome::Failed {
                                fault: Fault::Transient,
                                status: None,
                                reason: format!("transcoding task failed: {e}"),
                            },
                        );
                        continue;
                    }
                }
            }
            Err(reason) => {
                record(it, Outcome::permanent(reason));
                continue;
            }
        };
        message_id = message_id.checked_add(1).unwrap_or(1);
        let r = tokio::select! {
            _ = cancel.cancelled() => Err(LinkError::Cancelled),
            r = store_one(&mut assoc, message_id, it, &pc, payload, max_pdv, peer.dimse_timeout) => r,
        };
        match r {
            Ok(outcome) => record(it, outcome),
            Err(e) => {
                record(it, e.outcome(""));
                broken = Some(e);
            }
        }
    }
    if broken.is_some() {
        // We are the service user: A-ABORT source 0 (PS3.8 9.3.8). dicom-ul's
        // `abort()` sends source "service provider", which is the UL's own.
        let abort = Pdu::AbortRQ {
            source: AbortRQSource::ServiceUser,
        };
        let _ = tokio::time::timeout(peer.dimse_timeout, assoc.send(&abort)).await;
        // Dropping the association closes the socket.
    } else {
        match tokio::time::timeout(peer.dimse_timeout, assoc.release()).await {
            Ok(Ok(())) => {}
            // Every item already has its answer; a sloppy release changes nothing.
            Ok(Err(e)) => {
                tracing::debug!(destination = peer.destination, error = %chain(&e), "A-RELEASE failed")
            }
            Err(_) => tracing::debug!(destination = peer.destination, "A-RELEASE timed out"),
        }
    }
}

enum Payload {
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    Memory(Vec<u8>),
}

/// One C-STORE (PS3.7 9.1.1): command, dataset, response.
async fn store_one<S: Stream>(
    assoc: &mut Assoc<S>,
    message_id: u16,
    item: &OutboxItem,
    pc: &PresentationContextNegotiated,
    payload: Payload,
    max_pdv: usize,
    dimse_timeout: Duration,
) -> Result<Outcome, LinkError> {
    let command = dimse::encode_c_store_rq(message_id, &item.sop_class_uid, &item.sop_instance_uid);
    let len = command.len() as u64;
    send_fragments(
        assoc,
        pc.id,
        PDataValueType::Command,
        &command[..],
        len,
        max_pdv,
    )
    .await?;
    match payload {
        Payload::File { path, offset, len } => {
            let mut f = tokio::fs::File::open(&path)
                .await
                .map_err(|e| LinkError::Local(format!("cannot open {}: {e}", path.display())))?;
            f.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| LinkError::Local(format!("cannot seek {}: {e}", path.display())))?;
            send_fragments(assoc, pc.id, PDataValueType::Data, f, len, max_pdv).await?;
        }
        Payload::Memory(bytes) => {
            let len = bytes.len() as u64;
            send_fragments(assoc, pc.id, PDataValueType::Data, &bytes[..], len, max_pdv).await?;
        }
    }
    // dicom-ul has no read timeout set (see `send_batch`): this is the one.
    let rsp = match tokio::time::timeout(dimse_timeout, read_command(assoc)).await {
        Err(_) | Ok(Err(LinkError::Timeout(_))) => {
            return Err(LinkError::DimseTimeout(dimse_timeout))
        }
        Ok(r) => r?,
    };
    if rsp.field() != CommandField::CStoreRsp {
        return Err(LinkError::Protocol(format!(
            "expected a C-STORE-RSP, got command field 0x{:04X}",
            rsp.command_field
        )));
    }
    if rsp.message_id_being_responded_to != Some(message_id) {
        return Err(LinkError::Protocol(format!(
            "C-STORE-RSP answers message {:?}, we sent {message_id}",
            rsp.message_id_being_responded_to
        )));
    }
    if let Some(uid) = rsp.affected_sop_instance_uid.as_deref() {
        if !uid.is_empty() && uid != item.sop_instance_uid {
            return Err(LinkError::Protocol(format!(
                "C-STORE-RSP is for SOP instance {uid}, we sent {}",
                item.sop_instance_uid
            )));
        }
    }
    let Some(status) = rsp.status else {
        return Err(LinkError::Protocol("C-STORE-RSP without a Status".into()));
    };
    Ok(match classify_status(status) {
        StatusClass::Stored => Outcome::Stored {
            status,
            comment: rsp.error_comment,
        },
        StatusClass::Failed(fault) => Outcome::Failed {
            fault,
            status: Some(status),
            reason: match rsp.error_comment {
                Some(c) if !c.is_empty() => format!("C-STORE status 0x{status:04X}: {c}"),
                _ => format!("C-STORE status 0x{status:04X}"),
            },
        },
    })
}

/// `len` bytes from `src` as PDVs of at most `max_pdv` bytes, one PDV per
/// P-DATA-TF, the last one flagged (PS3.8 E.2).
async fn send_fragments<S: Stream>(
    assoc: &mut Assoc<S>,
    pc_id: u8,
    value_type: PDataValueType,
    mut src: impl AsyncRead + Unpin,
    len: u64,
    max_pdv: usize,
) -> Result<(), LinkError> {
    let mut left = len;
    loop {
        let n = left.min(max_pdv as u64) as usize;
        let mut data = vec![0u8; n];
        src.read_exact(&mut data)
            .await
            .map_err(|e| LinkError::Local(format!("cannot read the dataset: {e}")))?;
        left -= n as u64;
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: value_type.clone(),
                is_last: left == 0,
                data,
            }],
        };
        assoc.send(&pdu).await.map_err(ul_error)?;
        if left == 0 {
            return Ok(());
        }
    }
}

/// Read P-DATA until a whole command set has arrived.
async fn read_command<S: Stream>(assoc: &mut Assoc<S>) -> Result<dimse::Command, LinkError> {
    let mut buf = Vec::new();
    loop {
        match assoc.receive().await.map_err(ul_error)? {
            Pdu::PData { data } => {
                for pdv in data {
                    if pdv.value_type != PDataValueType::Command {
                        return Err(LinkError::Protocol(
                            "data PDV where a C-STORE-RSP was due".into(),
                        ));
                    }
                    buf.extend_from_slice(&pdv.data);
                    if buf.len() > MAX_COMMAND {
                        return Err(LinkError::Protocol("response command set too large".into()));
                    }
                    if pdv.is_last {
                        return dimse::decode_command(&buf)
                            .map_err(|e| LinkError::Protocol(e.to_string()));
                    }
                }
            }
            Pdu::AbortRQ { source } => return Err(LinkError::Aborted(format!("{source:?}"))),
            Pdu::ReleaseRQ => {
                return Err(LinkError::Protocol(
                    "peer asked to release mid-operation".into(),
                ))
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "unexpected {} while waiting for a C-STORE-RSP",
                    other.short_description()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(class: &str, ts: &str) -> Part10Info {
        Part10Info {
            sop_class_uid: class.into(),
            sop_instance_uid: "1.2".into(),
            transfer_syntax: ts.into(),
            dataset_offset: 0,
            file_len: 0,
        }
    }

    #[test]
    fn explicit_first_then_implicit_then_the_files_own() {
        let files = [
            info("1.1", EXPLICIT_VR_LE),
            info("1.2", "1.2.840.10008.1.2.4.70"),
            info("1.1", EXPLICIT_VR_LE),
        ];
        let c = proposed_contexts(files.iter());
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            (
                "1.1".to_string(),
                vec![EXPLICIT_VR_LE.to_string(), IMPLICIT_VR_LE.to_string()]
            )
        );
        assert_eq!(
            c[1].1.last().map(String::as_str),
            Some("1.2.840.10008.1.2.4.70")
        );
        let many: Vec<_> = (0..200)
            .map(|i| info(&format!("1.{i}"), EXPLICIT_VR_LE))
            .collect();
        assert_eq!(proposed_contexts(many.iter()).len(), 128);
    }

    #[test]
    fn transcoding_only_between_uncompressed_little_endian() {
        assert_eq!(plan(EXPLICIT_VR_LE, EXPLICIT_VR_LE), Ok(Plan::AsIs));
        assert_eq!(
            plan(EXPLICIT_VR_LE, IMPLICIT_VR_LE),
            Ok(Plan::Transcode(IMPLICIT_VR_LE.into()))
        );
        assert!(plan("1.2.840.10008.1.2.4.70", IMPLICIT_VR_LE).is_err());
    }

    #[test]
    fn faults_of_link_errors() {
        let rj = |permanent| LinkError::Rejected {
            result: "x",
            permanent,
            reason: "y".into(),
        };
        assert_eq!(rj(true).fault(), Fault::Permanent);
        assert_eq!(rj(false).fault(), Fault::Transient);
        assert_eq!(LinkError::NoContexts.fault(), Fault::Permanent);
        assert_eq!(LinkError::Aborted("x".into()).fault(), Fault::Transient);
        assert_eq!(
            LinkError::DimseTimeout(Duration::from_secs(1)).fault(),
            Fault::Transient
        );
        assert_eq!(LinkError::Cancelled.outcome(""), Outcome::NotAttempted);
    }
}
