//! CT phantoms with ground truth (issue 3). Implemented on the phantom branch.

use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct PhantomArgs {
    /// pma, sfa, cac or liver
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub count: u32,
}

pub fn run(_args: &PhantomArgs) -> anyhow::Result<()> {
    anyhow::bail!("phantom generator not built yet")
}
