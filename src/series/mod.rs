//! Series tracker: groups stored instances into series and decides when a
//! series is complete.
//!
//! **Input.** A [`StoredInstance`] for every instance ingest has fsync'd under
//! `<spool>/<study_uid>/<series_uid>/<sop_uid>.dcm`, sent through
//! [`TrackerHandle::instance_stored`], plus association release / abort
//! notices. At start, [`recover`] walks the spool itself.
//!
//! **Output.** One [`SeriesCompleted`] event per completion, pushed on a
//! durable [`CompletionQueue`] that routing consumes; and the SQLite index
//! ([`SeriesIndex`]) that routing and `biomarker-node series` read.
//!
//! **When a series is complete.** DICOM has no "end of series" message, so
//! completion is a heuristic with two triggers:
//! - *quiet timer*: no new instance for `series.quiet_seconds`;
//! - *association released* (`series.early_completion`): the association that
//!   stored into the series ended normally and the instances in the index are
//!   geometrically whole ([`check_whole`]). A series another open association
//!   is still storing into is left to the quiet timer.
//!
//! **Re-open.** A late *new* SOP instance for a series that is complete (or in
//! any later state) moves it back to `receiving`; it then completes again with
//! `generation + 1`. A duplicate SOP Instance UID never re-opens a series:
//! ingest keeps the first copy and the index is not touched.
//!
//! **Invariants.**
//! - The spool file is the truth; the index is its summary and [`recover`]
//!   repairs it at start (index missing files, drop rows whose file is gone).
//!   That is why the index runs with `synchronous=NORMAL`.
//! - One SOP Instance UID is indexed once, in one series.
//! - Only the tracker moves a series into or out of `receiving`; later stages
//!   set later states ([`SeriesState`]) with [`SeriesIndex::set_state`], which
//!   refuses to overwrite `receiving` so a re-open is never lost.
//! - Delivery on the queue is at-least-once: the event is pushed *before* the
//!   index records the completion, so a crash in between completes the series
//!   again after restart with the same generation. Consumers dedupe on
//!   `(series_instance_uid, generation)`.
//!
//! **Failure modes.** SQLite busy / I/O errors are retryable
//! ([`SeriesError::is_retryable`]): ingest answers the peer with a failure
//! status and the file is indexed by [`recover`] at the next start anyway. A
//! failed queue push leaves the series `receiving` and retries after another
//! quiet period. Unreadable spool files found by [`recover`] are logged and
//! skipped, never deleted. The association → series map lives in memory only;
//! after a crash the quiet timer covers what early completion would have done.

mod geometry;
mod index;
#[cfg(feature = "cluster")]
pub mod nats;
mod queue;
mod recover;
pub mod scan;
mod state;
mod tracker;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dicom::header::InstanceHeader;
use crate::dicom::Uid;

pub use geometry::{check_whole, NotWhole, MAX_NORMAL_ANGLE_RAD, SAME_POSITION_MM};
#[cfg(test)]
pub(crate) use geometry::tests::slice as test_slice;
pub use index::SeriesIndex;
pub use queue::{CompletionQueue, SqliteCompletionQueue};
pub use recover::{recover, Recovery};
pub use state::{SeriesState, UnknownState};
pub use tracker::{QueuedInstance, Tracker, TrackerHandle};

/// Where ingest reports stored instances and ended associations: the
/// embedded tracker, or the cluster's shared series state.
#[derive(Clone, Debug)]
pub enum SeriesSink {
    Local(TrackerHandle),
    #[cfg(feature = "cluster")]
    Cluster(std::sync::Arc<nats::ClusterSeries>),
}

