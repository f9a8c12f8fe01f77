//! One association, from A-ASSOCIATE-RQ to release or abort.
//!
//! The handler owns its socket, a read buffer bounded by our max PDU, and at
//! most one partially received instance. Every error on the association is
//! logged here and ends here: it never reaches the accept loop, and a bad
//! dataset costs the peer a failure status, not the association.
//!
//! A dataset past `node.max_dataset_mb`, or one arriving while free disk
//! falls below `node.min_free_disk_mb` (looked at every 4 MiB), loses its
//! partial file at once and is answered 0xA700 after its last PDV.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dicom_ul::pdu::{
    write_pdu, AbortRQServiceProviderReason, AbortRQSource, AssociationRJ, PDataValue,
    PDataValueType, Pdu,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::assembler::{Assembler, AssemblyError, Event};
use super::framing::{self, Frame, FrameError, Pdv};
use super::negotiation::{self, AcceptedContext, Overload, Policy};
use super::Shared;
use crate::dicom::{is_storage_sop_class, VERIFICATION};
use crate::dicom::dimse::{decode_command, CommandField, Command, Response, Status};
use crate::series::StoredInstance;
use crate::spool::{Incoming, SpoolError, SpoolWriter};
use crate::telemetry;

/// How often, in dataset bytes received, a transfer looks at free disk
/// again: a statvfs per 4 MiB costs nothing next to the writes, and one
/// transfer then overshoots the watermark by at most 4 MiB.
const DISK_CHECK_BYTES: u64 = 4 * 1024 * 1024;

