//! The inference stage in `serve`: claims jobs, runs them on the spooled
//! files, writes the reports under `results/`, queues them for the route's
//! destinations, and records the outcome.
//!
//! Input: pending jobs in the [`JobStore`], each with its resolved route;
//! the spooled files through the series index. Output: the job `done` with
//! its [`JobResult`], `failed` with its error, or `refused` with the
//! reason when the input guard (or the slice selection) refuses its input:
//! report files on disk and outbox rows only for `done`; the series state
//! `analyzed` (every job done or refused) or `failed` once every job of its
//! generation is finished.
//!
//! Invariants: see [`Worker`] and [`JobGuard`]: an abandoned attempt never
//! writes results or enqueues reports, and the store records only the
//! outcome of the attempt still running.
//!
//! Failure modes: a [`JobError`] fails the job with its text; a job store
//! error is logged and the job stays as it was (re-queued at the next start).

use std::path::PathBuf;
use std::sync::Arc;

use super::run::{load_volume, run_on_volume, JobError, JobResult, ReportRef};
use super::volumes::{VolumeCache, VolumeKey};
use super::{Job, JobState, Outcome, ResolvedRoute, RouteLookup};
use crate::inference::registry::Models;
use crate::report::write::{device_info, write_outputs, write_reports};
use crate::series::SeriesIndex;
use crate::volume::VolumeOptions;

/// Who decides a job's fate once it runs: its computation, by starting to
/// commit results, or the worker, by abandoning it at the deadline. Exactly
/// one of them wins, so an abandoned computation never writes or sends.
#[derive(Debug, Default)]
pub struct JobGuard(std::sync::atomic::AtomicU8);

impl JobGuard {
    const RUNNING: u8 = 0;
    const COMMITTING: u8 = 1;
    const ABANDONED: u8 = 2;

    fn swap_from_running(&self, to: u8) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        self.0.compare_exchange(Self::RUNNING, to, AcqRel, std::sync::atomic::Ordering::Acquire).is_ok()
    }

    /// The computation is about to write results; false when it was abandoned.
    pub fn begin_commit(&self) -> bool {
        self.swap_from_running(Self::COMMITTING)
    }

    /// The deadline passed; false when the computation is already committing
    /// (its remaining work is writing files and outbox rows, which is short).
    pub fn abandon(&self) -> bool {
        self.swap_from_running(Self::ABANDONED)
    }

    pub fn is_abandoned(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) == Self::ABANDONED
    }
}

/// The reason a job failed at its deadline.
pub fn deadline_reason(timeout: std::time::Duration) -> String {
    JobError::Deadline(timeout).to_string()
}

/// The inference stage in `serve`: claims jobs, runs them on the spooled
/// files, keeps the outputs under `results/`, and records the outcome.
///
/// A job that runs past `timeout` is failed with [`deadline_reason`] and
/// the next job is claimed. Its computation (a `spawn_blocking` thread,
/// which cannot be cancelled) is abandoned: [`JobGuard`] keeps it from
/// writing results or enqueueing reports, and the store only records the
/// outcome of the attempt that is still running. If it is stuck inside ONNX
/// Runtime it keeps holding that model's session, so jobs of the same model
/// may wait for it (and fail at their own deadline); other models run.
pub struct Worker {
    /// The jobs to run, and the wake-up to wait on when there are none.
    pub jobs: super::JobQueue,
    /// The series index, opened once by the wiring: the worker reads a
    /// job's instances and writes the series state through it.
    pub index: std::sync::Mutex<SeriesIndex>,
    pub spool_root: PathBuf,
    pub results_dir: PathBuf,
    pub models: Arc<Models>,
    /// The live route table, only for jobs stored before jobs carried their
    /// route ([`Job::resolved`] is `None`).
    pub routes: Arc<dyn RouteLookup>,
    pub volume_opts: VolumeOptions,
    /// Where finished reports go; `None` keeps them under results/ only.
    pub outbox: Option<crate::outbox::OutboxHandle>,
    /// This node's AE title, as the reports' device observer.
    pub ae_title: String,
    /// `jobs.timeout_s`.
    pub timeout: std::time::Duration,
    /// `destinations.<name>.send`: the output kinds each destination gets;
    /// a destination not in the map gets all of them.
    pub send_filter: std::collections::HashMap<String, Vec<crate::config::OutputKind>>,
    /// `jobs.workers` (resolved): how many jobs run at a time.
    pub parallel: usize,
    /// The decoded volumes the jobs of a series share (`jobs.volume_cache_mb`).
    pub volumes: VolumeCache,
}

