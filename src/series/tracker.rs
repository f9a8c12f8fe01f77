//! The tracker actor: sole writer of series state transitions.
//!
//! One task owns the [`SeriesIndex`], the quiet-timer deadlines and the
//! association → series map, so none of them needs a lock and every
//! transition happens in mailbox order. SQLite calls are short single-row
//! transactions (WAL, `synchronous=NORMAL`, no fsync per commit), so they run
//! inline in the actor rather than on the blocking pool. The actor has its
//! own thread (with a current-thread runtime for its timers), not a task on
//! the node's runtime: each insert held one of the runtime's workers for a
//! few hundred µs of SQLite (`perf trace` showed the index's WAL writes on a
//! worker), and a WAL checkpoint, which fsyncs, for milliseconds, while
//! associations and the HTTP API waited for that worker.

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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(SeriesError::TrackerThread)?;
        let (ended_tx, ended) = oneshot::channel();
        let span = tracing::info_span!("series_tracker");
        std::thread::Builder::new()
            .name("series-tracker".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| runtime.block_on(tracker.run(rx, shutdown).instrument(span)));
                let _ = ended_tx.send(std::panic::catch_unwind(run));
            })
            .map_err(SeriesError::TrackerThread)?;
        // A task on the caller's runtime stands for the thread, so that the
        // node awaits it as before and a panic in the actor reaches it.
        let task = tokio::spawn(async move {
            if let Ok(Err(panic)) = ended.await {
                std::panic::resume_unwind(panic);
            }
        });
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
                if recorded {
                    ev.emit();
                } else {
                    tracing::warn!(
                        series = %series,
                        "series changed state while completing; event already queued"
                    );
                }
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

/// An instance in the tracker's mailbox: [`QueuedInstance::outcome`] waits
/// for the index's answer.
pub struct QueuedInstance(oneshot::Receiver<Result<InsertOutcome, SeriesError>>);

impl QueuedInstance {
    /// An answer already known (the cluster's series state answers before
    /// the C-STORE response, not after).
    pub fn ready(r: Result<InsertOutcome, SeriesError>) -> QueuedInstance {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(r);
        QueuedInstance(rx)
    }

    pub async fn outcome(self) -> Result<InsertOutcome, SeriesError> {
        self.0.await.map_err(|_| SeriesError::TrackerStopped)?
    }
}

impl TrackerHandle {
    /// Indexes an instance ingest has fsync'd; resolves once the index
    /// committed.
    pub async fn instance_stored(
        &self,
        inst: StoredInstance,
    ) -> Result<InsertOutcome, SeriesError> {
        self.queue_instance_stored(inst).await?.outcome().await
    }