/// Why an association ended abnormally; decides what goes on the wire.
#[derive(Debug, thiserror::Error)]
pub enum AssociationError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a PDU")]
    Truncated,
    #[error("no A-ASSOCIATE-RQ within {0:?}")]
    ArtimExpired(Duration),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("PDU not completed within {0:?}")]
    ReadTimeout(Duration),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Assembly(#[from] AssemblyError),
    #[error("undecodable command set: {0}")]
    Command(#[from] crate::dicom::dimse::CommandError),
    #[error("unexpected {0} PDU")]
    UnexpectedPdu(&'static str),
    #[error("peer aborted")]
    PeerAborted,
    #[error("node shutting down")]
    Shutdown,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode PDU: {0}")]
    Encode(String),
}

impl AssociationError {
    /// The A-ABORT we send, if any (PS3.8 9.3.8): none when the peer is
    /// already gone or aborted first.
    fn abort_reason(&self) -> Option<AbortRQServiceProviderReason> {
        use AbortRQServiceProviderReason as R;
        match self {
            AssociationError::Closed
            | AssociationError::Truncated
            | AssociationError::PeerAborted
            | AssociationError::Io(_) => None,
            AssociationError::Frame(FrameError::UnknownType(_)) => Some(R::UnrecognizedPdu),
            AssociationError::Frame(_) | AssociationError::Command(_) => Some(R::InvalidPduParameter),
            AssociationError::Assembly(AssemblyError::UnknownContext(_)) => Some(R::InvalidPduParameter),
            AssociationError::Assembly(_) => Some(R::UnexpectedPduParameter),
            AssociationError::UnexpectedPdu(_) => Some(R::UnexpectedPdu),
            _ => Some(R::ReasonNotSpecified),
        }
    }
}

/// What an association runs over: a TCP socket, or a TLS session on one.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Framed PDU I/O over one socket.
struct Conn<S> {
    stream: S,
    buf: BytesMut,
    max_pdata: u32,
}

impl<S: Transport> Conn<S> {
    /// The bytes of the next whole PDU (see [`framing::parse`]); `first_byte`
    /// bounds the wait for a PDU to start, `read` bounds the time to finish
    /// one that has started. The bytes are split off the read buffer, not
    /// copied; the buffer takes its space back once they are dropped.
    async fn read_pdu(&mut self, first_byte: Duration, read: Duration) -> Result<Bytes, AssociationError> {
        loop {
            if let Some(n) = framing::check(&self.buf, self.max_pdata)? {
                return Ok(self.buf.split_to(n).freeze());
            }
            let (limit, on_timeout) = if self.buf.is_empty() {
                (first_byte, AssociationError::Idle(first_byte))
            } else {
                (read, AssociationError::ReadTimeout(read))
            };
            self.buf.reserve(64 * 1024);
            let n = match tokio::time::timeout(limit, self.stream.read_buf(&mut self.buf)).await {
                Ok(r) => r?,
                Err(_) => return Err(on_timeout),
            };
            if n == 0 {
                return Err(if self.buf.is_empty() {
                    AssociationError::Closed
                } else {
                    AssociationError::Truncated
                });
            }
        }
    }

    async fn send(&mut self, pdu: &Pdu) -> Result<(), AssociationError> {
        let mut out = Vec::with_capacity(256);
        write_pdu(&mut out, pdu).map_err(|e| AssociationError::Encode(e.to_string()))?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        // Best effort: the peer may already be gone.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send(&pdu)).await;
        let _ = self.stream.shutdown().await;
    }
}

/// The message being received after its command.
enum Pending {
    Store {
        cmd: Command,
        writer: Box<dyn SpoolWriter>,
        /// Dataset bytes received so far.
        received: u64,
    },
    /// Already stored (same SOP Instance UID): read and drop the dataset,
    /// answer success. The first copy stays byte-identical.
    Duplicate { cmd: Command },
    /// Read and drop the dataset, then answer with this status.
    Discard {
        cmd: Command,
        status: Status,
        comment: String,
    },
}

impl Pending {
    fn abort(self) {
        if let Pending::Store { writer, .. } = self {
            writer.abort();
        }
    }
}

pub(super) struct Association<S> {
    conn: Conn<S>,
    shared: Arc<Shared>,
    id: u64,
    contexts: Vec<AcceptedContext>,
    peer_max_pdu: u32,
    assembler: Assembler,
    pending: Option<Pending>,
    shutdown: CancellationToken,
}

/// Run one connection to its end. `admission` is the connection's place in
/// the pre-association stage: the RQ must arrive before its deadline, and a
/// newer connection may evict it until then. The association slot is taken
/// only once negotiation accepted the request; with none free the peer
/// gets a transient A-ASSOCIATE-RJ instead of a reset. `peer` is the TCP
/// peer, also under TLS: the IP allow-list is about the socket, not the
/// certificate.
pub(super) async fn run<S: Transport>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admission: super::Admission,
    shutdown: CancellationToken,
) {
    let id = admission.id;
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(64 * 1024),
        max_pdata: shared.node.max_pdu,
    };
    let artim = Duration::from_secs(shared.node.timeouts.association_request_s);
    let left = admission.deadline.saturating_duration_since(tokio::time::Instant::now());
    let rq = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        // logged by the gate
        _ = admission.evicted() => return,
        r = conn.read_pdu(left, left) => r,
    };
    // Ok(Err(what)): a whole PDU, but not the request.
    let rq = rq.and_then(|bytes| {
        Ok(match framing::parse(&bytes)? {
            Frame::Control(Pdu::AssociationRQ(rq)) => Ok(rq),
            Frame::Control(other) => Err(other.short_description().to_string()),
            Frame::PData(_) => Err("P-DATA-TF".to_owned()),
        })
    });
    let rq = match rq {
        Ok(Ok(rq)) => rq,
        Ok(Err(got)) => {
            telemetry::AssociationAborted { by: "us", reason: &format!("expected A-ASSOCIATE-RQ, got {got}") }.emit();
            conn.abort(AbortRQServiceProviderReason::UnexpectedPdu).await;
            return;
        }
        Err(e) => {
            let e = match e {
                AssociationError::Idle(_) | AssociationError::ReadTimeout(_) => AssociationError::ArtimExpired(artim),
                e => e,
            };
            telemetry::AssociationAborted { by: "us", reason: &e.to_string() }.emit();
            if let Some(r) = e.abort_reason() {
                conn.abort(r).await;
            }
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("calling_ae", rq.calling_ae_title.trim());
    span.record("called_ae", rq.called_ae_title.trim());

    // Who may associate is decided before any slot is spent on the caller.
    let decision = negotiation::negotiate(
        &rq,
        &Policy {
            ae_title: &shared.node.ae_title,
            allowed_callers: &shared.node.allowed_callers,
            max_pdu: shared.node.max_pdu,
            peer: peer.ip(),
        },
    );
    let (accepted, permit) = match decision {
        Err(rj) => {
            reject_unless_evicted(&mut conn, &admission, &rq, rj).await;
            return;
        }
        Ok(a) if shared.disk_low() => {
            drop(a);
            let rj = negotiation::reject_overload(Overload::LowDisk);
            reject_unless_evicted(&mut conn, &admission, &rq, rj).await;
            return;
        }
        Ok(a) => match admission.slot() {
            Some(permit) => (a, permit),
            None => {
                let rj = negotiation::reject_overload(Overload::TooManyAssociations);
                reject_unless_evicted(&mut conn, &admission, &rq, rj).await;
                return;
            }
        },
    };
    if let Err(e) = conn.send(&Pdu::AssociationAC(accepted.ac)).await {
        tracing::warn!(error = %e, "could not send A-ASSOCIATE-AC");
        return;
    }
    // An association now: it holds a slot and leaves the pre-association budget.
    drop(admission);
    telemetry::AssociationAccepted {
        contexts: accepted.contexts.len(),
        calling_ae: rq.calling_ae_title.trim(),
    }
    .emit();

    let mut assoc = Association {
        conn,
        shared,
        id,
        contexts: accepted.contexts,
        peer_max_pdu: accepted.peer_max_pdu,
        assembler: Assembler::default(),
        pending: None,
        shutdown,
    };
    let calling_ae = rq.calling_ae_title.trim().to_owned();
    let outcome = assoc.serve(&calling_ae).await;
    if let Some(p) = assoc.pending.take() {
        // Never acknowledged, so never an instance.
        p.abort();
    }
    match outcome {
        Ok(()) => {
            tracing::info!("association released");
            assoc.shared.tracker.association_released(assoc.id).await;
        }
        Err(e) => {
            let by = if matches!(e, AssociationError::PeerAborted) { "peer" } else { "us" };
            telemetry::AssociationAborted { by, reason: &e.to_string() }.emit();
            if let Some(r) = e.abort_reason() {
                assoc.conn.abort(r).await;
            }
            assoc.shared.tracker.association_aborted(assoc.id).await;
        }
    }
    drop(permit);
}

/// A reject is pre-association time too: an eviction cuts its wait for the
/// peer's close short, so rejected connections stay within the budget.
async fn reject_unless_evicted<S: Transport>(
    conn: &mut Conn<S>,
    admission: &super::Admission,
    rq: &dicom_ul::pdu::AssociationRQ,
    rj: AssociationRJ,
) {
    tokio::select! {
        _ = admission.evicted() => {}
        _ = reject(conn, &rq.calling_ae_title, &rq.called_ae_title, rj) => {}
    }
}

async fn reject<S: Transport>(conn: &mut Conn<S>, calling: &str, called: &str, rj: AssociationRJ) {
    telemetry::AssociationRejected {
        calling_ae: calling.trim(),
        called_ae: called.trim(),
        reason: &format!("{:?}: {}", rj.result, rj.source),
    }
    .emit();
    let _ = conn.send(&Pdu::AssociationRJ(rj)).await;
    // PS3.8 9.2.3: the requestor closes; give it a moment, then close anyway.
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.stream.read(&mut sink)).await;
    let _ = conn.stream.shutdown().await;
}

