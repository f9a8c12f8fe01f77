//! Telemetry: the metrics the node exports ([`metrics`]) and the typed
//! events that bump them ([`events`]), one log line and one metric each.
//!
//! Input: stage call sites emitting events; the HTTP `/metrics` handler
//! encoding [`METRICS`]. Output: structured log lines (tracing) and the
//! Prometheus text. Invariant: a counter is bumped only by its event, so
//! logs and metrics agree; by-state gauges are set from the stores at
//! scrape time. No failure modes: emitting never fails.
//!
//! Public paths are `crate::telemetry::X` for every metric and event type.

pub mod events;
pub mod metrics;

pub use events::*;
pub use metrics::*;
