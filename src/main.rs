use std::path::PathBuf;
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
    /// Validate a config file and exit non-zero on error.
    CheckConfig {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
    },
    /// Write synthetic CT phantoms with ground truth.
    Phantom(biomarker_node::phantom::PhantomArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => biomarker_node::pipeline::serve(&config),
        Command::Series { config, json } => biomarker_node::pipeline::print_series(&config, json),
        Command::CheckConfig { config } => biomarker_node::config::Config::load(&config)
            .map(|_| println!("{}: ok", config.display()))
            .map_err(anyhow::Error::from),
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
