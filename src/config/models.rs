//! The analysis sections: `models:` (the biomarker models by name, and
//! where they run), `onnxruntime:` (which runtime library) and `jobs:` (how
//! long one job may run). Read by the inference registry and the job worker.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model card (YAML); relative paths resolve against the config
    /// file's directory.
    pub card: PathBuf,
    #[serde(default)]
    pub execution_provider: ExecutionProvider,
    /// GPU ordinal for `cuda`; ignored for `cpu`.
    #[serde(default)]
    pub device_id: u32,
    /// When the model fails to load at start, refuse to start (true) or run
    /// without it and fail its jobs (false).
    #[serde(default)]
    pub fail_hard: bool,
    /// Jobs of this model run at most this many at a time.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
}

fn default_max_concurrency() -> usize {
    1
}

// Where a model runs. Here, not in `inference`, because it is a config
// value first; the inference stage reads it. (A `//` comment: a doc comment
// would become a description in the JSON schema.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    Cuda,
}

impl ExecutionProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnnxRuntimeConfig {
    /// Path of the ONNX Runtime shared library; relative paths resolve
    /// against the config file's directory. `ORT_DYLIB_PATH` overrides it.
    #[serde(default)]
    pub library: Option<PathBuf>,
}

impl OnnxRuntimeConfig {
    /// The library to load: `ORT_DYLIB_PATH` if set, else `library`.
    pub fn library_path(&self) -> Option<PathBuf> {
        std::env::var_os("ORT_DYLIB_PATH")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| self.library.clone())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// A job still running after this many seconds fails with "deadline of
    /// N s exceeded" and the next job runs.
    #[serde(default = "default_job_timeout")]
    pub timeout_s: f64,
    /// How many jobs run at a time; 0 (the default) is one per CPU core, at
    /// most [`MAX_AUTO_WORKERS`]. With more than one, each ONNX Runtime
    /// session gets cores / workers intra-op threads, so parallel jobs do not
    /// oversubscribe the cores.
    #[serde(default)]
    pub workers: usize,
    /// Bytes of decoded HU volumes the workers keep, so that the jobs of one
    /// series (one per route) decode it once; 0 turns the cache off.
    #[serde(default = "default_volume_cache_mb")]
    pub volume_cache_mb: usize,
    /// The most HU one job's volume may hold, in MiB of `f32` (4 bytes a
    /// voxel). A series that describes more is refused before the file that
    /// passes it is decoded, so a job's memory is bounded by this, whatever
    /// the series' number of files or frames.
    #[serde(default = "default_max_volume_mb")]
    pub max_volume_mb: u64,
}

fn default_max_volume_mb() -> u64 {
    4096
}

/// The most workers `jobs.workers: 0` chooses.
pub const MAX_AUTO_WORKERS: usize = 4;

fn default_volume_cache_mb() -> usize {
    1024
}

impl JobsConfig {
    /// `workers`, with 0 resolved to the machine's cores (at most [`MAX_AUTO_WORKERS`]).
    pub fn effective_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_AUTO_WORKERS),
            n => n,
        }
    }

    /// `max_volume_mb` in voxels.
    pub fn max_volume_voxels(&self) -> u64 {
        self.max_volume_mb.saturating_mul(1 << 20) / 4
    }

    /// ONNX Runtime intra-op threads per session: every core, however many
    /// workers. Studies mostly arrive one at a time, so a job usually runs
    /// alone and should have the whole machine; jobs side by side still share
    /// the cores fairly because no session spins while it waits
    /// (`inference::build_session`). Measured on 2 cores and 2 workers: a
    /// 150-slice liver job 2.2 s with one thread a session, 1.8 s with two;
    /// 20 studies queued back to back no slower.
    pub fn intra_threads(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

fn default_job_timeout() -> f64 {
    600.0
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            timeout_s: default_job_timeout(),
            workers: 0,
            volume_cache_mb: default_volume_cache_mb(),
            max_volume_mb: default_max_volume_mb(),
        }
    }
}
