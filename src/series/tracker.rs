//! The tracker actor: sole writer of series state transitions.
//!
//! One task owns the [`SeriesIndex`], the quiet-timer deadlines and the
//! association → series map, so none of them needs a lock and every
//! transition happens in mailbox order. SQLite calls are short single-row
//! transactions (WAL, `synchronous=NORMAL`, no fsync per commit), so they run
//! inline on the task rather than on the blocking pool.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    check_whole, recover, CompletionQueue, CompletionReason, InsertOutcome, SeriesError,
    SeriesIndex, StoredInstance,
};
use crate::config::SeriesConfig;
use crate::dicom::header::InstanceHeader;
use crate::dicom::Uid;

/// Bounded so a stalled index pushes back on ingest (which then answers
/// C-STORE slowly) instead of buffering without limit.
const MAILBOX: usize = 256;

/// A quiet period longer than this is treated as this, so deadline arithmetic
/// cannot overflow. Nobody waits a year for a series.
const MAX_QUIET: Duration = Duration::from_secs(365 * 24 * 3600);

enum Msg {
    Stored {
        inst: Box<StoredInstance>,
        reply: oneshot::Sender<Result<InsertOutcome, SeriesError>>,
    },
    IsDuplicate {
        sop: Uid,
        reply: oneshot::Sender<Result<bool, SeriesError>>,
    },
    Released {
        association_id: u64,
        done: oneshot::Sender<()>,
    },
    Aborted {
        association_id: u64,
        done: oneshot::Sender<()>,
    },
}

/// Quiet-timer deadlines of the series that are receiving, earliest first.
#[derive(Default)]
struct Deadlines {
    /// Current deadline per series, to find its entry in `order`.
    by_series: HashMap<Uid, Instant>,
    /// Ordered view the actor sleeps on; always mirrors `by_series`.
    order: BTreeSet<(Instant, Uid)>,
}

impl Deadlines {
    fn set(&mut self, series: Uid, at: Instant) {
        if let Some(old) = self.by_series.insert(series.clone(), at) {
            self.order.remove(&(old, series.clone()));
        }
        self.order.insert((at, series));
    }

    fn remove(&mut self, series: &Uid) {
        if let Some(old) = self.by_series.remove(series) {
            self.order.remove(&(old, series.clone()));
        }
    }

    fn contains(&self, series: &Uid) -> bool {
        self.by_series.contains_key(series)
    }

    fn earliest(&self) -> Option<Instant> {
        self.order.first().map(|(at, _)| *at)
    }

    fn due(&self, now: Instant) -> Vec<Uid> {
        self.order
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

/// The actor. Built and started only by [`Tracker::spawn`]; talk to it
/// through its [`TrackerHandle`].
pub struct Tracker {
    cfg: SeriesConfig,
    /// `cfg.quiet_seconds`, checked and clamped once.
    quiet: Duration,
    /// The only writer of the `receiving` ↔ `complete` transitions.
    index: SeriesIndex,
    /// Where completions go; pushed before the index records them.
    queue: Arc<dyn CompletionQueue>,
    /// Exactly the series this process believes are receiving.
    deadlines: Deadlines,
    /// Series each open association has stored new instances into. In memory
    /// only: after a crash the quiet timer does what early completion would.
    associations: HashMap<u64, HashSet<Uid>>,
}

/// Cheap to clone; one per association task.
#[derive(Clone)]
pub struct TrackerHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for TrackerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackerHandle")
            .field("closed", &self.tx.is_closed())
            .finish()
    }
}

