//! The one place that wires the stages: `biomarker-node serve`.
//!
//! Every stage is built here from its config section, and every channel,
//! cancellation token and `Notify` is created and owned here; stages never
//! create their own. Nothing below this module imports it (tests use
//! [`check`]).
//!
//! Input: a config file that passed [`check::check_file`]. Output: a running
//! node until SIGTERM or SIGINT; SIGHUP re-reads the config and swaps the
//! routes in ([`reload`]).
//!
//! Start-up order follows the data flow backwards from what must be durable:
//! the spool and the series index first (so recovery sees every stored
//! file), then the stages that read them, and the DICOM listeners last, so
//! nothing is accepted before it can be tracked. Readiness is set only once
//! the listeners are bound.
//!
//! Shutdown ([`Running::stop`]): the listeners stop first, then every stage
//! on the node's token; the series tracker has its own token and stops only
//! after every association has finished, so no stored instance misses the
//! index.
//!
//! Failures: any stage that cannot start fails `serve` with its context
//! (`cannot open the spool`, `cannot listen on ...`); a stage task that
//! panics fails it at shutdown.

pub mod check;
mod cluster;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// The job stage's types. The only place `node` names them.
use crate::inference::registry::Models;
use crate::job::worker::Worker;
use crate::job::{JobQueue, JobStore, SqliteJobStore};

use crate::config::Config;
use crate::ingest::{Gate, Listener, Shared};
use crate::outbox::{Destination, OutboxHandle, OutboxStore};
use crate::routing::stage::{Router, SharedRoutes};
use crate::routing::RouteTable;
use crate::series::{CompletionQueue, SeriesIndex, SqliteCompletionQueue};
use crate::spool::DiskSpool;
use crate::volume::VolumeOptions;

