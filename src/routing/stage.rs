//! The router stage in `serve`: completed series in, durable jobs out.
//!
//! Consumes the completion queue (at-least-once), evaluates the current
//! route table on the series' spooled files, and inserts one job per match.
//! The job store's uniqueness on (series, route, model version, generation)
//! makes a redelivered event harmless. The event is acknowledged only after
//! its jobs are durable, or after the series was set aside.
//!
//! **Failures never hold the queue.** A failure is either *permanent* (the
//! series itself: its first file is missing or is not readable DICOM, its
//! index rows are corrupt, routing panicked on it) or *transient* (the
//! environment: SQLite busy, an I/O error). A permanent failure sets the
//! series aside at once: state `unroutable`, the error in `state_reason`, a
//! metric and a log line, and the event is acknowledged so the next series
//! is routed. A transient failure is retried with exponential backoff
//! ([`RetryPolicy`]); when the attempts run out the series is set aside the
//! same way, the reason saying how many attempts were made. Only when the
//! index cannot even record `unroutable` does the head stay, retried at the
//! backoff cap: then no series could be routed anyway.
//! A re-opened series (a late instance) is routed again with its next
//! generation, whatever the previous one ended as.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{FactsError, RouteTable, SeriesFacts};
use crate::inference::registry::Models;
use crate::dicom::read::OpenError;
use crate::job::{JobKey, JobQueue, ResolvedRoute};
use crate::series::{CompletionQueue, SeriesCompleted, SeriesError, SeriesIndex, SeriesState};

/// The live route table; SIGHUP swaps it after a successful check.
pub type SharedRoutes = Arc<RwLock<Arc<RouteTable>>>;

/// Jobs stored before they carried their route are resolved by name in the
/// live table, as they were when they were made.
impl crate::job::RouteLookup for RwLock<Arc<RouteTable>> {
    fn resolve(&self, route: &str) -> Option<ResolvedRoute> {
        let table = self.read().unwrap_or_else(|p| p.into_inner()).clone();
        let r = table.routes.iter().find(|r| r.name == route)?;
        Some(ResolvedRoute {
            route: r.name.clone(),
            model: r.model.clone(),
            send_to: r.send_to.clone(),
            slices: r.slices.clone(),
            shadow: false,
        })
    }
}

/// How often, and how patiently, a transient routing failure is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, before the series is set aside.
    pub max_attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// 2+4+8+16 s: rides out a busy index or a short I/O hiccup, and holds
    /// the queue for half a minute at most.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(2),
            cap: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// Why routing one series failed, and whether the same attempt may succeed
/// later without anyone changing the series.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteFailure {
    pub reason: String,
    pub transient: bool,
}

impl RouteFailure {
    fn permanent(reason: impl Into<String>) -> Self {
        RouteFailure { reason: reason.into(), transient: false }
    }

    fn index(e: SeriesError) -> Self {
        RouteFailure { transient: e.is_retryable(), reason: e.to_string() }
    }

    /// A file that is gone stays gone, and one that does not parse will not
    /// parse next time; other I/O errors (EIO, EMFILE, a stale mount) may pass.
    fn facts(e: FactsError) -> Self {
        let transient = match &e {
            FactsError::Open(OpenError::Io { source, .. }) => source.kind() != std::io::ErrorKind::NotFound,
            _ => false,
        };
        RouteFailure { transient, reason: format!("cannot read the series' first instance: {e}") }
    }
}