impl SeriesSink {
    /// Embedded: queued in the tracker's mailbox, answered after the C-STORE
    /// response (the spool file is the truth). Cluster: recorded in the
    /// shared state before this returns, so an error here fails the C-STORE
    /// ([`SeriesSink::fails_the_store`]).
    pub async fn queue_instance_stored(&self, inst: StoredInstance) -> Result<QueuedInstance, SeriesError> {
        match self {
            SeriesSink::Local(t) => t.queue_instance_stored(inst).await,
            #[cfg(feature = "cluster")]
            SeriesSink::Cluster(c) => Ok(QueuedInstance::ready(c.instance_stored(&inst).await)),
        }
    }

    /// Whether an error of [`SeriesSink::queue_instance_stored`] must fail
    /// the C-STORE: in the cluster nothing would repair the series state
    /// later, while the embedded index is rebuilt from the spool at start.
    pub fn fails_the_store(&self) -> bool {
        match self {
            SeriesSink::Local(_) => false,
            #[cfg(feature = "cluster")]
            SeriesSink::Cluster(_) => true,
        }
    }

    /// Embedded only: the cluster dedupes on the object store at commit.
    pub async fn is_duplicate(&self, sop: &Uid) -> Result<bool, SeriesError> {
        match self {
            SeriesSink::Local(t) => t.is_duplicate(sop).await,
            #[cfg(feature = "cluster")]
            SeriesSink::Cluster(_) => Ok(false),
        }
    }

    pub async fn association_released(&self, association_id: u64) {
        match self {
            SeriesSink::Local(t) => t.association_released(association_id).await,
            #[cfg(feature = "cluster")]
            SeriesSink::Cluster(c) => c.association_ended(association_id, true).await,
        }
    }

    pub async fn association_aborted(&self, association_id: u64) {
        match self {
            SeriesSink::Local(t) => t.association_aborted(association_id).await,
            #[cfg(feature = "cluster")]
            SeriesSink::Cluster(c) => c.association_ended(association_id, false).await,
        }
    }
}

/// What ingest hands over once an instance is durably in the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredInstance {
    pub header: InstanceHeader,
    /// Relative to the spool root, so the data dir can move.
    pub rel_path: PathBuf,
    pub transfer_syntax: String,
    pub size_bytes: u64,
    /// Which association stored it; early completion keys on this. `0` for
    /// instances found by [`recover`], whose association is unknown.
    pub association_id: u64,
    pub calling_ae: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InsertOutcome {
    /// First time this SOP instance is seen; its series is (now) receiving.
    New,
    /// SOP Instance UID already indexed: ingest keeps the first copy and acks.
    Duplicate,
    /// New instance for a series that had completed; it is receiving again.
    Reopened,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionReason {
    QuietTimer,
    AssociationReleased,
}

impl CompletionReason {
    /// The same spelling serde uses, for the index's TEXT column and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CompletionReason::QuietTimer => "quiet_timer",
            CompletionReason::AssociationReleased => "association_released",
        }
    }
}

impl std::fmt::Display for CompletionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hand-off to routing: one per completion of one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesCompleted {
    pub series_instance_uid: Uid,
    pub study_instance_uid: Uid,
    pub reason: CompletionReason,
    /// Instances in the index when the series completed.
    pub instances: u32,
    /// 1 for the first completion; +1 each time a late instance re-opened it.
    pub generation: u32,
}

impl SeriesCompleted {
    /// The completion's typed event: one log line, one metric. Whoever
    /// records the completion emits it (the tracker, or the cluster's series
    /// state), once.
    pub(crate) fn emit(&self) {
        crate::telemetry::SeriesCompleted {
            series_instance_uid: self.series_instance_uid.as_str(),
            instances: self.instances,
            generation: self.generation,
            reason: self.reason.as_str(),
        }
        .emit();
    }
}