pub fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `biomarker-node serve`: check the config, start the runtime, run the node
/// until a stop signal. `role` other than embedded needs the `cluster:`
/// section ([`cluster`]).
pub fn serve(config_path: &Path, role: crate::config::Role) -> anyhow::Result<()> {
    let (cfg, table) = check::checked(config_path)?;
    cluster::check_role(&cfg, role)?;
    init_tracing(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = match role {
        crate::config::Role::Receiver => rt.block_on(cluster::run(cfg, crate::config::Role::Receiver)),
        role => rt.block_on(run(cfg, table, config_path.to_owned(), role)),
    };
    // A job abandoned at its deadline may still occupy a blocking thread
    // (a hung read, a stuck model); dropping the runtime would wait for it
    // forever. Everything durable is already committed here.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    r
}

/// What the stage builders share: the config and the handles more than one
/// stage holds, each created once here.
struct Ctx {
    cfg: Config,
    config_path: PathBuf,
    /// The node's stop: cancelled on SIGTERM/SIGINT; every stage but the
    /// series tracker stops on it.
    shutdown: CancellationToken,
    /// Completed series, from the tracker to the router (durable).
    queue: Arc<dyn CompletionQueue>,
    /// Jobs: from the router to the worker; the HTTP API retries them.
    jobs: JobQueue,
    models: Arc<Models>,
    /// The routes in force; a reload swaps the table inside.
    routes: SharedRoutes,
}

/// The embedded node; as `--role worker` (or `all`), the stages from
/// routing on, fed by the cluster's jobs stream instead of a local tracker
/// ([`cluster::start_worker`]), and for `all` the listeners on the
/// cluster's spool.
async fn run(cfg: Config, table: RouteTable, config_path: PathBuf, role: crate::config::Role) -> anyhow::Result<()> {
    use crate::config::Role;
    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.node.data_dir.display()))?;
    let spool = Arc::new(DiskSpool::open(&cfg.node.data_dir).context("cannot open the spool")?);
    let (index, queue) = open_series_stores(&cfg)?;
    // The tracker outlives ingest: it is cancelled only after every
    // association has finished, so no stored instance misses the index.
    // A cluster worker has none: the cluster's series state completes
    // series, and the worker's index is a cache of what it ran.
    let tracker_shutdown = CancellationToken::new();
    let tracker = if role == Role::Embedded {
        Some(
            crate::series::Tracker::spawn(
                cfg.series.clone(),
                index,
                cfg.spool_dir(),
                queue.clone(),
                tracker_shutdown.clone(),
            )
            .context("series tracker failed to start")?,
        )
    } else {
        drop(index);
        None
    };
    let models = load_models(&cfg).await?;
    let jobs = open_job_store(&cfg)?;
    let ctx = Ctx {
        routes: Arc::new(std::sync::RwLock::new(Arc::new(table))),
        shutdown: CancellationToken::new(),
        cfg,
        config_path,
        queue,
        jobs,
        models,
    };
    let side = match role {
        Role::Embedded => None,
        _ => Some(
            cluster::start_worker(&ctx.cfg, role, spool.clone(), ctx.queue.clone(), ctx.jobs.clone(), ctx.shutdown.clone())
                .await?,
        ),
    };
    tokio::spawn(watch_models(ctx.models.clone(), ctx.shutdown.clone()));
    let router = tokio::spawn(build_router(&ctx)?.run(ctx.shutdown.clone()));
    let outbox_store: Arc<dyn OutboxStore> = Arc::new(
        crate::outbox::SqliteOutboxStore::open(&ctx.cfg.node.data_dir.join("outbox.sqlite"))
            .context("cannot open the outbox")?,
    );
    let destinations = build_destinations(&ctx.cfg)?;
    let retention = build_retention(&ctx, outbox_store.clone()).map(|r| tokio::spawn(r.run(ctx.shutdown.clone())));
    let (outbox, outbox_task) = crate::outbox::Outbox::spawn(
        outbox_store,
        destinations,
        ctx.cfg.outbox.clone(),
        crate::dicom::AeTitle::new(&ctx.cfg.node.ae_title),
        // Across a cluster's workers one delivery per SOP Instance UID and
        // destination; on its own, the node's outbox is that already.
        side.as_ref().map_or_else(|| Arc::new(crate::outbox::claims::NoClaims) as _, |s| s.claims.clone()),
        ctx.shutdown.clone(),
    )
    .context("cannot start the outbox")?;
    let worker = tokio::spawn(build_worker(&ctx, outbox.clone())?.run(ctx.shutdown.clone()));
    let reloader = tokio::spawn(reload_on_sighup(ctx.config_path.clone(), ctx.routes.clone(), ctx.shutdown.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    // One gate for both ports: the association limit is the node's, not a port's.
    let gate = Gate::new(ctx.cfg.node.max_associations, ctx.cfg.node.max_pending_connections);
    let cluster_view = cluster_view(&ctx.cfg, role, side.as_ref());
    let http = start_http(&ctx, outbox, ready.clone(), gate.clone(), cluster_view).await?;
    let ingest = match (&tracker, &side) {
        (Some((handle, _)), _) => Some(Arc::new(Shared {
                node: ctx.cfg.node.clone(),
                spool,
                tracker: crate::series::SeriesSink::Local(handle.clone()),
            })),
        (None, Some(side)) => side.ingest.clone(),
        (None, None) => None,
    };
    let accept = match ingest {
        Some(ingest) => start_listeners(&ctx.cfg.node, &ctx.shutdown, ingest, gate).await?,
        None => Vec::new(),
    };
    ready.store(true, Ordering::Release);
    wait_for_signal().await;
    tracing::info!("shutting down: no new associations; open ones are aborted, unacknowledged data is dropped");
    ctx.shutdown.cancel();
    Running {
        accept,
        cluster: side.map(|s| s.tasks).unwrap_or_default(),
        reloader,
        http,
        worker,
        retention,
        outbox: outbox_task,
        tracker_shutdown,
        tracker: tracker.map(|(_, t)| t),
        router,
    }
    .stop()
    .await?;
    tracing::info!("stopped");
    Ok(())
}

/// The series index (owned by the tracker) and the completion queue (the
/// tracker's hand-off to the router), both in the index file.
fn open_series_stores(cfg: &Config) -> anyhow::Result<(SeriesIndex, Arc<dyn CompletionQueue>)> {
    let index = SeriesIndex::open(&cfg.index_path()).context("cannot open the series index")?;
    let queue: Arc<dyn CompletionQueue> =
        Arc::new(SqliteCompletionQueue::open(&cfg.index_path()).context("cannot open the completion queue")?);
    Ok((index, queue))
}

/// Every configured model, loaded off the runtime (ONNX sessions take
/// seconds). A `fail_hard` model that cannot load stops start-up.
async fn load_models(cfg: &Config) -> anyhow::Result<Arc<Models>> {
    let c = cfg.clone();
    let store = crate::inference::versions::ModelStore::open(&cfg.node.data_dir).context("cannot open the model store")?;
    let models = tokio::task::spawn_blocking(move || Models::load_with(&c, Some(Arc::new(store))))
        .await
        .context("model loading panicked")?
        .context("a fail_hard model could not be loaded")?;
    Ok(Arc::new(models))
}

/// How often the node looks for a promotion, rollback or new candidate.
const MODEL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Applies the model store's roles to the running node when they change.
///
/// The `models` commands write the store and the node notices, instead of
/// the commands calling the node's API: they then work whether or not a
/// node runs, need no HTTP token (writing the data dir is the authority,
/// as for every other file of the node), and the store stays the one truth
/// that a restart also reads. The cost is one tiny SQLite read a second
/// (`meta.revision`); a change takes effect within [`MODEL_POLL`] plus the
/// load of the new version. The API's promote applies its change at once.
async fn watch_models(models: Arc<Models>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MODEL_POLL) => {}
        }
        let m = models.clone();
        match tokio::task::spawn_blocking(move || m.refresh()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the model store; the running versions stay"),
            Err(e) => tracing::error!(error = %e, "model store refresh panicked"),
        }
    }
}

