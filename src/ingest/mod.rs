//! Ingest: the Verification and Storage SCP (PS3.4 A, B; PS3.7; PS3.8).
//!
//! Input: TCP connections. Output: durable spool files plus a
//! [`crate::series::StoredInstance`] hand-off to the series tracker for each,
//! and release/abort notices that drive early completion.
//!
//! Invariants:
//! - C-STORE success is sent only after the spool reports the instance
//!   durable (file and directory fsync'd).
//! - Memory per association is bounded by the max PDU we advertise: datasets
//!   stream to disk PDV by PDV.
//! - At most `max_associations` associations are served; extra requests get
//!   a transient A-ASSOCIATE-RJ (local limit exceeded), not a TCP reset.
//!
//! Failure modes: a protocol violation aborts that association (A-ABORT with
//! a PS3.8 reason); a bad dataset gets a failure status and the association
//! goes on; nothing on one association affects another.
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::series::TrackerHandle;
use crate::spool::Spool;

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

/// The accept loop. Owns the association limit and the shutdown signal;
/// each connection gets a handler task with only what it needs.
pub struct Listener {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// One permit per association we will serve.
    limit: Arc<Semaphore>,
    /// Bounds the handlers that only exist to send a reject, so a flood of
    /// connections cannot spawn unbounded tasks.
    reject_slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    next_id: AtomicU64,
}

impl Listener {
    pub async fn bind(shared: Arc<Shared>, shutdown: CancellationToken) -> std::io::Result<Listener> {
        let addr = SocketAddr::new(shared.node.bind, shared.node.port);
        let listener = TcpListener::bind(addr).await?;
        let max = shared.node.max_associations;
        // Association ids only need to be unique within one process's logs
        // and the index; seeding from the clock keeps them apart across restarts.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() << 20)
            .unwrap_or(0);
        Ok(Listener {
            listener,
            shared,
            limit: Arc::new(Semaphore::new(max)),
            reject_slots: Arc::new(Semaphore::new(64)),
            shutdown,
            tasks: TaskTracker::new(),
            next_id: AtomicU64::new(seed),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept until shutdown, then wait for every handler to finish.
    pub async fn run(self) {
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
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let permit = self.limit.clone().try_acquire_owned().ok();
            let reject_slot = if permit.is_none() {
                match self.reject_slots.clone().try_acquire_owned() {
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
                calling_ae = tracing::field::Empty,
                called_ae = tracing::field::Empty
            );
            let shared = self.shared.clone();
            let shutdown = self.shutdown.child_token();
            self.tasks.spawn(
                async move {
                    association::run(stream, peer, id, shared, permit, shutdown).await;
                    drop(reject_slot);
                }
                .instrument(span),
            );
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}