/// One row of `biomarker-node series`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesSummary {
    pub series_instance_uid: Uid,
    pub study_instance_uid: Uid,
    pub modality: Option<String>,
    pub state: SeriesState,
    pub instances: u32,
    /// Reason of the latest completion; `None` while receiving.
    pub completion_reason: Option<String>,
    /// Generation being received, or the one that last completed.
    pub generation: u32,
    /// RFC 3339, UTC, millisecond precision.
    pub first_received_at: String,
    pub last_received_at: String,
    pub completed_at: Option<String>,
    pub series_description: Option<String>,
    /// Why the series is in its state, when a stage recorded one: for
    /// `unroutable`, the routing error. `None` otherwise.
    #[serde(default)]
    pub state_reason: Option<String>,
    /// RFC 3339, UTC: when retention last deleted spooled instances of this
    /// series; `None` while all of them are in the spool.
    #[serde(default)]
    pub purged_at: Option<String>,
    /// How many of `instances` retention deleted from the spool.
    #[serde(default)]
    pub purged_instances: u32,
}

/// A series with instances still in the spool, as retention sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledSeries {
    pub series_instance_uid: Uid,
    pub state: SeriesState,
    /// RFC 3339: completion time, or last reception while receiving.
    pub last_activity: String,
    /// Instances and bytes still in the spool.
    pub instances: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeriesError {
    #[error("cannot open series index {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("series index: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("series index {path} has schema version {found}; this build knows {supported}")]
    Schema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt index row: {0}")]
    Corrupt(String),
    #[error("series {0} is not in the index")]
    UnknownSeries(Uid),
    #[error("`{0}` is not a state a later stage may set")]
    InvalidState(SeriesState),
    /// A later stage tried to move a series the tracker has re-opened.
    #[error("series {series} is {current}; its next completion will be queued again")]
    StateConflict { series: Uid, current: SeriesState },
    /// For [`CompletionQueue`] implementations other than SQLite.
    #[error("completion queue: {message}")]
    Queue { message: String, retryable: bool },
    #[error("invalid series configuration: {0}")]
    InvalidConfig(String),
    #[error("the series tracker has stopped")]
    TrackerStopped,
    /// Its thread, or that thread's timer runtime, could not be made.
    #[error("cannot start the series tracker's thread: {0}")]
    TrackerThread(std::io::Error),
    /// The cluster's shared series state (NATS JetStream) did not answer or
    /// refused: transient, the caller retries or fails the C-STORE.
    #[error("cluster series state: {0}")]
    Shared(String),
}

impl SeriesError {
    /// Whether the same call may succeed later without anyone fixing anything:
    /// lock contention, I/O and full disks are; corruption, schema mismatch
    /// and bad arguments are not. A stopped tracker is not: it only stops at
    /// shutdown.
    pub fn is_retryable(&self) -> bool {
        use rusqlite::ErrorCode as C;
        let sqlite = |e: &rusqlite::Error| {
            matches!(
                e.sqlite_error_code(),
                Some(
                    C::DatabaseBusy
                        | C::DatabaseLocked
                        | C::SystemIoFailure
                        | C::DiskFull
                        | C::OutOfMemory
                        | C::CannotOpen
                )
            )
        };
        match self {
            SeriesError::Open { source, .. } => sqlite(source),
            SeriesError::Sqlite(e) => sqlite(e),
            SeriesError::Io { .. } | SeriesError::Shared(_) | SeriesError::TrackerThread(_) => true,
            SeriesError::Queue { retryable, .. } => *retryable,
            SeriesError::Schema { .. }
            | SeriesError::Corrupt(_)
            | SeriesError::UnknownSeries(_)
            | SeriesError::InvalidState(_)
            | SeriesError::InvalidConfig(_)
            | SeriesError::StateConflict { .. }
            | SeriesError::TrackerStopped => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(SeriesError::Sqlite(busy).is_retryable());
        let corrupt = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            None,
        );
        assert!(!SeriesError::Sqlite(corrupt).is_retryable());
        assert!(!SeriesError::Corrupt("x".into()).is_retryable());
        assert!(SeriesError::Io {
            path: "p".into(),
            source: std::io::Error::other("x")
        }
        .is_retryable());
    }
}
