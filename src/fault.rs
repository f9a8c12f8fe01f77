//! The one retry vocabulary every stage uses: whether the same work, tried
//! again unchanged, may succeed. Stages map their own errors to it (spool →
//! the DIMSE status class, outbox → reschedule or dead-letter, job → retry or
//! fail), and never decide from an error's text.

/// Whether a failure is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Ours or the link's, and may pass: disk full, an I/O error, a refused
    /// connection, a timeout, a busy peer.
    Transient,
    /// The input or the peer said no for good: a dataset we will never accept,
    /// a rejected presentation context, a model that cannot read this series.
    /// The same attempt again cannot succeed.
    Permanent,
}

impl Fault {
    pub fn is_transient(self) -> bool {
        self == Fault::Transient
    }
}