/// The job store, with the jobs a stop interrupted set to run again.
fn open_job_store(cfg: &Config) -> anyhow::Result<JobQueue> {
    let jobs: Arc<dyn JobStore> = Arc::new(SqliteJobStore::open(&cfg.index_path()).context("cannot open the job store")?);
    let requeued = jobs.requeue_interrupted()?;
    if requeued > 0 {
        tracing::warn!(requeued, "jobs interrupted by the last stop run again");
    }
    Ok(JobQueue::new(jobs))
}

/// Routing: completed series → jobs.
fn build_router(ctx: &Ctx) -> anyhow::Result<Router> {
    Ok(Router {
        queue: ctx.queue.clone(),
        index: std::sync::Mutex::new(SeriesIndex::open(&ctx.cfg.index_path()).context("cannot open the series index")?),
        spool_root: ctx.cfg.spool_dir(),
        routes: ctx.routes.clone(),
        jobs: ctx.jobs.clone(),
        models: ctx.models.clone(),
        retry: crate::routing::stage::RetryPolicy::default(),
    })
}

/// The job worker: jobs → results and reports → the outbox.
/// How jobs assemble volumes under this config; `analyze` uses the same, so
/// that it measures what the node would.
pub(crate) fn volume_options(cfg: &Config) -> VolumeOptions {
    VolumeOptions {
        spacing_tolerance: cfg.series.spacing_tolerance,
        max_voxels: cfg.jobs.max_volume_voxels(),
        ..Default::default()
    }
}

fn build_worker(ctx: &Ctx, outbox: OutboxHandle) -> anyhow::Result<Worker> {
    let cfg = &ctx.cfg;
    Ok(Worker {
        send_filter: cfg.destinations.iter().map(|(k, d)| (k.clone(), d.send.clone())).collect(),
        outbox: Some(outbox),
        ae_title: cfg.node.ae_title.clone(),
        jobs: ctx.jobs.clone(),
        index: std::sync::Mutex::new(SeriesIndex::open(&cfg.index_path()).context("cannot open the series index")?),
        spool_root: cfg.spool_dir(),
        results_dir: cfg.node.data_dir.join("results"),
        models: ctx.models.clone(),
        routes: ctx.routes.clone(),
        volume_opts: volume_options(cfg),
        timeout: std::time::Duration::from_secs_f64(cfg.jobs.timeout_s),
        parallel: cfg.jobs.effective_workers(),
        volumes: crate::job::volumes::VolumeCache::new(cfg.jobs.volume_cache_mb << 20),
    })
}

