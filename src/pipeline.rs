//! Wires the stages together (in progress).
use std::path::Path;

pub fn serve(_config: &Path) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}

pub fn print_series(_config: &Path, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