impl Tracker {
    /// Runs [`recover`] first, then serves messages until `shutdown` is
    /// cancelled.
    ///
    /// Recovery runs here, synchronously, so a node whose index cannot be
    /// opened or reconciled fails at start rather than after accepting
    /// associations; call this before the listener starts. Every series still
    /// receiving after recovery gets a fresh quiet period.
    ///
    /// On shutdown the actor stops taking messages, answers those already in
    /// the mailbox, and ends; series still receiving stay so in the index and
    /// complete after the next start. Cancel it after ingest has drained, or
    /// late `instance_stored` calls get [`SeriesError::TrackerStopped`].
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn spawn(
        cfg: SeriesConfig,
        mut index: SeriesIndex,
        spool_root: PathBuf,
        queue: Arc<dyn CompletionQueue>,
        shutdown: CancellationToken,
    ) -> Result<(TrackerHandle, tokio::task::JoinHandle<()>), SeriesError> {
        let quiet = Duration::try_from_secs_f64(cfg.quiet_seconds)
            .map_err(|e| SeriesError::InvalidConfig(format!("series.quiet_seconds: {e}")))?
            .min(MAX_QUIET);
        let recovered = recover(&mut index, &spool_root, SystemTime::now())?;
        let mut deadlines = Deadlines::default();
        let at = Instant::now() + quiet;
        for series in recovered.receiving {
            deadlines.set(series, at);
        }
        let (tx, rx) = mpsc::channel(MAILBOX);
        let tracker = Tracker {
            cfg,
            quiet,
            index,
            queue,
            deadlines,
            associations: HashMap::new(),
        };
        let task = tokio::spawn(
            tracker
                .run(rx, shutdown)
                .instrument(tracing::info_span!("series_tracker")),
        );
        Ok((TrackerHandle { tx }, task))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, shutdown: CancellationToken) {
        // Once every handle is gone no instance can arrive, but receiving
        // series must still complete, so the timers keep running.
        let mut mailbox_open = true;
        loop {
            let next = self.deadlines.earliest();
            let timer = async move {
                match next {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Shutdown first; then due timers, so a busy mailbox cannot
                // starve completions.
                biased;
                () = shutdown.cancelled() => break,
                () = timer => self.complete_due(),
                msg = rx.recv(), if mailbox_open => match msg {
                    Some(msg) => self.handle(msg),
                    None => mailbox_open = false,
                },
            }
        }
        // Answer what was already sent rather than failing instances whose
        // files are safely in the spool.
        rx.close();
        while let Some(msg) = rx.recv().await {
            self.handle(msg);
        }
        tracing::info!(
            receiving = self.deadlines.by_series.len(),
            "series tracker stopped"
        );
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Stored { inst, reply } => {
                let res = self.stored(&inst);
                // The caller may have given up (association aborted); the
                // index row stands either way.
                let _ = reply.send(res);
            }
            Msg::IsDuplicate { sop, reply } => {
                let _ = reply.send(self.index.contains_instance(&sop));
            }
            Msg::Released {
                association_id,
                done,
            } => {
                self.released(association_id);
                let _ = done.send(());
            }
            Msg::Aborted {
                association_id,
                done,
            } => {
                if let Some(series) = self.associations.remove(&association_id) {
                    tracing::debug!(
                        association_id,
                        series = series.len(),
                        "association aborted; its series wait for the quiet timer"
                    );
                }
                let _ = done.send(());
            }
        }
    }

    fn stored(&mut self, inst: &StoredInstance) -> Result<InsertOutcome, SeriesError> {
        let series = &inst.header.series_instance_uid;
        let outcome = self.index.insert_instance(inst, SystemTime::now())?;
        match outcome {
            InsertOutcome::New | InsertOutcome::Reopened => {
                self.deadlines
                    .set(series.clone(), Instant::now() + self.quiet);
                if inst.association_id != 0 {
                    self.associations
                        .entry(inst.association_id)
                        .or_default()
                        .insert(series.clone());
                }
                if outcome == InsertOutcome::Reopened {
                    tracing::info!(
                        series = %series,
                        sop = %inst.header.sop_instance_uid,
                        "late instance re-opened a completed series"
                    );
                }
            }
            // Not activity on the series: the sender is repeating itself.
            InsertOutcome::Duplicate => tracing::debug!(
                series = %series,
                sop = %inst.header.sop_instance_uid,
                "duplicate instance; first copy kept"
            ),
        }
        Ok(outcome)
    }

