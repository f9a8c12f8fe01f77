//! What the SQLite stores (series index, completion queue, jobs, outbox) share.

use rusqlite::Connection;

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
