//! biomarker-node: a DICOM node that turns CT series into biomarker reports.
//!
//! Data flow, one module per stage:
//!
//! ```text
//! ingest (SCP) → spool (durable) → series (completion) → routing → inference
//!        → biomarkers → report (SR, SC) → outbox (SCU)
//! ```
//!
//! `node` is the one place that wires the stages together; stages never
//! create their own channels. `cli` holds the one-shot commands; `main.rs`
//! only parses the command line.

pub mod biomarkers;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod http;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_data;
#[cfg(test)]
mod tidy;
pub mod dicom;
pub mod fault;
pub mod inference;
pub mod ingest;
pub mod job;
pub mod node;
pub mod npy;
pub mod outbox;
pub mod par;
#[cfg(feature = "phantom")]
pub mod phantom;
pub mod retention;
pub mod report;
pub mod routing;
pub mod series;
pub mod spool;
pub mod store;
pub mod tls;
pub mod volume;

/// `error: source: source...`, for messages that leave the process (DIMSE
/// ErrorComment, job errors): snafu-based dicom-rs errors keep the useful
/// part in the source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
