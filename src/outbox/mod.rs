//! Outbox: results back to the PACS by C-STORE SCU (PS3.4 B, PS3.7 9.1.1),
//! or by STOW-RS (PS3.18 10.5) to a `stow_rs` destination ([`stow`]).
//!
//! Input: [`OutboxHandle::enqueue`] with a destination name and a Part-10
//! file the report stage has already written durably under
//! `<data_dir>/results/` (report/write.rs writes and fsyncs it; the job
//! stage enqueues it), with its (stable) SOP Class and Instance UIDs.
//! Output: the instance stored at the destination, or a dead letter with
//! the reason; both visible through [`OutboxHandle::list`] and
//! `biomarker-node outbox` ([`store::list_read_only`]).
//!
//! Invariants:
//! - Persist first, deliver second: `enqueue` returns after the row is
//!   committed (WAL, `synchronous=FULL`); the worker only reads the store.
//! - One row per (destination, SOP Instance UID): a result enqueued twice,
//!   or retried across restarts, is one instance at the PACS. A crash while
//!   `sending` re-sends on start-up, which a PACS treats as the same
//!   instance (same SOP Instance UID).
//! - One association (or HTTP connection) per destination batch; at most
//!   one batch per destination in flight; destinations do not wait for
//!   each other.
//!
//! Failure modes (see [`policy`]): success or warning status → delivered;
//! a refusal (failure status other than 0xA7xx, a rejected presentation
//! context, A-ASSOCIATE-RJ permanent, an unreadable or mismatched file) →
//! dead letter at once; connection refused, timeouts, A-ABORT,
//! A-ASSOCIATE-RJ transient, 0xA7xx → retry after `base * 2^(n-1)` (capped)
//! until `max_attempts`, then dead letter with the last reason. STOW-RS
//! maps HTTP statuses and FailureReasons onto the same two faults
//! ([`crate::fault::Fault`], via [`stow::classify`]). Dead letters wait for an operator's `retry` or
//! `dismiss`.
//!
//! Several workers of a cluster each run an outbox; [`claims::Claims`]
//! decides, before each send, which of them sends an item they share
//! (`nats`, feature `cluster`: a JetStream KV with compare-and-set). The
//! embedded node uses [`claims::NoClaims`].

pub mod claims;
pub mod events;
pub mod part10;
pub mod policy;
pub mod scu;
pub mod store;
pub mod stow;
#[cfg(feature = "cluster")]
pub mod nats;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use store::{Enqueued, ItemState, NewItem, OutboxItem, OutboxStore, SqliteOutboxStore};

use crate::config::{DestinationConfig, OutboxConfig, Problem};
use crate::dicom::{AeTitle, Uid};
use crate::fault::Fault;
use claims::{Claim, Claims};
use events::{Delivery, Disposition};
use scu::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox store: row {id}: {message}")]
    Corrupt { id: i64, message: String },
    #[error("unknown outbox destination `{0}`")]
    UnknownDestination(String),
    #[error("result path {0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    #[error("outbox: {0}")]
    Io(#[from] std::io::Error),
}

impl OutboxError {
    /// Whether the caller may try the same call again later.
    pub fn fault(&self) -> Fault {
        match self {
            OutboxError::Sqlite(_) | OutboxError::Io(_) => Fault::Transient,
            OutboxError::Corrupt { .. }
            | OutboxError::UnknownDestination(_)
            | OutboxError::NonUtf8Path(_) => Fault::Permanent,
        }
    }
}

/// A destination as the outbox sends to it: its checked config section
/// with the TLS and STOW-RS material it names loaded. Built once at start
/// ([`Destination::build`]); routes name it by its map key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Called AE title.
    pub ae_title: String,
    /// Host name or IP address.
    pub host: String,
    pub port: u16,
    /// DICOM TLS to this destination; built from `destinations.<name>.tls`.
    pub tls: Option<ClientTls>,
    /// Deliver by STOW-RS instead of C-STORE (`ae_title`, `host`, `port`
    /// unused); built from `destinations.<name>.stow_rs`.
    pub stow: Option<stow::StowTarget>,
}

