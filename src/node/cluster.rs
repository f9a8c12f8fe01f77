//! Cluster roles of `serve` (`--role receiver|worker|all`) on NATS
//! JetStream; the embedded role is the rest of [`super`].
//!
//! Input: a checked config with a `cluster:` section and the role.
//! Output: a running receiver until SIGTERM/SIGINT: the DICOM listeners on a
//! [`crate::spool::nats::NatsSpool`], so an instance is acknowledged only
//! once JetStream acknowledged its object and its metadata message.
//!
//! The receiver keeps a local series tracker (its own SQLite index under
//! `data_dir`): ingest's duplicate check and association bookkeeping need
//! one. It is this receiver's view only.
//!
//! `--role worker` is the embedded node without DICOM listeners, fed by
//! [`start_feed`]: each instance message of the stream is materialised
//! into the worker's own spool (same layout, fsync'd) and indexed by its
//! tracker, then acked; routing, jobs and outbox run as embedded. One
//! worker per cluster in this version (series state is the worker's
//! SQLite, not yet the shared KV: docs/SCALE-OUT.md, "Status"). Instances
//! from the stream have no association (id 0), so their series complete by
//! `series.quiet_seconds`, not early.
//!
//! Failures: NATS unreachable at start fails `serve`; later, an upload that
//! is not acknowledged fails that C-STORE (out of resources, the peer
//! retries) and the receiver keeps running.

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
    if role == Role::All {
        anyhow::bail!(
            "--role {}: not built yet; run `receiver` and `worker` processes (docs/SCALE-OUT.md, Status)",
            role.as_str()
        );
    }
    Ok(())
}

#[cfg(not(feature = "cluster"))]
pub(super) async fn run(_cfg: Config, role: Role) -> anyhow::Result<()> {
    anyhow::bail!("--role {}: this build has no cluster mode (cargo feature `cluster`)", role.as_str())
}

#[cfg(feature = "cluster")]
pub(super) async fn run(cfg: Config, role: Role) -> anyhow::Result<()> {
    use std::sync::Arc;

    use anyhow::Context;
    use tokio_util::sync::CancellationToken;

    use crate::ingest::{Gate, Shared};
    use crate::spool::nats::{NatsSpool, Shared as Storage};

    debug_assert_eq!(role, Role::Receiver, "check_role lets only the receiver through");
    let c = cfg.cluster.as_ref().expect("check_role: the section is there");
    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.node.data_dir.display()))?;
    let storage = Storage::connect(c)
        .await
        .with_context(|| format!("cannot reach NATS JetStream at {}", c.nats_url))?;
    let js = storage.js.clone();
    let spool = Arc::new(NatsSpool::open(&cfg.node.data_dir, storage).context("cannot open the cluster spool")?);
    let (index, queue) = super::open_series_stores(&cfg)?;
    let tracker_shutdown = CancellationToken::new();
    let (tracker, tracker_task) = crate::series::Tracker::spawn(
        cfg.series.clone(),
        index,
        cfg.spool_dir(),
        queue,
        tracker_shutdown.clone(),
    )
    .context("series tracker failed to start")?;
    if cfg.node.allowed_callers.is_empty() {
        tracing::warn!("node.allowed_callers is empty: any calling AE may store to this node");
    }
    let shutdown = CancellationToken::new();
    let gate = Gate::new(cfg.node.max_associations, cfg.node.max_pending_connections);
    let ingest = Arc::new(Shared {
        node: cfg.node.clone(),
        spool,
        tracker,
    });
    // The receiver's HTTP server: health, metrics and the cluster-wide view.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = match cfg.http.enabled {
        true => {
            let view = crate::http::cluster::ClusterView::on(js, c, role.as_str(), crate::http::cluster::process_id());
            let state = crate::http::cluster::ReceiverState { token: cfg.http.effective_token(), view, ready: ready.clone() };
            let (addr, task) = crate::http::cluster::serve_receiver(cfg.http.listen, state, shutdown.clone()).await?;
            tracing::info!(%addr, "HTTP interface listening (receiver: health, metrics, cluster view)");
            Some(task)
        }
        false => None,
    };
    let accept = super::start_listeners(&cfg.node, &shutdown, ingest, gate).await?;
    ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        role = role.as_str(),
        nats = %c.nats_url,
        bucket = %c.instances_bucket,
        stream = %c.instances_stream,
        "cluster receiver ready"
    );
    super::wait_for_signal().await;
    tracing::info!("shutting down: no new associations; open ones are aborted, unacknowledged data is dropped");
    shutdown.cancel();
    for a in accept {
        a.await.context("accept loop panicked")?;
    }
    if let Some(t) = http {
        let _ = t.await;
    }
    tracker_shutdown.cancel();
    tracker_task.await.context("series tracker panicked")?;
    tracing::info!("stopped");
    Ok(())
}

/// The durable consumer every worker of a cluster shares.
#[cfg(feature = "cluster")]
const FEED_CONSUMER: &str = "bn-worker-series";

#[cfg(not(feature = "cluster"))]
pub(super) async fn start_feed(
    _cfg: &Config,
    _spool: std::sync::Arc<crate::spool::DiskSpool>,
    _tracker: crate::series::TrackerHandle,
    _shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    anyhow::bail!("--role worker: this build has no cluster mode (cargo feature `cluster`)")
}

/// `--role worker`: instance messages → the local spool → the tracker → ack.
/// A message is acked only after the file is fsync'd and the index
/// committed (or the instance was already indexed); anything else leaves it
/// to be delivered again.
#[cfg(feature = "cluster")]
pub(super) async fn start_feed(
    cfg: &Config,
    spool: std::sync::Arc<crate::spool::DiskSpool>,
    tracker: crate::series::TrackerHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;

    use crate::series::StoredInstance;
    use crate::spool::nats::Shared as Storage;

    let c = cfg.cluster.as_ref().expect("check_role: the section is there");
    let storage = Storage::connect(c)
        .await
        .with_context(|| format!("cannot reach NATS JetStream at {}", c.nats_url))?;
    let mut feed = storage.feed(FEED_CONSUMER).await.context("cannot consume the instances stream")?;
    let max_dataset_bytes = cfg.node.max_dataset_mb.saturating_mul(1024 * 1024);
    tracing::info!(nats = %c.nats_url, stream = %c.instances_stream, consumer = FEED_CONSUMER, "cluster worker fed");
    Ok(tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = feed.next() => n,
            };
            let d = match next {
                None => {
                    tracing::error!("instances stream closed; the worker takes no more instances");
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "instances stream");
                    continue;
                }
                Some(Ok(d)) => d,
            };
            let sop = d.meta.header.sop_instance_uid.clone();
            let stored = match feed.materialize(&d, &spool, max_dataset_bytes).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, sop_instance_uid = %sop, "cannot materialise an instance; delivered again later");
                    continue;
                }
            };
            // Indexed even when the file was already there: an earlier
            // delivery may have written it and died before the index did.
            let inst = StoredInstance {
                header: stored.header,
                rel_path: stored.rel_path,
                transfer_syntax: d.meta.transfer_syntax.clone(),
                size_bytes: stored.size_bytes,
                association_id: 0,
                calling_ae: String::new(),
            };
            if let Err(e) = tracker.instance_stored(inst).await {
                tracing::error!(error = %e, sop_instance_uid = %sop, "series index update failed; delivered again later");
                continue;
            }
            if let Err(e) = d.ack().await {
                tracing::warn!(error = %e, sop_instance_uid = %sop, "ack failed; the instance comes again and is a duplicate");
            }
        }
    }))
}