pub struct Router {
    pub queue: Arc<dyn CompletionQueue>,
    /// The series index, opened once by the wiring: the router reads a
    /// series' instances and writes its state through it.
    pub index: std::sync::Mutex<SeriesIndex>,
    pub spool_root: PathBuf,
    pub routes: SharedRoutes,
    /// Where the jobs go; woken after new jobs are stored.
    pub jobs: JobQueue,
    pub models: Arc<Models>,
    pub retry: RetryPolicy,
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Router {
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        // (event id, failed attempts so far) of the head being retried.
        let mut failing: Option<(i64, u32)> = None;
        loop {
            match this.queue.peek() {
                Ok(Some((id, ev))) => {
                    let me = this.clone();
                    let ev2 = ev.clone();
                    let r = tokio::task::spawn_blocking(move || me.route_one(&ev2)).await;
                    let failure = match r {
                        Ok(Ok(())) => None,
                        Ok(Err(f)) => Some(f),
                        // Deterministic in the series' data as far as we can
                        // tell, so retrying would only panic again.
                        Err(e) => Some(RouteFailure::permanent(format!("routing panicked: {}", panic_text(e)))),
                    };
                    let Some(f) = failure else {
                        failing = None;
                        this.ack_and_wake(id);
                        continue;
                    };
                    let attempt = match failing {
                        Some((fid, n)) if fid == id => n + 1,
                        _ => 1,
                    };
                    let wait = if f.transient && attempt < this.retry.max_attempts {
                        tracing::warn!(
                            series_instance_uid = %ev.series_instance_uid,
                            generation = ev.generation,
                            attempt,
                            error = %f.reason,
                            "routing failed transiently; will retry"
                        );
                        failing = Some((id, attempt));
                        this.retry.backoff(attempt)
                    } else {
                        let reason = if f.transient {
                            format!("{} (gave up after {attempt} attempts)", f.reason)
                        } else {
                            f.reason
                        };
                        let me = this.clone();
                        let ev2 = ev.clone();
                        let r = tokio::task::spawn_blocking(move || me.set_aside(&ev2, &reason)).await;
                        match r {
                            Ok(Ok(())) => {
                                failing = None;
                                this.ack_and_wake(id);
                                continue;
                            }
                            Ok(Err(e)) => tracing::error!(
                                series_instance_uid = %ev.series_instance_uid,
                                error = %e,
                                "cannot record an unroutable series; the queue waits"
                            ),
                            Err(e) => tracing::error!(error = %panic_text(e), "recording an unroutable series panicked"),
                        }
                        failing = Some((id, attempt));
                        this.retry.cap
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the completion queue");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = this.queue.notified() => {}
            }
        }
    }

    fn ack_and_wake(&self, id: i64) {
        if let Err(e) = self.queue.ack(id) {
            tracing::error!(error = %e, "cannot acknowledge a completion event");
        }
        self.jobs.wake();
    }

    /// Blocking. Records `unroutable` with `reason`. A series re-opened
    /// meanwhile, or one no longer in the index, needs nothing recorded: its
    /// next completion is queued anew.
    fn set_aside(&self, ev: &SeriesCompleted, reason: &str) -> Result<(), SeriesError> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        match index.set_state_of_generation(&ev.series_instance_uid, ev.generation, SeriesState::Unroutable, Some(reason)) {
            Ok(()) => {
                crate::telemetry::SeriesUnroutable {
                    series_instance_uid: ev.series_instance_uid.as_str(),
                    generation: ev.generation,
                    reason,
                }
                .emit();
                Ok(())
            }
            Err(e @ (SeriesError::StateConflict { .. } | SeriesError::UnknownSeries(_))) => {
                tracing::info!(series_instance_uid = %ev.series_instance_uid, error = %e, "series not set aside");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the route's job reads every slice of the series: a card that
    /// takes a volume, or a 2-D card measured on each slice (`slices: all`).
    /// A model not loaded counts as one slice (its job fails fast anyway).
    fn reads_every_slice(&self, m: &super::RouteMatch) -> bool {
        m.slices == Some(crate::volume::SliceSelection::All)
            || self.models.get(&m.model).is_ok_and(|model| model.card.input.slices != "single")
    }

    /// Blocking: reads the index and first instance header.
    fn route_one(&self, ev: &SeriesCompleted) -> Result<(), RouteFailure> {
        let span = tracing::info_span!("series", uid = %ev.series_instance_uid, generation = ev.generation);
        let _g = span.enter();
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let instances = index
            .series_instances(&ev.series_instance_uid)
            .map_err(RouteFailure::index)?;
        let table = self.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
        let facts = SeriesFacts::load_spooled(&self.spool_root, &instances).map_err(RouteFailure::facts)?;
        let mut matches = table.matches(&facts);
        // Longest job first. The job queue is FIFO and the workers are few
        // (one per core): a series' whole-volume jobs (CAC on every slab, a
        // liver volume) take seconds, its one-slice jobs (PMA, SFA) a
        // fraction of that, so starting the long ones first ends the
        // series' last job sooner (on a 300-slice chest, CAC no longer waits
        // behind PMA and SFA). Stable: otherwise the route table's order.
        matches.sort_by_key(|m| std::cmp::Reverse(self.reads_every_slice(m)));
        let mut new = 0;
        for m in &matches {
            let key = JobKey {
                series_instance_uid: ev.series_instance_uid.to_string(),
                route: m.route.clone(),
                model: m.model.clone(),
                model_version: self.models.version(&m.model),
                generation: ev.generation,
            };
            // The job store is the environment, not the series: transient.
            // The job keeps the route as it is now: a reload before the job
            // runs must not change where its reports go.
            let inserted = self.jobs.enqueue(&key, &m.into()).map_err(|e| RouteFailure {
                reason: e.to_string(),
                transient: true,
            })?;
            if inserted.is_some() {
                new += 1;
            }
            // A candidate version runs in shadow beside the active one: its
            // own job (its version is in the key), which sends nothing.
            if let Some(candidate) = self.models.candidate(&m.model) {
                let key = JobKey { model_version: candidate.card.version.clone(), ..key };
                let route = ResolvedRoute { send_to: vec![], shadow: true, ..m.into() };
                let inserted = self.jobs.enqueue(&key, &route).map_err(|e| RouteFailure {
                    reason: e.to_string(),
                    transient: true,
                })?;
                if inserted.is_some() {
                    new += 1;
                }
            }
        }
        tracing::info!(routes = matches.len(), new_jobs = new, "series routed");
        set_state(&mut index, ev, if matches.is_empty() { SeriesState::NoRoute } else { SeriesState::Routed });
        Ok(())
    }
}

/// Routing never undoes a re-open: the index refuses to overwrite
/// `receiving` of a later generation, which is expected and only logged.
pub fn set_state(index: &mut SeriesIndex, ev: &SeriesCompleted, state: SeriesState) {
    if let Err(e) = index.set_state_of_generation(&ev.series_instance_uid, ev.generation, state, None) {
        tracing::debug!(error = %e, state = state.as_str(), "series state not updated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobStore;
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::SystemTime;

    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::meta::FileMetaTableBuilder;
    use dicom_object::InMemDicomObject;

    use crate::dicom::Uid;
    use crate::job::{Job, JobStoreError, SqliteJobStore};
    use crate::series::{CompletionReason, SqliteCompletionQueue, StoredInstance};

    const STUDY: &str = "1.2.826.0.1.7";

    /// A minimal CT header: enough for the index and for routing on modality.
    fn write_ct(path: &Path, series: &str, sop: &str) {
        let mut o = InMemDicomObject::new_empty();
        let mut put = |tag, vr, v: &str| o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        put(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2");
        put(tags::SOP_INSTANCE_UID, VR::UI, sop);
        put(tags::STUDY_INSTANCE_UID, VR::UI, STUDY);
        put(tags::SERIES_INSTANCE_UID, VR::UI, series);
        put(tags::MODALITY, VR::CS, "CT");
        put(tags::INSTANCE_NUMBER, VR::IS, "1");
        let file = o
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
                    .media_storage_sop_instance_uid(sop),
            )
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        file.write_to_file(path).unwrap();
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        index_path: PathBuf,
        spool: PathBuf,
        queue: Arc<SqliteCompletionQueue>,
        jobs: Arc<SqliteJobStore>,
        routes: SharedRoutes,
        models: Arc<Models>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture::with_routes("  - {name: ct, model: m, match: {derived: modality, equals: CT}}\n")
        }

        fn with_routes(routes: &str) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let index_path = dir.path().join("index.sqlite");
            let spool = dir.path().join("spool");
            std::fs::write(dir.path().join("m.yaml"), "name: x\n").unwrap();
            let cfg = dir.path().join("node.yaml");
            std::fs::write(
                &cfg,
                "node: {ae_title: T, data_dir: ./data}\n\
                 models: {m: {card: m.yaml}}\n\
                 routes:\n"
                    .to_owned()
                    + routes,
            )
            .unwrap();
            let (mut c, table) = crate::node::check::check_file(&cfg).unwrap_or_else(|d| panic!("{d:#?}"));
            // No model is loaded: jobs get version "unavailable", which is
            // all routing needs.
            c.models.clear();
            let models = Arc::new(Models::load(&c).unwrap());
            SeriesIndex::open(&index_path).unwrap();
            Fixture {
                queue: Arc::new(SqliteCompletionQueue::open(&index_path).unwrap()),
                jobs: Arc::new(SqliteJobStore::open(&dir.path().join("jobs.sqlite")).unwrap()),
                routes: Arc::new(RwLock::new(Arc::new(table))),
                models,
                index_path,
                spool,
                _dir: dir,
            }
        }

        /// Stores, indexes and completes a one-instance series; `poison`
        /// then overwrites its spooled file with bytes that are not DICOM.
        fn complete(&self, series: &str, poison: bool) {
            let sop = format!("{series}.1");
            let rel = PathBuf::from(format!("{STUDY}/{series}/{sop}.dcm"));
            let path = self.spool.join(&rel);
            write_ct(&path, series, &sop);
            let header = crate::spool::read_header(&path).unwrap();
            let mut ix = SeriesIndex::open(&self.index_path).unwrap();
            let inst = StoredInstance {
                header,
                rel_path: rel,
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                size_bytes: 1,
                association_id: 1,
                calling_ae: "T".into(),
            };
            ix.insert_instance(&inst, SystemTime::now()).unwrap();
            let ev = ix
                .pending_completion(&Uid::parse(series).unwrap(), CompletionReason::QuietTimer)
                .unwrap()
                .unwrap();
            self.queue.push(&ev).unwrap();
            ix.mark_complete(&ev, SystemTime::now()).unwrap();
            if poison {
                std::fs::write(&path, b"this is not a DICOM file").unwrap();
            }
        }

        fn router(&self, jobs: Arc<dyn JobStore>) -> Router {
            Router {
                queue: self.queue.clone(),
                index: std::sync::Mutex::new(SeriesIndex::open(&self.index_path).unwrap()),
                spool_root: self.spool.clone(),
                routes: self.routes.clone(),
                jobs: JobQueue::new(jobs),
                models: self.models.clone(),
                retry: RetryPolicy {
                    max_attempts: 3,
                    base: Duration::from_millis(10),
                    cap: Duration::from_millis(40),
                },
            }
        }

        /// Runs the router until the queue is empty (20 s safety limit).
        async fn drain(&self, router: Router) {
            let stop = CancellationToken::new();
            let task = tokio::spawn(router.run(stop.clone()));
            let limit = tokio::time::Instant::now() + Duration::from_secs(20);
            while self.queue.peek().unwrap().is_some() {
                assert!(tokio::time::Instant::now() < limit, "the router did not drain the queue");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.cancel();
            task.await.unwrap();
        }

        fn series(&self, uid: &str) -> crate::series::SeriesSummary {
            let ix = SeriesIndex::open_readonly(&self.index_path).unwrap();
            ix.list_series()
                .unwrap()
                .into_iter()
                .find(|s| s.series_instance_uid.as_str() == uid)
                .unwrap()
        }
    }

    /// The real store, failing `enqueue` transiently (SQLITE_BUSY) the first
    /// `fail_first` times.
    struct FlakyJobs {
        inner: Arc<SqliteJobStore>,
        fail_first: u32,
        calls: AtomicU32,
    }

    impl JobStore for FlakyJobs {
        fn enqueue(&self, key: &JobKey, route: &ResolvedRoute) -> Result<Option<i64>, JobStoreError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
                return Err(JobStoreError::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                    Some("database is locked".into()),
                )));
            }
            self.inner.enqueue(key, route)
        }
        fn claim(&self) -> Result<Option<Job>, JobStoreError> {
            self.inner.claim()
        }
        fn finish(&self, id: i64, o: crate::job::Outcome<'_>) -> Result<(), JobStoreError> {
            self.inner.finish(id, o)
        }
        fn finish_attempt(&self, id: i64, attempt: u32, o: crate::job::Outcome<'_>) -> Result<bool, JobStoreError> {
            self.inner.finish_attempt(id, attempt, o)
        }
        fn requeue_interrupted(&self) -> Result<usize, JobStoreError> {
            self.inner.requeue_interrupted()
        }
        fn list(&self) -> Result<Vec<Job>, JobStoreError> {
            self.inner.list()
        }
        fn for_series(&self, s: &str) -> Result<Vec<Job>, JobStoreError> {
            self.inner.for_series(s)
        }
        fn get(&self, id: i64) -> Result<Option<Job>, JobStoreError> {
            self.inner.get(id)
        }
        fn recent(&self, limit: usize) -> Result<Vec<Job>, JobStoreError> {
            self.inner.recent(limit)
        }
        fn count_by_state(&self) -> Result<Vec<(String, i64)>, JobStoreError> {
            self.inner.count_by_state()
        }
        fn retrigger(&self, id: i64) -> Result<bool, JobStoreError> {
            self.inner.retrigger(id)
        }
    }

    #[tokio::test]
    async fn a_poison_series_is_set_aside_and_the_next_one_is_routed() {
        let f = Fixture::new();
        f.complete("1.2.3.1", true);
        f.complete("1.2.3.2", false);
        let before = crate::telemetry::METRICS.series_unroutable.get();
        f.drain(f.router(f.jobs.clone())).await;
        let poison = f.series("1.2.3.1");
        assert_eq!(poison.state, SeriesState::Unroutable);
        let reason = poison.state_reason.unwrap();
        assert!(reason.contains("not a DICOM file"), "{reason}");
        let good = f.series("1.2.3.2");
        assert_eq!((good.state.as_str(), good.state_reason), ("routed", None));
        let jobs = f.jobs.list().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].key.series_instance_uid, "1.2.3.2");
        assert!(crate::telemetry::METRICS.series_unroutable.get() > before);
    }

    #[tokio::test]
    async fn a_series_jobs_that_read_every_slice_are_queued_first() {
        let f = Fixture::with_routes(
            "  - {name: one-slice, model: m, match: {derived: modality, equals: CT}}\n\
             \x20 - {name: every-slice, model: m, slices: {mode: all}, match: {derived: modality, equals: CT}}\n\
             \x20 - {name: another-slice, model: m, match: {derived: modality, equals: CT}}\n",
        );
        f.complete("1.2.3.1", false);
        f.drain(f.router(f.jobs.clone())).await;
        // The workers claim jobs in id order.
        let routes: Vec<String> = f.jobs.list().unwrap().into_iter().map(|j| j.key.route).collect();
        assert_eq!(routes, ["every-slice", "one-slice", "another-slice"]);
    }

    #[tokio::test]
    async fn a_missing_first_file_is_permanent() {
        let f = Fixture::new();
        f.complete("1.2.4.1", false);
        std::fs::remove_file(f.spool.join(format!("{STUDY}/1.2.4.1/1.2.4.1.1.dcm"))).unwrap();
        // One attempt only: a store that fails every call would show retries.
        let flaky = Arc::new(FlakyJobs { inner: f.jobs.clone(), fail_first: 0, calls: AtomicU32::new(0) });
        f.drain(f.router(flaky.clone())).await;
        let s = f.series("1.2.4.1");
        assert_eq!(s.state, SeriesState::Unroutable);
        assert!(!s.state_reason.unwrap().contains("attempts"));
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_then_routed() {
        let f = Fixture::new();
        f.complete("1.2.5.1", false);
        let flaky = Arc::new(FlakyJobs { inner: f.jobs.clone(), fail_first: 2, calls: AtomicU32::new(0) });
        f.drain(f.router(flaky.clone())).await;
        assert_eq!(f.series("1.2.5.1").state, SeriesState::Routed);
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
        assert_eq!(f.jobs.list().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_lasting_transient_failure_is_set_aside_after_its_attempts() {
        let f = Fixture::new();
        f.complete("1.2.6.1", false);
        f.complete("1.2.6.2", false);
        // Fails the first series' three attempts, then works for the next.
        let flaky = Arc::new(FlakyJobs { inner: f.jobs.clone(), fail_first: 3, calls: AtomicU32::new(0) });
        f.drain(f.router(flaky.clone())).await;
        let s = f.series("1.2.6.1");
        assert_eq!(s.state, SeriesState::Unroutable);
        let reason = s.state_reason.unwrap();
        assert!(reason.contains("database is locked") && reason.contains("after 3 attempts"), "{reason}");
        assert_eq!(f.series("1.2.6.2").state, SeriesState::Routed);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy { max_attempts: 9, base: Duration::from_secs(2), cap: Duration::from_secs(30) };
        let waits: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![2, 4, 8, 16, 30, 30]);
        assert_eq!(p.backoff(200), Duration::from_secs(30));
    }
}
