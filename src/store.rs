//! What the SQLite stores (series index, completion queue, jobs, outbox) share:
//! how their file is opened, how one connection is shared between threads,
//! the per-state counts and the timestamp format of their TEXT columns.
//!
//! **Input.** A file path and a [`Mode`]. **Output.** A configured
//! [`Connection`], optionally in a [`Locked`] for stores used from several
//! threads.
//!
//! **Invariants.**
//! - Every read-write connection runs in WAL mode with a 5 s busy timeout, so
//!   the listing commands and the HTTP API read a consistent snapshot while
//!   `serve` commits, and a writer waits for another instead of failing.
//! - A read-only open never creates the file and never takes a write lock:
//!   the CLI may run next to `serve`, and before it ever ran.
//! - Each store says how durable a commit must be ([`Synchronous`]); the
//!   helper never picks it for them.
//!
//! **Failure modes.** Open and pragma errors come back as [`rusqlite::Error`]
//! for the store to wrap in its own error (with the path, where it wants
//! one). A file system without WAL support (some network mounts) is logged
//! and used as it is: still correct, but readers then wait behind writers.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How long a statement waits for another connection's write lock. Writes
/// are short, so 5 s means something is wrong, not busy.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How a store opens its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// For listings while `serve` writes: the file must exist; no write lock,
    /// no journal-mode change.
    ReadOnly,
    /// Creates the file if needed and switches it to WAL.
    ReadWrite(Synchronous),
}

/// SQLite's `synchronous` pragma: what a commit that returned promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives power loss (an fsync per commit): for state nothing else can
    /// rebuild, such as jobs and the outbox. SQLite's own default.
    Full,
    /// The last commits may be lost on power loss, the file is never
    /// corrupted: for the series index (and its queue), which recovery
    /// rebuilds from the spool.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Opens `path` as `mode` says; see the module doc for what every store gets.
pub fn open(path: &Path, mode: Mode) -> rusqlite::Result<Connection> {
    let sync = match mode {
        Mode::ReadOnly => {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            return Ok(conn);
        }
        Mode::ReadWrite(sync) => sync,
    };
    let conn = Connection::open(path)?;
    // Before journal_mode: switching to WAL takes a lock another process may hold.
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let journal: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !journal.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode = journal, "SQLite file is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", sync.pragma())?;
    Ok(conn)
}

/// One connection shared by the threads of a store. A rusqlite
/// [`Connection`] is `Send` but not `Sync`, and every call is short, so a
/// plain mutex is enough.
pub struct Locked(Mutex<Connection>);

impl Locked {
    pub fn new(conn: Connection) -> Self {
        Locked(Mutex::new(conn))
    }

    /// The connection, even after a thread panicked holding it: a panic
    /// cannot leave it half-way, since every statement is atomic and a
    /// transaction dropped by the unwinding rolls back.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `SELECT state, COUNT(*) ... GROUP BY state` over one of the node's
/// tables (jobs, series, outbox all keep a `state` column), so a status
/// poll counts in SQLite instead of loading every row.
pub(crate) fn count_by_state(c: &Connection, table: &str) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = c.prepare(&format!("SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state"))?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// RFC 3339 in UTC with fixed millisecond width, so the TEXT columns sort
/// chronologically.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let dt = time::OffsetDateTime::from(t);
    dt.format(&fmt).unwrap_or_else(|_| {
        // Only a year outside 0..=9999 gets here; keep something sortable-ish
        // rather than failing an insert over a clock.
        format!("{}", dt.unix_timestamp())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(c: &Connection, name: &str) -> String {
        c.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, rusqlite::types::Value>(0))
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
            .unwrap()
    }

    #[test]
    fn read_write_is_wal_with_the_busy_timeout_and_the_asked_durability() {
        let dir = tempfile::tempdir().unwrap();
        for (sync, level) in [(Synchronous::Full, "2"), (Synchronous::Normal, "1")] {
            let path = dir.path().join(format!("{sync:?}.sqlite"));
            let c = open(&path, Mode::ReadWrite(sync)).unwrap();
            assert!(path.exists());
            assert_eq!(pragma(&c, "journal_mode"), "wal");
            assert_eq!(pragma(&c, "busy_timeout"), "5000");
            assert_eq!(pragma(&c, "synchronous"), level, "{sync:?}");
        }
    }

    #[test]
    fn full_is_what_sqlite_does_when_nobody_asks() {
        // Stores that never set the pragma (the job store did not) keep
        // their durability when they move to `Synchronous::Full`.
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join("plain.sqlite")).unwrap();
        let _: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
        assert_eq!(pragma(&c, "synchronous"), "2");
    }

    #[test]
    fn read_only_needs_the_file_and_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        assert!(open(&path, Mode::ReadOnly).is_err());
        assert!(!path.exists(), "a read-only open created the file");
        let rw = open(&path, Mode::ReadWrite(Synchronous::Full)).unwrap();
        rw.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);").unwrap();
        let ro = open(&path, Mode::ReadOnly).unwrap();
        assert_eq!(pragma(&ro, "busy_timeout"), "5000");
        let n: i64 = ro.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1);
        let e = ro.execute("INSERT INTO t VALUES (2)", []).unwrap_err();
        assert_eq!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::ReadOnly), "{e}");
        // The writer still commits while a reader is open (WAL).
        rw.execute("INSERT INTO t VALUES (3)", []).unwrap();
        let n: i64 = ro.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn locked_survives_a_panic_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let locked = std::sync::Arc::new(Locked::new(
            open(&dir.path().join("l.sqlite"), Mode::ReadWrite(Synchronous::Full)).unwrap(),
        ));
        locked.lock().execute_batch("CREATE TABLE t (x INTEGER);").unwrap();
        let l = locked.clone();
        let panicked = std::thread::spawn(move || {
            let mut c = l.lock();
            let tx = c.transaction().unwrap();
            tx.execute("INSERT INTO t VALUES (1)", []).unwrap();
            panic!("under the lock");
        })
        .join();
        assert!(panicked.is_err());
        let c = locked.lock();
        // The unfinished transaction rolled back; the connection works.
        let n: i64 = c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
        c.execute("INSERT INTO t VALUES (2)", []).unwrap();
    }
}
