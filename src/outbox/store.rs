//! The durable outbox: one row per (destination, SOP instance).
//!
//! States (PS3.4 says nothing here; this is ours):
//!
//! ```text
//! pending ──claim──▶ sending ──success/warning──▶ delivered
//!    ▲                  │ ├──transient, attempts < max──▶ pending (next_attempt_at = now + backoff)
//!    │                  │ └──permanent, or attempts = max──▶ dead ──dismiss──▶ dismissed
//!    └──retry(id)───────┼──────────────────────────────────────┘
//!    └──crash (start-up requeue) / shutdown before sending──┘
//! ```
//!
//! Every transition out of `sending` is guarded by `state = 'sending'`, so a
//! stale writer cannot resurrect a delivered or dismissed row. Times are
//! stored as Unix milliseconds (compared in SQL) and printed as RFC 3339.
//! The file runs with `synchronous=FULL`: an enqueue or a transition that
//! returned survives power loss.
//!
//! [`OutboxStore`] is the seam for an object store or a message queue.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::{Serialize, Serializer};

use super::OutboxError;
use crate::dicom::Uid;
use crate::store::{Locked, Mode, Synchronous};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    Pending,
    Sending,
    Delivered,
    /// Dead letter: permanent failure, or transient failures up to
    /// `max_attempts`. Stays until an operator retries or dismisses it.
    Dead,
    /// A dead letter an operator has acknowledged. Kept (not deleted) so the
    /// (destination, SOP instance) uniqueness still holds: a late re-enqueue
    /// of the same result does not send it again.
    Dismissed,
}

