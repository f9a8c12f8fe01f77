//! The one place that wires the stages: every stage is built from its config
//! section here, and every channel, cancellation token and `Notify` is owned
//! here.

pub mod check;