/// `destinations`: where the outbox delivers, with TLS and STOW-RS material
/// read (already checked by [`check::check_file`]).
fn build_destinations(cfg: &Config) -> anyhow::Result<HashMap<String, Destination>> {
    let mut destinations = HashMap::new();
    for (k, d) in &cfg.destinations {
        let dest = Destination::build(k, d).map_err(|e| anyhow::anyhow!("{e}"))?;
        destinations.insert(k.clone(), dest);
    }
    Ok(destinations)
}

/// `retention`, when enabled.
fn build_retention(ctx: &Ctx, outbox: Arc<dyn OutboxStore>) -> Option<crate::retention::Retention> {
    ctx.cfg.retention.enabled().then(|| crate::retention::Retention {
        config: ctx.cfg.retention.clone(),
        index_path: ctx.cfg.index_path(),
        spool_root: ctx.cfg.spool_dir(),
        jobs: ctx.jobs.store.clone(),
        outbox,
    })
}

/// The cluster-wide counts for the HTTP API of a worker or `all`
/// (`/api/cluster`), on its own NATS connection; `None` on an embedded node.
#[cfg(feature = "cluster")]
fn cluster_view(
    cfg: &Config,
    role: crate::config::Role,
    side: Option<&cluster::WorkerSide>,
) -> Option<crate::http::cluster::ClusterView> {
    let (c, side) = (cfg.cluster.as_ref()?, side?);
    Some(crate::http::cluster::ClusterView::on(side.js.clone(), c, role.as_str(), side.id.clone()))
}

#[cfg(not(feature = "cluster"))]
fn cluster_view(
    _cfg: &Config,
    _role: crate::config::Role,
    _side: Option<&cluster::WorkerSide>,
) -> Option<crate::http::cluster::ClusterView> {
    None
}

/// `http`, when enabled: bound now, so a port clash fails start-up.
async fn start_http(
    ctx: &Ctx,
    outbox: OutboxHandle,
    ready: Arc<AtomicBool>,
    gate: Arc<Gate>,
    cluster: Option<crate::http::cluster::ClusterView>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let cfg = &ctx.cfg;
    if !cfg.http.enabled {
        return Ok(None);
    }
    let reload: crate::http::Reload = {
        let (config_path, routes) = (ctx.config_path.clone(), ctx.routes.clone());
        Box::new(move || reload(&config_path, &routes))
    };
    let state = Arc::new(crate::http::AppState {
        token: cfg.http.effective_token(),
        reload,
        node: crate::http::NodeInfo {
            ae_title: cfg.node.ae_title.clone(),
            dicom_port: cfg.node.port,
            data_dir: cfg.node.data_dir.clone(),
            index_path: cfg.index_path(),
            spool_root: cfg.spool_dir(),
            min_free_disk_mb: cfg.node.min_free_disk_mb,
            started: std::time::SystemTime::now(),
        },
        jobs: ctx.jobs.clone(),
        outbox,
        routes: ctx.routes.clone(),
        models: ctx.models.clone(),
        model_config: cfg.models.clone(),
        ready,
        gate,
        cluster,
    });
    let (addr, task) = crate::http::bind(cfg.http.listen, state, ctx.shutdown.clone()).await?;
    tracing::info!(%addr, token = cfg.http.effective_token().is_some(), "HTTP interface listening");
    Ok(Some(task))
}

