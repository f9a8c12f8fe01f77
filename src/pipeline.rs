//! Wires the stages together: the one place that creates channels, queues
//! and tasks, and owns shutdown.
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::{Listener, Shared};
use crate::series::TrackerHandle;
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
    let cfg = Config::load(config_path)?;
    init_tracing(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.node.data_dir.display()))?;
    let spool = Arc::new(DiskSpool::open(&cfg.node.data_dir).context("cannot open the spool")?);
    let shutdown = CancellationToken::new();
    let tracker = TrackerHandle;
    if cfg.node.allowed_callers.is_empty() {
        tracing::warn!("node.allowed_callers is empty: any calling AE may store to this node");
    }
    let shared = Arc::new(Shared {
        node: cfg.node.clone(),
        spool,
        tracker,
    });
    let listener = Listener::bind(shared, shutdown.clone())
        .await
        .with_context(|| format!("cannot listen on {}:{}", cfg.node.bind, cfg.node.port))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        ae_title = %cfg.node.ae_title,
        data_dir = %cfg.node.data_dir.display(),
        "listening"
    );
    let accept = tokio::spawn(listener.run());
    wait_for_signal().await;
    tracing::info!("shutting down: no new associations; open ones are aborted, unacknowledged data is dropped");
    shutdown.cancel();
    accept.await.context("accept loop panicked")?;
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

pub fn print_series(_config: &Path, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("series listing lands with the tracker")
}
