//! The job stage: one durable job per (series, route, model version,
//! series generation), run by the inference worker.
//!
//! Input: jobs that routing creates ([`JobStore::enqueue`]), each with the
//! [`ResolvedRoute`] it matched: model, slice selection, destinations.
//! Output: per job, a [`JobResult`] (the [`run::ResultLine`], when inference
//! finished, the report files) or a failure text; report files under
//! `<data_dir>/results/`, queued in the outbox for the route's destinations;
//! the series state once its generation's jobs are finished.
//!
//! Invariants:
//! - A job is inserted once per key and runs once, unless its series is
//!   re-opened (new generation) or it is re-triggered ([`store`]).
//! - A job carries the route it was created with, so a reload (SIGHUP or the
//!   API) between routing and running changes neither what it computes nor
//!   where its reports go. Rows stored before jobs carried their route fall
//!   back to a lookup by name in the live table ([`RouteLookup`]).
//! - Reports are written (fsynced) before they are queued, and a job
//!   abandoned at its deadline neither writes nor queues ([`worker`]).
//! - This module knows nothing of routing: it gets plain data.
//!
//! Failure modes: a [`JobError`] fails the job with its text; its
//! [`JobError::fault`] says whether the same job may succeed when run again.
//! A refusal ([`JobError::Refused`]: the input guard, or no arch in the
//! volume) ends it `refused` instead ([`store::Outcome::Refused`]): final,
//! nothing sent.
//! A job store error ([`JobStoreError`]) leaves the job as it was.

pub mod run;
pub mod shadow;
pub mod store;
pub mod verdict;
pub mod volumes;
pub mod worker;

pub use run::{JobError, JobResult};
pub use store::{Job, JobKey, JobState, JobStore, JobStoreError, Outcome, ResolvedRoute, RouteLookup, SqliteJobStore};

use std::sync::Arc;

use tokio::sync::Notify;

/// The job queue as the stages share it: the durable store, and the wake-up
/// the workers wait on. Whoever makes a job runnable (routing, an API retry)
/// calls [`JobQueue::wake`]; a worker that finds nothing waits on
/// [`JobQueue::notified`].
#[derive(Clone)]
pub struct JobQueue {
    pub store: Arc<dyn JobStore>,
    wake: Arc<Notify>,
}

impl JobQueue {
    pub fn new(store: Arc<dyn JobStore>) -> JobQueue {
        JobQueue { store, wake: Arc::new(Notify::new()) }
    }

    /// Every idle worker looks again; a worker that is busy finds the
    /// stored permit when it next waits.
    pub fn wake(&self) {
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }
}

impl std::ops::Deref for JobQueue {
    type Target = dyn JobStore;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}
