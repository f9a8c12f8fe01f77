//! The series stage on the cluster's shared state (feature `cluster`,
//! docs/SCALE-OUT.md): series in a JetStream KV bucket, completions on a
//! work-queue stream.
//!
//! Input: instances stored by any receiver ([`ClusterSeries::instance_stored`],
//! before the C-STORE succeeds), the end of each of this receiver's
//! associations, and a quiet-timer sweep that every cluster process runs.
//! Output: one [`SeriesCompleted`] per series generation, published to
//! `<jobs_subject>.series` (work-queue retention: one worker takes it).
//!
//! Invariants:
//! - Every change of a series is a compare-and-set on its key's revision
//!   (`kv.update(key, value, revision)`, or `create` for a new key), retried
//!   on conflict, so receivers and sweepers on any machine never lose an
//!   update and exactly one of them moves a generation to complete.
//! - Early completion across receivers: a record lists the associations
//!   (`<process>/<association>`) that stored into it and have not ended. A
//!   release removes its own; the one that leaves the list empty completes
//!   the series. So a study sent half through each of two receivers
//!   completes once, at the second release. An aborted association, or one
//!   whose receiver died, is left to the quiet timer, as in the embedded
//!   tracker (whose quiet timer, too, completes a series whatever
//!   associations are open).
//! - Complete, then publish, then record `queued`: a process that dies in
//!   between leaves `queued: false`, and any sweep publishes it again; the
//!   stream drops the repeat by its `Nats-Msg-Id` (`<series>-<generation>`)
//!   within its duplicate window, and a worker's job keys dedupe beyond it.
//! - A late instance re-opens a complete series as the next generation, as
//!   in the embedded index.
//!
//! Not done here, unlike the embedded tracker: the geometry check
//! ([`super::check_whole`]) before early completion needs every header; the
//! worker that materialises the series has them, and routing's facts see
//! the series whole or not.
//!
//! Failures: NATS unreachable or too many conflicts are
//! [`SeriesError::Shared`] (transient): ingest fails that C-STORE with an
//! out-of-resources status, and the peer sends it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{CompletionReason, InsertOutcome, SeriesCompleted, SeriesError, StoredInstance};
use crate::config::{ClusterConfig, SeriesConfig};
use crate::dicom::Uid;

/// Compare-and-set attempts before an update gives up: far more than two
/// receivers and a sweeper racing on one series ever need.
const MAX_CAS: usize = 64;

/// The durable consumer on the jobs stream that every worker shares, so
/// each job goes to one of them.
pub const JOBS_CONSUMER: &str = "bn-workers";

/// A published completion waits this long for its completer to record
/// `queued` before a sweep publishes it again.
const REPUBLISH_AFTER_MS: u64 = 5_000;

/// One series in the KV bucket (JSON). The key is its Series Instance UID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesRecord {
    pub study: Uid,
    pub state: RecordState,
    /// 1 for the first completion; +1 each time a late instance re-opened it.
    pub generation: u32,
    /// Instances stored into it (every generation). Informational: the
    /// worker takes the series' instances from the instances stream.
    pub instances: u32,
    /// Associations (`<process>/<association id>`) that stored into this
    /// generation and have not ended.
    pub open: Vec<String>,
    /// Unix ms of the last change by an instance (the quiet timer's start),
    /// or of the completion.
    pub updated_ms: u64,
    /// Whether this generation's completion is on the jobs stream.
    #[serde(default)]
    pub queued: bool,
    #[serde(default)]
    pub reason: Option<CompletionReason>,
    /// The last error a worker recorded for this generation's job.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    Receiving,
    Complete,
}