    /// Puts an instance in the tracker's mailbox and returns at once; the
    /// [`QueuedInstance`] resolves once the index committed. Everything this
    /// handle's caller sends afterwards (the next instance's duplicate check,
    /// the association's release) is handled after it: mailbox order.
    pub async fn queue_instance_stored(&self, inst: StoredInstance) -> Result<QueuedInstance, SeriesError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Stored {
                inst: Box::new(inst),
                reply,
            })
            .await
            .map_err(|_| SeriesError::TrackerStopped)?;
        Ok(QueuedInstance(rx))
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
            tracing::debug!(
                association_id,
                "series tracker stopped; association end ignored"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::geometry::tests::slice;
    use crate::series::recover::tests::write_ct;
    use crate::series::{SeriesCompleted, SeriesState, SqliteCompletionQueue};
    use std::path::Path;

    struct Node {
        _dir: tempfile::TempDir,
        index_path: PathBuf,
        queue: Arc<SqliteCompletionQueue>,
        handle: TrackerHandle,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn cfg(quiet_seconds: f64, early_completion: bool) -> SeriesConfig {
        SeriesConfig {
            quiet_seconds,
            early_completion,
            spacing_tolerance: 0.1,
        }
    }

    fn start(cfg: SeriesConfig, prepare_spool: impl FnOnce(&Path)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        prepare_spool(&spool);
        let index_path = dir.path().join("index.sqlite");
        let index = SeriesIndex::open(&index_path).unwrap();
        let queue = Arc::new(SqliteCompletionQueue::open(&index_path).unwrap());
        let shutdown = CancellationToken::new();
        let (handle, task) =
            Tracker::spawn(cfg, index, spool, queue.clone(), shutdown.clone()).unwrap();
        Node {
            _dir: dir,
            index_path,
            queue,
            handle,
            shutdown,
            task,
        }
    }

    fn stored(series: &str, i: u32, z: f64, association_id: u64) -> StoredInstance {
        let header = slice(series, i, z);
        StoredInstance {
            rel_path: PathBuf::from(format!(
                "{}/{}/{}.dcm",
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )),
            header,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            size_bytes: 1000,
            association_id,
            calling_ae: "CT01".into(),
        }
    }

    /// Slices 1..=n of `series`, minus `skip`, at 2.5 mm.
    async fn send(node: &Node, series: &str, n: u32, skip: &[u32], association_id: u64) {
        for i in (1..=n).filter(|i| !skip.contains(i)) {
            let out = node
                .handle
                .instance_stored(stored(series, i, f64::from(i) * 2.5, association_id))
                .await
                .unwrap();
            assert_ne!(out, InsertOutcome::Duplicate);
        }
    }

    /// Next event, acked; `None` if none arrives within `within`.
    async fn next_event(node: &Node, within: Duration) -> Option<SeriesCompleted> {
        tokio::time::timeout(within, async {
            loop {
                let woken = node.queue.notified();
                if let Some((id, ev)) = node.queue.peek().unwrap() {
                    node.queue.ack(id).unwrap();
                    return ev;
                }
                woken.await;
            }
        })
        .await
        .ok()
    }

    /// Poll a row until it reaches `state` (or 5 s pass), then return it.
    async fn settle(
        f: impl Fn() -> crate::series::SeriesSummary,
        state: SeriesState,
    ) -> crate::series::SeriesSummary {
        let t0 = Instant::now();
        loop {
            let r = f();
            if r.state == state || t0.elapsed() > Duration::from_secs(5) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn row(node: &Node, series: &str) -> crate::series::SeriesSummary {
        SeriesIndex::open_readonly(&node.index_path)
            .unwrap()
            .list_series()
            .unwrap()
            .into_iter()
            .find(|r| r.series_instance_uid.as_str() == series)
            .expect("series is indexed")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quiet_timer_completes() {
        let node = start(cfg(0.3, false), |_| {});
        let t0 = Instant::now();
        send(&node, "1.2.3", 4, &[], 1).await;
        node.handle.association_released(1).await; // early completion is off
        assert_eq!(node.queue.peek().unwrap(), None);
        let ev = next_event(&node, Duration::from_secs(5))
            .await
            .expect("completes");
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(ev.reason, CompletionReason::QuietTimer);
        assert_eq!((ev.instances, ev.generation), (4, 1));
        assert_eq!(ev.series_instance_uid.as_str(), "1.2.3");
        // The event is pushed before the index commits (at-least-once), so
        // the row may lag the event by a moment.
        let r = settle(|| row(&node, "1.2.3"), SeriesState::Complete).await;
        assert_eq!(r.state, SeriesState::Complete);
        assert_eq!(r.completion_reason.as_deref(), Some("quiet_timer"));
        assert!(r.completed_at.is_some());
        // Exactly once.
        assert_eq!(next_event(&node, Duration::from_millis(500)).await, None);
    }

    /// The actor needs none of its caller's runtime: with the only thread of
    /// a current-thread runtime blocked past the quiet period (as a worker is
    /// by a long synchronous call), the series still completes on time. On
    /// the caller's runtime its timer could not fire until the thread was
    /// free again.
    #[tokio::test(flavor = "current_thread")]
    async fn the_actor_completes_series_while_the_callers_runtime_is_blocked() {
        let node = start(cfg(0.2, false), |_| {});
        send(&node, "1.2.3", 2, &[], 1).await;
        std::thread::sleep(Duration::from_millis(1500));
        let (id, ev) = node.queue.peek().unwrap().expect("completed while the runtime's thread was blocked");
        assert_eq!(ev.series_instance_uid.as_str(), "1.2.3");
        node.queue.ack(id).unwrap();
        node.shutdown.cancel();
        node.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_is_reported_and_does_not_reopen() {
        let node = start(cfg(0.2, false), |_| {});
        let sop = Uid::parse("1.2.3.1").unwrap();
        assert!(!node.handle.is_duplicate(&sop).await.unwrap());
        let first = node
            .handle
            .instance_stored(stored("1.2.3", 1, 0.0, 1))
            .await;
        assert_eq!(first.unwrap(), InsertOutcome::New);
        assert!(node.handle.is_duplicate(&sop).await.unwrap());
        let again = node
            .handle
            .instance_stored(stored("1.2.3", 1, 0.0, 2))
            .await;
        assert_eq!(again.unwrap(), InsertOutcome::Duplicate);
        assert!(next_event(&node, Duration::from_secs(5)).await.is_some());
        let late_dup = node
            .handle
            .instance_stored(stored("1.2.3", 1, 0.0, 3))
            .await;
        assert_eq!(late_dup.unwrap(), InsertOutcome::Duplicate);
        assert_eq!(row(&node, "1.2.3").state, SeriesState::Complete);
        assert_eq!(next_event(&node, Duration::from_millis(500)).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn late_new_instance_reopens_and_increments_generation() {
        let node = start(cfg(0.2, false), |_| {});
        send(&node, "1.2.3", 2, &[], 1).await;
        let first = next_event(&node, Duration::from_secs(5)).await.unwrap();
        assert_eq!((first.instances, first.generation), (2, 1));
        let out = node
            .handle
            .instance_stored(stored("1.2.3", 3, 7.5, 2))
            .await
            .unwrap();
        assert_eq!(out, InsertOutcome::Reopened);
        let r = row(&node, "1.2.3");
        assert_eq!((r.state.as_str(), r.generation), ("receiving", 2));
        let second = next_event(&node, Duration::from_secs(5)).await.unwrap();
        assert_eq!((second.instances, second.generation), (3, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_completes_a_whole_series_at_once_but_not_one_with_a_gap() {
        // A quiet period the test never reaches: only early completion can fire.
        let node = start(cfg(60.0, true), |_| {});
        send(&node, "1.2.3", 10, &[], 1).await;
        send(&node, "1.2.4", 10, &[5], 2).await;
        node.handle.association_released(1).await;
        let ev = node
            .queue
            .peek()
            .unwrap()
            .expect("completed before release returned")
            .1;
        assert_eq!(ev.series_instance_uid.as_str(), "1.2.3");
        assert_eq!(ev.reason, CompletionReason::AssociationReleased);
        assert_eq!(ev.instances, 10);
        assert_eq!(
            row(&node, "1.2.3").completion_reason.as_deref(),
            Some("association_released")
        );
        next_event(&node, Duration::from_secs(1)).await.unwrap();

        node.handle.association_released(2).await;
        assert_eq!(node.queue.peek().unwrap(), None);
        assert_eq!(row(&node, "1.2.4").state, SeriesState::Receiving);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_waits_for_other_associations_and_abort_never_completes() {
        let node = start(cfg(60.0, true), |_| {});
        // Two associations share one series; the first to release must not
        // complete it while the other may still be sending.
        send(&node, "1.2.5", 4, &[], 1).await;
        node.handle
            .instance_stored(stored("1.2.5", 5, 12.5, 2))
            .await
            .unwrap();
        node.handle.association_released(1).await;
        assert_eq!(node.queue.peek().unwrap(), None);
        node.handle.association_released(2).await;
        assert_eq!(node.queue.peek().unwrap().unwrap().1.instances, 5);

        send(&node, "1.2.6", 4, &[], 3).await;
        node.handle.association_aborted(3).await;
        node.handle.association_released(3).await; // forgotten already
        assert_eq!(row(&node, "1.2.6").state, SeriesState::Receiving);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recover_indexes_spool_files_and_times_them_out() {
        let node = start(cfg(0.3, true), |spool| {
            for i in 1..=3 {
                write_ct(spool, "1.2.7", i, f64::from(i));
            }
        });
        let r = row(&node, "1.2.7");
        assert_eq!((r.state.as_str(), r.instances), ("receiving", 3));
        let ev = next_event(&node, Duration::from_secs(5))
            .await
            .expect("completes after restart");
        assert_eq!((ev.reason, ev.instances), (CompletionReason::QuietTimer, 3));
        let sop = Uid::parse("1.2.7.2").unwrap();
        assert!(node.handle.is_duplicate(&sop).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_keeps_receiving_series_for_the_next_start() {
        let node = start(cfg(60.0, false), |_| {});
        let spool = node._dir.path().join("spool");
        for i in 1..=2 {
            // As ingest does: file first, then the tracker.
            let rel = write_ct(&spool, "1.2.8", i, f64::from(i));
            let mut inst = stored("1.2.8", i, f64::from(i), 1);
            assert_eq!(inst.rel_path, rel);
            inst.size_bytes = std::fs::metadata(spool.join(&rel)).unwrap().len();
            node.handle.instance_stored(inst).await.unwrap();
        }
        node.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), node.task)
            .await
            .expect("actor ends")
            .unwrap();
        let e = node
            .handle
            .instance_stored(stored("1.2.8", 3, 3.0, 1))
            .await
            .unwrap_err();
        assert!(matches!(e, SeriesError::TrackerStopped), "{e}");
        assert_eq!(node.queue.peek().unwrap(), None);

        // Restart on the same files: the series gets a fresh quiet period.
        let index = SeriesIndex::open(&node.index_path).unwrap();
        let queue = Arc::new(SqliteCompletionQueue::open(&node.index_path).unwrap());
        let (_handle, _task) = Tracker::spawn(
            cfg(0.2, false),
            index,
            spool,
            queue.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let woken = queue.notified();
                if let Some((_, ev)) = queue.peek().unwrap() {
                    return ev;
                }
                woken.await;
            }
        })
        .await
        .expect("restarted tracker completes the series");
        assert_eq!((ev.instances, ev.generation), (2, 1));
        assert_eq!(ev.reason, CompletionReason::QuietTimer);
    }

    /// A queue that refuses its first push, to exercise the retry path.
    #[derive(Default)]
    struct FlakyQueue {
        refused: std::sync::atomic::AtomicBool,
        events: std::sync::Mutex<Vec<SeriesCompleted>>,
        notify: tokio::sync::Notify,
    }

    impl CompletionQueue for FlakyQueue {
        fn push(&self, ev: &SeriesCompleted) -> Result<(), SeriesError> {
            if !self.refused.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Err(SeriesError::Queue {
                    message: "broker away".into(),
                    retryable: true,
                });
            }
            self.events.lock().unwrap().push(ev.clone());
            self.notify.notify_one();
            Ok(())
        }
        fn peek(&self) -> Result<Option<(i64, SeriesCompleted)>, SeriesError> {
            Ok(self.events.lock().unwrap().first().cloned().map(|e| (0, e)))
        }
        fn ack(&self, _id: i64) -> Result<(), SeriesError> {
            Ok(())
        }
        fn notified(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
            Box::pin(self.notify.notified())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_push_keeps_the_series_receiving_and_retries() {
        let dir = tempfile::tempdir().unwrap();
        let index_path = dir.path().join("index.sqlite");
        let queue = Arc::new(FlakyQueue::default());
        let (handle, _task) = Tracker::spawn(
            cfg(0.2, true),
            SeriesIndex::open(&index_path).unwrap(),
            dir.path().join("spool"),
            queue.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        for i in 1..=3 {
            handle
                .instance_stored(stored("1.2.9", i, f64::from(i) * 2.5, 1))
                .await
                .unwrap();
        }
        let t0 = Instant::now();
        handle.association_released(1).await; // whole, but the push fails
        assert!(queue.events.lock().unwrap().is_empty());
        let state = |p: &Path| {
            SeriesIndex::open_readonly(p)
                .unwrap()
                .list_series()
                .unwrap()[0]
                .clone()
        };
        assert_eq!(state(&index_path).state, SeriesState::Receiving);
        tokio::time::timeout(Duration::from_secs(5), async {
            while queue.events.lock().unwrap().is_empty() {
                queue.notified().await;
            }
        })
        .await
        .expect("retried after a quiet period");
        assert!(t0.elapsed() >= Duration::from_millis(200));
        let ev = queue.events.lock().unwrap()[0].clone();
        assert_eq!(
            (ev.reason, ev.generation, ev.instances),
            (CompletionReason::QuietTimer, 1, 3)
        );
        assert_eq!(settle(|| state(&index_path), SeriesState::Complete).await.state, SeriesState::Complete);
    }

    #[test]
    fn deadlines_stay_ordered_when_moved() {
        let mut d = Deadlines::default();
        let t = Instant::now();
        let (a, b) = (Uid::parse("1.1").unwrap(), Uid::parse("1.2").unwrap());
        d.set(a.clone(), t + Duration::from_secs(1));
        d.set(b.clone(), t + Duration::from_secs(2));
        d.set(a.clone(), t + Duration::from_secs(3));
        assert_eq!(d.earliest(), Some(t + Duration::from_secs(2)));
        assert_eq!(d.due(t + Duration::from_secs(2)), vec![b.clone()]);
        d.remove(&b);
        d.remove(&a);
        assert_eq!((d.earliest(), d.order.len()), (None, 0));
    }

    #[test]
    fn invalid_quiet_period_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.sqlite");
        let e = Tracker::spawn(
            cfg(-1.0, true),
            SeriesIndex::open(&p).unwrap(),
            dir.path().join("spool"),
            Arc::new(SqliteCompletionQueue::open(&p).unwrap()),
            CancellationToken::new(),
        )
        .expect_err("negative quiet period");
        assert!(matches!(e, SeriesError::InvalidConfig(_)), "{e}");
    }
}
