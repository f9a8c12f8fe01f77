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
//! - A slot is taken only after the A-ASSOCIATE-RQ passed negotiation;
//!   before that a connection sits in a separate, bounded pre-association
//!   budget under one short deadline (see [`Gate`]), so silent or slow
//!   connections cannot starve allowed peers.
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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::series::SeriesSink;
use crate::spool::Spool;
use crate::telemetry;

/// What every association handler shares; read-only after start.
pub struct Shared {
    pub node: NodeConfig,
    pub spool: Arc<dyn Spool>,
    pub tracker: SeriesSink,
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
/// the TLS port draw on one association limit, one pre-association budget
/// and one id sequence.
///
/// Two stages, so that connections nobody has vouched for cannot starve the
/// peers that have been:
/// - Pre-association (TLS handshake, A-ASSOCIATE-RQ, negotiation, a
///   reject): every connection is admitted at once into a budget of
///   `max_pending_connections`, under one deadline of
///   `timeouts.association_request_s` from TCP accept. When the budget is
///   full, the connection that has waited longest is closed to make room. A
///   real peer sends its request within milliseconds of connecting, so a
///   flood of silent or slow connections mostly evicts itself.
/// - Association: an association slot (`max_associations`) is taken only
///   once the request passed negotiation (called AE, allowed caller and
///   host, contexts), so only callers that are allowed hold slots.
pub struct Gate {
    /// One permit per association we will serve.
    limit: Arc<Semaphore>,
    /// Connections in the pre-association stage by id: ids grow, so the
    /// first is the oldest. Cancelling the token closes that connection.
    waiting: Mutex<BTreeMap<u64, (CancellationToken, SocketAddr)>>,
    max_waiting: usize,
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

    /// Connections that have not (yet) become an association.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn new(max_associations: usize, max_pending_connections: usize) -> Arc<Gate> {
        // Association ids only need to be unique within one process's logs
        // and the index; seeding from the clock keeps them apart across restarts.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() << 20)
            .unwrap_or(0);
        Arc::new(Gate {
            limit: Arc::new(Semaphore::new(max_associations)),
            waiting: Mutex::new(BTreeMap::new()),
            max_waiting: max_pending_connections.max(1),
            next_id: AtomicU64::new(seed),
            max: max_associations,
        })
    }

    /// Admit a new connection into the pre-association stage, closing the
    /// oldest waiting one if the budget is full.
    fn admit(self: &Arc<Self>, peer: SocketAddr, deadline: tokio::time::Instant) -> Admission {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let evicted = {
            let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let evicted = if w.len() >= self.max_waiting { w.pop_first() } else { None };
            w.insert(id, (token.clone(), peer));
            evicted
        };
        if let Some((old_id, (old_token, old_peer))) = evicted {
            old_token.cancel();
            telemetry::PreAssociationEvicted { id: old_id, peer: old_peer, budget: self.max_waiting }.emit();
        }
        Admission { gate: self.clone(), id, evicted: token, deadline }
    }
}

/// A connection's place in the pre-association stage. Dropping it leaves
/// the stage: once the association is accepted, or when the connection ends.
pub struct Admission {
    gate: Arc<Gate>,
    pub id: u64,
    evicted: CancellationToken,
    /// TCP accept + `timeouts.association_request_s`: the TLS handshake and
    /// the A-ASSOCIATE-RQ share it, so a slow handshake cannot double it.
    pub deadline: tokio::time::Instant,
}

impl Admission {
    /// Resolves when a newer connection took this one's place.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }

    /// An association slot, for a request that passed negotiation.
    pub fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.gate.limit.clone().try_acquire_owned().ok()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // A no-op when this one was evicted: ids are never reused.
        self.gate.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
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
            let artim = std::time::Duration::from_secs(self.shared.node.timeouts.association_request_s);
            let admission = self.gate.admit(peer, tokio::time::Instant::now() + artim);
            let span = tracing::info_span!(
                "association",
                id = admission.id,
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
                        None => association::run(stream, peer, shared, admission, shutdown).await,
                        Some(acceptor) => {
                            // The handshake is pre-association time: it runs
                            // under the same deadline and budget as the RQ.
                            let handshake = tokio::select! {
                                _ = shutdown.cancelled() => return,
                                // logged by the gate
                                _ = admission.evicted() => return,
                                r = tokio::time::timeout_at(admission.deadline, acceptor.accept(stream)) => r,
                            };
                            match handshake {
                                Ok(Ok(tls_stream)) => {
                                    association::run(tls_stream, peer, shared, admission, shutdown).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_pre_association_budget_evicts_the_oldest_and_never_takes_a_slot() {
        let gate = Gate::new(1, 3);
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let later = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let a: Vec<Admission> = (0..3).map(|_| gate.admit(peer, later)).collect();
        assert_eq!((gate.waiting(), gate.in_use()), (3, 0));
        let newest = gate.admit(peer, later);
        assert_eq!(gate.waiting(), 3);
        // the oldest is told to go, at once; the others are not
        tokio::time::timeout(std::time::Duration::from_secs(1), a[0].evicted()).await.unwrap();
        for other in &a[1..] {
            assert!(tokio::time::timeout(std::time::Duration::from_millis(10), other.evicted()).await.is_err());
        }
        // a slot is a separate thing, taken on request only
        let slot = newest.slot().expect("one slot");
        assert_eq!(gate.in_use(), 1);
        assert!(a[1].slot().is_none());
        drop(newest);
        drop(a);
        assert_eq!(gate.waiting(), 0);
        drop(slot);
        assert_eq!(gate.in_use(), 0);
    }
}
