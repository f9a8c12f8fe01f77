//! The durable hand-off of [`SeriesCompleted`] events to routing.
//!
//! Kept to push / peek / ack / notified so a distributed queue can replace
//! SQLite later without touching the tracker or routing.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::SystemTime;

use rusqlite::{params, OptionalExtension};
use tokio::sync::Notify;

use super::{SeriesCompleted, SeriesError};
use crate::store::{rfc3339, Locked};

/// Durable FIFO of completion events, delivered at least once.
///
/// A consumer loops: `peek`, process, `ack`; when `peek` is empty it awaits
/// `notified()` and peeks again. An event stays at the head until acked, so a
/// consumer that crashes mid-way sees it again on restart.
pub trait CompletionQueue: Send + Sync + 'static {
    /// Durable when it returns `Ok`.
    fn push(&self, ev: &SeriesCompleted) -> Result<(), SeriesError>;
    /// The oldest un-acked event and its id.
    fn peek(&self) -> Result<Option<(i64, SeriesCompleted)>, SeriesError>;
    /// Removes the event; acking an unknown id is a no-op so a retried ack is safe.
    fn ack(&self, id: i64) -> Result<(), SeriesError>;
    /// Resolves after a push (possibly spuriously). Created before a `peek`
    /// that comes back empty, or after it: a push in between is not lost.
    fn notified(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// [`CompletionQueue`] in a table of an SQLite file, which may be the index
/// file: its own connection, its own table.
pub struct SqliteCompletionQueue {
    conn: Locked,
    /// Wakes the consumer after a push in this process. `notify_one` keeps a
    /// permit when nobody waits, which is what makes a push between an empty
    /// `peek` and `notified().await` not get lost.
    notify: Notify,
}

impl SqliteCompletionQueue {
    pub fn open(path: &Path) -> Result<Self, SeriesError> {
        let conn = super::index::open_rw(path)?;
        // AUTOINCREMENT: ids are never reused, so a stale ack cannot remove
        // a newer event.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS completion_queue (
                 id          INTEGER PRIMARY KEY AUTOINCREMENT,
                 event_json  TEXT NOT NULL,
                 enqueued_at TEXT NOT NULL
             );",
        )?;
        Ok(SqliteCompletionQueue {
            conn: Locked::new(conn),
            notify: Notify::new(),
        })
    }
}

impl CompletionQueue for SqliteCompletionQueue {
    fn push(&self, ev: &SeriesCompleted) -> Result<(), SeriesError> {
        let json = serde_json::to_string(ev)
            .map_err(|e| SeriesError::Corrupt(format!("cannot encode event: {e}")))?;
        self.conn.lock().execute(
            "INSERT INTO completion_queue (event_json, enqueued_at) VALUES (?1, ?2)",
            params![json, rfc3339(SystemTime::now())],
        )?;
        self.notify.notify_one();
        Ok(())
    }

    fn peek(&self) -> Result<Option<(i64, SeriesCompleted)>, SeriesError> {
        let row: Option<(i64, String)> = self
            .conn
            .lock()
            .query_row(
                "SELECT id, event_json FROM completion_queue ORDER BY id LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(id, json)| {
            serde_json::from_str(&json)
                .map(|ev| (id, ev))
                // Permanent: the head stays put until an operator acks `id`.
                .map_err(|e| SeriesError::Corrupt(format!("completion_queue id {id}: {e}")))
        })
        .transpose()
    }

    fn ack(&self, id: i64) -> Result<(), SeriesError> {
        self.conn.lock().execute("DELETE FROM completion_queue WHERE id = ?1", [id])?;
        Ok(())
    }

    fn notified(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.notify.notified())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::Uid;
    use crate::series::{CompletionReason, SeriesIndex};
    use std::time::Duration;

    fn ev(series: &str, generation: u32) -> SeriesCompleted {
        SeriesCompleted {
            series_instance_uid: Uid::parse(series).unwrap(),
            study_instance_uid: Uid::parse("1.2.9").unwrap(),
            reason: CompletionReason::AssociationReleased,
            instances: 3,
            generation,
        }
    }

    #[test]
    fn push_peek_ack_persist_across_reopen_and_share_the_index_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let _index = SeriesIndex::open(&path).unwrap();
        {
            let q = SqliteCompletionQueue::open(&path).unwrap();
            assert_eq!(q.peek().unwrap(), None);
            q.push(&ev("1.2.3", 1)).unwrap();
            q.push(&ev("1.2.4", 1)).unwrap();
            let (id, head) = q.peek().unwrap().unwrap();
            assert_eq!(head, ev("1.2.3", 1));
            q.ack(id).unwrap();
            q.ack(id).unwrap(); // retried ack is harmless
        }
        let q = SqliteCompletionQueue::open(&path).unwrap();
        let (id, head) = q.peek().unwrap().unwrap();
        assert_eq!(head, ev("1.2.4", 1));
        q.ack(id).unwrap();
        assert_eq!(q.peek().unwrap(), None);
        // Ids are not reused after the table empties.
        q.push(&ev("1.2.5", 2)).unwrap();
        assert!(q.peek().unwrap().unwrap().0 > id);
    }

    #[test]
    fn event_json_uses_snake_case_reason() {
        let v = serde_json::to_value(ev("1.2.3", 2)).unwrap();
        assert_eq!(v["reason"], "association_released");
        assert_eq!(v["series_instance_uid"], "1.2.3");
        assert_eq!(v["generation"], 2);
    }

    #[tokio::test]
    async fn push_before_wait_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteCompletionQueue::open(&dir.path().join("q.sqlite")).unwrap();
        assert_eq!(q.peek().unwrap(), None);
        q.push(&ev("1.2.3", 1)).unwrap();
        tokio::time::timeout(Duration::from_secs(2), q.notified())
            .await
            .expect("stored permit wakes the waiter");
    }
}
