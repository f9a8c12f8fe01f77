//! Cluster roles of `serve` (`--role receiver|worker|all`) on NATS
//! JetStream (docs/SCALE-OUT.md); the embedded role is the rest of [`super`].
//!
//! - **receiver**: the DICOM listeners on a [`crate::spool::nats::NatsSpool`]
//!   and the cluster's series state ([`ClusterSeries`]): an instance is
//!   acknowledged only once JetStream acknowledged its object, its metadata
//!   message and its series record. No local state that matters.
//! - **worker**: the embedded stages from routing on (router, job workers,
//!   outbox, HTTP) on the worker's own SQLite and disk, fed by the jobs
//!   work-queue stream ([`start_worker`]): each message is one completed
//!   series generation; the worker materialises the series from the object
//!   store into its local spool, completes it in its local index with the
//!   cluster's generation, lets the router and job workers run it, and acks
//!   only when every job of that generation has ended (reports durable,
//!   outbox rows committed). No local series tracker: the cluster's series
//!   state decides completion.
//! - **all**: both in one process.
//!
//! Every cluster process runs the quiet-timer sweep of the series state.
//!
//! Failures: NATS unreachable at start fails `serve`; later, a C-STORE whose
//! upload or series update is not acknowledged fails (out of resources, the
//! peer retries), and a job that cannot be materialised or run is handed
//! back (nak) with its error recorded; after `cluster.max_deliver`
//! deliveries it goes to the dead letters with that error.

use crate::config::{Config, Role};

/// Refuses a role this config or build cannot run, before anything starts.
pub(super) fn check_role(cfg: &Config, role: Role) -> anyhow::Result<()> {
    if role == Role::Embedded {
        return Ok(());
    }
    if cfg.cluster.is_none() {
        anyhow::bail!(
            "--role {} needs a `cluster:` section in the config (docs/SCALE-OUT.md)",
            role.as_str()
        );
    }
    if !cfg!(feature = "cluster") {
        anyhow::bail!("--role {}: this build has no cluster mode (cargo feature `cluster`)", role.as_str());
    }
    Ok(())
}

/// What a worker (or `all`) process adds to the embedded stages.
pub(super) struct WorkerSide {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// `all`: ingest on the cluster's spool and series state.
    pub ingest: Option<std::sync::Arc<crate::ingest::Shared>>,
    /// For the HTTP API's cluster view.
    #[cfg(feature = "cluster")]
    pub js: async_nats::jetstream::Context,
    /// This process in the cluster's records.
    #[cfg(feature = "cluster")]
    pub id: String,
    /// The outbox's claims in the cluster's KV: one delivery per SOP
    /// Instance UID and destination across workers.
    pub claims: std::sync::Arc<dyn crate::outbox::claims::Claims>,
}

#[cfg(not(feature = "cluster"))]
pub(super) async fn run(_cfg: Config, role: Role) -> anyhow::Result<()> {
    anyhow::bail!("--role {}: this build has no cluster mode (cargo feature `cluster`)", role.as_str())
}