impl SeriesRecord {
    fn completed(&self, series: &Uid) -> SeriesCompleted {
        SeriesCompleted {
            series_instance_uid: series.clone(),
            study_instance_uid: self.study.clone(),
            reason: self.reason.unwrap_or(CompletionReason::QuietTimer),
            instances: self.instances,
            generation: self.generation,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn shared(what: &str, e: &dyn std::fmt::Display) -> SeriesError {
    SeriesError::Shared(format!("{what}: {e}"))
}

/// The new record for `add` instances (this one and those of the same
/// association not written yet) stored into `cur` (absent: a new series),
/// and what that was. `open` is the storing association, if any.
pub fn on_instance(
    cur: Option<&SeriesRecord>,
    study: &Uid,
    open: Option<&str>,
    now: u64,
    add: u32,
) -> (SeriesRecord, InsertOutcome) {
    let opened = open.map(|o| vec![o.to_owned()]).unwrap_or_default();
    match cur {
        None => (
            SeriesRecord {
                study: study.clone(),
                state: RecordState::Receiving,
                generation: 1,
                instances: add,
                open: opened,
                updated_ms: now,
                queued: false,
                reason: None,
                error: None,
            },
            InsertOutcome::New,
        ),
        Some(r) if r.state == RecordState::Receiving => {
            let mut r = r.clone();
            r.instances += add;
            r.updated_ms = now;
            if let Some(o) = open {
                if !r.open.iter().any(|x| x == o) {
                    r.open.push(o.to_owned());
                }
            }
            (r, InsertOutcome::New)
        }
        Some(r) => (
            SeriesRecord {
                study: r.study.clone(),
                state: RecordState::Receiving,
                generation: r.generation + 1,
                instances: r.instances + add,
                open: opened,
                updated_ms: now,
                queued: false,
                reason: None,
                error: None,
            },
            InsertOutcome::Reopened,
        ),
    }
}

/// The record after association `who` ended, having stored `add` instances
/// not written yet, or `None` for no change. Completes the series when it
/// was released, early completion is on, and no other association is still
/// storing into it.
pub fn on_association_end(
    cur: &SeriesRecord,
    who: &str,
    released: bool,
    early: bool,
    now: u64,
    add: u32,
) -> Option<SeriesRecord> {
    if cur.state != RecordState::Receiving || !cur.open.iter().any(|x| x == who) {
        return None;
    }
    let mut r = cur.clone();
    r.instances += add;
    r.open.retain(|x| x != who);
    if released && early && r.open.is_empty() {
        r.state = RecordState::Complete;
        r.reason = Some(CompletionReason::AssociationReleased);
        r.updated_ms = now;
    }
    Some(r)
}

/// The record completed by the quiet timer, or `None` when it is not due.
pub fn on_quiet(cur: &SeriesRecord, quiet_ms: u64, now: u64) -> Option<SeriesRecord> {
    if cur.state != RecordState::Receiving || now.saturating_sub(cur.updated_ms) < quiet_ms {
        return None;
    }
    let mut r = cur.clone();
    r.state = RecordState::Complete;
    r.reason = Some(CompletionReason::QuietTimer);
    r.updated_ms = now;
    Some(r)
}

/// The series stage of one cluster process. Cheap to share (`Arc`).
pub struct ClusterSeries {
    kv: kv::Store,
    js: jetstream::Context,
    jobs_subject: String,
    /// This process, in the `open` lists: `<role>-<host>-<pid>`.
    me: String,
    quiet_ms: u64,
    /// How long an association may store into a series without writing its
    /// record again: `min(1 s, quiet / 4)`. The sweep waits this much longer
    /// than `quiet_ms`, so the quiet timer never fires early.
    refresh_ms: u64,
    early: bool,
    /// Series each of this process' open associations stored into, and when
    /// the record last heard of them.
    associations: Mutex<HashMap<u64, HashMap<Uid, Touch>>>,
}

/// One association's writes to one series' record.
#[derive(Clone, Copy)]
struct Touch {
    written_ms: u64,
    /// Instances stored since, not counted in the record yet.
    unwritten: u32,
}

impl std::fmt::Debug for ClusterSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSeries").field("me", &self.me).finish()
    }
}

impl ClusterSeries {
    /// Opens (creating when absent, file storage, `cluster.replicas`) the
    /// series bucket, the jobs work-queue stream and the dead-letter stream.
    pub async fn open(
        js: jetstream::Context,
        c: &ClusterConfig,
        series: &SeriesConfig,
        me: String,
    ) -> Result<ClusterSeries, SeriesError> {
        let kv = crate::spool::nats::key_value(&js, &c.series_bucket, c.replicas)
            .await
            .map_err(SeriesError::Shared)?;
        js.get_or_create_stream(stream::Config {
            name: c.jobs_stream.clone(),
            subjects: vec![format!("{}.>", c.jobs_subject)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: c.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| shared("create the jobs stream", &e))?;
        js.get_or_create_stream(stream::Config {
            name: c.dead_stream.clone(),
            subjects: vec![format!("{}.>", c.dead_subject)],
            storage: stream::StorageType::File,
            num_replicas: c.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| shared("create the dead-letter stream", &e))?;
        let quiet = series.quiet_seconds.clamp(0.0, 365.0 * 24.0 * 3600.0);
        Ok(ClusterSeries {
            kv,
            js,
            jobs_subject: c.jobs_subject.clone(),
            me,
            quiet_ms: (quiet * 1000.0) as u64,
            refresh_ms: ((quiet * 1000.0 / 4.0) as u64).min(1000),
            early: series.early_completion,
            associations: Mutex::new(HashMap::new()),
        })
    }

    pub fn id(&self) -> &str {
        &self.me
    }

    /// The series' record, if any.
    pub async fn get(&self, series: &Uid) -> Result<Option<SeriesRecord>, SeriesError> {
        Ok(self.entry(series).await?.and_then(|(_, r)| r))
    }

    /// `(revision, record)`; a deleted key is `(revision, None)`.
    async fn entry(&self, series: &Uid) -> Result<Option<(u64, Option<SeriesRecord>)>, SeriesError> {
        let Some(e) = self.kv.entry(series.as_str()).await.map_err(|e| shared("series get", &e))? else {
            return Ok(None);
        };
        if e.operation != kv::Operation::Put {
            return Ok(Some((e.revision, None)));
        }
        let r = serde_json::from_slice(&e.value).map_err(|e| SeriesError::Corrupt(format!("series {series}: {e}")))?;
        Ok(Some((e.revision, Some(r))))
    }

    /// Compare-and-set loop: `f` gives the new record from the current one
    /// (`None`: leave it). Returns what was written.
    async fn modify<F>(&self, series: &Uid, mut f: F) -> Result<Option<SeriesRecord>, SeriesError>
    where
        F: FnMut(Option<&SeriesRecord>) -> Option<SeriesRecord>,
    {
        for _ in 0..MAX_CAS {
            let cur = self.entry(series).await?;
            let (rev, rec) = match &cur {
                Some((rev, rec)) => (Some(*rev), rec.as_ref()),
                None => (None, None),
            };
            let Some(next) = f(rec) else { return Ok(None) };
            let body = serde_json::to_vec(&next).map_err(|e| SeriesError::Corrupt(e.to_string()))?;
            let written = match rev {
                Some(rev) => match self.kv.update(series.as_str(), body.into(), rev).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(shared("series update", &e)),
                },
                None => match self.kv.create(series.as_str(), body.into()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(shared("series create", &e)),
                },
            };
            if written {
                return Ok(Some(next));
            }
        }
        Err(SeriesError::Shared(format!("series {series}: {MAX_CAS} compare-and-set conflicts in a row")))
    }

    /// Records an instance in its series; call before the C-STORE succeeds.
    ///
    /// An association storing a series writes its record at most once per
    /// `refresh_ms` (the first instance always): one compare-and-set per
    /// instance would cost two more round trips per C-STORE, and the record
    /// needs only to exist, to list the association, and to keep the quiet
    /// timer off. The count catches up at the next write or at the end of
    /// the association (a receiver killed in between leaves it short: the
    /// count is informational; the worker takes the series' instances from
    /// the instances stream).
    pub async fn instance_stored(&self, inst: &StoredInstance) -> Result<InsertOutcome, SeriesError> {
        let series = &inst.header.series_instance_uid;
        let now = now_ms();
        let mut add = 1;
        if inst.association_id != 0 {
            let mut map = self.associations.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = map.get_mut(&inst.association_id).and_then(|m| m.get_mut(series)) {
                if now.saturating_sub(t.written_ms) < self.refresh_ms {
                    t.unwritten += 1;
                    return Ok(InsertOutcome::New);
                }
                add += t.unwritten;
            }
        }
        let who = (inst.association_id != 0).then(|| format!("{}/{}", self.me, inst.association_id));
        let mut outcome = InsertOutcome::New;
        self.modify(series, |cur| {
            let (next, o) = on_instance(cur, &inst.header.study_instance_uid, who.as_deref(), now, add);
            outcome = o;
            Some(next)
        })
        .await?;
        if inst.association_id != 0 {
            self.associations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(inst.association_id)
                .or_default()
                .insert(series.clone(), Touch { written_ms: now, unwritten: 0 });
        }
        if outcome == InsertOutcome::Reopened {
            tracing::info!(series = %series, sop = %inst.header.sop_instance_uid, "late instance re-opened a completed series");
        }
        Ok(outcome)
    }

    /// One of this process' associations ended. Errors are logged: the
    /// quiet timer completes what this could not.
    pub async fn association_ended(&self, association_id: u64, released: bool) {
        let series_set = self
            .associations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&association_id)
            .unwrap_or_default();
        let who = format!("{}/{}", self.me, association_id);
        for (series, touch) in series_set {
            let now = now_ms();
            let ended = |cur: Option<&SeriesRecord>| on_association_end(cur?, &who, released, self.early, now, touch.unwritten);
            match self.modify(&series, ended).await {
                Ok(Some(r)) if r.state == RecordState::Complete => self.queue(&series, &r).await,
                Ok(Some(r)) => tracing::debug!(series = %series, open = r.open.len(), "another association still stores into it"),
                Ok(None) => {}
                Err(e) => tracing::warn!(series = %series, error = %e, "cannot record the association's end; the quiet timer completes the series"),
            }
        }
    }

    /// Puts a completed generation on the jobs stream and records that.
    async fn queue(&self, series: &Uid, r: &SeriesRecord) {
        let ev = r.completed(series);
        if let Err(e) = self.publish(&ev).await {
            tracing::warn!(series = %series, error = %e, "cannot queue the completion; a sweep will");
            return;
        }
        let gen = r.generation;
        let marked = self
            .modify(series, |cur| {
                let cur = cur?;
                (cur.generation == gen && cur.state == RecordState::Complete && !cur.queued).then(|| SeriesRecord {
                    queued: true,
                    ..cur.clone()
                })
            })
            .await;
        if let Err(e) = marked {
            tracing::warn!(series = %series, error = %e, "completion queued but not recorded; a sweep queues it again (deduped)");
        }
        ev.emit();
    }

    async fn publish(&self, ev: &SeriesCompleted) -> Result<(), SeriesError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{}-{}", ev.series_instance_uid, ev.generation).as_str());
        let body = serde_json::to_vec(ev).map_err(|e| SeriesError::Corrupt(e.to_string()))?;
        self.js
            .publish_with_headers(format!("{}.series", self.jobs_subject), headers, body.into())
            .await
            .map_err(|e| shared("completion publish", &e))?
            .await
            .map_err(|e| shared("completion publish ack", &e))?;
        Ok(())
    }

