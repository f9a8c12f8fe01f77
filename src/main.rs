//! The command line: parse it, then hand over to `node::serve` or one of
//! the `cli` commands.
use std::path::PathBuf;
use std::process::ExitCode;

use biomarker_node::{cli, node};
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
        /// `embedded` (every stage in this process, SQLite and local disk),
        /// or a cluster role on the config's `cluster:` section: `receiver`
        /// (DICOM SCP into the shared object store), `worker`, `all`.
        #[arg(long, default_value = "embedded", value_parser = ["embedded", "receiver", "worker", "all"])]
        role: String,
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
        /// Also run the input guard's pixel checks (HU calibration, level)
        /// on each matched series: decodes its pixels, so slower.
        #[arg(long)]
        guard_pixels: bool,
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
    /// Training data from the node's own spool: `dataset export`.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// The model store: versions, the candidate that runs in shadow,
    /// promotion and rollback (every change is audited).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Print the JSON Schema of the config file (generated from the code;
    /// docs/CONFIGURATION.md is the reference), for editors and admins.
    ConfigSchema,
    /// Write synthetic CT phantoms with ground truth.
    #[cfg(feature = "phantom")]
    Phantom(biomarker_node::phantom::PhantomArgs),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Export the series of the node's spool that a labels CSV names, as
    /// the training layout of `python -m biomarker_training.train`: each
    /// series through the same route match, slice selection, HU conversion,
    /// input guard and candidates as inference. See docs/DATASET-EXPORT.md.
    ///
    /// Writes DIR/labels.csv, DIR/cases/cNNNN/{volume.npy,candidates.npy,
    /// meta.json}, DIR/dataset.json and DIR/export-report.txt (no UIDs, no
    /// patient data), and the case → UID mapping to DIR.mapping.csv (or
    /// --mapping). Prints the report: rows exported, unmatched, ambiguous,
    /// not routed, refused by the input guard, failed.
    ///
    /// Exit codes: 0 at least one case exported; 1 none exported; 2 config,
    /// index or I/O error; 3 unusable labels CSV; 4 a unit that is not the
    /// task's; 5 unknown task; 6 DIR not empty, or --mapping inside DIR.
    Export {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        /// The model card `task` to export for (pma, sfa, cac, liver).
        #[arg(long)]
        task: String,
        /// CSV: one key column (accession_number, study_instance_uid or
        /// series_instance_uid), `value`, optional `unit`.
        #[arg(long)]
        labels: PathBuf,
        /// The export folder (new or empty).
        #[arg(long)]
        out: PathBuf,
        /// Where the case id → UID mapping goes (outside --out).
        /// Default: <out>.mapping.csv beside the folder.
        #[arg(long)]
        mapping: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Each configured model's versions: active, candidate, previous.
    List {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The audit log: registrations, candidates, promotions, rollbacks.
    Audit {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Copy a trained model (its card, the ONNX beside it) into the store,
    /// after checking card, checksum, task, unit and that the ONNX runs.
    Register {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        /// The card written by `python -m biomarker_training.train`.
        #[arg(long)]
        card: PathBuf,
        /// The configured model it is a version of (default: the one whose
        /// card has the same name and task, else the one of the same task).
        #[arg(long)]
        model: Option<String>,
        /// `candidate` (default): it runs in shadow at once; `none`: only stored.
        #[arg(long = "as", default_value = "candidate", value_parser = ["candidate", "none"])]
        role: String,
    },
    /// Make VERSION the active version of NAME (the running node switches
    /// within seconds; jobs already routed finish on their version).
    Promote {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        name: String,
        version: String,
    },
    /// Make the version that was active before the last promotion active again.
    Rollback {
        #[arg(long, default_value = "config/node.yaml")]
        config: PathBuf,
        name: String,
    },
}

fn models(cmd: ModelsCommand) -> anyhow::Result<()> {
    use cli::models;
    match cmd {
        ModelsCommand::List { config, json } => models::list(&config, json),
        ModelsCommand::Audit { config, json } => models::audit(&config, json),
        ModelsCommand::Register { config, card, model, role } => {
            models::register(&config, &card, model.as_deref(), role == "candidate")
        }
        ModelsCommand::Promote { config, name, version } => models::promote(&config, &name, &version),
        ModelsCommand::Rollback { config, name } => models::rollback(&config, &name),
    }
}

/// Jobs allocate volume-sized arrays and 1 MiB slices on several threads.
/// glibc raises its mmap threshold to the size of each mmapped block freed
/// (up to 32 MiB), after which even 30 MB arrays come from per-thread arenas
/// that keep freed memory: a queue of 20 300-slice chests peaked at 1.8-2.2
/// GiB RSS with that. A fixed threshold stops the drift (an explicit
/// MALLOC_MMAP_THRESHOLD_ wins). It is 4 MiB, not 1 MiB: at 1 MiB every
/// 512 x 512 slice of u32 labels or f32 scratch was a fresh mmap, page
/// faults on every page and a TLB shootdown on every munmap; `analyze` of a
/// 300-slice chest spent 3.2 s of 5.9 s in the kernel (perf: page faults,
/// munmap, IPIs), 1.8 s of 4.95 s at 4 MiB. What the slices leave in the
/// arenas goes back to the system after each job
/// (`job::worker::release_freed_memory`): the queue of 20 chests without
/// contrast ran at 1072 studies/hour, 1711 MiB peak RSS, against 732 and
/// 1748 MiB at 1 MiB (`CASES=queue QUEUE_KIND=chest300nc
/// bash integration-tests/bench/time_to_result.sh`).
fn return_large_blocks_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes the allocator's tuning; called before
        // any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            // With a fixed mmap threshold the trim threshold no longer
            // follows it and stays at 128 KiB: every freed buffer of a few
            // hundred KiB (an instance's PDUs, its write buffer) at the top
            // of an arena went back to the kernel (madvise) and came back as
            // page faults on the next instance, 18 % of ingest CPU (perf,
            // issue 15). Jobs still hand their memory back explicitly,
            // whatever this threshold.
            libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        }
    }
}

fn main() -> ExitCode {
    // RUST_BACKTRACE=1 (often set in shells and CI) would also make every
    // library error capture a backtrace: dicom-rs builds one on an expected
    // end of a header read, for every stored instance (3.6 % of ingest CPU,
    // perf, issue 15). Panics still print theirs; an explicit
    // RUST_LIB_BACKTRACE wins. Set before any thread exists.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    return_large_blocks_to_the_os();
    let parsed = Cli::parse();
    let result = match parsed.command {
        Command::Serve { config, role } => {
            node::serve(&config, biomarker_node::config::Role::parse(&role).expect("clap checked the role"))
        }
        Command::Series { config, json } => cli::list::series(&config, json),
        Command::Jobs { config, json } => cli::list::jobs(&config, json),
        Command::Outbox { config, json } => cli::list::outbox(&config, json),
        Command::CheckConfig { config } => cli::check_config(&config),
        Command::Route { config, json, guard_pixels, paths } => cli::route(&config, json, guard_pixels, &paths),
        Command::Analyze { config, out, paths } => cli::analyze(&config, &out, &paths),
        Command::Models { command } => models(command),
        Command::ConfigSchema => cli::config_schema(),
        Command::Dataset(DatasetCommand::Export { config, task, labels, out, mapping }) => {
            cli::dataset_export(&config, &biomarker_node::dataset::ExportRequest { task, labels, out, mapping })
        }
        #[cfg(feature = "phantom")]
        Command::Phantom(args) => biomarker_node::phantom::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::dataset::exit_code(&e))
        }
    }
}
