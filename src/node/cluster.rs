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
//! one. It is this receiver's view only; the cluster's series state comes
//! from the metadata stream (the worker role, not built yet: see
//! docs/SCALE-OUT.md, "Status").
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
    if role != Role::Receiver {
        anyhow::bail!(
            "--role {}: not built yet; only `receiver` runs in this version (docs/SCALE-OUT.md, Status)",
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
    let accept = super::start_listeners(&cfg.node, &shutdown, ingest, gate).await?;
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
    tracker_shutdown.cancel();
    tracker_task.await.context("series tracker panicked")?;
    tracing::info!("stopped");
    Ok(())
}