impl<S: Transport> Association<S> {
    async fn serve(&mut self, calling_ae: &str) -> Result<(), AssociationError> {
        let idle = Duration::from_secs(self.shared.node.timeouts.idle_s);
        let read = Duration::from_secs(self.shared.node.timeouts.read_s);
        loop {
            let bytes = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(AssociationError::Shutdown),
                p = self.conn.read_pdu(idle, read) => p?,
            };
            let pdu = match framing::parse(&bytes)? {
                Frame::PData(pdvs) => {
                    for pdv in &pdvs {
                        self.on_pdv(pdv, calling_ae).await?;
                    }
                    continue;
                }
                Frame::Control(pdu) => pdu,
            };
            match pdu {
                Pdu::ReleaseRQ => {
                    if self.assembler.in_progress() {
                        tracing::warn!("release requested in the middle of a message; partial instance dropped");
                    }
                    self.conn.send(&Pdu::ReleaseRP).await?;
                    let _ = self.conn.stream.shutdown().await;
                    return Ok(());
                }
                Pdu::AbortRQ { .. } => return Err(AssociationError::PeerAborted),
                Pdu::AssociationRQ(_) => return Err(AssociationError::UnexpectedPdu("A-ASSOCIATE-RQ")),
                Pdu::AssociationAC(_) => return Err(AssociationError::UnexpectedPdu("A-ASSOCIATE-AC")),
                Pdu::AssociationRJ(_) => return Err(AssociationError::UnexpectedPdu("A-ASSOCIATE-RJ")),
                Pdu::ReleaseRP => return Err(AssociationError::UnexpectedPdu("A-RELEASE-RP")),
                // framing::parse yields P-DATA-TF as Frame::PData; listed for the match only
                Pdu::PData { .. } => return Err(AssociationError::UnexpectedPdu("P-DATA-TF")),
                Pdu::Unknown { .. } => return Err(AssociationError::UnexpectedPdu("unknown")),
            }
        }
    }

    fn context(&self, id: u8) -> Option<&AcceptedContext> {
        self.contexts.iter().find(|c| c.id == id)
    }

    async fn on_pdv(&mut self, pdv: &Pdv<'_>, calling_ae: &str) -> Result<(), AssociationError> {
        let contexts = &self.contexts;
        let event = self.assembler.push(pdv, |id| contexts.iter().any(|c| c.id == id))?;
        match event {
            None => Ok(()),
            Some(Event::Command { ctx, bytes }) => self.on_command(ctx, &bytes).await,
            Some(Event::Data { ctx, bytes, last }) => {
                self.on_data(bytes)?;
                if last {
                    self.finish_message(ctx, calling_ae).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_command(&mut self, ctx: u8, bytes: &[u8]) -> Result<(), AssociationError> {
        let cmd = decode_command(bytes)?;
        let context = self.context(ctx).expect("assembler only yields accepted contexts").clone();
        match cmd.field() {
            CommandField::CEchoRq if !cmd.has_dataset() => {
                let status = if context.abstract_syntax == VERIFICATION {
                    Status::Success
                } else {
                    Status::SopClassNotSupported
                };
                self.respond(ctx, Response::to_request(&cmd, status, None)).await
            }
            CommandField::CStoreRq if cmd.has_dataset() => {
                // A re-sent instance is acknowledged without storing it again,
                // whichever study or series it names this time.
                let dup = match cmd.affected_sop_instance_uid.as_deref().map(crate::dicom::Uid::parse) {
                    Some(Ok(uid)) => self.shared.tracker.is_duplicate(&uid).await.unwrap_or(false),
                    _ => false,
                };
                self.pending = Some(if dup { Pending::Duplicate { cmd } } else { self.begin_store(cmd, &context) });
                self.assembler.expect_data(ctx);
                Ok(())
            }
            _ if cmd.has_dataset() => {
                self.pending = Some(Pending::Discard {
                    cmd,
                    status: Status::UnrecognizedOperation,
                    comment: "operation not supported by this SCP".into(),
                });
                self.assembler.expect_data(ctx);
                Ok(())
            }
            _ => {
                let rsp = Response::to_request(&cmd, Status::UnrecognizedOperation, Some("operation not supported by this SCP".into()));
                self.respond(ctx, rsp).await
            }
        }
    }

    /// Decide, before any data arrives, whether this instance can be stored.
    fn begin_store(&self, cmd: Command, context: &AcceptedContext) -> Pending {
        let sop_class = cmd.affected_sop_class_uid.clone().unwrap_or_default();
        let sop_instance = cmd.affected_sop_instance_uid.clone().unwrap_or_default();
        let refuse = |status, comment: &str| Pending::Discard {
            cmd: cmd.clone(),
            status,
            comment: comment.to_owned(),
        };
        if sop_class != context.abstract_syntax || !is_storage_sop_class(&sop_class) {
            return refuse(Status::SopClassNotSupported, "SOP class differs from the presentation context");
        }
        // Refused before a byte is written: this UID names the spool file.
        if let Err(e) = crate::dicom::Uid::parse(&sop_instance) {
            return refuse(Status::CannotUnderstand, &format!(
                "AffectedSOPInstanceUID {} is not a valid UID: {e}",
                crate::dicom::header::escaped(&sop_instance)
            ));
        }
        if self.shared.disk_low() {
            return refuse(Status::OutOfResources, "free disk below the configured minimum");
        }
        let incoming = Incoming {
            sop_class_uid: sop_class,
            sop_instance_uid: sop_instance,
            transfer_syntax: context.transfer_syntax.clone(),
            max_dataset_bytes: self.max_dataset_bytes(),
        };
        match self.shared.spool.begin(&incoming) {
            Ok(writer) => Pending::Store { cmd, writer, received: 0 },
            Err(e) => {
                tracing::error!(error = %e, "cannot open a spool file");
                refuse(Status::OutOfResources, "cannot open a spool file")
            }
        }
    }

    fn max_dataset_bytes(&self) -> u64 {
        self.shared.node.max_dataset_mb.saturating_mul(1024 * 1024)
    }

    /// Stores one PDV of the dataset. Past `node.max_dataset_mb`, or when the
    /// disk falls below its watermark during the transfer, the partial file
    /// goes at once and the rest of the dataset is read and dropped: the
    /// peer gets 0xA700 after its last PDV, in step with the protocol, and
    /// may go on with its next instance on the same association.
    fn on_data(&mut self, bytes: &[u8]) -> Result<(), AssociationError> {
        let Some(pending) = self.pending.take() else {
            // The assembler only yields data after a command that expects it.
            return Err(AssociationError::Assembly(AssemblyError::DataWithoutCommand));
        };
        self.pending = Some(match pending {
            Pending::Store { cmd, mut writer, received } => {
                let now = received + bytes.len() as u64;
                let refuse = |writer: Box<dyn SpoolWriter>, cmd, comment: String| {
                    writer.abort();
                    Pending::Discard { cmd, status: Status::OutOfResources, comment }
                };
                let max = self.max_dataset_bytes();
                if now > max {
                    let sop = cmd.affected_sop_instance_uid.as_deref().unwrap_or("");
                    tracing::warn!(sop_instance_uid = sop, limit_mb = self.shared.node.max_dataset_mb, "dataset exceeds node.max_dataset_mb; partial file removed");
                    refuse(writer, cmd, format!("dataset exceeds node.max_dataset_mb ({} MiB)", self.shared.node.max_dataset_mb))
                } else if received / DISK_CHECK_BYTES != now / DISK_CHECK_BYTES && self.shared.disk_low() {
                    let sop = cmd.affected_sop_instance_uid.as_deref().unwrap_or("");
                    tracing::warn!(sop_instance_uid = sop, received = now, "free disk fell below node.min_free_disk_mb during a transfer; partial file removed");
                    refuse(writer, cmd, "free disk fell below the configured minimum during the transfer".into())
                } else {
                    match writer.write(bytes) {
                        Ok(()) => Pending::Store { cmd, writer, received: now },
                        Err(e) => {
                            tracing::error!(error = %e, "spool write failed");
                            refuse(writer, cmd, "spool write failed".into())
                        }
                    }
                }
            }
            other => other,
        });
        Ok(())
    }

    async fn finish_message(&mut self, ctx: u8, calling_ae: &str) -> Result<(), AssociationError> {
        let Some(pending) = self.pending.take() else {
            return Err(AssociationError::Assembly(AssemblyError::DataWithoutCommand));
        };
        // The index update of a stored instance, answered after the response.
        let mut indexing = None;
        let mut failed: Option<Response> = None;
        let rsp = match pending {
            Pending::Duplicate { cmd } => {
                let sop = cmd.affected_sop_instance_uid.clone().unwrap_or_default();
                telemetry::InstanceStored {
                    sop_instance_uid: &sop,
                    series_instance_uid: "",
                    bytes: 0,
                    duplicate: true,
                }
                .emit();
                Response::to_request(&cmd, Status::Success, None)
            }
            Pending::Discard { cmd, status, comment } => {
                store_failed(&cmd, status, comment)
            }
            Pending::Store { cmd, writer, .. } => {
                let committed = tokio::task::spawn_blocking(move || writer.commit())
                    .await
                    .unwrap_or_else(|e| Err(SpoolError::Io(std::io::Error::other(e.to_string()))));
                let ts = self.context(ctx).map(|c| c.transfer_syntax.clone()).unwrap_or_default();
                match committed {
                    Ok(stored) => {
                        telemetry::InstanceStored {
                            sop_instance_uid: stored.header.sop_instance_uid.as_str(),
                            series_instance_uid: stored.header.series_instance_uid.as_str(),
                            bytes: stored.size_bytes,
                            duplicate: stored.duplicate,
                        }
                        .emit();
                        if !stored.duplicate {
                            let inst = StoredInstance {
                                header: stored.header,
                                rel_path: stored.rel_path,
                                transfer_syntax: ts,
                                size_bytes: stored.size_bytes,
                                association_id: self.id,
                                calling_ae: calling_ae.to_owned(),
                            };
                            let placed = self.shared.spool.root().join(&inst.rel_path);
                            // The file is durable, so the response does not wait for the
                            // index: an index failure is repaired by recovery at the next
                            // start and never failed the store. The instance is in the
                            // tracker's mailbox before the response goes, so the peer's
                            // next message (a duplicate check, the release that may
                            // complete the series) is handled after it. Its answer is
                            // awaited below, before this association reads on.
                            match self.shared.tracker.queue_instance_stored(inst).await {
                                Ok(q) => indexing = Some((q, placed)),
                                Err(e) if self.shared.tracker.fails_the_store() => {
                                    // The cluster's series state: nothing would
                                    // repair it later, so the peer sends again.
                                    tracing::error!(error = %e, "series state update failed; the store fails");
                                    failed = Some(store_failed(&cmd, Status::OutOfResources, e.to_string()));
                                }
                                Err(e) => tracing::error!(error = %e, "series index update failed; recovery will re-index"),
                            }
                        }
                        failed.take().unwrap_or_else(|| Response::to_request(&cmd, Status::Success, None))
                    }
                    Err(e) => {
                        let status = status_for(&e);
                        let comment = e.to_string();
                        if e.fault().is_transient() {
                            tracing::error!(error = %comment, "store failed on our side");
                        }
                        store_failed(&cmd, status, comment)
                    }
                }
            }
        };
        self.respond(ctx, rsp).await?;
        if let Some((queued, placed)) = indexing {
            match queued.outcome().await {
                Ok(crate::series::InsertOutcome::Duplicate) => {
                    // Lost a race with another association storing the same
                    // UID under another series: keep the first copy only.
                    if let Err(e) = std::fs::remove_file(&placed) {
                        tracing::warn!(error = %e, "cannot remove a second copy of an instance");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "series index update failed; recovery will re-index"),
            }
        }
        Ok(())
    }

    async fn respond(&mut self, ctx: u8, rsp: Response) -> Result<(), AssociationError> {
        let data = rsp.encode();
        debug_assert!(self.peer_max_pdu == 0 || data.len() + 6 <= self.peer_max_pdu as usize);
        self.conn
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: ctx,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data,
                }],
            })
            .await
    }
}

/// The C-STORE-RSP for a refused or failed store, counted and logged.
fn store_failed(cmd: &Command, status: Status, comment: String) -> Response {
    telemetry::StoreFailed {
        sop_instance_uid: cmd.affected_sop_instance_uid.as_deref().unwrap_or(""),
        status: status.code(),
        reason: &comment,
    }
    .emit();
    Response::to_request(cmd, status, Some(comment))
}

/// The one mapping from spool failures to DIMSE statuses (PS3.4 B.2.3).
pub fn status_for(e: &SpoolError) -> Status {
    match e {
        SpoolError::Io(_)
        | SpoolError::Meta(_)
        | SpoolError::Shared(_)
        | SpoolError::TooLarge { .. }
        | SpoolError::TooManyElements(_) => {
            Status::OutOfResources
        }
        SpoolError::SopClassMismatch { .. } => Status::DataSetDoesNotMatchSopClass,
        SpoolError::Unparseable(_)
        | SpoolError::Header(_)
        | SpoolError::SopInstanceMismatch { .. }
        | SpoolError::Path(_) => Status::CannotUnderstand,
    }
}