impl Worker {
    /// Claims jobs while fewer than `parallel` run, each on its own blocking
    /// thread. At shutdown it stops claiming and returns once the jobs
    /// running have ended, as the one-job loop did.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let parallel = self.parallel.max(1);
        let this = Arc::new(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            // Register interest before claiming so a notify in between is not lost.
            let notified = this.jobs.notified();
            let job = match this.jobs.claim() {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim a job");
                    None
                }
            };
            let Some(job) = job else {
                drop(permit);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = notified => {}
                    // belt and braces: jobs re-queued by another process
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                }
                continue;
            };
            let me = this.clone();
            tokio::spawn(async move {
                me.handle(job).await;
                drop(permit);
            });
        }
        // The jobs still running end (or meet their deadline) first.
        let _ = slots.acquire_many(parallel as u32).await;
    }

    /// One claimed job: run it under its deadline and record its outcome.
    async fn handle(self: Arc<Self>, job: Job) {
        let me = self.clone();
        let id = job.id;
        let attempt = job.attempts;
        let series = job.key.series_instance_uid.clone();
        let (route, model) = (job.key.route.clone(), job.key.model.clone());
        crate::telemetry::JobStarted { job: id, series_instance_uid: &series, route: &route, model: &model, attempt }
            .emit();
        let guard = Arc::new(JobGuard::default());
        let g = guard.clone();
        let mut handle = tokio::task::spawn_blocking(move || {
            let result = me.process(&job, &g);
            release_freed_memory();
            result
        });
        let joined = |r: Result<Result<JobResult, JobError>, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err(JobError::Panicked(e.to_string())))
        };
        let outcome = match tokio::time::timeout(self.timeout, &mut handle).await {
            Ok(r) => joined(r),
            Err(_) if guard.abandon() => {
                crate::telemetry::JobDeadlineExceeded {
                    job: id,
                    series_instance_uid: &series,
                    route: &route,
                    timeout_s: self.timeout.as_secs_f64(),
                }
                .emit();
                // Only to say when the abandoned thread is gone.
                tokio::spawn(async move {
                    let late = handle.await;
                    tracing::info!(
                        job = id,
                        panicked = late.is_err(),
                        "abandoned job computation ended; its outcome is discarded"
                    );
                });
                Err(JobError::Deadline(self.timeout))
            }
            // Already writing its results: let it finish.
            Err(_) => joined(handle.await),
        };
        // The job's text is the error's, chain included as its Display
        // has it; its fault is logged for the operator.
        let stored = match &outcome {
            Ok(r) => serde_json::to_value(r)
                .map_err(super::JobStoreError::from)
                .and_then(|v| self.jobs.finish_attempt(id, attempt, Outcome::Done(&v))),
            Err(e) => {
                let reason = e.to_string();
                match e {
                    // Stored as `refused`: final, not retried, nothing
                    // was written or sent.
                    JobError::Refused { check, .. } => {
                        crate::telemetry::JobRefused { job: id, route: &route, model: &model, check, reason: &reason }
                            .emit()
                    }
                    _ => crate::telemetry::JobFailed {
                        job: id,
                        route: &route,
                        model: &model,
                        attempt,
                        fault: e.fault(),
                        reason: &reason,
                    }
                    .emit(),
                }
                self.jobs.finish_attempt(id, attempt, e.outcome(&reason))
            }
        };
        match stored {
            Ok(true) => {}
            Ok(false) => tracing::warn!(job = id, attempt, "job moved on meanwhile; this outcome is not recorded"),
            Err(e) => tracing::error!(job = id, error = %e, "cannot record a job outcome"),
        }
        self.update_series_state(&series);
    }

    fn process(&self, job: &Job, guard: &JobGuard) -> Result<JobResult, JobError> {
        let span = tracing::info_span!("job", id = job.id, series = %job.key.series_instance_uid, route = %job.key.route);
        let _g = span.enter();
        let uid = crate::dicom::Uid::parse(&job.key.series_instance_uid)?;
        let files: Vec<PathBuf> = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .series_instances(&uid)?
            .into_iter()
            .map(|(p, _)| self.spool_root.join(p))
            .collect();
        // The route as routing resolved it when it made the job. A job from
        // before jobs carried their route is looked up by name in the live
        // table, as it was then; a route gone from it delivers nowhere.
        let m = job.resolved.clone().unwrap_or_else(|| {
            self.routes.resolve(&job.key.route).unwrap_or_else(|| ResolvedRoute {
                route: job.key.route.clone(),
                model: job.key.model.clone(),
                send_to: vec![],
                slices: None,
                shadow: false,
            })
        });
        if files.is_empty() {
            return Err(JobError::NoInstances);
        }
        // The version the job was routed with, held for the whole job: a
        // promotion meanwhile does not change what this job runs or what its
        // SR names (the SR's algorithm version is this card's).
        let model = self.job_model(job, &m)?;
        let t0 = std::time::Instant::now();
        let key = VolumeKey { series: uid.as_str().to_owned(), generation: job.key.generation, files: files.len() };
        // Decoded once for the series' jobs and shared, not copied: a job
        // reads it, resamples from it, or copies just the slices it needs.
        let shared = self.volumes.get_or_load(&key, || load_volume(&files, &self.volume_opts))?;
        let a = run_on_volume(&model, uid.as_str(), &m, shared, t0)?;
        // The store is checked too: another process may have re-queued the
        // job, and then that attempt owns the results directory.
        let still_ours = matches!(
            self.jobs.get(job.id),
            Ok(Some(j)) if j.state == JobState::Running && j.attempts == job.attempts
        );
        if guard.is_abandoned() || !still_ours || !guard.begin_commit() {
            return Err(JobError::Abandoned);
        }
        let inference_finished_at = crate::store::rfc3339(std::time::SystemTime::now());
        let generation = format!("g{}", job.key.generation);
        // A shadow run's files go beside the active run's, never over them.
        let shadow = format!("shadow-{}", job.key.model_version);
        let tail: &[&str] = if m.shadow { &[&m.route, &generation, &shadow] } else { &[&m.route, &generation] };
        let dir = crate::dicom::uid_path(&self.results_dir, &[&uid], tail)?;
        let source = a.report_source();
        write_outputs(&a.line, &source, &dir)?;
        let seed = format!("{}|{}|{}|{}", uid, m.route, job.key.model_version, job.key.generation);
        // The job's persisted creation time, so a rerun makes identical objects.
        let created = time::OffsetDateTime::parse(&job.created_at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        let files = write_reports(&source, &model, &seed, created, device_info(&self.ae_title), &dir)?;
        // A shadow run is kept, never sent: not even to a destination its
        // route names (it has none; this is the second lock).
        if let Some(outbox) = self.outbox.as_ref().filter(|_| !m.shadow) {
            for dest in &m.send_to {
                let wanted = self.send_filter.get(dest);
                for f in files.iter().filter(|f| wanted.is_none_or(|k| k.contains(&f.kind))) {
                    outbox.enqueue(dest, &f.path, &f.sop_class_uid, &f.sop_instance_uid)?;
                }
            }
        }
        crate::telemetry::JobFinished {
            route: &m.route,
            model: &m.model,
            value: a.line.value,
            unit: &a.line.unit,
            ms: a.line.elapsed_ms,
            reports: files.len(),
        }
        .emit();
        Ok(JobResult {
            line: a.line,
            inference_finished_at,
            reports: files
                .iter()
                .map(|f| ReportRef { path: f.path.clone(), sop_instance_uid: f.sop_instance_uid.as_str().to_owned() })
                .collect(),
        })
    }

    /// The model version a job runs: the one in its key. A job of the
    /// active model whose version is gone (a configured card replaced while
    /// it waited) runs the active version, as before versions were kept; a
    /// shadow job needs its candidate.
    fn job_model(&self, job: &Job, m: &ResolvedRoute) -> Result<Arc<crate::inference::Model>, JobError> {
        match self.models.get_version(&m.model, &job.key.model_version) {
            Ok(model) => Ok(model),
            Err(e) if m.shadow => Err(e.into()),
            Err(e) => {
                tracing::warn!(job = job.id, error = %e, "the job's model version is not available; running the active one");
                Ok(self.models.get(&m.model)?)
            }
        }
    }

    fn update_series_state(&self, series: &str) {
        let Ok(jobs) = self.jobs.for_series(series) else { return };
        // Shadow runs are not the node's answer about the series.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.resolved.as_ref().is_some_and(|r| r.shadow)).collect();
        let Some(gen) = jobs.iter().map(|j| j.key.generation).max() else { return };
        let current: Vec<_> = jobs.iter().filter(|j| j.key.generation == gen).collect();
        if current.iter().any(|j| !j.state.is_finished()) {
            return;
        }
        // No job of the series is left to run: its volume is not needed.
        self.volumes.forget(series);
        // A refused job is an answer about the series, not a failure of the node.
        let state = if current.iter().all(|j| matches!(j.state, JobState::Done | JobState::Refused)) {
            crate::series::SeriesState::Analyzed
        } else {
            crate::series::SeriesState::Failed
        };
        if let Ok(uid) = crate::dicom::Uid::parse(series) {
            let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = index.set_state(&uid, state) {
                tracing::debug!(error = %e, state = state.as_str(), "series state not updated");
            }
        }
    }
}

