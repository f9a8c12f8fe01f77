//! `biomarker-node dataset export`: the training layout from the node's own
//! spool ([`crate::dataset`]). Prints the report; the exit code is the
//! [`ExportError`]'s (`main.rs` reads it).

use std::path::Path;

use crate::dataset::{export, ExportError, ExportRequest};

/// Check the config, export, print the report. No case exported is an
/// error ([`ExportError::NothingExported`]) after the report is printed.
pub fn dataset_export(config: &Path, req: &ExportRequest) -> anyhow::Result<()> {
    let (cfg, table) = crate::node::check::checked(config)?;
    {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let report = export(&cfg, &table, req)?;
    print!("{}", report.text());
    if report.exported == 0 {
        return Err(ExportError::NothingExported.into());
    }
    Ok(())
}

/// The exit code for an error of a command: an export error's own, else 2.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<ExportError>().map_or(2, ExportError::exit_code)
}