impl ItemState {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Pending => "pending",
            ItemState::Sending => "sending",
            ItemState::Delivered => "delivered",
            ItemState::Dead => "dead",
            ItemState::Dismissed => "dismissed",
        }
    }
    fn parse(s: &str) -> Option<ItemState> {
        Some(match s {
            "pending" => ItemState::Pending,
            "sending" => ItemState::Sending,
            "delivered" => ItemState::Delivered,
            "dead" => ItemState::Dead,
            "dismissed" => ItemState::Dismissed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ItemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the report stage hands over: a Part-10 file already durable on disk
/// and the UIDs it was written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// A key of the destinations map, not an AE title: routes name
    /// destinations, and the AE title of one may change in config.
    pub destination: String,
    pub path: PathBuf,
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    New(i64),
    /// This (destination, SOP instance) was enqueued before; nothing changed.
    Existing(i64),
}

impl Enqueued {
    pub fn id(self) -> i64 {
        match self {
            Enqueued::New(id) | Enqueued::Existing(id) => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxItem {
    pub id: i64,
    pub destination: String,
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub state: ItemState,
    /// Attempts started (a claim counts one).
    pub attempts: u32,
    /// When a `pending` item becomes due; meaningless in other states.
    #[serde(serialize_with = "ser_time")]
    pub next_attempt_at: SystemTime,
    pub last_error: Option<String>,
    #[serde(serialize_with = "ser_time")]
    pub created_at: SystemTime,
    #[serde(serialize_with = "ser_opt_time")]
    pub delivered_at: Option<SystemTime>,
}

pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_opt_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Durable outbox items. Every method is one short atomic operation; the
/// worker is the only caller of the `sending` transitions.
pub trait OutboxStore: Send + Sync + 'static {
    /// Durable when it returns `Ok`. Idempotent per (destination, SOP instance).
    fn enqueue(&self, item: &NewItem, now: SystemTime) -> Result<Enqueued, OutboxError>;
    /// Up to `limit` pending items due at `now`, oldest due first, skipping
    /// destinations that already have a batch in flight; now `sending`, with
    /// `attempts` incremented.
    fn claim_due(
        &self,
        now: SystemTime,
        skip_destinations: &[String],
        limit: usize,
    ) -> Result<Vec<OutboxItem>, OutboxError>;
    /// The earliest `next_attempt_at` of a pending item outside `skip_destinations`.
    fn next_due(&self, skip_destinations: &[String]) -> Result<Option<SystemTime>, OutboxError>;
    /// sending → delivered. `note` keeps a warning status for the record.
    fn mark_delivered(
        &self,
        id: i64,
        now: SystemTime,
        note: Option<&str>,
    ) -> Result<(), OutboxError>;
    /// sending → pending, due at `at`.
    fn schedule_retry(&self, id: i64, at: SystemTime, error: &str) -> Result<(), OutboxError>;
    /// sending → dead.
    fn mark_dead(&self, id: i64, error: &str) -> Result<(), OutboxError>;
    /// sending → pending without spending an attempt (shutdown before the
    /// item went on the wire).
    fn unclaim(&self, id: i64) -> Result<(), OutboxError>;
    /// sending → pending, due at `at`, without spending an attempt: another
    /// worker holds the item, or the shared claims could not be reached
    /// (`claims`). `note` says why, in `last_error`.
    fn defer(&self, id: i64, at: SystemTime, note: &str) -> Result<(), OutboxError>;
    /// At start-up: sending → pending, due now. The attempt stays counted.
    fn requeue_interrupted(&self, now: SystemTime) -> Result<usize, OutboxError>;
    fn list(&self) -> Result<Vec<OutboxItem>, OutboxError>;
    fn get(&self, id: i64) -> Result<Option<OutboxItem>, OutboxError>;
    /// How many items are in each state.
    fn count_by_state(&self) -> Result<Vec<(String, i64)>, OutboxError>;
    /// Send again now: a dead letter goes back to pending with its attempts
    /// reset; a pending item waiting out its backoff becomes due now (its
    /// attempts kept, so the dead-letter limit still holds). False for any
    /// other state (sending, delivered, dismissed).
    fn retry(&self, id: i64, now: SystemTime) -> Result<bool, OutboxError>;
    /// dead → dismissed. False if `id` is not dead.
    fn dismiss(&self, id: i64) -> Result<bool, OutboxError>;
}

/// [`OutboxStore`] in a table `outbox` of an SQLite file, which may be
/// shared with other stores (own connection, own table).
pub struct SqliteOutboxStore {
    conn: Locked,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS outbox (
         id               INTEGER PRIMARY KEY AUTOINCREMENT,
         destination      TEXT NOT NULL,
         path             TEXT NOT NULL,
         sop_class_uid    TEXT NOT NULL,
         sop_instance_uid TEXT NOT NULL,
         state            TEXT NOT NULL CHECK (state IN ('pending','sending','delivered','dead','dismissed')),
         attempts         INTEGER NOT NULL DEFAULT 0,
         next_attempt_at  INTEGER NOT NULL,
         last_error       TEXT,
         created_at       INTEGER NOT NULL,
         delivered_at     INTEGER,
         UNIQUE (destination, sop_instance_uid)
     );
     CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);";

const COLS: &str = "id, destination, path, sop_class_uid, sop_instance_uid, state, attempts, \
                    next_attempt_at, last_error, created_at, delivered_at";

impl SqliteOutboxStore {
    pub fn open(path: &Path) -> Result<SqliteOutboxStore, OutboxError> {
        // FULL: an enqueue that returned must survive power loss, the same
        // promise the spool makes for received instances.
        let conn = crate::store::open(path, Mode::ReadWrite(Synchronous::Full))?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteOutboxStore {
            conn: Locked::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    fn transition(&self, sql: &str, p: impl rusqlite::Params) -> Result<bool, OutboxError> {
        Ok(self.conn().execute(sql, p)? == 1)
    }
}

/// Items of a store file, read-only: for the CLI, which must not create
/// the file or take write locks while the node runs. A file without the
/// table lists nothing.
pub fn list_read_only(path: &Path) -> Result<Vec<OutboxItem>, OutboxError> {
    let conn = crate::store::open(path, Mode::ReadOnly)?;
    let exists: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'outbox'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    select(&conn, "1 = 1 ORDER BY id", [])
}

fn row_to_item(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<OutboxItem, OutboxError>> {
    let id: i64 = r.get(0)?;
    let state: String = r.get(5)?;
    let Some(state) = ItemState::parse(&state) else {
        return Ok(Err(OutboxError::Corrupt {
            id,
            message: format!("unknown state `{state}`"),
        }));
    };
    let path: String = r.get(2)?;
    Ok(Ok(OutboxItem {
        id,
        destination: r.get(1)?,
        path: PathBuf::from(path),
        sop_class_uid: r.get(3)?,
        sop_instance_uid: r.get(4)?,
        state,
        attempts: r.get(6)?,
        next_attempt_at: from_ms(r.get(7)?),
        last_error: r.get(8)?,
        created_at: from_ms(r.get(9)?),
        delivered_at: r.get::<_, Option<i64>>(10)?.map(from_ms),
    }))
}

fn select(
    conn: &Connection,
    where_: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<OutboxItem>, OutboxError> {
    let mut st = conn.prepare(&format!("SELECT {COLS} FROM outbox WHERE {where_}"))?;
    let rows = st
        .query_map(p, row_to_item)?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().collect()
}

/// `?n, ?n+1, ...` for `count` parameters starting at `first`.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl OutboxStore for SqliteOutboxStore {
    fn enqueue(&self, item: &NewItem, now: SystemTime) -> Result<Enqueued, OutboxError> {
        let path = item
            .path
            .to_str()
            .ok_or_else(|| OutboxError::NonUtf8Path(item.path.clone()))?;
        let c = self.conn();
        let n = c.execute(
            "INSERT OR IGNORE INTO outbox
                 (destination, path, sop_class_uid, sop_instance_uid, state, attempts, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5)",
            params![
                item.destination,
                path,
                item.sop_class_uid.as_str(),
                item.sop_instance_uid.as_str(),
                to_ms(now)
            ],
        )?;
        if n == 1 {
            return Ok(Enqueued::New(c.last_insert_rowid()));
        }
        let id = c.query_row(
            "SELECT id FROM outbox WHERE destination = ?1 AND sop_instance_uid = ?2",
            params![item.destination, item.sop_instance_uid.as_str()],
            |r| r.get(0),
        )?;
        Ok(Enqueued::Existing(id))
    }

    fn claim_due(
        &self,
        now: SystemTime,
        skip_destinations: &[String],
        limit: usize,
    ) -> Result<Vec<OutboxItem>, OutboxError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let skip = placeholders(3, skip_destinations.len());
        let mut args: Vec<rusqlite::types::Value> = vec![to_ms(now).into(), (limit as i64).into()];
        args.extend(skip_destinations.iter().map(|d| d.clone().into()));
        let mut items = select(
            &tx,
            &format!(
                "state = 'pending' AND next_attempt_at <= ?1 AND destination NOT IN ({skip})
                 ORDER BY next_attempt_at, id LIMIT ?2"
            ),
            params_from_iter(args),
        )?;
        for it in &mut items {
            tx.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id = ?1",
                [it.id],
            )?;
            it.state = ItemState::Sending;
            it.attempts += 1;
        }
        tx.commit()?;
        Ok(items)
    }

    fn next_due(&self, skip_destinations: &[String]) -> Result<Option<SystemTime>, OutboxError> {
        let skip = placeholders(1, skip_destinations.len());
        let ms: Option<i64> = self.conn().query_row(
            &format!(
                "SELECT MIN(next_attempt_at) FROM outbox
                 WHERE state = 'pending' AND destination NOT IN ({skip})"
            ),
            params_from_iter(skip_destinations),
            |r| r.get(0),
        )?;
        Ok(ms.map(from_ms))
    }

    fn mark_delivered(
        &self,
        id: i64,
        now: SystemTime,
        note: Option<&str>,
    ) -> Result<(), OutboxError> {
        self.transition(
            "UPDATE outbox SET state = 'delivered', delivered_at = ?2, last_error = ?3
             WHERE id = ?1 AND state = 'sending'",
            params![id, to_ms(now), note],
        )?;
        Ok(())
    }

    fn schedule_retry(&self, id: i64, at: SystemTime, error: &str) -> Result<(), OutboxError> {
        self.transition(
            "UPDATE outbox SET state = 'pending', next_attempt_at = ?2, last_error = ?3
             WHERE id = ?1 AND state = 'sending'",
            params![id, to_ms(at), error],
        )?;
        Ok(())
    }

    fn mark_dead(&self, id: i64, error: &str) -> Result<(), OutboxError> {
        self.transition(
            "UPDATE outbox SET state = 'dead', last_error = ?2 WHERE id = ?1 AND state = 'sending'",
            params![id, error],
        )?;
        Ok(())
    }

    fn unclaim(&self, id: i64) -> Result<(), OutboxError> {
        self.transition(
            "UPDATE outbox SET state = 'pending', attempts = MAX(attempts - 1, 0)
             WHERE id = ?1 AND state = 'sending'",
            [id],
        )?;
        Ok(())
    }

    fn defer(&self, id: i64, at: SystemTime, note: &str) -> Result<(), OutboxError> {
        self.transition(
            "UPDATE outbox SET state = 'pending', attempts = MAX(attempts - 1, 0), next_attempt_at = ?2,
                               last_error = ?3
             WHERE id = ?1 AND state = 'sending'",
            params![id, to_ms(at), note],
        )?;
        Ok(())
    }

    fn requeue_interrupted(&self, now: SystemTime) -> Result<usize, OutboxError> {
        Ok(self.conn().execute(
            "UPDATE outbox SET state = 'pending', next_attempt_at = ?1 WHERE state = 'sending'",
            [to_ms(now)],
        )?)
    }

    fn list(&self) -> Result<Vec<OutboxItem>, OutboxError> {
        select(&self.conn(), "1 = 1 ORDER BY id", [])
    }

    fn count_by_state(&self) -> Result<Vec<(String, i64)>, OutboxError> {
        Ok(crate::store::count_by_state(&self.conn(), "outbox")?)
    }

    fn get(&self, id: i64) -> Result<Option<OutboxItem>, OutboxError> {
        Ok(select(&self.conn(), "id = ?1", [id])?.into_iter().next())
    }

    fn retry(&self, id: i64, now: SystemTime) -> Result<bool, OutboxError> {
        self.transition(
            "UPDATE outbox SET attempts = CASE state WHEN 'dead' THEN 0 ELSE attempts END,
                               state = 'pending', next_attempt_at = ?2
             WHERE id = ?1 AND state IN ('dead', 'pending')",
            params![id, to_ms(now)],
        )
    }

    fn dismiss(&self, id: i64) -> Result<bool, OutboxError> {
        self.transition(
            "UPDATE outbox SET state = 'dismissed' WHERE id = ?1 AND state = 'dead'",
            [id],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(dest: &str, sop: &str) -> NewItem {
        NewItem {
            destination: dest.into(),
            path: PathBuf::from(format!("/data/results/{sop}.dcm")),
            sop_class_uid: Uid::parse("1.2.840.10008.5.1.4.1.1.88.33").unwrap(),
            sop_instance_uid: Uid::parse(sop).unwrap(),
        }
    }

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn open() -> (tempfile::TempDir, SqliteOutboxStore) {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteOutboxStore::open(&d.path().join("o.sqlite")).unwrap();
        (d, s)
    }

    #[test]
    fn one_row_per_destination_and_sop_instance() {
        let (_d, s) = open();
        let a = s.enqueue(&item("pacs", "1.2.3"), t(0)).unwrap();
        assert!(matches!(a, Enqueued::New(_)));
        assert_eq!(
            s.enqueue(&item("pacs", "1.2.3"), t(5)).unwrap(),
            Enqueued::Existing(a.id())
        );
        assert!(matches!(
            s.enqueue(&item("archive", "1.2.3"), t(0)).unwrap(),
            Enqueued::New(_)
        ));
        assert_eq!(s.list().unwrap().len(), 2);
        // Even after delivery, the same result is not queued again.
        let c = s.claim_due(t(0), &[], 10).unwrap();
        for it in &c {
            s.mark_delivered(it.id, t(1), None).unwrap();
        }
        assert_eq!(
            s.enqueue(&item("pacs", "1.2.3"), t(9)).unwrap(),
            Enqueued::Existing(a.id())
        );
        assert!(s.claim_due(t(100), &[], 10).unwrap().is_empty());
    }

    #[test]
    fn claim_respects_due_time_and_busy_destinations() {
        let (_d, s) = open();
        s.enqueue(&item("pacs", "1.1"), t(0)).unwrap();
        s.enqueue(&item("archive", "1.2"), t(0)).unwrap();
        let c = s.claim_due(t(0), &["pacs".to_string()], 10).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].destination, "archive");
        assert_eq!((c[0].state, c[0].attempts), (ItemState::Sending, 1));
        // The in-flight item is not claimed twice.
        assert!(s
            .claim_due(t(0), &["pacs".to_string()], 10)
            .unwrap()
            .is_empty());
        s.schedule_retry(c[0].id, t(2), "connection refused")
            .unwrap();
        assert_eq!(s.next_due(&["pacs".to_string()]).unwrap(), Some(t(2)));
        assert_eq!(s.next_due(&[]).unwrap(), Some(t(0)));
        assert_eq!(
            s.claim_due(t(1), &["pacs".to_string()], 10).unwrap().len(),
            0
        );
        let again = s.claim_due(t(2), &["pacs".to_string()], 10).unwrap();
        assert_eq!(again[0].attempts, 2);
        assert_eq!(again[0].last_error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn dead_letters_retry_and_dismiss() {
        let (_d, s) = open();
        let id = s.enqueue(&item("pacs", "1.1"), t(0)).unwrap().id();
        s.claim_due(t(0), &[], 10).unwrap();
        s.mark_dead(id, "status 0xA900").unwrap();
        assert!(s.claim_due(t(1000), &[], 10).unwrap().is_empty());
        let dead = s.get(id).unwrap().unwrap();
        assert_eq!(
            (dead.state, dead.last_error.as_deref()),
            (ItemState::Dead, Some("status 0xA900"))
        );
        // Only dead items can be dismissed; dead and pending ones retried.
        assert!(!s.dismiss(id + 1).unwrap());
        assert!(s.retry(id, t(5)).unwrap());
        assert!(s.retry(id, t(4)).unwrap(), "a pending item can be made due now");
        assert_eq!(s.get(id).unwrap().unwrap().attempts, 0);
        let c = s.claim_due(t(4), &[], 10).unwrap();
        assert_eq!(c[0].attempts, 1, "retry gives a full set of attempts");
        assert!(!s.retry(id, t(5)).unwrap(), "not while it is being sent");
        s.mark_dead(id, "again").unwrap();
        assert!(s.dismiss(id).unwrap());
        assert_eq!(s.get(id).unwrap().unwrap().state, ItemState::Dismissed);
        // Outcomes never move a row that is not `sending`.
        s.mark_delivered(id, t(6), None).unwrap();
        s.schedule_retry(id, t(6), "x").unwrap();
        assert_eq!(s.get(id).unwrap().unwrap().state, ItemState::Dismissed);
    }

    #[test]
    fn crash_while_sending_requeues_at_start_up() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.sqlite");
        {
            let s = SqliteOutboxStore::open(&p).unwrap();
            s.enqueue(&item("pacs", "1.1"), t(0)).unwrap();
            s.enqueue(&item("pacs", "1.2"), t(0)).unwrap();
            let c = s.claim_due(t(0), &[], 10).unwrap();
            s.mark_delivered(c[0].id, t(1), None).unwrap();
        } // crash with 1.2 on the wire
        let s = SqliteOutboxStore::open(&p).unwrap();
        assert!(s.claim_due(t(10), &[], 10).unwrap().is_empty());
        assert_eq!(s.requeue_interrupted(t(10)).unwrap(), 1);
        let c = s.claim_due(t(10), &[], 10).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].sop_instance_uid.as_str(), c[0].attempts), ("1.2", 2));
        // Shutdown before the wire gives the attempt back.
        s.unclaim(c[0].id).unwrap();
        assert_eq!(s.get(c[0].id).unwrap().unwrap().attempts, 1);
    }

    #[test]
    fn read_only_listing_does_not_create_the_table() {
        let (d, s) = open();
        s.enqueue(&item("pacs", "1.1"), t(0)).unwrap();
        assert_eq!(list_read_only(&d.path().join("o.sqlite")).unwrap().len(), 1);
        let other = d.path().join("other.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE x (a);")
            .unwrap();
        assert!(list_read_only(&other).unwrap().is_empty());
        assert!(list_read_only(&d.path().join("missing.sqlite")).is_err());
    }
}