/// Hands the memory a job freed back to the system. Blocks below the mmap
/// threshold (`main`: 4 MiB, so a slice's scratch arrays are reused rather
/// than mapped and unmapped each time) stay in the thread's malloc arena when
/// freed; a job frees hundreds of MB of them (a 300-slice volume is 300
/// one-MiB slices while it is assembled), and without this each worker
/// thread's arena would keep its peak (issue 15: a queue of 20 chests went
/// from 1.7 to 3.0 GiB RSS). `malloc_trim` walks every arena.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_and_commit_exclude_each_other() {
        // The deadline wins: the computation may no longer commit.
        let g = JobGuard::default();
        assert!(!g.is_abandoned());
        assert!(g.abandon());
        assert!(g.is_abandoned());
        assert!(!g.begin_commit());
        // The commit wins: the worker waits instead of failing the job.
        let g = JobGuard::default();
        assert!(g.begin_commit());
        assert!(!g.abandon());
        assert!(!g.is_abandoned());
        assert_eq!(deadline_reason(std::time::Duration::from_secs(600)), "deadline of 600 s exceeded");
        assert_eq!(deadline_reason(std::time::Duration::from_millis(2500)), "deadline of 2.5 s exceeded");
    }
}

#[cfg(test)]
mod reload_tests {
    use std::sync::RwLock;
    use std::time::{Duration, SystemTime};