/// What the SCU needs to open a TLS association.
#[derive(Clone)]
pub struct ClientTls {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// Checked against the destination's certificate (SAN DNS name or IP).
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Two destinations are the same when they share one built config: rustls
/// configs cannot be compared, and are built once per destination.
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}
impl Eq for ClientTls {}

impl Destination {
    /// Load what `destinations.<name>` names: TLS roots and client
    /// certificate, STOW-RS secrets. The section is the one
    /// `config::Config::validate` passed and is not checked again; a
    /// problem here is a file or variable that cannot be read, at its key.
    pub fn build(name: &str, cfg: &DestinationConfig) -> Result<Destination, Problem> {
        let tls = match &cfg.tls {
            None => None,
            Some(t) => Some(ClientTls {
                config: crate::tls::client_config(name, t).map_err(|e| Problem::new(e.key(), e.to_string()))?,
                server_name: t.server_name.clone().unwrap_or_else(|| cfg.host.clone()),
            }),
        };
        let stow = cfg.stow_rs.as_ref().map(|s| stow::StowTarget::build(name, s)).transpose()?;
        Ok(Destination {
            ae_title: cfg.ae_title.clone(),
            host: cfg.host.clone(),
            port: cfg.port,
            tls,
            stow,
        })
    }
}

/// Most items one claim takes; a destination's batch is at most this.
const CLAIM_LIMIT: usize = 64;
/// How long the worker sleeps with nothing due (a wake or enqueue ends it).
const IDLE_POLL: Duration = Duration::from_secs(60);
/// Pause after a store error, so a broken disk is not hammered.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The caller's side: enqueue and operate. Cheap to clone.
#[derive(Clone)]
pub struct OutboxHandle {
    store: Arc<dyn OutboxStore>,
    /// To refuse an unknown destination at enqueue, where the caller can
    /// still see the mistake, rather than as a dead letter later.
    destinations: Arc<HashMap<String, Destination>>,
    /// Wakes the worker; `notify_one` keeps a permit when it is busy, so
    /// an enqueue during a batch is not missed.
    wake: Arc<Notify>,
}

impl OutboxHandle {
    /// Durable when it returns `Ok`; wakes the worker. Enqueueing the same
    /// (destination, SOP instance) again returns the existing id.
    pub fn enqueue(
        &self,
        destination: &str,
        path: &Path,
        sop_class_uid: &Uid,
        sop_instance_uid: &Uid,
    ) -> Result<Enqueued, OutboxError> {
        if !self.destinations.contains_key(destination) {
            return Err(OutboxError::UnknownDestination(destination.to_owned()));
        }
        let r = self.store.enqueue(
            &NewItem {
                destination: destination.to_owned(),
                path: path.to_owned(),
                sop_class_uid: sop_class_uid.clone(),
                sop_instance_uid: sop_instance_uid.clone(),
            },
            SystemTime::now(),
        )?;
        if matches!(r, Enqueued::New(_)) {
            self.wake.notify_one();
        }
        Ok(r)
    }

    pub fn list(&self) -> Result<Vec<OutboxItem>, OutboxError> {
        self.store.list()
    }

    pub fn get(&self, id: i64) -> Result<Option<OutboxItem>, OutboxError> {
        self.store.get(id)
    }

    pub fn count_by_state(&self) -> Result<Vec<(String, i64)>, OutboxError> {
        self.store.count_by_state()
    }

    /// Send again now: a dead letter with a full set of attempts, or a
    /// pending item without waiting out its backoff. False otherwise.
    pub fn retry(&self, id: i64) -> Result<bool, OutboxError> {
        let ok = self.store.retry(id, SystemTime::now())?;
        if ok {
            self.wake.notify_one();
        }
        Ok(ok)
    }

