//! Durable jobs: one per (series, route, model version, series generation).
//!
//! Input: routed matches for a completed series. Output: claimed jobs for
//! the inference workers, and their results or failures.
//!
//! Invariants:
//! - Each (series, route, model version, generation) is inserted once, so a
//!   completion event delivered twice (the queue is at-least-once) or a
//!   restart never runs a job twice; a re-opened series (new generation) or
//!   an explicit `retrigger` runs it again.
//! - Jobs left `running` by a crash go back to `pending` at start-up.
//! - An outcome is recorded for the attempt that is running
//!   ([`JobStore::finish_attempt`]): a job failed at its deadline, then
//!   re-queued or re-triggered, is never overwritten by the abandoned
//!   attempt's late result.
//! - A job carries its [`ResolvedRoute`] (model, slice selection,
//!   destinations), fixed when routing created it: a reload that renames or
//!   drops the route afterwards changes neither what the job computes nor
//!   where its reports go. Rows written before the `route_json` column
//!   existed have none; for them the worker still looks the route up by name
//!   in the live table, as it did then.
//!
//! The [`JobStore`] trait is the seam for a distributed queue.

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("job store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job store: bad JSON in row {id}: {message}")]
    Corrupt { id: i64, message: String },
    #[error("job store: cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where a job is. Stored, printed and served as these exact strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
    /// The input is outside what the model was validated on (or the output
    /// implausible): final like `failed`, but the node did nothing wrong.
    /// The error holds the reason; nothing was sent.
    Refused,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Refused => "refused",
        }
    }

    fn parse(s: &str) -> Option<JobState> {
        [JobState::Pending, JobState::Running, JobState::Done, JobState::Failed, JobState::Refused].into_iter().find(|j| j.as_str() == s)
    }

    /// Done, failed or refused: no worker will touch it unless it is re-triggered.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Refused)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so the `jobs` table's column widths apply.
        f.pad(self.as_str())
    }
}

impl rusqlite::types::FromSql for JobState {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        JobState::parse(s).ok_or_else(|| rusqlite::types::FromSqlError::Other(format!("unknown job state `{s}`").into()))
    }
}

