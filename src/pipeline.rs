//! Wires the stages together: the one place that creates channels, queues
//! and tasks, and owns shutdown.
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::inference::registry::Models;
use crate::job::worker::Worker;
use crate::config::Config;
use crate::job::{JobStore, SqliteJobStore};
use crate::routing::stage::{Router, SharedRoutes};
use crate::routing::RouteTable;
use crate::volume::VolumeOptions;
use crate::ingest::{Gate, Listener, Shared};
use crate::series::{CompletionQueue, SeriesIndex, SqliteCompletionQueue, Tracker};
use crate::spool::DiskSpool;

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

pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let (cfg, table) = checked(config_path)?;
    init_tracing(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt.block_on(run(cfg, table, config_path.to_owned()));
    // A job abandoned at its deadline may still occupy a blocking thread
    // (a hung read, a stuck model); dropping the runtime would wait for it
    // forever. Everything durable is already committed here.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    r
}

pub use crate::node::check::checked;

async fn run(cfg: Config, table: RouteTable, config_path: std::path::PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.node.data_dir.display()))?;
    let spool = Arc::new(DiskSpool::open(&cfg.node.data_dir).context("cannot open the spool")?);
    let shutdown = CancellationToken::new();
    // The tracker outlives ingest: it is cancelled only after every
    // association has finished, so no stored instance misses the index.
    let tracker_shutdown = CancellationToken::new();
    let index = SeriesIndex::open(&cfg.index_path()).context("cannot open the series index")?;
    let queue: Arc<dyn CompletionQueue> =
        Arc::new(SqliteCompletionQueue::open(&cfg.index_path()).context("cannot open the completion queue")?);
    let (tracker, tracker_task) = Tracker::spawn(
        cfg.series.clone(),
        index,
        cfg.spool_dir(),
        queue.clone(),
        tracker_shutdown.clone(),
    )
    .context("series tracker failed to start")?;
    let models = {
        let c = cfg.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || Models::load(&c))
                .await
                .context("model loading panicked")?
                .context("a fail_hard model could not be loaded")?,
        )
    };
    let jobs: Arc<dyn JobStore> = Arc::new(SqliteJobStore::open(&cfg.index_path()).context("cannot open the job store")?);
    let requeued = jobs.requeue_interrupted()?;
    if requeued > 0 {
        tracing::warn!(requeued, "jobs interrupted by the last stop run again");
    }
    let routes: SharedRoutes = Arc::new(std::sync::RwLock::new(Arc::new(table)));
    let work = Arc::new(tokio::sync::Notify::new());
    let router = Router {
        queue: queue.clone(),
        index_path: cfg.index_path(),
        spool_root: cfg.spool_dir(),
        routes: routes.clone(),
        jobs: jobs.clone(),
        models: models.clone(),
        work: work.clone(),
        retry: crate::routing::stage::RetryPolicy::default(),
    };
    let consumer = tokio::spawn(router.run(shutdown.clone()));
    let outbox_store: Arc<dyn crate::outbox::OutboxStore> = Arc::new(
        crate::outbox::SqliteOutboxStore::open(&cfg.node.data_dir.join("outbox.sqlite")).context("cannot open the outbox")?,
    );
    let mut destinations = std::collections::HashMap::new();
    for (k, d) in &cfg.destinations {
        let tls = match &d.tls {
            None => None,
            Some(t) => Some(crate::outbox::ClientTls {
                config: crate::tls::client_config(k, t).with_context(|| format!("destinations.{k}.tls"))?,
                server_name: t.server_name.clone().unwrap_or_else(|| d.host.clone()),
            }),
        };
        let stow = match &d.stow_rs {
            None => None,
            Some(s) => Some(crate::outbox::stow::StowTarget::build(k, s).map_err(|e| anyhow::anyhow!("{e}"))?),
        };
        destinations.insert(
            k.clone(),
            crate::outbox::Destination {
                ae_title: d.ae_title.clone(),
                host: d.host.clone(),
                port: d.port,
                tls,
                stow,
            },
        );
    }
    let retention_task = cfg.retention.enabled().then(|| {
        let r = crate::retention::Retention {
            config: cfg.retention.clone(),
            index_path: cfg.index_path(),
            spool_root: cfg.spool_dir(),
            jobs: jobs.clone(),
            outbox: outbox_store.clone(),
        };
        tokio::spawn(r.run(shutdown.clone()))
    });
    let (outbox, outbox_task) = crate::outbox::Outbox::spawn(
        outbox_store,
        destinations,
        cfg.outbox.clone(),
        crate::dicom::AeTitle::new(&cfg.node.ae_title),
        shutdown.clone(),
    )
    .context("cannot start the outbox")?;
    let outbox_for_http = outbox.clone();
    let worker = Worker {
        send_filter: cfg.destinations.iter().map(|(k, d)| (k.clone(), d.send.clone())).collect(),
        outbox: Some(outbox),
        ae_title: cfg.node.ae_title.clone(),
        jobs: jobs.clone(),
        index: std::sync::Mutex::new(SeriesIndex::open(&cfg.index_path()).context("cannot open the series index")?),
        spool_root: cfg.spool_dir(),
        results_dir: cfg.node.data_dir.join("results"),
        models: models.clone(),
        routes: routes.clone(),
        work: work.clone(),
        volume_opts: VolumeOptions {
            spacing_tolerance: cfg.series.spacing_tolerance,
            ..Default::default()
        },
        timeout: std::time::Duration::from_secs_f64(cfg.jobs.timeout_s),
    };
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let reloader = tokio::spawn(reload_on_sighup(config_path.clone(), routes.clone(), shutdown.clone()));
    if cfg.node.allowed_callers.is_empty() {
        tracing::warn!("node.allowed_callers is empty: any calling AE may store to this node");
    }
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One gate for both ports: the association limit is the node's, not a port's.
    let gate = Gate::new(cfg.node.max_associations, cfg.node.max_pending_connections);
    let http_task = if cfg.http.enabled {
        let state = Arc::new(crate::http::AppState {
            token: cfg.http.effective_token(),
            config_path: config_path.clone(),
            ae_title: cfg.node.ae_title.clone(),
            dicom_port: cfg.node.port,
            data_dir: cfg.node.data_dir.clone(),
            index_path: cfg.index_path(),
            min_free_disk_mb: cfg.node.min_free_disk_mb,
            jobs: jobs.clone(),
            outbox: outbox_for_http,
            routes: routes.clone(),
            models: models.clone(),
            model_config: cfg.models.clone(),
            work: work.clone(),
            ready: ready.clone(),
            gate: gate.clone(),
            started: std::time::SystemTime::now(),
        });
        let (addr, task) = crate::http::bind(cfg.http.listen, state, shutdown.clone()).await?;
        tracing::info!(%addr, token = cfg.http.effective_token().is_some(), "HTTP interface listening");
        Some(task)
    } else {
        None
    };
    let shared = Arc::new(Shared {
        node: cfg.node.clone(),
        spool,
        tracker,
    });
    let mut listeners = Vec::new();
    if cfg.node.tls.as_ref().is_none_or(|t| t.plain) {
        let addr = std::net::SocketAddr::new(cfg.node.bind, cfg.node.port);
        let l = Listener::bind_on(addr, None, shared.clone(), gate.clone(), shutdown.clone())
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(l);
    }
    if let Some(t) = &cfg.node.tls {
        let server = crate::tls::server_config(t).context("node.tls")?;
        let addr = std::net::SocketAddr::new(cfg.node.bind, t.port);
        let l = Listener::bind_on(addr, Some(server), shared.clone(), gate.clone(), shutdown.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} (node.tls.port)"))?;
        listeners.push(l);
    }
    let mut accept = Vec::new();
    for l in listeners {
        tracing::info!(
            addr = %l.local_addr()?,
            tls = l.is_tls(),
            ae_title = %cfg.node.ae_title,
            data_dir = %cfg.node.data_dir.display(),
            "listening"
        );
        accept.push(tokio::spawn(l.run()));
    }
    ready.store(true, std::sync::atomic::Ordering::Release);
    wait_for_signal().await;
    tracing::info!("shutting down: no new associations; open ones are aborted, unacknowledged data is dropped");
    shutdown.cancel();
    for a in accept {
        a.await.context("accept loop panicked")?;
    }
    let _ = reloader.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    worker_task.await.context("job worker panicked")?;
    if let Some(t) = retention_task {
        t.await.context("retention panicked")?;
    }
    outbox_task.await.context("outbox panicked")?;
    tracker_shutdown.cancel();
    tracker_task.await.context("series tracker panicked")?;
    consumer.await.context("completion consumer panicked")?;
    tracing::info!("stopped");
    Ok(())
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
async fn reload_on_sighup(config_path: std::path::PathBuf, routes: SharedRoutes, shutdown: CancellationToken) {
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
/// SIGHUP and the HTTP API. Returns the number of routes now in force, or
/// the diagnostics that refused the new config.
pub fn reload(config_path: &Path, routes: &SharedRoutes) -> Result<usize, Vec<String>> {
    let metrics = &crate::telemetry::METRICS;
    match crate::node::check::check_file(config_path) {
        Ok((_, table)) => {
            let n = table.routes.len();
            *routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
            metrics.count_reload("ok");
            tracing::info!(routes = n, config = %config_path.display(), "config reloaded");
            Ok(n)
        }
        Err(diags) => {
            for d in &diags {
                tracing::error!(diagnostic = %d, "config reload refused");
            }
            metrics.count_reload("refused");
            tracing::error!(problems = diags.len(), "config reload refused; the previous config stays in force");
            Err(diags.iter().map(|d| d.to_string()).collect())
        }
    }
}

pub fn print_series(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let path = cfg.index_path();
    if !path.exists() {
        anyhow::bail!("no series index at {} yet: has `serve` run with this config?", path.display());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    crate::series::print_series(&path, json, &mut out)?;
    Ok(())
}

/// `biomarker-node analyze`: the same routing and analysis as `serve`, on
/// files. Exits non-zero when there is nothing usable or a job failed.
pub fn analyze(config_path: &Path, out: &Path, paths: &[std::path::PathBuf]) -> anyhow::Result<()> {
    use crate::routing::{dry_run, SeriesFacts};
    let (cfg, table) = checked(config_path)?;
    {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let mut notes = Vec::new();
    let series = dry_run::collect(paths, &mut notes);
    for n in dry_run::summarize(&notes) {
        eprintln!("note: {n}");
    }
    if series.is_empty() {
        anyhow::bail!("no usable DICOM series under the given paths");
    }
    let models = Models::load(&cfg)?;
    let opts = crate::volume::VolumeOptions {
        spacing_tolerance: cfg.series.spacing_tolerance,
        ..Default::default()
    };
    let mut failures = 0usize;
    let mut jobs = 0usize;
    for s in &series {
        let facts = match SeriesFacts::load(&s.instances) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: series {}: {e}", s.uid);
                failures += 1;
                continue;
            }
        };
        let files: Vec<_> = s.instances.iter().map(|(p, _)| p.clone()).collect();
        for m in table.matches(&facts) {
            jobs += 1;
            match crate::job::run::run(&models, &s.uid, &(&m).into(), &files, &opts) {
                Ok(a) => {
                    let uid = crate::dicom::Uid::parse(&s.uid)?;
                    let dir = crate::dicom::uid_path(out, &[&uid], &[&m.route])?;
                    crate::report::write::write_outputs(&a.line, &a.report_source(), &dir)?;
                    let seed = format!("{}|{}|{}|analyze", s.uid, m.route, a.line.model_version);
                    let model = models.get(&m.model)?;
                    let device = crate::report::write::device_info(&cfg.node.ae_title);
                    crate::report::write::write_reports(&a.report_source(), model, &seed, time::OffsetDateTime::now_utc(), device, &dir)?;
                    println!("{}", serde_json::to_string(&a.line)?);
                }
                Err(e) => {
                    eprintln!("error: series {} route {}: {e}", s.uid, m.route);
                    failures += 1;
                }
            }
        }
    }
    if jobs == 0 {
        eprintln!("note: no route matched any of the {} series", series.len());
    }
    if failures > 0 {
        anyhow::bail!("{failures} job(s) failed");
    }
    Ok(())
}

pub fn print_jobs(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let path = cfg.index_path();
    if !path.exists() {
        anyhow::bail!("no job store at {} yet: has `serve` run with this config?", path.display());
    }
    let store = SqliteJobStore::open(&path)?;
    let stdout = std::io::stdout();
    crate::job::store::print_jobs(&store, json, &mut stdout.lock())?;
    Ok(())
}

pub fn print_outbox(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let stdout = std::io::stdout();
    crate::outbox::print_outbox(&cfg.node.data_dir.join("outbox.sqlite"), json, &mut stdout.lock())?;
    Ok(())
}