    /// Dead letter → dismissed. False if `id` is not a dead letter.
    pub fn dismiss(&self, id: i64) -> Result<bool, OutboxError> {
        self.store.dismiss(id)
    }
}

pub struct Outbox;

impl Outbox {
    /// Requeue what a crash left `sending`, then start the delivery worker.
    /// The worker stops when `shutdown` is cancelled, after its in-flight
    /// batches have released or aborted their associations. `claims` is
    /// asked before each send ([`claims::NoClaims`] in the embedded node).
    pub fn spawn(
        store: Arc<dyn OutboxStore>,
        destinations: HashMap<String, Destination>,
        cfg: OutboxConfig,
        calling_ae: AeTitle,
        claims: Arc<dyn Claims>,
        shutdown: CancellationToken,
    ) -> Result<(OutboxHandle, JoinHandle<()>), OutboxError> {
        let requeued = store.requeue_interrupted(SystemTime::now())?;
        if requeued > 0 {
            tracing::warn!(
                requeued,
                "outbox: items interrupted while sending are due again"
            );
        }
        let destinations = Arc::new(destinations);
        let wake = Arc::new(Notify::new());
        let handle = OutboxHandle {
            store: store.clone(),
            destinations: destinations.clone(),
            wake: wake.clone(),
        };
        let worker = Worker {
            ctx: Arc::new(BatchContext {
                store,
                destinations,
                cfg,
                calling_ae,
                claims,
            }),
            wake,
            shutdown,
        };
        Ok((handle, tokio::spawn(worker.run())))
    }
}

/// What every batch task reads; read-only.
struct BatchContext {
    store: Arc<dyn OutboxStore>,
    destinations: Arc<HashMap<String, Destination>>,
    cfg: OutboxConfig,
    calling_ae: AeTitle,
    claims: Arc<dyn Claims>,
}

/// Claims due items and runs one batch task per destination.
struct Worker {
    ctx: Arc<BatchContext>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
}

