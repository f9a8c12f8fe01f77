//! The SQLite index of stored instances, grouped by series.
//!
//! One writer (the tracker actor, plus later stages calling `set_state`) and
//! any number of readers (routing, `biomarker-node series`) share the file:
//! WAL lets readers see a consistent snapshot while the writer commits.
//!
//! Retention deletes spool files but keeps their rows, flagged with
//! `purged_at`: such an instance is no longer a duplicate (a copy sent again
//! is stored as new), no longer part of its series for routing and jobs,
//! and not "missing" for recovery.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    InsertOutcome, SeriesCompleted, SeriesError, SeriesState, SeriesSummary, SpooledSeries,
    StoredInstance,
};
use crate::dicom::header::InstanceHeader;
use crate::dicom::Uid;
use crate::store::{self, rfc3339, Mode, Synchronous};

/// Bumped on every incompatible schema change; an index from a newer build is
/// refused rather than misread. 2 added `series.state_reason`,
/// `series.purged_at`, `series.purged_instances` and `instances.purged_at`;
/// [`SeriesIndex::open`] migrates a version 1 index in place.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    modality            TEXT,
    series_description  TEXT,
    state               TEXT NOT NULL,
    completion_reason   TEXT,
    generation          INTEGER NOT NULL,
    first_received_at   TEXT NOT NULL,
    last_received_at    TEXT NOT NULL,
    completed_at        TEXT,
    state_reason        TEXT,
    purged_at           TEXT,
    purged_instances    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY NOT NULL,
    series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
    rel_path            TEXT NOT NULL,
    transfer_syntax     TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    association_id      INTEGER NOT NULL,
    calling_ae          TEXT NOT NULL,
    received_at         TEXT NOT NULL,
    header_json         TEXT NOT NULL,
    purged_at           TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_instance_uid);
";

/// Version 1 → 2: the state reason and retention's record. Additive only, so
/// a reader never sees a half-migrated row.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE series ADD COLUMN state_reason TEXT;
ALTER TABLE series ADD COLUMN purged_at TEXT;
ALTER TABLE series ADD COLUMN purged_instances INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN purged_at TEXT;
";

/// Owns one connection to the index file; see the module doc of
/// [`crate::series`] for who writes what.
pub struct SeriesIndex {
    conn: Connection,
    /// The file has the version 2 columns (always, once opened for writing).
    v2: bool,
}

/// Shared by the index and the SQLite queue, which may use the same file.
pub(super) fn open_rw(path: &Path) -> Result<Connection, SeriesError> {
    let open_err = |source| SeriesError::Open {
        path: path.to_owned(),
        source,
    };
    // The spool is the truth and recover() repairs the index, so losing the
    // last commits on power loss is acceptable; NORMAL spares an fsync per insert.
    let conn = store::open(path, Mode::ReadWrite(Synchronous::Normal)).map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    Ok(conn)
}