/// Ingest: the plain DICOM port (unless TLS only) and the TLS port, both
/// bound before any accepts, then their accept loops.
async fn start_listeners(
    node: &crate::config::NodeConfig,
    shutdown: &CancellationToken,
    ingest: Arc<Shared>,
    gate: Arc<Gate>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    if node.allowed_callers.is_empty() {
        tracing::warn!("node.allowed_callers is empty: any calling AE may store to this node");
    }
    let mut listeners = Vec::new();
    if node.tls.as_ref().is_none_or(|t| t.plain) {
        let addr = SocketAddr::new(node.bind, node.port);
        let l = Listener::bind_on(addr, None, ingest.clone(), gate.clone(), shutdown.clone())
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(l);
    }
    if let Some(t) = &node.tls {
        let server = crate::tls::server_config(t).context("node.tls")?;
        let addr = SocketAddr::new(node.bind, t.port);
        let l = Listener::bind_on(addr, Some(server), ingest.clone(), gate.clone(), shutdown.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} (node.tls.port)"))?;
        listeners.push(l);
    }
    let mut accept = Vec::new();
    for l in listeners {
        tracing::info!(
            addr = %l.local_addr()?,
            tls = l.is_tls(),
            ae_title = %node.ae_title,
            data_dir = %node.data_dir.display(),
            "listening"
        );
        accept.push(tokio::spawn(l.run()));
    }
    Ok(accept)
}

/// The tasks of a running node.
struct Running {
    accept: Vec<JoinHandle<()>>,
    /// `--role worker|all`: the jobs consumer and the series sweeper.
    cluster: Vec<JoinHandle<()>>,
    reloader: JoinHandle<()>,
    http: Option<JoinHandle<()>>,
    worker: JoinHandle<()>,
    retention: Option<JoinHandle<()>>,
    outbox: JoinHandle<()>,
    tracker_shutdown: CancellationToken,
    /// The embedded role's series tracker.
    tracker: Option<JoinHandle<()>>,
    router: JoinHandle<()>,
}

impl Running {
    /// Wait for every task after the node's token was cancelled: the
    /// listeners first, the series tracker last (its own token is cancelled
    /// only once no association can store any more).
    async fn stop(self) -> anyhow::Result<()> {
        for a in self.accept {
            a.await.context("accept loop panicked")?;
        }
        for t in self.cluster {
            t.await.context("cluster task panicked")?;
        }
        let _ = self.reloader.await;
        if let Some(t) = self.http {
            let _ = t.await;
        }
        self.worker.await.context("job worker panicked")?;
        if let Some(t) = self.retention {
            t.await.context("retention panicked")?;
        }
        self.outbox.await.context("outbox panicked")?;
        self.tracker_shutdown.cancel();
        if let Some(t) = self.tracker {
            t.await.context("series tracker panicked")?;
        }
        self.router.await.context("completion consumer panicked")?;
        Ok(())
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail at start-up");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// SIGHUP: re-read and check the config; a bad one is refused with its
/// diagnostics and the running routes stay. Models, ports and storage are
/// fixed for the life of the process (changing them needs a restart).
async fn reload_on_sighup(config_path: PathBuf, routes: SharedRoutes, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install a SIGHUP handler; config reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => {}
        }
        // The outcome is logged and counted inside.
        let _ = reload(&config_path, &routes);
    }
}

/// Re-read and check the config; on success swap the routes in. Shared by
/// SIGHUP and the HTTP API (handed to it as [`crate::http::Reload`]).
/// Returns the number of routes now in force, or the diagnostics that
/// refused the new config.
pub fn reload(config_path: &Path, routes: &SharedRoutes) -> Result<usize, Vec<String>> {
    match check::check_file(config_path) {
        Ok((_, table)) => {
            let n = table.routes.len();
            *routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
            crate::telemetry::ConfigReloaded { routes: n, config: config_path }.emit();
            Ok(n)
        }
        Err(diags) => {
            for d in &diags {
                tracing::error!(diagnostic = %d, "config reload refused");
            }
            crate::telemetry::ConfigReloadRefused { problems: diags.len() }.emit();
            Err(diags.iter().map(|d| d.to_string()).collect())
        }
    }
}
