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
//!
//! The [`JobStore`] trait is the seam for a distributed queue.

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job store: bad JSON in row {id}: {message}")]
    Corrupt { id: i64, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobKey {
    pub series_instance_uid: String,
    pub route: String,
    pub model: String,
    pub model_version: String,
    pub generation: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    #[serde(flatten)]
    pub key: JobKey,
    pub state: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

pub trait JobStore: Send + Sync + 'static {
    /// Ok(Some(id)) for a new job, Ok(None) when this key already exists.
    fn enqueue(&self, key: &JobKey) -> Result<Option<i64>, JobError>;
    /// Oldest pending job, now marked running.
    fn claim(&self) -> Result<Option<Job>, JobError>;
    fn finish(&self, id: i64, outcome: Result<&serde_json::Value, &str>) -> Result<(), JobError>;
    /// [`JobStore::finish`] for attempt `attempt` only while that attempt is
    /// still the running one. False, and nothing written, when the job moved
    /// on meanwhile (failed at its deadline, re-queued, re-triggered), so a
    /// late outcome cannot overwrite what happened since.
    fn finish_attempt(&self, id: i64, attempt: u32, outcome: Result<&serde_json::Value, &str>) -> Result<bool, JobError>;
    /// At start-up: running → pending. Returns how many.
    fn requeue_interrupted(&self) -> Result<usize, JobError>;
    fn list(&self) -> Result<Vec<Job>, JobError>;
    fn for_series(&self, series_instance_uid: &str) -> Result<Vec<Job>, JobError>;
    fn get(&self, id: i64) -> Result<Option<Job>, JobError>;
    /// The newest `limit` jobs, newest first.
    fn recent(&self, limit: usize) -> Result<Vec<Job>, JobError>;
    /// How many jobs are in each state.
    fn count_by_state(&self) -> Result<Vec<(String, i64)>, JobError>;
    /// Run a finished (done or failed) job again, same key: false when `id`
    /// is not finished.
    fn retrigger(&self, id: i64) -> Result<bool, JobError>;
}

pub struct SqliteJobStore {
    conn: crate::store::Locked,
}

fn now() -> String {
    crate::store::rfc3339(SystemTime::now())
}

impl SqliteJobStore {
    pub fn open(path: &Path) -> Result<SqliteJobStore, JobError> {
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
        Ok(SqliteJobStore { conn: crate::store::Locked::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

}

fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Job, Option<String>)> {
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
        },
        r.get(9)?,
    ))
}

const COLS: &str = "id, series_uid, route, model, model_version, generation, state, attempts, error, result_json, created_at, started_at, finished_at";

fn with_result((mut job, json): (Job, Option<String>)) -> Result<Job, JobError> {
    if let Some(j) = json {
        job.result = Some(serde_json::from_str(&j).map_err(|e| JobError::Corrupt {
            id: job.id,
            message: e.to_string(),
        })?);
    }
    Ok(job)
}

impl JobStore for SqliteJobStore {
    fn enqueue(&self, key: &JobKey) -> Result<Option<i64>, JobError> {
        let c = self.conn();
        let n = c.execute(
            "INSERT OR IGNORE INTO jobs (series_uid, route, model, model_version, generation, state, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
            params![key.series_instance_uid, key.route, key.model, key.model_version, key.generation, now()],
        )?;
        Ok((n == 1).then(|| c.last_insert_rowid()))
    }