fn check_version(conn: &Connection, path: &Path) -> Result<i64, SeriesError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    // A reader may meet a version 1 index that no `serve` of this build has
    // opened yet; it reads it without the version 2 columns.
    if !(1..=SCHEMA_VERSION).contains(&found) {
        return Err(SeriesError::Schema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(found)
}

fn uid(raw: String, column: &str) -> Result<Uid, SeriesError> {
    Uid::parse(&raw).map_err(|e| SeriesError::Corrupt(format!("{column} `{raw}`: {e}")))
}

fn path_text(p: &Path) -> Result<&str, SeriesError> {
    // Spool paths are built from UIDs, so they are ASCII; anything else did
    // not come from ingest.
    p.to_str()
        .ok_or_else(|| SeriesError::Corrupt(format!("path {} is not UTF-8", p.display())))
}

impl SeriesIndex {
    /// Opens (creating if needed) the index for writing.
    pub fn open(path: &Path) -> Result<Self, SeriesError> {
        let mut conn = open_rw(path)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found == 0 {
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        } else if found == 1 {
            tx.execute_batch(MIGRATE_1_TO_2)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        check_version(&conn, path)?;
        Ok(SeriesIndex { conn, v2: true })
    }

    /// Opens an existing index read-only, for the CLI while `serve` writes.
    pub fn open_readonly(path: &Path) -> Result<Self, SeriesError> {
        let open_err = |source| SeriesError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = store::open(path, Mode::ReadOnly).map_err(open_err)?;
        let v2 = check_version(&conn, path)? >= 2;
        Ok(SeriesIndex { conn, v2 })
    }

    /// Records one stored instance; see [`InsertOutcome`]. A duplicate leaves
    /// the index untouched.
    pub fn insert_instance(
        &mut self,
        inst: &StoredInstance,
        now: SystemTime,
    ) -> Result<InsertOutcome, SeriesError> {
        let h = &inst.header;
        let rel_path = path_text(&inst.rel_path)?;
        let header_json = serde_json::to_string(h)
            .map_err(|e| SeriesError::Corrupt(format!("cannot encode header: {e}")))?;
        let now = rfc3339(now);
        // Statements come from the connection's cache: preparing them anew
        // was 8 % of the node's CPU per stored instance (perf, issue 15).
        // IMMEDIATE: take the write lock up front, so a concurrent writer makes
        // us wait (busy_timeout) instead of failing the read→write upgrade.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known: Option<Option<String>> = tx
            .prepare_cached("SELECT purged_at FROM instances WHERE sop_instance_uid = ?1")?
            .query_row(
                [h.sop_instance_uid.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        match known {
            Some(None) => return Ok(InsertOutcome::Duplicate),
            // Retention deleted the first copy: this one is the instance
            // now, and its series is re-opened to analyse it again.
            Some(Some(_)) => {
                tx.prepare_cached("DELETE FROM instances WHERE sop_instance_uid = ?1")?.execute(
                    [h.sop_instance_uid.as_str()],
                )?;
            }
            None => {}
        }
        // Read as text: only `receiving` matters here, and a state this
        // build does not know must not stop ingest.
        let existing: Option<(String, String)> = tx
            .prepare_cached("SELECT state, study_instance_uid FROM series WHERE series_instance_uid = ?1")?
            .query_row(
                [h.series_instance_uid.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let outcome = match existing {
            None => {
                tx.prepare_cached("INSERT INTO series (series_instance_uid, study_instance_uid, modality,
                         series_description, state, generation, first_received_at,
                         last_received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)")?.execute(
                    params![
                        h.series_instance_uid.as_str(),
                        h.study_instance_uid.as_str(),
                        h.modality,
                        h.series_description,
                        SeriesState::Receiving,
                        now
                    ],
                )?;
                InsertOutcome::New
            }
            Some((state, study)) => {
                if study != h.study_instance_uid.as_str() {
                    // A sender bug; the series keeps its first study so the
                    // event stays consistent with what routing already saw.
                    tracing::warn!(
                        series = %h.series_instance_uid,
                        indexed_study = %study,
                        instance_study = %h.study_instance_uid,
                        "instance names another study than its series"
                    );
                }
                let reopen = state != SeriesState::Receiving.as_str();
                tx.prepare_cached("UPDATE series SET
                         last_received_at = ?2,
                         modality = COALESCE(modality, ?3),
                         series_description = COALESCE(series_description, ?4),
                         state = ?5,
                         state_reason = NULL,
                         generation = generation + ?6,
                         completion_reason = CASE WHEN ?6 = 1 THEN NULL ELSE completion_reason END,
                         completed_at = CASE WHEN ?6 = 1 THEN NULL ELSE completed_at END
                     WHERE series_instance_uid = ?1")?.execute(
                    params![
                        h.series_instance_uid.as_str(),
                        now,
                        h.modality,
                        h.series_description,
                        SeriesState::Receiving,
                        i64::from(reopen)
                    ],
                )?;
                if reopen {
                    InsertOutcome::Reopened
                } else {
                    InsertOutcome::New
                }
            }
        };
        tx.prepare_cached("INSERT INTO instances (sop_instance_uid, series_instance_uid, rel_path,
                 transfer_syntax, size_bytes, association_id, calling_ae, received_at,
                 header_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")?.execute(
            params![
                h.sop_instance_uid.as_str(),
                h.series_instance_uid.as_str(),
                rel_path,
                inst.transfer_syntax,
                // SQLite integers are i64; a >8 EiB file is not a CT slice.
                i64::try_from(inst.size_bytes).unwrap_or(i64::MAX),
                // Informational only: keep the bits, sign notwithstanding.
                inst.association_id as i64,
                inst.calling_ae,
                now,
                header_json
            ],
        )?;
        tx.commit()?;
        Ok(outcome)
    }

    pub fn contains_instance(&self, sop_instance_uid: &Uid) -> Result<bool, SeriesError> {
        // Cached: ingest asks this once per C-STORE.
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM instances WHERE sop_instance_uid = ?1 AND purged_at IS NULL")?
            .query_row([sop_instance_uid.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Every series, most recently active first.
    /// How many series are in each state.
    pub fn count_by_state(&self) -> Result<Vec<(String, i64)>, SeriesError> {
        Ok(crate::store::count_by_state(&self.conn, "series")?)
    }

    /// The series' state, `None` when it is not in the index.
    pub fn state_of(&self, series: &Uid) -> Result<Option<SeriesState>, SeriesError> {
        let s: Option<String> = self
            .conn
            .query_row(
                "SELECT state FROM series WHERE series_instance_uid = ?1",
                [series.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        s.map(|s| s.parse().map_err(|e: super::UnknownState| SeriesError::Corrupt(e.to_string())))
            .transpose()
    }

    pub fn list_series(&self) -> Result<Vec<SeriesSummary>, SeriesError> {
        let v2_cols = if self.v2 {
            "s.state_reason, s.purged_at, s.purged_instances"
        } else {
            "NULL, NULL, 0"
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT s.series_instance_uid, s.study_instance_uid, s.modality, s.state,
                    (SELECT COUNT(*) FROM instances i
                      WHERE i.series_instance_uid = s.series_instance_uid),
                    s.completion_reason, s.generation, s.first_received_at,
                    s.last_received_at, s.completed_at, s.series_description,
                    {v2_cols}
             FROM series s
             ORDER BY s.last_received_at DESC, s.series_instance_uid"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(SeriesSummary {
                series_instance_uid: uid(r.get(0)?, "series_instance_uid")?,
                study_instance_uid: uid(r.get(1)?, "study_instance_uid")?,
                modality: r.get(2)?,
                state: r.get(3)?,
                instances: r.get(4)?,
                completion_reason: r.get(5)?,
                generation: r.get(6)?,
                first_received_at: r.get(7)?,
                last_received_at: r.get(8)?,
                completed_at: r.get(9)?,
                series_description: r.get(10)?,
                state_reason: r.get(11)?,
                purged_at: r.get(12)?,
                purged_instances: r.get(13)?,
            });
        }
        Ok(out)
    }

    /// Spool paths (relative to the spool root) and headers of one series, in
    /// the order they were received; instances retention deleted are left out.
    pub fn series_instances(
        &self,
        series: &Uid,
    ) -> Result<Vec<(PathBuf, InstanceHeader)>, SeriesError> {
        let live = if self.v2 { "AND purged_at IS NULL" } else { "" };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT rel_path, header_json FROM instances
             WHERE series_instance_uid = ?1 {live} ORDER BY rowid"
        ))?;
        let rows = stmt.query_map([series.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (path, json) = row?;
            let header: InstanceHeader = serde_json::from_str(&json)
                .map_err(|e| SeriesError::Corrupt(format!("header of {path}: {e}")))?;
            out.push((PathBuf::from(path), header));
        }
        Ok(out)
    }

    /// For later stages (`routed`, `analyzed`, …). `receiving` belongs to the
    /// tracker: setting it is refused, and so is overwriting it, because the
    /// series was re-opened after the caller saw it complete and will be
    /// queued again.
    pub fn set_state(&mut self, series: &Uid, state: SeriesState) -> Result<(), SeriesError> {
        self.set_state_with_reason(series, state, None)
    }

    /// [`SeriesIndex::set_state`] that also records why (e.g. the routing
    /// error of an `unroutable` series); `None` clears an earlier reason.
    pub fn set_state_with_reason(
        &mut self,
        series: &Uid,
        state: SeriesState,
        reason: Option<&str>,
    ) -> Result<(), SeriesError> {
        self.set_state_inner(series, None, state, reason)
    }

    /// Routing's answer to the completion event of `generation`. The tracker
    /// pushes that event before it records it (at-least-once, see
    /// `tracker.rs`), so routing can answer while the row still says
    /// `receiving` at that same generation; the answer is written then too,
    /// and [`SeriesIndex::mark_complete`] keeps it. A row receiving at another
    /// generation was re-opened: refused as by [`SeriesIndex::set_state`].
    pub fn set_state_of_generation(
        &mut self,
        series: &Uid,
        generation: u32,
        state: SeriesState,
        reason: Option<&str>,
    ) -> Result<(), SeriesError> {
        self.set_state_inner(series, Some(generation), state, reason)
    }

    fn set_state_inner(
        &mut self,
        series: &Uid,
        generation: Option<u32>,
        state: SeriesState,
        reason: Option<&str>,
    ) -> Result<(), SeriesError> {
        if state == SeriesState::Receiving {
            return Err(SeriesError::InvalidState(state));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<(String, u32, bool)> = tx
            .query_row(
                "SELECT state, generation, completed_at IS NULL FROM series WHERE series_instance_uid = ?1",
                [series.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        match current {
            None => return Err(SeriesError::UnknownSeries(series.clone())),
            Some((current, at, not_recorded)) if current == SeriesState::Receiving.as_str() => {
                let completing = generation == Some(at) && not_recorded;
                if !completing {
                    return Err(SeriesError::StateConflict {
                        series: series.clone(),
                        current: SeriesState::Receiving,
                    });
                }
            }
            Some(_) => {}
        }
        tx.execute(
            "UPDATE series SET state = ?2, state_reason = ?3 WHERE series_instance_uid = ?1",
            params![series.as_str(), state, reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The event completing `series` now would produce, or `None` when the
    /// series is not receiving (already complete, or unknown).
    pub(crate) fn pending_completion(
        &self,
        series: &Uid,
        reason: super::CompletionReason,
    ) -> Result<Option<SeriesCompleted>, SeriesError> {
        let row: Option<(String, String, u32, u32)> = self
            .conn
            .query_row(
                "SELECT s.state, s.study_instance_uid, s.generation,
                        (SELECT COUNT(*) FROM instances i
                          WHERE i.series_instance_uid = s.series_instance_uid)
                 FROM series s WHERE s.series_instance_uid = ?1",
                [series.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((state, study, generation, instances)) = row else {
            return Ok(None);
        };
        if state != SeriesState::Receiving.as_str() {
            return Ok(None);
        }
        Ok(Some(SeriesCompleted {
            series_instance_uid: series.clone(),
            study_instance_uid: uid(study, "study_instance_uid")?,
            reason,
            instances,
            generation,
        }))
    }

    /// Records the completion `ev` describes. False when the series moved on
    /// meanwhile (re-opened into another generation, or already recorded).
    /// Routing may have answered the event already (it is pushed before it
    /// is recorded): its state is kept, and only the completion is recorded.
    pub(crate) fn mark_complete(
        &mut self,
        ev: &SeriesCompleted,
        now: SystemTime,
    ) -> Result<bool, SeriesError> {
        let n = self.conn.execute(
            "UPDATE series SET state = CASE WHEN state = ?6 THEN ?3 ELSE state END,
                               completion_reason = ?4, completed_at = ?5
             WHERE series_instance_uid = ?1 AND generation = ?2 AND completed_at IS NULL",
            params![
                ev.series_instance_uid.as_str(),
                ev.generation,
                SeriesState::Complete,
                ev.reason.as_str(),
                rfc3339(now),
                SeriesState::Receiving
            ],
        )?;
        Ok(n == 1)
    }

    pub(super) fn receiving_series(&self) -> Result<Vec<Uid>, SeriesError> {
        let mut stmt = self
            .conn
            .prepare("SELECT series_instance_uid FROM series WHERE state = ?1")?;
        let rows = stmt.query_map([SeriesState::Receiving], |r| r.get::<_, String>(0))?;
        rows.map(|r| uid(r?, "series_instance_uid")).collect()
    }

    /// `(sop_instance_uid, rel_path)` of every indexed instance, for recover().
    pub(super) fn indexed_paths(&self) -> Result<Vec<(String, PathBuf)>, SeriesError> {
        // Purged rows name files retention deleted on purpose: not "gone".
        let mut stmt = self
            .conn
            .prepare("SELECT sop_instance_uid, rel_path FROM instances WHERE purged_at IS NULL")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                PathBuf::from(r.get::<_, String>(1)?),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Series that still have instances in the spool, for retention: with
    /// their state, last activity and spooled bytes. Oldest activity first.
    pub fn spooled_series(&self) -> Result<Vec<SpooledSeries>, SeriesError> {
        let mut stmt = self.conn.prepare(
            "SELECT s.series_instance_uid, s.state,
                    COALESCE(s.completed_at, s.last_received_at),
                    COUNT(i.sop_instance_uid), COALESCE(SUM(i.size_bytes), 0)
             FROM series s JOIN instances i
               ON i.series_instance_uid = s.series_instance_uid AND i.purged_at IS NULL
             GROUP BY s.series_instance_uid
             ORDER BY 3, 1",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, SeriesState>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (series, state, last_activity, instances, bytes) = row?;
            out.push(SpooledSeries {
                series_instance_uid: uid(series, "series_instance_uid")?,
                state,
                last_activity,
                instances: instances.max(0) as u64,
                bytes: bytes.max(0) as u64,
            });
        }
        Ok(out)
    }

    /// `(sop_instance_uid, rel_path)` of the instances of `series` still in
    /// the spool.
    pub fn spooled_instances(&self, series: &Uid) -> Result<Vec<(String, PathBuf)>, SeriesError> {
        let mut stmt = self.conn.prepare(
            "SELECT sop_instance_uid, rel_path FROM instances
             WHERE series_instance_uid = ?1 AND purged_at IS NULL ORDER BY rowid",
        )?;
        let rows = stmt.query_map([series.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, PathBuf::from(r.get::<_, String>(1)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that retention deleted these instances' files: the rows stay
    /// (the record), flagged, and the series counts them. Returns how many
    /// rows were newly marked.
    pub fn mark_purged(
        &mut self,
        series: &Uid,
        sops: &[String],
        now: SystemTime,
    ) -> Result<usize, SeriesError> {
        let now = rfc3339(now);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0;
        {
            let mut upd = tx.prepare(
                "UPDATE instances SET purged_at = ?3
                 WHERE sop_instance_uid = ?1 AND series_instance_uid = ?2 AND purged_at IS NULL",
            )?;
            for sop in sops {
                n += upd.execute(params![sop, series.as_str(), now])?;
            }
        }
        tx.execute(
            "UPDATE series SET purged_at = ?2, purged_instances = purged_instances + ?3
             WHERE series_instance_uid = ?1",
            params![series.as_str(), now, n as i64],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Drops instance rows whose spool file is gone, then receiving series
    /// left empty (nothing to complete). Series in later states keep their
    /// row as history even when the spool was cleaned behind them.
    pub(super) fn remove_instances(&mut self, sops: &[String]) -> Result<usize, SeriesError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut removed = 0;
        {
            let mut del = tx.prepare("DELETE FROM instances WHERE sop_instance_uid = ?1")?;
            for sop in sops {
                removed += del.execute([sop])?;
            }
        }
        tx.execute(
            "DELETE FROM series WHERE state = ?1 AND NOT EXISTS
                 (SELECT 1 FROM instances i
                   WHERE i.series_instance_uid = series.series_instance_uid)",
            [SeriesState::Receiving],
        )?;
        tx.commit()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::geometry::tests::slice;

    pub(crate) fn stored(series: &str, i: u32, z: f64, assoc: u64) -> StoredInstance {
        let header = slice(series, i, z);
        StoredInstance {
            rel_path: PathBuf::from(format!(
                "{}/{}/{}.dcm",
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )),
            header,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            size_bytes: 1234,
            association_id: assoc,
            calling_ae: "MODALITY".into(),
        }
    }

    fn s(u: &str) -> Uid {
        Uid::parse(u).unwrap()
    }

    #[test]
    fn insert_duplicate_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut ix = SeriesIndex::open(&path).unwrap();
        let now = SystemTime::now();
        assert_eq!(
            ix.insert_instance(&stored("1.2.3", 1, 0.0, 7), now)
                .unwrap(),
            InsertOutcome::New
        );
        assert_eq!(
            ix.insert_instance(&stored("1.2.3", 2, 2.5, 7), now)
                .unwrap(),
            InsertOutcome::New
        );
        assert_eq!(
            ix.insert_instance(&stored("1.2.3", 2, 2.5, 8), now)
                .unwrap(),
            InsertOutcome::Duplicate
        );
        assert!(ix.contains_instance(&s("1.2.3.2")).unwrap());
        assert!(!ix.contains_instance(&s("1.2.3.3")).unwrap());
        let list = ix.list_series().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].instances, 2);
        assert_eq!(list[0].state, SeriesState::Receiving);
        assert_eq!(list[0].generation, 1);
        assert_eq!(list[0].modality.as_deref(), Some("CT"));
        assert!(list[0].first_received_at.ends_with('Z'));
        let inst = ix.series_instances(&s("1.2.3")).unwrap();
        assert_eq!(inst.len(), 2);
        assert_eq!(inst[1].1, slice("1.2.3", 2, 2.5));
        assert_eq!(inst[0].0, PathBuf::from("1.2.826.0.1.99/1.2.3/1.2.3.1.dcm"));
    }

    #[test]
    fn reader_sees_writer_commits_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut ix = SeriesIndex::open(&path).unwrap();
        let mut ro = SeriesIndex::open_readonly(&path).unwrap();
        assert!(ro.list_series().unwrap().is_empty());
        ix.insert_instance(&stored("1.2.3", 1, 0.0, 1), SystemTime::now())
            .unwrap();
        assert_eq!(ro.list_series().unwrap().len(), 1);
        let e = ro
            .insert_instance(&stored("1.2.3", 2, 2.5, 1), SystemTime::now())
            .unwrap_err();
        assert!(!e.is_retryable(), "{e}");
    }

    #[test]
    fn a_version_1_index_is_read_as_is_and_migrated_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            // The version 1 schema: the current one without the added columns.
            let v1 = SCHEMA
                .replace(",\n    state_reason        TEXT,\n    purged_at           TEXT,\n    purged_instances    INTEGER NOT NULL DEFAULT 0", "")
                .replace(",\n    purged_at           TEXT\n", "\n");
            assert!(!v1.contains("purged"), "{v1}");
            c.execute_batch(&v1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, state, generation,
                     first_received_at, last_received_at) VALUES ('1.2.3', '1.2', 'analyzed', 1, 't', 't')",
                [],
            )
            .unwrap();
        }
        let ro = SeriesIndex::open_readonly(&path).unwrap();
        let row = &ro.list_series().unwrap()[0];
        assert_eq!((row.state.as_str(), row.state_reason.as_deref(), row.purged_instances), ("analyzed", None, 0));
        assert!(ro.series_instances(&s("1.2.3")).unwrap().is_empty());
        drop(ro);
        let mut ix = SeriesIndex::open(&path).unwrap();
        ix.set_state_with_reason(&s("1.2.3"), SeriesState::Unroutable, Some("why")).unwrap();
        let row = &ix.list_series().unwrap()[0];
        assert_eq!(row.state_reason.as_deref(), Some("why"));
        let version: i64 = ix.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn open_readonly_refuses_a_missing_index() {
        let dir = tempfile::tempdir().unwrap();
        let e = SeriesIndex::open_readonly(&dir.path().join("nope.sqlite"))
            .err()
            .expect("missing file must not open");
        assert!(matches!(e, SeriesError::Open { .. }), "{e}");
    }

    #[test]
    fn set_state_guards_receiving() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = SeriesIndex::open(&dir.path().join("i.sqlite")).unwrap();
        ix.insert_instance(&stored("1.2.3", 1, 0.0, 1), SystemTime::now())
            .unwrap();
        assert!(matches!(
            ix.set_state(&s("1.2.3"), SeriesState::Routed),
            Err(SeriesError::StateConflict { current: SeriesState::Receiving, .. })
        ));
        assert!(matches!(
            ix.set_state(&s("1.2.3"), SeriesState::Receiving),
            Err(SeriesError::InvalidState(SeriesState::Receiving))
        ));
        assert!(matches!(
            ix.set_state(&s("1.2.9"), SeriesState::Routed),
            Err(SeriesError::UnknownSeries(_))
        ));
        let ev = ix
            .pending_completion(&s("1.2.3"), super::super::CompletionReason::QuietTimer)
            .unwrap()
            .unwrap();
        assert!(ix.mark_complete(&ev, SystemTime::now()).unwrap());
        ix.set_state(&s("1.2.3"), SeriesState::Routed).unwrap();
        assert_eq!(ix.list_series().unwrap()[0].state, SeriesState::Routed);
        // A late instance re-opens it from any later state.
        assert_eq!(
            ix.insert_instance(&stored("1.2.3", 2, 2.5, 2), SystemTime::now())
                .unwrap(),
            InsertOutcome::Reopened
        );
        let row = &ix.list_series().unwrap()[0];
        assert_eq!((row.state.as_str(), row.generation), ("receiving", 2));
        assert_eq!(row.completion_reason, None);
    }

    /// The tracker pushes a completion before it records it, so routing can
    /// answer first (CI saw a `no_route` series stuck at `complete`). The
    /// answer must survive the tracker's record; an answer to an older
    /// generation must not overwrite a re-open.
    #[test]
    fn routing_may_answer_a_completion_before_the_tracker_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = SeriesIndex::open(&dir.path().join("i.sqlite")).unwrap();
        ix.insert_instance(&stored("1.2.3", 1, 0.0, 1), SystemTime::now()).unwrap();
        let ev = ix
            .pending_completion(&s("1.2.3"), super::super::CompletionReason::AssociationReleased)
            .unwrap()
            .unwrap();
        // Pushed, not yet recorded: routing answers.
        ix.set_state_of_generation(&s("1.2.3"), ev.generation, SeriesState::NoRoute, None).unwrap();
        assert!(ix.mark_complete(&ev, SystemTime::now()).unwrap());
        let row = &ix.list_series().unwrap()[0];
        assert_eq!(row.state, SeriesState::NoRoute);
        assert_eq!(row.completion_reason.as_deref(), Some("association_released"));
        assert!(row.completed_at.is_some());
        // Recorded once only.
        assert!(!ix.mark_complete(&ev, SystemTime::now()).unwrap());

        // Re-opened into generation 2: a late answer to generation 1 is refused,
        // and so is one to generation 2 from a caller that did not say which.
        ix.insert_instance(&stored("1.2.3", 2, 2.5, 2), SystemTime::now()).unwrap();
        assert!(matches!(
            ix.set_state_of_generation(&s("1.2.3"), ev.generation, SeriesState::Routed, None),
            Err(SeriesError::StateConflict { current: SeriesState::Receiving, .. })
        ));
        assert!(matches!(
            ix.set_state(&s("1.2.3"), SeriesState::Routed),
            Err(SeriesError::StateConflict { current: SeriesState::Receiving, .. })
        ));
        let row = &ix.list_series().unwrap()[0];
        assert_eq!((row.state, row.generation), (SeriesState::Receiving, 2));
    }
}