impl Worker {
    async fn run(self) {
        let mut batches: JoinSet<()> = JoinSet::new();
        // Destination of each running batch, so it is not claimed twice.
        let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
        loop {
            let busy: Vec<String> = in_flight
                .values()
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let now = SystemTime::now();
            let wait = match self.ctx.store.claim_due(now, &busy, CLAIM_LIMIT) {
                Ok(items) => {
                    for (destination, items) in group_by_destination(items) {
                        let ctx = self.ctx.clone();
                        let cancel = self.shutdown.clone();
                        let dest = destination.clone();
                        let h = batches
                            .spawn(async move { run_batch(&ctx, &dest, items, &cancel).await });
                        in_flight.insert(h.id(), destination);
                    }
                    let busy: Vec<String> = in_flight.values().cloned().collect();
                    match self.ctx.store.next_due(&busy) {
                        Ok(Some(t)) => t
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO),
                        Ok(None) => IDLE_POLL,
                        Err(e) => {
                            tracing::error!(error = %e, "outbox: cannot read the next due time");
                            STORE_ERROR_PAUSE
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "outbox: cannot claim items");
                    STORE_ERROR_PAUSE
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                Some(done) = batches.join_next_with_id(), if !batches.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => {
                            // Its items stay `sending` until the next start-up requeues them.
                            tracing::error!(error = %e, "outbox: batch task failed");
                            e.id()
                        }
                    };
                    in_flight.remove(&id);
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Batches see the same token: each stops before its next item.
        while batches.join_next().await.is_some() {}
        tracing::info!("outbox: worker stopped");
    }
}

fn group_by_destination(items: Vec<OutboxItem>) -> Vec<(String, Vec<OutboxItem>)> {
    let mut out: Vec<(String, Vec<OutboxItem>)> = Vec::new();
    for it in items {
        match out.iter_mut().find(|(d, _)| *d == it.destination) {
            Some((_, v)) => v.push(it),
            None => out.push((it.destination.clone(), vec![it])),
        }
    }
    out
}

async fn run_batch(
    ctx: &BatchContext,
    destination: &str,
    items: Vec<OutboxItem>,
    cancel: &CancellationToken,
) {
    let Some(dest) = ctx.destinations.get(destination) else {
        // Removed from config since it was enqueued; `retry` after fixing it.
        for it in &items {
            let reason = format!("destination `{destination}` is not configured");
            apply(
                ctx,
                destination,
                "",
                it,
                Outcome::Failed {
                    fault: Fault::Permanent,
                    status: None,
                    reason,
                },
            );
        }
        return;
    };
    let items = claim_items(ctx, destination, items, cancel).await;
    if items.is_empty() {
        return;
    }
    // Outcomes the shared claims must hear of, after the batch: (SOP
    // Instance UID, delivered?). The store is written at once, the claims
    // (network) once the association is over.
    let mut settled: Vec<(String, bool)> = Vec::with_capacity(items.len());
    send_claimed(ctx, destination, dest, &items, cancel, &mut settled).await;
    settle(ctx, destination, settled).await;
}

/// Tells the claims what became of each item sent. After the first error
/// (NATS down) the rest are not tried, so a batch does not wait out one
/// timeout per item: their leases run out by themselves.
async fn settle(ctx: &BatchContext, destination: &str, settled: Vec<(String, bool)>) {
    let total = settled.len();
    for (i, (sop, delivered)) in settled.into_iter().enumerate() {
        let r = if delivered {
            ctx.claims.delivered(destination, &sop).await
        } else {
            ctx.claims.release(destination, &sop).await
        };
        if let Err(reason) = r {
            tracing::warn!(destination, sop_instance_uid = %sop, %reason, not_recorded = total - i,
                "outbox: the shared delivery state was not updated; the claims' leases run out by themselves");
            return;
        }
    }
}

/// Asks the claims about each item; returns those this worker sends now.
/// The rest are recorded here: delivered by another worker, or due again
/// later without an attempt counted. Once the claims are unavailable, the
/// rest of the batch is not asked (one timeout per batch, not per item);
/// on shutdown the rest are given back.
async fn claim_items(
    ctx: &BatchContext,
    destination: &str,
    items: Vec<OutboxItem>,
    cancel: &CancellationToken,
) -> Vec<OutboxItem> {
    let mut mine = Vec::with_capacity(items.len());
    let mut unavailable: Option<String> = None;
    for it in items {
        let claim = match &unavailable {
            Some(reason) => Claim::Unavailable { reason: reason.clone() },
            None => tokio::select! {
                _ = cancel.cancelled() => {
                    if let Err(e) = ctx.store.unclaim(it.id) {
                        tracing::error!(id = it.id, error = %e, "outbox: cannot give an item back");
                    }
                    continue;
                }
                c = ctx.claims.claim(destination, &it.sop_instance_uid) => c,
            },
        };
        let now = SystemTime::now();
        let event = |outcome: &str, detail: &str| {
            events::NotClaimed { destination, sop_instance_uid: &it.sop_instance_uid, outcome, detail }.emit()
        };
        let r = match claim {
            Claim::Proceed => {
                mine.push(it);
                continue;
            }
            Claim::AlreadyDelivered { by } => {
                event("delivered_elsewhere", &by);
                ctx.store.mark_delivered(it.id, now, Some(&format!("delivered by another worker ({by})")))
            }
            Claim::HeldByOther { owner, retry_at } => {
                event("held", &owner);
                ctx.store.defer(it.id, retry_at, &format!("being sent by another worker ({owner})"))
            }
            Claim::Unavailable { reason } => {
                event("unavailable", &reason);
                let note = format!("shared delivery state unavailable: {reason}");
                unavailable = Some(reason);
                ctx.store.defer(it.id, now + claims::UNAVAILABLE_RETRY, &note)
            }
        };
        if let Err(e) = r {
            tracing::error!(id = it.id, error = %e, "outbox: cannot record a claim outcome");
        }
    }
    mine
}

/// One batch to one configured destination, every outcome recorded in the
/// store and pushed to `settled` for the claims.
async fn send_claimed(
    ctx: &BatchContext,
    destination: &str,
    dest: &Destination,
    items: &[OutboxItem],
    cancel: &CancellationToken,
    settled: &mut Vec<(String, bool)>,
) {
    if let Some(target) = &dest.stow {
        let mut record = |it: &OutboxItem, outcome: Outcome| {
            settled.push((it.sop_instance_uid.clone(), matches!(outcome, Outcome::Stored { .. })));
            apply(ctx, destination, "", it, outcome)
        };
        let span = tracing::info_span!("outbox_stow", destination, url = target.url(), items = items.len());
        stow::send_batch(
            target,
            ctx.cfg.connect_timeout(),
            ctx.cfg.dimse_timeout(),
            items,
            cancel,
            &mut record,
        )
        .instrument(span)
        .await;
        return;
    }
    let peer = scu::Peer {
        destination,
        dest,
        calling_ae: ctx.calling_ae.as_str(),
        connect_timeout: ctx.cfg.connect_timeout(),
        dimse_timeout: ctx.cfg.dimse_timeout(),
    };
    let mut record = |it: &OutboxItem, outcome: Outcome| {
        settled.push((it.sop_instance_uid.clone(), matches!(outcome, Outcome::Stored { .. })));
        apply(ctx, destination, &dest.ae_title, it, outcome)
    };
    let span = tracing::info_span!(
        "outbox_association",
        destination,
        called_ae = %dest.ae_title,
        calling_ae = %ctx.calling_ae,
        items = items.len()
    );
    scu::send_batch(&peer, items, cancel, &mut record)
        .instrument(span)
        .await;
}

/// Write one item's outcome to the store and emit its event. A store error
/// leaves the item `sending`; the next start-up requeues it.
fn apply(
    ctx: &BatchContext,
    destination: &str,
    called_ae: &str,
    it: &OutboxItem,
    outcome: Outcome,
) {
    let now = SystemTime::now();
    let event = |status: Option<u16>, disposition: Disposition, reason: Option<&str>| {
        Delivery {
            destination,
            called_ae,
            sop_instance_uid: &it.sop_instance_uid,
            attempt: it.attempts,
            status,
            disposition,
            reason,
        }
        .emit()
    };
    let r = match outcome {
        Outcome::NotAttempted => ctx.store.unclaim(it.id),
        Outcome::Stored { status, comment } => {
            let note = (status != 0).then(|| match &comment {
                Some(c) => format!("warning 0x{status:04X}: {c}"),
                None => format!("warning 0x{status:04X}"),
            });
            event(Some(status), Disposition::Delivered, note.as_deref());
            ctx.store.mark_delivered(it.id, now, note.as_deref())
        }
        Outcome::Failed {
            fault: Fault::Permanent,
            status,
            reason,
        } => {
            event(status, Disposition::Dead, Some(&reason));
            ctx.store.mark_dead(it.id, &reason)
        }
        Outcome::Failed {
            fault: Fault::Transient,
            status,
            reason,
        } => match policy::after_transient_failure(
            it.attempts,
            ctx.cfg.max_attempts,
            ctx.cfg.retry_base(),
            ctx.cfg.retry_cap(),
        ) {
            policy::AfterFailure::RetryIn(d) => {
                event(status, Disposition::RetryIn(d), Some(&reason));
                ctx.store.schedule_retry(it.id, now + d, &reason)
            }
            policy::AfterFailure::DeadLetter => {
                let reason = format!("gave up after {} attempts: {reason}", it.attempts);
                event(status, Disposition::Dead, Some(&reason));
                ctx.store.mark_dead(it.id, &reason)
            }
        },
    };
    if let Err(e) = r {
        tracing::error!(id = it.id, error = %e, "outbox: cannot record a delivery outcome");
    }
}
