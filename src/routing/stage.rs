//! The router stage in `serve`: completed series in, durable jobs out.
//!
//! Consumes the completion queue (at-least-once), evaluates the current
//! route table on the series' spooled files, and inserts one job per match.
//! The job store's uniqueness on (series, route, model version, generation)
//! makes a redelivered event harmless. The event is acknowledged only after
//! its jobs are durable.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{RouteTable, SeriesFacts};
use crate::analysis::Models;
use crate::jobs::{JobKey, JobStore};
use crate::series::{CompletionQueue, SeriesCompleted, SeriesIndex};

/// The live route table; SIGHUP swaps it after a successful check.
pub type SharedRoutes = Arc<RwLock<Arc<RouteTable>>>;

pub struct Router {
    pub queue: Arc<dyn CompletionQueue>,
    pub index_path: PathBuf,
    pub spool_root: PathBuf,
    pub routes: SharedRoutes,
    pub jobs: Arc<dyn JobStore>,
    pub models: Arc<Models>,
    /// Wakes the job workers after new jobs are stored.
    pub work: Arc<Notify>,
}

impl Router {
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        loop {
            match this.queue.peek() {
                Ok(Some((id, ev))) => {
                    let me = this.clone();
                    let ev2 = ev.clone();
                    let r = tokio::task::spawn_blocking(move || me.route_one(&ev2)).await;
                    match r {
                        Ok(Ok(())) => {
                            if let Err(e) = this.queue.ack(id) {
                                tracing::error!(error = %e, "cannot acknowledge a completion event");
                            }
                            this.work.notify_waiters();
                            this.work.notify_one();
                            continue;
                        }
                        Ok(Err(e)) => {
                            tracing::error!(series_instance_uid = %ev.series_instance_uid, error = %e, "routing failed; will retry");
                        }
                        Err(e) => tracing::error!(error = %e, "routing task panicked; will retry"),
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
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

    /// Blocking: reads the index and first instance header.
    fn route_one(&self, ev: &SeriesCompleted) -> anyhow::Result<()> {
        let span = tracing::info_span!("series", uid = %ev.series_instance_uid, generation = ev.generation);
        let _g = span.enter();
        let mut index = SeriesIndex::open(&self.index_path)?;
        let instances = index.series_instances(&ev.series_instance_uid)?;
        let table = self.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
        let matches = match SeriesFacts::load_spooled(&self.spool_root, &instances) {
            Ok(facts) => table.matches(&facts),
            Err(e) => {
                // Unreadable first header: nothing can be routed, say so once.
                tracing::warn!(error = %e, "series cannot be routed");
                set_state(&mut index, ev, "unroutable");
                return Ok(());
            }
        };
        let mut new = 0;
        for m in &matches {
            let key = JobKey {
                series_instance_uid: ev.series_instance_uid.to_string(),
                route: m.route.clone(),
                model: m.model.clone(),
                model_version: self.models.version(&m.model),
                generation: ev.generation,
            };
            if self.jobs.enqueue(&key)?.is_some() {
                new += 1;
            }
        }
        tracing::info!(routes = matches.len(), new_jobs = new, "series routed");
        set_state(&mut index, ev, if matches.is_empty() { "no_route" } else { "routed" });
        Ok(())
    }
}

/// Later stages never undo a re-open: the index refuses to overwrite
/// `receiving`, which is expected and only logged.
pub fn set_state(index: &mut SeriesIndex, ev: &SeriesCompleted, state: &str) {
    if let Err(e) = index.set_state(&ev.series_instance_uid, state) {
        tracing::debug!(error = %e, state, "series state not updated");
    }
}
