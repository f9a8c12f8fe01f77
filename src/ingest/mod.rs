//! Ingest: the Verification and Storage SCP (PS3.4 A, B; PS3.7; PS3.8).
//!
//! Input: TCP connections, plain or DICOM TLS (PS3.15 B.1). Output: durable
//! spool files plus a [`crate::series::StoredInstance`] hand-off to the
//! series tracker for each, and release/abort notices that drive early
//! completion.
//!
//! Invariants:
//! - C-STORE success is sent only after the spool reports the instance
//!   durable (file and directory fsync'd).
//! - Memory per association is bounded by the max PDU we advertise: datasets
//!   stream to disk PDV by PDV.
//! - At most `max_associations` associations are served; extra requests get
//!   a transient A-ASSOCIATE-RJ (local limit exceeded), not a TCP reset.
//!
//! Failure modes: a failed TLS handshake is logged and counted, and closes
//! only that connection; a protocol violation aborts that association
//! (A-ABORT with a PS3.8 reason); a bad dataset gets a failure status and the
//! association goes on; nothing on one association affects another.
//!
//! The PDU codec and types are dicom-ul's; the association state machine is
//! ours, because dicom-ul's `ServerAssociation` reads whole messages into
//! memory, has no hook for IP allow-lists or load-based rejects, and no
//! per-PDU timeouts.

pub mod assembler;
pub mod association;
pub mod framing;
pub mod harness;
pub mod negotiation;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::series::TrackerHandle;
use crate::spool::Spool;
use crate::telemetry;

/// What every association handler shares; read-only after start.
pub struct Shared {
    pub node: NodeConfig,
    pub spool: Arc<dyn Spool>,
    pub tracker: TrackerHandle,
}

impl Shared {
    /// Below the watermark we refuse new work but keep what we have.
    pub fn disk_low(&self) -> bool {
        match self.spool.free_bytes() {
            Ok(free) => free < self.node.min_free_disk_mb.saturating_mul(1024 * 1024),
            Err(e) => {
                tracing::error!(error = %e, "cannot read free disk space; treating as low");
                true
            }
        }
    }
}

/// Admission state shared by every listener of the node, so the plain and
/// the TLS port draw on one association limit and one id sequence.
pub struct Gate {
    /// One permit per association we will serve.
    limit: Arc<Semaphore>,
    /// Bounds the handlers that only exist to send a reject, so a flood of
    /// connections cannot spawn unbounded tasks.
    reject_slots: Arc<Semaphore>,
    next_id: AtomicU64,
    max: usize,
}

impl Gate {
    /// Connections holding an association slot now (both ports), for
    /// monitoring: a node stuck at its limit rejects new associations.
    pub fn in_use(&self) -> usize {
        self.max.saturating_sub(self.limit.available_permits())
    }

    pub fn limit(&self) -> usize {
        self.max
    }

    pub fn new(max_associations: usize) -> Arc<Gate> {
        // Association ids only need to be unique within one process's logs
        // and the index; seeding from the clock keeps them apart across restarts.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() << 20)
            .unwrap_or(0);
        Arc::new(Gate {
            limit: Arc::new(Semaphore::new(max_associations)),
            reject_slots: Arc::new(Semaphore::new(64)),
            next_id: AtomicU64::new(seed),
            max: max_associations,
        })
    }
}

/// The accept loop of one port. Each connection gets a handler task with
/// only what it needs; a TLS handshake runs in that task, never here, so a
/// slow or hostile handshake cannot stall accepting.
pub struct Listener {
    listener: TcpListener,
    /// `Some` on the DICOM TLS port (PS3.15 B.1): every connection must
    /// complete a handshake before its first PDU is read.
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Listener {
    /// A listener on `addr`, TLS when `tls` is set, admitting through `gate`.
    pub async fn bind_on(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        shared: Arc<Shared>,
        gate: Arc<Gate>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Listener {
            listener,
            tls: tls.map(TlsAcceptor::from),
            shared,
            gate,
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accept until shutdown, then wait for every handler to finish.
    pub async fn run(self) {
        let transport = if self.tls.is_some() { "tls" } else { "tcp" };
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let id = self.gate.next_id.fetch_add(1, Ordering::Relaxed);
            let permit = self.gate.limit.clone().try_acquire_owned().ok();
            let reject_slot = if permit.is_none() {
                match self.gate.reject_slots.clone().try_acquire_owned() {
                    Ok(s) => Some(s),
                    Err(_) => {
                        tracing::warn!(%peer, "connection dropped: association and reject limits reached");
                        continue;
                    }
                }
            } else {
                None
            };
            let span = tracing::info_span!(
                "association",
                id,
                peer = %peer,
                transport,
                calling_ae = tracing::field::Empty,
                called_ae = tracing::field::Empty
            );
            let shared = self.shared.clone();
            let shutdown = self.shutdown.child_token();
            let tls = self.tls.clone();
            self.tasks.spawn(
                async move {
                    match tls {
                        None => association::run(stream, peer, id, shared, permit, shutdown).await,
                        Some(acceptor) => {
                            // The handshake counts against ARTIM: it is what
                            // stands before the A-ASSOCIATE-RQ on this port.
                            let artim = std::time::Duration::from_secs(shared.node.timeouts.association_request_s);
                            let handshake = tokio::select! {
                                _ = shutdown.cancelled() => return,
                                r = tokio::time::timeout(artim, acceptor.accept(stream)) => r,
                            };
                            match handshake {
                                Ok(Ok(tls_stream)) => {
                                    association::run(tls_stream, peer, id, shared, permit, shutdown).await
                                }
                                Ok(Err(e)) => telemetry::TlsHandshakeFailed { peer, reason: &handshake_reason(&e) }.emit(),
                                Err(_) => telemetry::TlsHandshakeFailed {
                                    peer,
                                    reason: &format!("not completed within {artim:?}"),
                                }
                                .emit(),
                            }
                        }
                    }
                    drop(reject_slot);
                }
                .instrument(span),
            );
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// rustls' reason, plus the likely cause when the first bytes were not TLS
/// at all: the usual operator mistake is a plain DICOM peer on this port.
fn handshake_reason(e: &std::io::Error) -> String {
    let not_tls = matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))
    );
    if not_tls {
        format!("{e} (not TLS: a plain DICOM peer on the TLS port?)")
    } else {
        e.to_string()
    }
}
