//! Where a series is in the pipeline: the `state` column of the index, the
//! `state` field of `biomarker-node series --json` and `/api/series`, and the
//! `state` label of the `biomarker_node_series` metric.
//!
//! **Who sets what.** The tracker alone moves a series into `receiving` (new or
//! re-opened) and on to `complete`; routing sets `routed`, `no_route` or
//! `unroutable`; the inference worker sets `analyzed` or `failed` once every
//! job of the latest generation has ended. [`SeriesIndex::set_state`] refuses
//! `receiving`, so later stages can never undo a re-open. Routing may answer
//! a completion before the tracker has recorded it (the event is pushed
//! first); it names the event's generation, and the tracker's record keeps
//! its answer.
//!
//! **Invariant.** The spellings are stored in SQLite and printed as they are:
//! [`SeriesState::as_str`], [`FromStr`](std::str::FromStr) and serde agree,
//! and never change. A row with a spelling this build does not know fails
//! to read (a permanent error), never guessed at.
//!
//! [`SeriesIndex::set_state`]: super::SeriesIndex::set_state

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeriesState {
    /// Instances are arriving; the tracker waits for completion.
    Receiving,
    /// Complete and on the completion queue; routing has not taken it yet.
    Complete,
    /// Routing matched at least one route and queued its jobs.
    Routed,
    /// No route matched; nothing more happens to it.
    NoRoute,
    /// Routing failed for good (or past its retries) and set it aside; the
    /// reason is in `state_reason`.
    Unroutable,
    /// Every job of the latest generation is done.
    Analyzed,
    /// Every job of the latest generation ended, and at least one failed.
    Failed,
}

impl SeriesState {
    pub const ALL: [SeriesState; 7] = [
        SeriesState::Receiving,
        SeriesState::Complete,
        SeriesState::Routed,
        SeriesState::NoRoute,
        SeriesState::Unroutable,
        SeriesState::Analyzed,
        SeriesState::Failed,
    ];

    /// The stored and printed spelling (the same as serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            SeriesState::Receiving => "receiving",
            SeriesState::Complete => "complete",
            SeriesState::Routed => "routed",
            SeriesState::NoRoute => "no_route",
            SeriesState::Unroutable => "unroutable",
            SeriesState::Analyzed => "analyzed",
            SeriesState::Failed => "failed",
        }
    }

    /// Routing has not taken the series yet: it is receiving, or complete
    /// and waiting on the queue.
    pub fn before_routing(self) -> bool {
        matches!(self, SeriesState::Receiving | SeriesState::Complete)
    }
}

impl std::fmt::Display for SeriesState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A spelling that is not a [`SeriesState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown series state `{0}`")]
pub struct UnknownState(pub String);

impl std::str::FromStr for SeriesState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SeriesState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl ToSql for SeriesState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for SeriesState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_str()?.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_are_todays_and_agree_everywhere() {
        let expected = ["receiving", "complete", "routed", "no_route", "unroutable", "analyzed", "failed"];
        for (st, text) in SeriesState::ALL.into_iter().zip(expected) {
            assert_eq!(st.as_str(), text);
            assert_eq!(st.to_string(), text);
            assert_eq!(text.parse::<SeriesState>(), Ok(st));
            assert_eq!(serde_json::to_value(st).unwrap(), serde_json::json!(text));
            assert_eq!(serde_json::from_value::<SeriesState>(serde_json::json!(text)).unwrap(), st);
        }
        assert_eq!("Routed".parse::<SeriesState>(), Err(UnknownState("Routed".into())));
    }

    #[test]
    fn sqlite_stores_the_spelling_and_refuses_an_unknown_one() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let text: String = c.query_row("SELECT ?1", [SeriesState::NoRoute], |r| r.get(0)).unwrap();
        assert_eq!(text, "no_route");
        let st: SeriesState = c.query_row("SELECT 'unroutable'", [], |r| r.get(0)).unwrap();
        assert_eq!(st, SeriesState::Unroutable);
        let e = c.query_row("SELECT 'archived'", [], |r| r.get::<_, SeriesState>(0)).unwrap_err();
        assert!(e.to_string().contains("unknown series state `archived`"), "{e}");
    }
}