/// How an attempt ended, as the store records it: the state follows from
/// the variant, never from the text. The `state` column is free text, so
/// `refused` needed no migration: older versions reading a `refused` row see
/// an unknown state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome<'a> {
    /// `done`, with the result.
    Done(&'a serde_json::Value),
    /// `failed`, with the error text.
    Failed(&'a str),
    /// `refused` (the input is not what the model measures), with the
    /// reason as the API shows it.
    Refused(&'a str),
}

impl Outcome<'_> {
    pub fn state(&self) -> JobState {
        match self {
            Outcome::Done(_) => JobState::Done,
            Outcome::Failed(_) => JobState::Failed,
            Outcome::Refused(_) => JobState::Refused,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobKey {
    pub series_instance_uid: String,
    pub route: String,
    pub model: String,
    pub model_version: String,
    pub generation: u32,
}

/// What routing decided for a job, beyond its key: the model to run, the
/// slice to give it and where its reports go. Stored with the job (column
/// `route_json`) so the worker never consults the live route table, which
/// a SIGHUP may have changed since.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ResolvedRoute {
    pub route: String,
    pub model: String,
    pub send_to: Vec<String>,
    pub slices: Option<crate::volume::SliceSelection>,
    /// A candidate version's run beside the active one (`job::shadow`): its
    /// results are kept under `results/` and never sent (`send_to` is empty
    /// and the worker queues nothing for it), and it does not decide the
    /// series' state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// The live route table by name, for jobs stored before they carried their
/// route (see [`Job::resolved`]). Implemented by the routing stage's table,
/// so this module does not depend on routing.
pub trait RouteLookup: Send + Sync {
    fn resolve(&self, route: &str) -> Option<ResolvedRoute>;
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    #[serde(flatten)]
    pub key: JobKey,
    pub state: JobState,
    pub attempts: u32,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The route as it was when the job was created; `None` only for rows
    /// stored by a version without the `route_json` column. Not part of the
    /// job's JSON (CLI and API), which is unchanged.
    #[serde(skip)]
    pub resolved: Option<ResolvedRoute>,
}

impl Job {
    /// The result as the worker wrote it. `None` for an unfinished or
    /// failed job, and for a stored result of another shape (a row from a
    /// version that wrote other fields): readers then see no result, as they
    /// saw missing keys before. The JSON that the CLI and the API print is
    /// [`Job::result`] itself, so it stays exactly what was stored.
    pub fn typed_result(&self) -> Option<super::JobResult> {
        serde_json::from_value(self.result.clone()?).ok()
    }
}

pub trait JobStore: Send + Sync + 'static {
    /// Ok(Some(id)) for a new job, Ok(None) when this key already exists
    /// (the existing job keeps the route it was created with).
    fn enqueue(&self, key: &JobKey, route: &ResolvedRoute) -> Result<Option<i64>, JobStoreError>;
    /// Oldest pending job, now marked running.
    fn claim(&self) -> Result<Option<Job>, JobStoreError>;
    fn finish(&self, id: i64, outcome: Outcome<'_>) -> Result<(), JobStoreError>;
    /// [`JobStore::finish`] for attempt `attempt` only while that attempt is
    /// still the running one. False, and nothing written, when the job moved
    /// on meanwhile (failed at its deadline, re-queued, re-triggered), so a
    /// late outcome cannot overwrite what happened since.
    fn finish_attempt(&self, id: i64, attempt: u32, outcome: Outcome<'_>) -> Result<bool, JobStoreError>;
    /// At start-up: running → pending. Returns how many.
    fn requeue_interrupted(&self) -> Result<usize, JobStoreError>;
    fn list(&self) -> Result<Vec<Job>, JobStoreError>;
    fn for_series(&self, series_instance_uid: &str) -> Result<Vec<Job>, JobStoreError>;
    fn get(&self, id: i64) -> Result<Option<Job>, JobStoreError>;
    /// The newest `limit` jobs, newest first.
    fn recent(&self, limit: usize) -> Result<Vec<Job>, JobStoreError>;
    /// How many jobs are in each state.
    fn count_by_state(&self) -> Result<Vec<(String, i64)>, JobStoreError>;
    /// Run a finished (done, failed or refused) job again, same key and same resolved
    /// route: false when `id` is not finished.
    fn retrigger(&self, id: i64) -> Result<bool, JobStoreError>;
}

pub struct SqliteJobStore {
    conn: crate::store::Locked,
}

fn now() -> String {
    crate::store::rfc3339(SystemTime::now())
}

impl SqliteJobStore {
    pub fn open(path: &Path) -> Result<SqliteJobStore, JobStoreError> {
        // FULL, SQLite's default and what this store always had: a recorded outcome survives power loss.
        let conn = crate::store::open(path, crate::store::Mode::ReadWrite(crate::store::Synchronous::Full))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                 id            INTEGER PRIMARY KEY AUTOINCREMENT,
                 series_uid    TEXT NOT NULL,
                 route         TEXT NOT NULL,
                 model         TEXT NOT NULL,
                 model_version TEXT NOT NULL,
                 generation    INTEGER NOT NULL,
                 state         TEXT NOT NULL,
                 attempts      INTEGER NOT NULL DEFAULT 0,
                 error         TEXT,
                 result_json   TEXT,
                 created_at    TEXT NOT NULL,
                 started_at    TEXT,
                 finished_at   TEXT,
                 UNIQUE (series_uid, route, model_version, generation)
             );
             CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);",
        )?;
        add_route_column(&conn)?;
        Ok(SqliteJobStore { conn: crate::store::Locked::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

}

/// Migration: job stores made before jobs carried their route get the
/// `route_json` column (NULL for their rows). In one write transaction, so
/// two processes opening an old store at once do not both add it.
fn add_route_column(conn: &Connection) -> Result<(), JobStoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| {
        let has: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = 'route_json'",
            [],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN route_json TEXT")?;
        }
        Ok(())
    })();
    conn.execute_batch(if r.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
    r
}

fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Job, Option<String>, Option<String>)> {
    Ok((
        Job {
            id: r.get(0)?,
            key: JobKey {
                series_instance_uid: r.get(1)?,
                route: r.get(2)?,
                model: r.get(3)?,
                model_version: r.get(4)?,
                generation: r.get(5)?,
            },
            state: r.get(6)?,
            attempts: r.get(7)?,
            error: r.get(8)?,
            result: None,
            created_at: r.get(10)?,
            started_at: r.get(11)?,
            finished_at: r.get(12)?,
            resolved: None,
        },
        r.get(9)?,
        r.get(13)?,
    ))
}

const COLS: &str = "id, series_uid, route, model, model_version, generation, state, attempts, error, result_json, created_at, started_at, finished_at, route_json";

fn with_result((mut job, json, route): (Job, Option<String>, Option<String>)) -> Result<Job, JobStoreError> {
    let corrupt = |id, e: serde_json::Error| JobStoreError::Corrupt { id, message: e.to_string() };
    if let Some(j) = json {
        job.result = Some(serde_json::from_str(&j).map_err(|e| corrupt(job.id, e))?);
    }
    if let Some(r) = route {
        job.resolved = Some(serde_json::from_str(&r).map_err(|e| corrupt(job.id, e))?);
    }
    Ok(job)
}

impl JobStore for SqliteJobStore {
    fn enqueue(&self, key: &JobKey, route: &ResolvedRoute) -> Result<Option<i64>, JobStoreError> {
        let route_json = serde_json::to_string(route)?;
        let c = self.conn();
        let n = c.execute(
            "INSERT OR IGNORE INTO jobs (series_uid, route, model, model_version, generation, state, created_at, route_json)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
            params![key.series_instance_uid, key.route, key.model, key.model_version, key.generation, now(), route_json],
        )?;
        Ok((n == 1).then(|| c.last_insert_rowid()))
    }

    fn claim(&self) -> Result<Option<Job>, JobStoreError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let row = tx
            .query_row(
                &format!("SELECT {COLS} FROM jobs WHERE state = 'pending' ORDER BY id LIMIT 1"),
                [],
                row_to_job,
            )
            .optional()?;
        let Some((mut job, json, route)) = row else {
            return Ok(None);
        };
        let started = now();
        tx.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?2 WHERE id = ?1",
            params![job.id, started],
        )?;
        tx.commit()?;
        job.state = JobState::Running;
        job.attempts += 1;
        job.started_at = Some(started);
        with_result((job, json, route)).map(Some)
    }

    fn finish(&self, id: i64, outcome: Outcome<'_>) -> Result<(), JobStoreError> {
        let state = outcome.state().as_str();
        let c = self.conn();
        match outcome {
            Outcome::Done(v) => c.execute(
                "UPDATE jobs SET state = ?4, result_json = ?2, error = NULL, finished_at = ?3 WHERE id = ?1",
                params![id, v.to_string(), now(), state],
            )?,
            Outcome::Failed(e) | Outcome::Refused(e) => c.execute(
                "UPDATE jobs SET state = ?4, error = ?2, finished_at = ?3 WHERE id = ?1",
                params![id, e, now(), state],
            )?,
        };
        Ok(())
    }

    fn finish_attempt(&self, id: i64, attempt: u32, outcome: Outcome<'_>) -> Result<bool, JobStoreError> {
        let state = outcome.state().as_str();
        let c = self.conn();
        let n = match outcome {
            Outcome::Done(v) => c.execute(
                "UPDATE jobs SET state = ?5, result_json = ?2, error = NULL, finished_at = ?3
                 WHERE id = ?1 AND state = 'running' AND attempts = ?4",
                params![id, v.to_string(), now(), attempt, state],
            )?,
            Outcome::Failed(e) | Outcome::Refused(e) => c.execute(
                "UPDATE jobs SET state = ?5, error = ?2, finished_at = ?3
                 WHERE id = ?1 AND state = 'running' AND attempts = ?4",
                params![id, e, now(), attempt, state],
            )?,
        };
        Ok(n == 1)
    }

    fn requeue_interrupted(&self) -> Result<usize, JobStoreError> {
        Ok(self.conn().execute("UPDATE jobs SET state = 'pending' WHERE state = 'running'", [])?)
    }

    fn list(&self) -> Result<Vec<Job>, JobStoreError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM jobs ORDER BY id"))?;
        let rows = st.query_map([], row_to_job)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(with_result).collect()
    }

    fn for_series(&self, series_instance_uid: &str) -> Result<Vec<Job>, JobStoreError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM jobs WHERE series_uid = ?1 ORDER BY id"))?;
        let rows = st.query_map(params![series_instance_uid], row_to_job)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(with_result).collect()
    }

    fn get(&self, id: i64) -> Result<Option<Job>, JobStoreError> {
        let c = self.conn();
        let row = c
            .query_row(&format!("SELECT {COLS} FROM jobs WHERE id = ?1"), params![id], row_to_job)
            .optional()?;
        row.map(with_result).transpose()
    }

    fn recent(&self, limit: usize) -> Result<Vec<Job>, JobStoreError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM jobs ORDER BY id DESC LIMIT ?1"))?;
        let rows = st
            .query_map(params![limit.min(i64::MAX as usize) as i64], row_to_job)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(with_result).collect()
    }

    fn count_by_state(&self) -> Result<Vec<(String, i64)>, JobStoreError> {
        crate::store::count_by_state(&self.conn(), "jobs").map_err(JobStoreError::from)
    }

    fn retrigger(&self, id: i64) -> Result<bool, JobStoreError> {
        let n = self.conn().execute(
            "UPDATE jobs SET state = 'pending', error = NULL WHERE id = ?1 AND state IN ('done', 'failed', 'refused')",
            params![id],
        )?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: u32) -> JobKey {
        JobKey {
            series_instance_uid: "1.2.3".into(),
            route: "pma".into(),
            model: "pma".into(),
            model_version: "1".into(),
            generation: g,
        }
    }

    fn route() -> ResolvedRoute {
        ResolvedRoute {
            route: "pma".into(),
            model: "pma".into(),
            send_to: vec!["pacs".into()],
            shadow: false,
            slices: Some(crate::volume::SliceSelection::ZMm(-12.5)),
        }
    }

    #[test]
    fn a_job_keeps_its_route_and_an_old_store_is_migrated() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.sqlite");
        {
            // A store as the previous version made it, with one pending job.
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE jobs (
                     id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL, route TEXT NOT NULL,
                     model TEXT NOT NULL, model_version TEXT NOT NULL, generation INTEGER NOT NULL,
                     state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, result_json TEXT,
                     created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
                     UNIQUE (series_uid, route, model_version, generation));
                 INSERT INTO jobs (series_uid, route, model, model_version, generation, state, created_at)
                 VALUES ('1.2.3', 'pma', 'pma', '1', 1, 'pending', '2026-01-01T00:00:00.000Z');",
            )
            .unwrap();
        }
        let s = SqliteJobStore::open(&p).unwrap();
        // Opened again: the migration is a no-op the second time.
        let s2 = SqliteJobStore::open(&p).unwrap();
        let old = s.claim().unwrap().unwrap();
        assert_eq!(old.resolved, None);
        let id = s2.enqueue(&key(2), &route()).unwrap().unwrap();
        assert_eq!(s.get(id).unwrap().unwrap().resolved, Some(route()));
        // Not part of the job's JSON.
        let v = serde_json::to_value(s.get(id).unwrap().unwrap()).unwrap();
        assert!(v.get("resolved").is_none() && v.get("send_to").is_none(), "{v}");
        // The state reads as it always did, in JSON and in the table.
        assert_eq!(v["state"], "pending");
        assert_eq!(format!("{:<8}|", JobState::Done), "done    |");
        assert_eq!(s.count_by_state().unwrap(), vec![("pending".to_owned(), 1), ("running".to_owned(), 1)]);
    }

    #[test]
    fn a_key_runs_once_and_a_new_generation_again() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteJobStore::open(&d.path().join("j.sqlite")).unwrap();
        assert!(s.enqueue(&key(1), &route()).unwrap().is_some());
        assert!(s.enqueue(&key(1), &route()).unwrap().is_none());
        assert!(s.enqueue(&key(2), &route()).unwrap().is_some());
        assert_eq!(s.list().unwrap().len(), 2);
        assert_eq!(s.count_by_state().unwrap(), vec![("pending".to_owned(), 2)]);
        let newest: Vec<u32> = s.recent(1).unwrap().iter().map(|j| j.key.generation).collect();
        assert_eq!(newest, vec![2]);
    }

    #[test]
    fn interrupted_jobs_resume_after_restart_and_results_persist() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.sqlite");
        {
            let s = SqliteJobStore::open(&p).unwrap();
            s.enqueue(&key(1), &route()).unwrap();
            let j = s.claim().unwrap().unwrap();
            assert_eq!(j.state, JobState::Running);
            assert!(s.claim().unwrap().is_none());
        } // crash while running
        let s = SqliteJobStore::open(&p).unwrap();
        assert_eq!(s.requeue_interrupted().unwrap(), 1);
        let j = s.claim().unwrap().unwrap();
        assert_eq!(j.attempts, 2);
        s.finish(j.id, Outcome::Done(&serde_json::json!({"value": 12.5}))).unwrap();
        let all = s.list().unwrap();
        assert_eq!(all[0].state, JobState::Done);
        assert_eq!(all[0].result.as_ref().unwrap()["value"], 12.5);
        assert!(s.retrigger(j.id).unwrap());
        assert_eq!(s.claim().unwrap().unwrap().id, j.id);
    }

    #[test]
    fn a_refusal_is_stored_as_refused_and_can_be_rerun() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteJobStore::open(&d.path().join("j.sqlite")).unwrap();
        s.enqueue(&key(1), &route()).unwrap();
        let j = s.claim().unwrap().unwrap();
        let reason = "refused: slice thickness 7.0 mm is outside the model's validated 0.5-5.0 mm (check: slice_thickness)";
        assert!(s.finish_attempt(j.id, j.attempts, Outcome::Refused(reason)).unwrap());
        let now = s.get(j.id).unwrap().unwrap();
        assert_eq!((now.state, now.error.as_deref()), (JobState::Refused, Some(reason)));
        assert!(now.state.is_finished());
        assert_eq!(serde_json::to_value(&now).unwrap()["state"], "refused");
        assert_eq!(s.count_by_state().unwrap(), vec![("refused".to_owned(), 1)]);
        // Not retried on its own: nothing pending.
        assert!(s.claim().unwrap().is_none());
        assert!(s.retrigger(j.id).unwrap());
        let again = s.claim().unwrap().unwrap();
        s.finish(again.id, Outcome::Failed("volume: boom")).unwrap();
        assert_eq!(s.get(j.id).unwrap().unwrap().state, JobState::Failed);
        // The state is the outcome's, not read from the text.
        assert!(s.retrigger(j.id).unwrap());
        let third = s.claim().unwrap().unwrap();
        assert!(s.finish_attempt(third.id, third.attempts, Outcome::Failed(reason)).unwrap());
        assert_eq!(s.get(j.id).unwrap().unwrap().state, JobState::Failed);
    }

    #[test]
    fn a_late_outcome_cannot_overwrite_a_deadline_failure() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteJobStore::open(&d.path().join("j.sqlite")).unwrap();
        s.enqueue(&key(1), &route()).unwrap();
        let j = s.claim().unwrap().unwrap();
        assert!(s.finish_attempt(j.id, j.attempts, Outcome::Failed("deadline of 600 s exceeded")).unwrap());
        // The abandoned computation comes back with a result: refused.
        assert!(!s.finish_attempt(j.id, j.attempts, Outcome::Done(&serde_json::json!({"value": 1.0}))).unwrap());
        let now = s.get(j.id).unwrap().unwrap();
        assert_eq!((now.state.as_str(), now.error.as_deref()), ("failed", Some("deadline of 600 s exceeded")));
        assert!(now.result.is_none());
        // Re-triggered and running again: the old attempt still cannot write.
        assert!(s.retrigger(j.id).unwrap());
        let again = s.claim().unwrap().unwrap();
        assert_eq!(again.attempts, j.attempts + 1);
        assert!(!s.finish_attempt(j.id, j.attempts, Outcome::Done(&serde_json::json!({"value": 1.0}))).unwrap());
        assert!(s.finish_attempt(j.id, again.attempts, Outcome::Done(&serde_json::json!({"value": 2.0}))).unwrap());
        assert_eq!(s.get(j.id).unwrap().unwrap().result.unwrap()["value"], 2.0);
    }
}
