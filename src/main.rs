use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A DICOM node that computes imaging biomarkers and reports them to the PACS.
#[derive(Parser)]
#[command(name = "biomarker-node", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the DICOM node (C-ECHO/C-STORE SCP and the processing pipeline).
    Serve {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
    },
    /// List tracked series; works while `serve` runs.
    Series {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// List jobs (one per series × route × model version); works while
    /// `serve` runs.
    Jobs {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the outbox (results waiting, delivered and dead-lettered).
    Outbox {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file, routes included; print every problem as
    /// file:line:column and exit non-zero on error.
    CheckConfig {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
    },
    /// Dry-run routing: group the DICOM files under PATHs into series and
    /// show which routes match each, and why the others do not.
    Route {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        /// One JSON object per (series, route) line.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Route and analyze DICOM files offline: one JSON line per (series,
    /// route) on stdout, outputs under --out.
    Analyze {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the config file (generated from the code;
    /// docs/CONFIGURATION.md is the reference), for editors and admins.
    ConfigSchema,
    /// Write synthetic CT phantoms with ground truth.
    #[cfg(feature = "phantom")]
    Phantom(biomarker_node::phantom::PhantomArgs),
}

fn load_checked(config: &Path) -> anyhow::Result<biomarker_node::routing::RouteTable> {
    biomarker_node::pipeline::checked(config).map(|(_, table)| table)
}

fn check_config(config: &Path) -> anyhow::Result<()> {
    let table = load_checked(config)?;
    println!("{}: ok ({} route(s))", config.display(), table.routes.len());
    Ok(())
}

fn route(config: &Path, json: bool, paths: &[PathBuf]) -> anyhow::Result<()> {
    let table = load_checked(config)?;
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    biomarker_node::routing::dry_run::run(&table, paths, json, &mut stdout.lock(), &mut stderr.lock())?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => biomarker_node::pipeline::serve(&config),
        Command::Series { config, json } => biomarker_node::pipeline::print_series(&config, json),
        Command::Jobs { config, json } => biomarker_node::pipeline::print_jobs(&config, json),
        Command::Outbox { config, json } => biomarker_node::pipeline::print_outbox(&config, json),
        Command::CheckConfig { config } => check_config(&config),
        Command::Route { config, json, paths } => route(&config, json, &paths),
        Command::Analyze { config, out, paths } => biomarker_node::pipeline::analyze(&config, &out, &paths),
        Command::ConfigSchema => {
            println!("{:#}", biomarker_node::config::json_schema());
            Ok(())
        }
        #[cfg(feature = "phantom")]
        Command::Phantom(args) => biomarker_node::phantom::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
