//! Loading a config the way `serve`, a reload and `check-config` do: parse
//! it, then try to build every stage's part of it (TLS material, STOW-RS
//! targets, compiled routes), so that one pass reports every problem.
//!
//! This lives above the stages, not in `config`: `config` is plain data that
//! every stage reads, and must not depend on any of them.

use std::path::Path;

use crate::config::{Config, ConfigDiagnostic};
use crate::routing::RouteTable;

/// Load a config and compile its routes, collecting every problem: what
/// `check-config` runs, and what a reload must pass before it replaces the
/// running config.
pub fn check_file(path: &Path) -> Result<(Config, RouteTable), Vec<ConfigDiagnostic>> {
    let text = std::fs::read_to_string(path).ok();
    let cfg = Config::load(path).map_err(|e| e.diagnostics(text.as_deref()))?;
    // Certificates and keys are read here, not in `load`, so the listing
    // commands still work on a node whose key file is unreadable to them.
    let mut diags: Vec<ConfigDiagnostic> = crate::tls::check(&cfg)
        .into_iter()
        .map(|e| ConfigDiagnostic::at(cfg.source.as_ref(), e.key(), e.to_string()))
        .collect();
    // Secrets (environment, files) and `ca` of STOW-RS destinations.
    for (name, d) in &cfg.destinations {
        if let Some(Err(e)) = d.stow_rs.as_ref().map(|s| crate::outbox::stow::StowTarget::build(name, s)) {
            diags.push(ConfigDiagnostic::at(cfg.source.as_ref(), &e.key, e.message));
        }
    }
    match RouteTable::compile(&cfg) {
        Ok(table) if diags.is_empty() => Ok((cfg, table)),
        Ok(_) => Err(diags),
        Err(more) => {
            diags.extend(more);
            Err(diags)
        }
    }
}

/// [`check_file`] for the commands: every problem on stderr, one error.
pub fn checked(config_path: &Path) -> anyhow::Result<(Config, RouteTable)> {
    check_file(config_path).map_err(|diags| {
        for d in &diags {
            eprintln!("{d}");
        }
        anyhow::anyhow!("{}: {} problem(s)", config_path.display(), diags.len())
    })
}