    fn claim(&self) -> Result<Option<Job>, JobError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let row = tx
            .query_row(
                &format!("SELECT {COLS} FROM jobs WHERE state = 'pending' ORDER BY id LIMIT 1"),
                [],
                row_to_job,
            )
            .optional()?;
        let Some((mut job, json)) = row else {
            return Ok(None);
        };
        let started = now();
        tx.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?2 WHERE id = ?1",
            params![job.id, started],
        )?;
        tx.commit()?;
        job.state = "running".into();
        job.attempts += 1;
        job.started_at = Some(started);
        with_result((job, json)).map(Some)
    }

    fn finish(&self, id: i64, outcome: Result<&serde_json::Value, &str>) -> Result<(), JobError> {
        let c = self.conn();
        match outcome {
            Ok(v) => c.execute(
                "UPDATE jobs SET state = 'done', result_json = ?2, error = NULL, finished_at = ?3 WHERE id = ?1",
                params![id, v.to_string(), now()],
            )?,
            Err(e) => c.execute(
                "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?3 WHERE id = ?1",
                params![id, e, now()],
            )?,
        };
        Ok(())
    }

    fn finish_attempt(&self, id: i64, attempt: u32, outcome: Result<&serde_json::Value, &str>) -> Result<bool, JobError> {
        let c = self.conn();
        let n = match outcome {
            Ok(v) => c.execute(
                "UPDATE jobs SET state = 'done', result_json = ?2, error = NULL, finished_at = ?3
                 WHERE id = ?1 AND state = 'running' AND attempts = ?4",
                params![id, v.to_string(), now(), attempt],
            )?,
            Err(e) => c.execute(
                "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?3
                 WHERE id = ?1 AND state = 'running' AND attempts = ?4",
                params![id, e, now(), attempt],
            )?,
        };
        Ok(n == 1)
    }

    fn requeue_interrupted(&self) -> Result<usize, JobError> {
        Ok(self.conn().execute("UPDATE jobs SET state = 'pending' WHERE state = 'running'", [])?)
    }

    fn list(&self) -> Result<Vec<Job>, JobError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM jobs ORDER BY id"))?;
        let rows = st.query_map([], row_to_job)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(with_result).collect()
    }

    fn for_series(&self, series_instance_uid: &str) -> Result<Vec<Job>, JobError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM jobs WHERE series_uid = ?1 ORDER BY id"))?;
        let rows = st.query_map(params![series_instance_uid], row_to_job)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(with_result).collect()
    }

    fn get(&self, id: i64) -> Result<Option<Job>, JobError> {
        let c = self.conn();
        let row = c
            .query_row(&format!("SELECT {COLS} FROM jobs WHERE id = ?1"), params![id], row_to_job)
            .optional()?;
        row.map(with_result).transpose()
    }

    fn recent(&self, limit: usize) -> Result<Vec<Job>, JobError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM jobs ORDER BY id DESC LIMIT ?1"))?;
        let rows = st
            .query_map(params![limit.min(i64::MAX as usize) as i64], row_to_job)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(with_result).collect()
    }

    fn count_by_state(&self) -> Result<Vec<(String, i64)>, JobError> {
        crate::store::count_by_state(&self.conn(), "jobs").map_err(JobError::from)
    }

    fn retrigger(&self, id: i64) -> Result<bool, JobError> {
        let n = self.conn().execute(
            "UPDATE jobs SET state = 'pending', error = NULL WHERE id = ?1 AND state IN ('done', 'failed')",
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

    #[test]
    fn a_key_runs_once_and_a_new_generation_again() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteJobStore::open(&d.path().join("j.sqlite")).unwrap();
        assert!(s.enqueue(&key(1)).unwrap().is_some());
        assert!(s.enqueue(&key(1)).unwrap().is_none());
        assert!(s.enqueue(&key(2)).unwrap().is_some());
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
            s.enqueue(&key(1)).unwrap();
            let j = s.claim().unwrap().unwrap();
            assert_eq!(j.state, "running");
            assert!(s.claim().unwrap().is_none());
        } // crash while running
        let s = SqliteJobStore::open(&p).unwrap();
        assert_eq!(s.requeue_interrupted().unwrap(), 1);
        let j = s.claim().unwrap().unwrap();
        assert_eq!(j.attempts, 2);
        s.finish(j.id, Ok(&serde_json::json!({"value": 12.5}))).unwrap();
        let all = s.list().unwrap();
        assert_eq!(all[0].state, "done");
        assert_eq!(all[0].result.as_ref().unwrap()["value"], 12.5);
        assert!(s.retrigger(j.id).unwrap());
        assert_eq!(s.claim().unwrap().unwrap().id, j.id);
    }

    #[test]
    fn a_late_outcome_cannot_overwrite_a_deadline_failure() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteJobStore::open(&d.path().join("j.sqlite")).unwrap();
        s.enqueue(&key(1)).unwrap();
        let j = s.claim().unwrap().unwrap();
        assert!(s.finish_attempt(j.id, j.attempts, Err("deadline of 600 s exceeded")).unwrap());
        // The abandoned computation comes back with a result: refused.
        assert!(!s.finish_attempt(j.id, j.attempts, Ok(&serde_json::json!({"value": 1.0}))).unwrap());
        let now = s.get(j.id).unwrap().unwrap();
        assert_eq!((now.state.as_str(), now.error.as_deref()), ("failed", Some("deadline of 600 s exceeded")));
        assert!(now.result.is_none());
        // Re-triggered and running again: the old attempt still cannot write.
        assert!(s.retrigger(j.id).unwrap());
        let again = s.claim().unwrap().unwrap();
        assert_eq!(again.attempts, j.attempts + 1);
        assert!(!s.finish_attempt(j.id, j.attempts, Ok(&serde_json::json!({"value": 1.0}))).unwrap());
        assert!(s.finish_attempt(j.id, again.attempts, Ok(&serde_json::json!({"value": 2.0}))).unwrap());
        assert_eq!(s.get(j.id).unwrap().unwrap().result.unwrap()["value"], 2.0);
    }
}