    fn released(&mut self, association_id: u64) {
        let Some(series_set) = self.associations.remove(&association_id) else {
            return;
        };
        if !self.cfg.early_completion {
            return;
        }
        for series in series_set {
            let _span = tracing::debug_span!("series", uid = %series).entered();
            if !self.deadlines.contains(&series) {
                continue; // completed meanwhile
            }
            if self.associations.values().any(|s| s.contains(&series)) {
                tracing::debug!("another open association stores into it; left to the quiet timer");
                continue;
            }
            let rows = match self.index.series_instances(&series) {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "cannot read series for early completion");
                    continue;
                }
            };
            let headers: Vec<&InstanceHeader> = rows.iter().map(|(_, h)| h).collect();
            match check_whole(&headers, self.cfg.spacing_tolerance) {
                Ok(()) => self.complete(&series, CompletionReason::AssociationReleased),
                Err(why) => tracing::debug!(%why, "not whole; left to the quiet timer"),
            }
        }
    }

    fn complete_due(&mut self) {
        for series in self.deadlines.due(Instant::now()) {
            self.complete(&series, CompletionReason::QuietTimer);
        }
    }

    /// Push first, then record: see the at-least-once note in the module doc.
    /// Any failure keeps the series receiving and retries one quiet period on.
    fn complete(&mut self, series: &Uid, reason: CompletionReason) {
        let _span = tracing::info_span!("series", uid = %series).entered();
        let retry_at = Instant::now() + self.quiet;
        let ev = match self.index.pending_completion(series, reason) {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                // Not receiving any more (set by another writer, or recovery
                // dropped it): nothing to time.
                self.deadlines.remove(series);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read series to complete it; will retry");
                self.deadlines.set(series.clone(), retry_at);
                return;
            }
        };
        if let Err(error) = self.queue.push(&ev) {
            tracing::warn!(%error, "cannot queue completion; will retry");
            self.deadlines.set(series.clone(), retry_at);
            return;
        }
        match self.index.mark_complete(&ev, SystemTime::now()) {
            Ok(recorded) => {
                self.deadlines.remove(series);
                if !recorded {
                    tracing::warn!("series changed state while completing; event already queued");
                }
                tracing::info!(
                    instances = ev.instances,
                    generation = ev.generation,
                    reason = %ev.reason,
                    "series complete"
                );
            }
            Err(error) => {
                // The event is queued; retrying queues it again with the same
                // generation, which routing dedupes.
                tracing::error!(%error, "completion queued but not recorded; will retry");
                self.deadlines.set(series.clone(), retry_at);
            }
        }
    }
}

impl TrackerHandle {
    /// Indexes an instance ingest has fsync'd; resolves once the index
    /// committed, so ingest acknowledges only what the index knows.
    pub async fn instance_stored(&self, inst: StoredInstance) -> Result<InsertOutcome, SeriesError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Stored {
                inst: Box::new(inst),
                reply,
            })
            .await
            .map_err(|_| SeriesError::TrackerStopped)?;
        rx.await.map_err(|_| SeriesError::TrackerStopped)?
    }

    /// Whether this SOP instance is already indexed, so ingest can skip
    /// writing a second copy.
    pub async fn is_duplicate(&self, sop: &Uid) -> Result<bool, SeriesError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::IsDuplicate {
                sop: sop.clone(),
                reply,
            })
            .await
            .map_err(|_| SeriesError::TrackerStopped)?;
        rx.await.map_err(|_| SeriesError::TrackerStopped)?
    }

    /// The association ended with A-RELEASE: each series it stored into
    /// completes now if `early_completion` is on, no other open association
    /// stores into it, and its indexed instances pass [`check_whole`].
    /// Resolves once the tracker has decided.
    pub async fn association_released(&self, association_id: u64) {
        self.notify(association_id, |association_id, done| Msg::Released {
            association_id,
            done,
        })
        .await;
    }

    /// The association was aborted: forget it; its series wait for the quiet
    /// timer, since an abort says nothing about completeness.
    pub async fn association_aborted(&self, association_id: u64) {
        self.notify(association_id, |association_id, done| Msg::Aborted {
            association_id,
            done,
        })
        .await;
    }

    async fn notify(&self, association_id: u64, msg: fn(u64, oneshot::Sender<()>) -> Msg) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(msg(association_id, done)).await.is_err() || rx.await.is_err() {
            // Shutting down: the quiet timer after restart covers it.
            tracing::debug!(association_id, "series tracker stopped; association end ignored");
        }
    }
}
