//! What the SQLite stores (series index, jobs, outbox) share.

use rusqlite::Connection;

/// `SELECT state, COUNT(*) ... GROUP BY state` over one of the node's
/// tables (jobs, series, outbox all keep a `state` column), so a status
/// poll counts in SQLite instead of loading every row.
pub(crate) fn count_by_state(c: &Connection, table: &str) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = c.prepare(&format!("SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state"))?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}