    /// Records a worker's error on a generation (for the dead letter's reason).
    pub async fn record_error(&self, series: &Uid, generation: u32, error: &str) -> Result<(), SeriesError> {
        self.modify(series, |cur| {
            let cur = cur?;
            (cur.generation == generation).then(|| SeriesRecord { error: Some(error.to_owned()), ..cur.clone() })
        })
        .await
        .map(|_| ())
    }

    /// One pass of the quiet timer over every series: completes those quiet
    /// for `series.quiet_seconds`, and queues completions whose completer
    /// died before recording `queued`. Returns the completions it queued.
    ///
    /// Reads every key: fine for the thousands of series a cluster holds at
    /// once (finished ones are not deleted yet: docs/SCALE-OUT.md).
    pub async fn sweep(&self) -> Result<usize, SeriesError> {
        use futures_util::StreamExt;
        let mut keys = self.kv.keys().await.map_err(|e| shared("series keys", &e))?;
        let mut uids = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| shared("series keys", &e))?;
            if let Ok(u) = Uid::parse(&k) {
                uids.push(u);
            }
        }
        let mut queued = 0;
        for series in uids {
            let now = now_ms();
            let Some(r) = self.get(&series).await? else { continue };
            match r.state {
                RecordState::Receiving if now.saturating_sub(r.updated_ms) >= self.quiet_ms + self.refresh_ms => {
                    let quiet = self.quiet_ms + self.refresh_ms;
                    if let Some(done) = self.modify(&series, |cur| on_quiet(cur?, quiet, now)).await? {
                        self.queue(&series, &done).await;
                        queued += 1;
                    }
                }
                RecordState::Complete if !r.queued && now.saturating_sub(r.updated_ms) >= REPUBLISH_AFTER_MS => {
                    self.queue(&series, &r).await;
                    queued += 1;
                }
                _ => {}
            }
        }
        Ok(queued)
    }

    /// Sweeps every second until `shutdown`. Every cluster process runs one:
    /// compare-and-set makes them safe together, and any survivor completes
    /// what a dead process left.
    pub async fn run_sweeper(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "series sweep failed; next in 1 s");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> Uid {
        Uid::parse(s).unwrap()
    }

    #[test]
    fn a_series_over_two_associations_completes_at_the_second_release() {
        let study = uid("1.2.3");
        let (r, o) = on_instance(None, &study, Some("a/1"), 10, 1);
        assert_eq!(o, InsertOutcome::New);
        let (r, _) = on_instance(Some(&r), &study, Some("b/7"), 11, 1);
        assert_eq!(r.open, vec!["a/1", "b/7"]);
        assert_eq!(r.instances, 2);
        let r = on_association_end(&r, "a/1", true, true, 12, 0).expect("changed");
        assert_eq!(r.state, RecordState::Receiving);
        assert_eq!(r.open, vec!["b/7"]);
        let r = on_association_end(&r, "b/7", true, true, 13, 5).expect("changed");
        assert_eq!(r.state, RecordState::Complete);
        assert_eq!(r.instances, 7, "the 5 instances b/7 stored without writing are counted at its end");
        assert_eq!(r.reason, Some(CompletionReason::AssociationReleased));
        // A second release of the same association changes nothing.
        assert!(on_association_end(&r, "b/7", true, true, 14, 0).is_none());
    }

    #[test]
    fn an_abort_or_early_completion_off_leaves_the_series_to_the_quiet_timer() {
        let study = uid("1.2.3");
        let (r, _) = on_instance(None, &study, Some("a/1"), 10, 1);
        let aborted = on_association_end(&r, "a/1", false, true, 11, 0).expect("changed");
        assert_eq!(aborted.state, RecordState::Receiving);
        assert!(aborted.open.is_empty());
        let off = on_association_end(&r, "a/1", true, false, 11, 0).expect("changed");
        assert_eq!(off.state, RecordState::Receiving);
        assert!(on_quiet(&aborted, 1000, 500).is_none(), "not quiet yet");
        let done = on_quiet(&aborted, 1000, 1010).expect("quiet");
        assert_eq!(done.state, RecordState::Complete);
        assert_eq!(done.reason, Some(CompletionReason::QuietTimer));
    }

    #[test]
    fn a_late_instance_reopens_the_next_generation() {
        let study = uid("1.2.3");
        let (r, _) = on_instance(None, &study, Some("a/1"), 10, 1);
        let done = on_quiet(&r, 0, 20).unwrap();
        let done = SeriesRecord { queued: true, ..done };
        let (r2, o) = on_instance(Some(&done), &study, Some("a/2"), 30, 1);
        assert_eq!(o, InsertOutcome::Reopened);
        assert_eq!((r2.generation, r2.instances, r2.state, r2.queued), (2, 2, RecordState::Receiving, false));
        assert_eq!(r2.open, vec!["a/2"]);
    }

    #[test]
    fn the_record_round_trips_as_json() {
        let (r, _) = on_instance(None, &uid("1.2.3"), None, 10, 1);
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"state\":\"receiving\""), "{j}");
        assert_eq!(serde_json::from_str::<SeriesRecord>(&j).unwrap(), r);
    }
}
