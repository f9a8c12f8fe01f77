//! `biomarker-node check-config`: every problem of a config file, routes,
//! TLS material and STOW-RS secrets included, as `file:line:column` on
//! stderr (by [`crate::node::check::checked`]); one `ok` line on success.

use std::path::Path;

pub fn check_config(config: &Path) -> anyhow::Result<()> {
    let (_, table) = crate::node::check::checked(config)?;
    println!("{}: ok ({} route(s))", config.display(), table.routes.len());
    Ok(())
}

/// `biomarker-node config-schema`: the JSON Schema of the config file.
pub fn config_schema() -> anyhow::Result<()> {
    println!("{:#}", crate::config::json_schema());
    Ok(())
}