    use super::*;
    use std::path::Path;

    use crate::job::SqliteJobStore;
    use crate::outbox::{OutboxStore, SqliteOutboxStore};
    use crate::routing::stage::{RetryPolicy, Router, SharedRoutes};
    use crate::series::{CompletionQueue, CompletionReason, SeriesIndex, SqliteCompletionQueue, StoredInstance};

    fn config(dir: &Path, card: &Path, lib: &Path, route: &str, send_to: &str) -> String {
        format!(
            "node: {{ae_title: NODE, data_dir: {data}}}\n\
             onnxruntime: {{library: {lib}}}\n\
             models: {{cac: {{card: {card}}}}}\n\
             destinations: {{pacs: {{ae_title: PACS, host: 127.0.0.1, port: 1}}}}\n\
             routes:\n  - {{name: {route}, model: cac, send_to: {send_to}, match: {{derived: modality, equals: CT}}}}\n",
            data = dir.join("data").display(),
            card = card.display(),
            lib = lib.display(),
        )
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(tokio::time::Instant::now() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reload bug (issue 13): a job routed to `pacs`, whose route a
    /// SIGHUP renames (and points nowhere) before the worker runs it, still
    /// sends its reports to `pacs`, because the job carries the route it was
    /// created with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_between_routing_and_running_keeps_the_jobs_destinations() {
        let Some(card) = crate::test_data::model_card("cac") else { return };
        let Some(realct) = crate::test_data::realct() else { return };
        if !crate::inference::init_for_tests() {
            return;
        }
        let lib = crate::inference::test_library().unwrap();
        let d = tempfile::tempdir().unwrap();
        // The input is one slice of a contrast abdomen, which the shipped CAC
        // card's input guard refuses; this test is about where reports go, so
        // it uses the card as a site would write it without the guard.
        let card = {
            let mut y: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
            let m = y.as_mapping_mut().unwrap();
            m.remove("validated_input");
            m.remove("validated_output");
            let onnx = card.parent().unwrap().join(m["onnx"].as_str().unwrap());
            m.insert("onnx".into(), onnx.display().to_string().into());
            let site = d.path().join("cac-site.yaml");
            std::fs::write(&site, serde_yaml::to_string(&y).unwrap()).unwrap();
            site
        };
        let cfg_path = d.path().join("node.yaml");
        std::fs::write(&cfg_path, config(d.path(), &card, &lib, "cac", "[pacs]")).unwrap();
        let (cfg, table) = crate::node::check::check_file(&cfg_path).unwrap_or_else(|e| panic!("{e:#?}"));
        let index_path = d.path().join("index.sqlite");
        let spool = d.path().join("spool");

        // One spooled, indexed, completed CT slice.
        let rel = PathBuf::from("1/2/ct.dcm");
        std::fs::create_dir_all(spool.join("1/2")).unwrap();
        std::fs::copy(realct.join("abdomen-ge-3slice/01.dcm"), spool.join(&rel)).unwrap();
        let header = crate::spool::read_header(&spool.join(&rel)).unwrap();
        let series = header.series_instance_uid.clone();
        let mut ix = SeriesIndex::open(&index_path).unwrap();
        let inst = StoredInstance {
            header,
            rel_path: rel,
            transfer_syntax: "1.2.840.10008.1.2".into(),
            size_bytes: 1,
            association_id: 1,
            calling_ae: "T".into(),
        };
        ix.insert_instance(&inst, SystemTime::now()).unwrap();
        let ev = ix.pending_completion(&series, CompletionReason::QuietTimer).unwrap().unwrap();
        let queue = Arc::new(SqliteCompletionQueue::open(&index_path).unwrap());
        queue.push(&ev).unwrap();
        ix.mark_complete(&ev, SystemTime::now()).unwrap();

        let models = Arc::new(Models::load(&cfg).unwrap());
        let jobs = crate::job::JobQueue::new(Arc::new(SqliteJobStore::open(&index_path).unwrap()));
        let routes: SharedRoutes = Arc::new(RwLock::new(Arc::new(table)));
        let stop = tokio_util::sync::CancellationToken::new();

        // Routing makes the job (route `cac`, to `pacs`)...
        let router = Router {
            queue: queue.clone(),
            index: std::sync::Mutex::new(SeriesIndex::open(&index_path).unwrap()),
            spool_root: spool.clone(),
            routes: routes.clone(),
            jobs: jobs.clone(),
            models: models.clone(),
            retry: RetryPolicy::default(),
        };
        let router_task = tokio::spawn(router.run(stop.clone()));
        wait_until("the router to drain the queue", || queue.peek().unwrap().is_none()).await;
        assert_eq!(jobs.list().unwrap().len(), 1);

        // ...then a SIGHUP renames the route and sends it nowhere.
        std::fs::write(&cfg_path, config(d.path(), &card, &lib, "renamed", "[]")).unwrap();
        assert_eq!(crate::node::reload(&cfg_path, &routes), Ok(1));
        assert_eq!(routes.read().unwrap().routes[0].name, "renamed");

        // Only now does the worker run the job.
        let outbox_store: Arc<dyn OutboxStore> =
            Arc::new(SqliteOutboxStore::open(&d.path().join("outbox.sqlite")).unwrap());
        let dest = crate::outbox::Destination {
            ae_title: "PACS".into(),
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            stow: None,
        };
        let (outbox, outbox_task) = crate::outbox::Outbox::spawn(
            outbox_store.clone(),
            [("pacs".to_owned(), dest)].into(),
            cfg.outbox.clone(),
            crate::dicom::AeTitle::new("NODE"),
            Arc::new(crate::outbox::claims::NoClaims),
            stop.clone(),
        )
        .unwrap();
        let worker = Worker {
            jobs: jobs.clone(),
            index: std::sync::Mutex::new(SeriesIndex::open(&index_path).unwrap()),
            spool_root: spool.clone(),
            results_dir: d.path().join("results"),
            models: models.clone(),
            routes: routes.clone(),
            volume_opts: VolumeOptions::default(),
            outbox: Some(outbox),
            ae_title: "NODE".into(),
            timeout: Duration::from_secs(120),
            send_filter: Default::default(),
            parallel: 2,
            volumes: VolumeCache::new(64 << 20),
        };
        let worker_task = tokio::spawn(worker.run(stop.clone()));
        jobs.wake();
        wait_until("the job to finish", || {
            jobs.list().unwrap().iter().all(|j| j.state.is_finished())
        })
        .await;
        stop.cancel();
        for t in [router_task, worker_task, outbox_task] {
            t.await.unwrap();
        }

        let job = &jobs.list().unwrap()[0];
        assert_eq!((job.state.as_str(), job.key.route.as_str()), ("done", "cac"), "{:?}", job.error);
        let items = outbox_store.list().unwrap();
        let reports = job.result.as_ref().unwrap()["reports"].as_array().unwrap().len();
        assert!(reports > 0);
        assert_eq!(items.len(), reports, "every report is queued for the route's destination");
        assert!(items.iter().all(|i| i.destination == "pacs"), "{items:?}");
    }
}