#[cfg(not(feature = "cluster"))]
pub(super) async fn start_worker(
    _cfg: &Config,
    role: Role,
    _spool: std::sync::Arc<crate::spool::DiskSpool>,
    _queue: std::sync::Arc<dyn crate::series::CompletionQueue>,
    _jobs: crate::job::JobQueue,
    _shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<WorkerSide> {
    anyhow::bail!("--role {}: this build has no cluster mode (cargo feature `cluster`)", role.as_str())
}

#[cfg(feature = "cluster")]
pub(super) use imp::{run, start_worker};

#[cfg(feature = "cluster")]
mod imp {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use anyhow::Context;
    use async_nats::jetstream::{self, consumer::pull, AckKind};
    use tokio_util::sync::CancellationToken;

    use super::WorkerSide;
    use crate::config::{ClusterConfig, Config, Role};
    use crate::ingest::{Gate, Shared};
    use crate::job::{JobQueue, JobState};
    use crate::series::nats::{ClusterSeries, JOBS_CONSUMER};
    use crate::series::{CompletionQueue, SeriesCompleted, SeriesIndex, SeriesSink, SeriesState, StoredInstance};
    use crate::spool::nats::{NatsSpool, Shared as Storage};
    use crate::spool::DiskSpool;

    /// Objects copied from the object store at once while materialising.
    const MATERIALISE_IN_FLIGHT: usize = 8;

    struct Parts {
        storage: Storage,
        series: Arc<ClusterSeries>,
    }

    async fn connect(cfg: &Config) -> anyhow::Result<Parts> {
        let c = cfg.cluster.as_ref().expect("check_role: the section is there");
        let storage = Storage::connect(c)
            .await
            .with_context(|| format!("cannot reach NATS JetStream at {}", c.nats_url))?;
        // `<host>-<pid>`: in the series' open associations, the outbox
        // claims and `/api/cluster`, one name for this process.
        let series = ClusterSeries::open(storage.js.clone(), c, &cfg.series, crate::http::cluster::process_id())
            .await
            .context("cannot open the cluster's series state")?;
        Ok(Parts { storage, series: Arc::new(series) })
    }

    fn ingest(cfg: &Config, parts: &Parts) -> anyhow::Result<Arc<Shared>> {
        let spool =
            Arc::new(NatsSpool::open(&cfg.node.data_dir, parts.storage.clone()).context("cannot open the cluster spool")?);
        Ok(Arc::new(Shared {
            node: cfg.node.clone(),
            spool,
            tracker: SeriesSink::Cluster(parts.series.clone()),
        }))
    }

    /// `--role receiver`.
    pub(in crate::node) async fn run(cfg: Config, role: Role) -> anyhow::Result<()> {
        debug_assert_eq!(role, Role::Receiver, "serve sends the other roles to the embedded wiring");
        let c = cfg.cluster.as_ref().expect("check_role: the section is there");
        std::fs::create_dir_all(&cfg.node.data_dir)
            .with_context(|| format!("cannot create data_dir {}", cfg.node.data_dir.display()))?;
        let parts = connect(&cfg).await?;
        let shared = ingest(&cfg, &parts)?;
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(parts.series.clone().run_sweeper(shutdown.clone()));
        let gate = Gate::new(cfg.node.max_associations, cfg.node.max_pending_connections);
        // The receiver's HTTP server: health, metrics and the cluster-wide view.
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let http = if cfg.http.enabled {
            let view = crate::http::cluster::ClusterView::on(
                parts.storage.js.clone(),
                c,
                role.as_str(),
                parts.series.id().to_owned(),
            );
            let state =
                crate::http::cluster::ReceiverState { token: cfg.http.effective_token(), view, ready: ready.clone() };
            let (addr, task) = crate::http::cluster::serve_receiver(cfg.http.listen, state, shutdown.clone()).await?;
            tracing::info!(%addr, "HTTP interface listening (receiver: health, metrics, cluster view)");
            Some(task)
        } else {
            None
        };
        let accept = crate::node::start_listeners(&cfg.node, &shutdown, shared, gate).await?;
        ready.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(
            role = role.as_str(),
            id = parts.series.id(),
            nats = %c.nats_url,
            bucket = %c.instances_bucket,
            stream = %c.instances_stream,
            "cluster receiver ready"
        );
        crate::node::wait_for_signal().await;
        tracing::info!("shutting down: no new associations; open ones are aborted, unacknowledged data is dropped");
        shutdown.cancel();
        for a in accept {
            a.await.context("accept loop panicked")?;
        }
        if let Some(t) = http {
            let _ = t.await;
        }
        sweeper.await.context("series sweeper panicked")?;
        tracing::info!("stopped");
        Ok(())
    }

    /// `--role worker|all`: the jobs consumer and the sweeper; for `all`,
    /// also the ingest side the caller listens with.
    pub(in crate::node) async fn start_worker(
        cfg: &Config,
        role: Role,
        spool: Arc<DiskSpool>,
        queue: Arc<dyn CompletionQueue>,
        jobs: JobQueue,
        shutdown: CancellationToken,
    ) -> anyhow::Result<WorkerSide> {
        let c = cfg.cluster.as_ref().expect("check_role: the section is there").clone();
        let parts = connect(cfg).await?;
        let ingest = if role == Role::All { Some(ingest(cfg, &parts)?) } else { None };
        let stream = parts
            .storage
            .js
            .get_stream(&c.jobs_stream)
            .await
            .context("cannot open the jobs stream")?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                JOBS_CONSUMER,
                pull::Config {
                    durable_name: Some(JOBS_CONSUMER.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs_f64(c.ack_wait_s),
                    // Unlimited: the worker dead-letters a job itself after
                    // `max_deliver` deliveries, with its reason; a consumer
                    // limit would only stop delivering it, silently.
                    max_deliver: -1,
                    filter_subject: format!("{}.series", c.jobs_subject),
                    ..Default::default()
                },
            )
            .await
            .context("cannot create the jobs consumer")?;
        let index = SeriesIndex::open(&cfg.index_path()).context("cannot open the series index")?;
        let w = Jobs {
            c: c.clone(),
            storage: parts.storage.clone(),
            series: parts.series.clone(),
            spool,
            index: std::sync::Mutex::new(index),
            queue,
            jobs,
            max_dataset_bytes: cfg.node.max_dataset_mb.saturating_mul(1024 * 1024),
        };
        tracing::info!(
            role = role.as_str(),
            id = parts.series.id(),
            nats = %c.nats_url,
            stream = %c.jobs_stream,
            consumer = JOBS_CONSUMER,
            "cluster worker takes jobs"
        );
        let sweeper = tokio::spawn(parts.series.clone().run_sweeper(shutdown.clone()));
        let consume = tokio::spawn(Arc::new(w).consume(consumer, shutdown));
        let claims = crate::outbox::nats::KvClaims::open(parts.storage.js.clone(), &c, parts.series.id().to_owned())
            .await
            .context("cannot open the outbox claims")?;
        Ok(WorkerSide {
            tasks: vec![sweeper, consume],
            ingest,
            js: parts.storage.js.clone(),
            id: parts.series.id().to_owned(),
            claims: Arc::new(claims),
        })
    }

    /// A dead letter: the job, how often it was delivered, and why it ended there.
    #[derive(serde::Serialize)]
    struct DeadLetter<'a> {
        job: &'a SeriesCompleted,
        deliveries: i64,
        reason: String,
        worker: &'a str,
    }

    struct Jobs {
        c: ClusterConfig,
        storage: Storage,
        series: Arc<ClusterSeries>,
        spool: Arc<DiskSpool>,
        /// The worker's local index: a cache of the series it ran, which
        /// routing and the job read as in the embedded node.
        index: std::sync::Mutex<SeriesIndex>,
        queue: Arc<dyn CompletionQueue>,
        jobs: JobQueue,
        max_dataset_bytes: u64,
    }

    impl Jobs {
        /// One job at a time per worker process: a prefetched job would sit
        /// unstarted while its `ack_wait` runs, and no other worker could
        /// take it. The local job workers still run a series' routes in
        /// parallel where `jobs` allows.
        async fn consume(self: Arc<Self>, consumer: jetstream::consumer::Consumer<pull::Config>, shutdown: CancellationToken) {
            use futures_util::StreamExt;
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                let batch = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    b = consumer.fetch().max_messages(1).expires(Duration::from_secs(5)).messages() => b,
                };
                let mut batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot fetch from the jobs stream; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(m) = batch.next().await {
                    match m {
                        Ok(m) => self.clone().one(m, &shutdown).await,
                        Err(e) => tracing::warn!(error = %e, "jobs stream"),
                    }
                }
            }
        }

        async fn one(self: Arc<Self>, msg: jetstream::Message, shutdown: &CancellationToken) {
            let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
            let ev: SeriesCompleted = match serde_json::from_slice(&msg.payload) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::error!(subject = %msg.subject, error = %e, "not a job message; terminated");
                    let _ = msg.ack_with(AckKind::Term).await;
                    return;
                }
            };
            let span = tracing::info_span!("series", uid = %ev.series_instance_uid, generation = ev.generation);
            if delivered > self.c.max_deliver {
                self.dead_letter(&msg, &ev, delivered).await;
                return;
            }
            tracing::info!(parent: &span, delivered, instances = ev.instances, "job taken");
            // Progress keeps the job ours while it runs longer than ack_wait.
            let every = Duration::from_secs_f64(self.c.ack_wait_s / 3.0);
            let ran = {
                let run = self.run(&ev, shutdown);
                tokio::pin!(run);
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        r = &mut run => break r,
                        _ = tick.tick() => {
                            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                                tracing::warn!(parent: &span, error = %e, "cannot report progress");
                            }
                        }
                    }
                }
            };
            match ran {
                Ok(true) => match msg.double_ack().await {
                    Ok(()) => tracing::info!(parent: &span, "job done and acked"),
                    Err(e) => tracing::warn!(parent: &span, error = %e, "ack not confirmed; the job may run again (its reports are the same SOP Instances)"),
                },
                Ok(false) => {
                    // Shutting down: hand it back now rather than after ack_wait.
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
                Err(e) => {
                    tracing::error!(parent: &span, delivered, error = %e, "job failed; handed back");
                    if let Err(e2) = self.series.record_error(&ev.series_instance_uid, ev.generation, &e).await {
                        tracing::warn!(parent: &span, error = %e2, "cannot record the job's error");
                    }
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
                }
            }
        }

        async fn dead_letter(&self, msg: &jetstream::Message, ev: &SeriesCompleted, delivered: i64) {
            let last = self.series.get(&ev.series_instance_uid).await.ok().flatten().and_then(|r| r.error);
            let reason = match last {
                Some(e) => format!("delivered {} times without finishing; last error: {e}", delivered - 1),
                None => format!(
                    "delivered {} times without finishing: the workers that took it died or did not report within ack_wait",
                    delivered - 1
                ),
            };
            let letter = DeadLetter { job: ev, deliveries: delivered - 1, reason: reason.clone(), worker: self.series.id() };
            let body = serde_json::to_vec(&letter).expect("plain data serialises");
            let sent = async {
                self.storage
                    .js
                    .publish(format!("{}.series", self.c.dead_subject), body.into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match sent {
                Ok(_) => {
                    tracing::error!(
                        series = %ev.series_instance_uid,
                        generation = ev.generation,
                        %reason,
                        "job dead-lettered"
                    );
                    let _ = msg.ack_with(AckKind::Term).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot dead-letter a job; it comes again");
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                }
            }
        }

        /// Materialise, complete locally with the cluster's generation, and
        /// wait until routing ran and every job of the generation ended.
        /// `Ok(false)`: interrupted by shutdown.
        async fn run(&self, ev: &SeriesCompleted, shutdown: &CancellationToken) -> Result<bool, String> {
            use futures_util::StreamExt;
            let series = &ev.series_instance_uid;
            let metas = self
                .storage
                .series_instances(ev.study_instance_uid.as_str(), series.as_str())
                .await
                .map_err(|e| e.to_string())?;
            if metas.is_empty() {
                return Err("no instance messages for this series on the instances stream".into());
            }
            // Several objects in flight: each copy ends in an fsync, and the
            // object store answers faster than one disk flush at a time.
            let mut todo = Vec::new();
            for meta in &metas {
                if !self.lock().contains_instance(&meta.header.sop_instance_uid).map_err(|e| e.to_string())? {
                    todo.push(meta.clone());
                }
            }
            let fetched = todo.len();
            let mut copies = futures_util::stream::iter(todo)
                .map(|meta| {
                    let (storage, spool, max) = (self.storage.clone(), self.spool.clone(), self.max_dataset_bytes);
                    async move {
                        let stored = storage.materialize(&meta, &spool, max).await;
                        (meta, stored)
                    }
                })
                .buffer_unordered(MATERIALISE_IN_FLIGHT);
            while let Some((meta, stored)) = copies.next().await {
                if shutdown.is_cancelled() {
                    return Ok(false);
                }
                let stored = stored.map_err(|e| format!("instance {}: {e}", meta.header.sop_instance_uid))?;
                let inst = StoredInstance {
                    header: stored.header,
                    rel_path: stored.rel_path,
                    transfer_syntax: meta.transfer_syntax.clone(),
                    size_bytes: stored.size_bytes,
                    association_id: 0,
                    calling_ae: String::new(),
                };
                self.lock().insert_instance(&inst, SystemTime::now()).map_err(|e| e.to_string())?;
            }
            tracing::info!(instances = metas.len(), fetched, "series materialised");
            {
                let mut index = self.lock();
                if let Some(local) = index.pending_completion(series, ev.reason).map_err(|e| e.to_string())? {
                    index.mark_complete(&local, SystemTime::now()).map_err(|e| e.to_string())?;
                }
            }
            // The cluster's generation, not the local index's: job keys, and
            // so report UIDs, are then the same on whichever worker runs it.
            let ev = SeriesCompleted { instances: metas.len() as u32, ..ev.clone() };
            self.queue.push(&ev).map_err(|e| e.to_string())?;
            loop {
                if self.finished(&ev)? {
                    return Ok(true);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, SeriesIndex> {
            self.index.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Routed (or set aside), and every job of this generation ended.
        fn finished(&self, ev: &SeriesCompleted) -> Result<bool, String> {
            let state = self.lock().state_of(&ev.series_instance_uid).map_err(|e| e.to_string())?;
            // Past routing: receiving and complete are before it.
            if matches!(state, None | Some(SeriesState::Receiving | SeriesState::Complete)) {
                return Ok(false);
            }
            let jobs = self.jobs.store.for_series(ev.series_instance_uid.as_str()).map_err(|e| e.to_string())?;
            Ok(jobs
                .iter()
                .filter(|j| j.key.generation == ev.generation)
                .all(|j| matches!(j.state, JobState::Done | JobState::Failed | JobState::Refused)))
        }
    }
}
