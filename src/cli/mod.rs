//! The one-shot commands of `biomarker-node` (all but `serve`, which is
//! [`crate::node::serve`]): each reads the config, does its work and prints
//! to stdout, problems to stderr. `main.rs` only parses the command line and
//! calls one of these.
//!
//! Output is an interface: scripts and the integration tests read it, so the
//! text and the JSON fields stay as they are.
//!
//! The commands that need a checked config (routes compiled, TLS and STOW-RS
//! material read) load it through [`crate::node::check`], the same check
//! `serve` and a reload run.

pub mod analyze;
pub mod check_config;
pub mod dataset;
pub mod list;
pub mod models;
pub mod route;

pub use analyze::analyze;
pub use check_config::{check_config, config_schema};
pub use dataset::dataset_export;
pub use route::route;
