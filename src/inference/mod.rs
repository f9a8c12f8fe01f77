//! Inference: ONNX Runtime sessions for the model cards.
//!
//! Input: a model card and normalised slices `[N, 1, H, W]`. Output: the
//! model's map (or value) for each slice, and which execution provider ran.
//!
//! Invariants:
//! - ONNX Runtime is loaded at run time (`load-dynamic`) from the configured
//!   path or `ORT_DYLIB_PATH`; a missing library is an error, never a panic.
//! - Each model is loaded once; `max_concurrency` sessions bound how many
//!   runs proceed at once (a GPU semaphore in effect).
//! - CUDA is verified by an actual run at load. If it fails we fall back to
//!   CPU with a log line and a counter, unless the model is `fail_hard`.

pub mod card;
pub mod guard;
#[cfg(test)]
mod golden;
pub mod measure;
pub mod registry;
pub mod versions;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use ndarray::Array4;
use ort::session::Session;
use ort::value::Tensor;

pub use card::{CardError, ModelCard};

use crate::config::ExecutionProvider;
pub use measure::measure;

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("ONNX Runtime library not found: set onnxruntime.library in the config or ORT_DYLIB_PATH (tried {0})")]
    LibraryMissing(String),
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    LibraryLoad { path: PathBuf, message: String },
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("model {model}: {message}")]
    Session { model: String, message: String },
    #[error("model {model}: CUDA execution provider failed ({message}) and fail_hard is set")]
    CudaRequired { model: String, message: String },
    #[error("model {model}: output has shape {shape:?}, expected [N,1,H,W]")]
    OutputShape { model: String, shape: Vec<usize> },
    /// The input cannot be measured this way (e.g. a volume of one slice).
    #[error("model {model}: {message}")]
    Input { model: String, message: String },
}

impl InferenceError {
    /// Environment problems may pass (a GPU busy, a library being installed);
    /// a bad card or model will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, InferenceError::Session { .. })
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub execution_provider: ExecutionProvider,
    pub device_id: i32,
    pub fail_hard: bool,
    pub max_concurrency: usize,
    /// Intra-op threads per session; 0 lets ONNX Runtime decide (its
    /// physical cores).
    pub intra_threads: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            execution_provider: ExecutionProvider::Cpu,
            device_id: 0,
            fail_hard: false,
            max_concurrency: 1,
            intra_threads: 0,
        }
    }
}

static ORT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where to find libonnxruntime: the config's path, then `ORT_DYLIB_PATH`.
pub fn resolve_library(configured: Option<&Path>) -> Result<PathBuf, InferenceError> {
    resolve_library_from(configured, std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
}

fn resolve_library_from(configured: Option<&Path>, from_env: Option<PathBuf>) -> Result<PathBuf, InferenceError> {
    let candidates: Vec<PathBuf> = configured.map(Path::to_path_buf).into_iter().chain(from_env).collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            InferenceError::LibraryMissing(if candidates.is_empty() {
                "nothing configured".into()
            } else {
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            })
        })
}

/// Load ONNX Runtime once per process.
pub fn init(configured: Option<&Path>) -> Result<(), InferenceError> {
    let path = resolve_library(configured)?;
    let r = ORT.get_or_init(|| {
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        builder.with_name("biomarker-node").build().map_err(|e| e.to_string())
    });
    match r {
        Ok(_) => Ok(()),
        Err(message) => Err(InferenceError::LibraryLoad {
            path,
            message: message.clone(),
        }),
    }
}

/// One loaded model: its card and a small pool of sessions.
pub struct Model {
    pub card: ModelCard,
    /// The provider that passed the start-up check.
    pub provider: ExecutionProvider,
    sessions: Vec<Mutex<Session>>,
    next: AtomicU64,
}

impl Model {
    /// Load and verify. [`init`] must have succeeded first.
    pub fn load(card_path: &Path, opts: &RuntimeOptions) -> Result<Model, InferenceError> {
        let card = ModelCard::load(card_path)?;
        card.verify_digest()?;
        let n = opts.max_concurrency.max(1);
        let mut provider = opts.execution_provider;
        let mut sessions = Vec::with_capacity(n);
        if provider == ExecutionProvider::Cuda {
            match build_session(&card, opts, ExecutionProvider::Cuda).and_then(|mut s| {
                smoke_run(&card, &mut s)?;
                Ok(s)
            }) {
                Ok(s) => sessions.push(Mutex::new(s)),
                Err(e) if opts.fail_hard => {
                    return Err(InferenceError::CudaRequired {
                        model: card.name.clone(),
                        message: e.to_string(),
                    })
                }
                Err(e) => {
                    crate::telemetry::CudaFallback { model: &card.name, error: &e }.emit();
                    provider = ExecutionProvider::Cpu;
                }
            }
        }
        while sessions.len() < n {
            let mut s = build_session(&card, opts, provider)?;
            if sessions.is_empty() {
                smoke_run(&card, &mut s)?;
            }
            sessions.push(Mutex::new(s));
        }
        tracing::info!(model = %card.name, version = %card.version, provider = provider.as_str(), sessions = n, "model loaded");
        Ok(Model {
            card,
            provider,
            sessions,
            next: AtomicU64::new(0),
        })
    }

    /// Run a batch `[N,1,H,W]`; returns the first output as `[N,1,H,W]`
    /// (or `[N,1,1,1]` for a direct-regression model). Blocking.
    pub fn run(&self, input: Array4<f32>) -> Result<Array4<f32>, InferenceError> {
        let i = (self.next.fetch_add(1, Ordering::Relaxed) as usize) % self.sessions.len();
        // A poisoned lock means a panic inside ONNX Runtime's caller; the
        // session itself holds no Rust invariants, so keep using it.
        let mut s = self.sessions[i].lock().unwrap_or_else(|p| p.into_inner());
        run_session(&self.card, &mut s, input)
    }
}

fn session_err(card: &ModelCard, e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Session {
        model: card.name.clone(),
        message: e.to_string(),
    }
}

fn environment() -> Option<&'static ort::environment::Environment> {
    ORT.get().and_then(|r| r.as_ref().ok())
}

fn build_session(card: &ModelCard, opts: &RuntimeOptions, ep: ExecutionProvider) -> Result<Session, InferenceError> {
    let env = environment().ok_or_else(|| session_err(card, "ONNX Runtime is not initialised"))?;
    let mut b = Session::builder(env).map_err(|e| session_err(card, e))?;
    if opts.intra_threads > 0 {
        b = b.with_intra_threads(opts.intra_threads).map_err(|e| session_err(card, e))?;
    }
    // A spinning pool keeps its cores busy between ops to start the next one
    // sooner; here those cores are wanted by the job's own slice loops
    // (`par`) and by the other workers' sessions, and the liver job measured
    // faster without spinning even alone.
    b = b.with_intra_op_spinning(false).map_err(|e| session_err(card, e))?;
    if ep == ExecutionProvider::Cuda {
        b = b.with_execution_providers([cuda_provider(opts.device_id)]).map_err(|e| session_err(card, e))?;
    }
    b.commit_from_file(card.onnx_path()).map_err(|e| session_err(card, e))
}

/// The CUDA provider as the node configures it.
/// - TF32 off: ONNX Runtime's CUDA provider turns it on by default, and on the
///   H200 the PMA map then differed from the CPU map by 2.0e-4. The cards'
///   numbers were validated on fp32, and these small nets gain nothing that
///   matters from tensor cores.
/// - Heuristic cuDNN algorithm choice: the default (exhaustive) benchmarks
///   every algorithm the first time it sees an input shape, and a series'
///   batch (its slices or slabs) is a new shape nearly every time: a 40-slab
///   CAC job took 375 ms on the H200 against 109 ms on its CPU.
fn cuda_provider(device_id: i32) -> ort::ep::ExecutionProviderDispatch {
    ort::ep::CUDA::default()
        .with_device_id(device_id)
        .with_tf32(false)
        .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
        .build()
        .error_on_failure()
}

/// A run on a zero input proves the provider can execute this graph.
fn smoke_run(card: &ModelCard, s: &mut Session) -> Result<(), InferenceError> {
    let [h, w] = card.input.size;
    run_session(card, s, Array4::zeros((1, 1, h, w))).map(|_| ())
}

fn run_session(card: &ModelCard, s: &mut Session, input: Array4<f32>) -> Result<Array4<f32>, InferenceError> {
    // ort links its own ndarray version; cross the boundary as shape + buffer.
    let dims: Vec<i64> = input.shape().iter().map(|&d| d as i64).collect();
    let (data, _) = input.into_raw_vec_and_offset();
    let tensor = Tensor::from_array((dims, data)).map_err(|e| session_err(card, e))?;
    let outputs = s
        .run(ort::inputs![card.input.input_name.as_str() => tensor])
        .map_err(|e| session_err(card, e))?;
    let out = outputs
        .get(card.input.output_name.as_str())
        .ok_or_else(|| session_err(card, format!("no output named {}", card.input.output_name)))?;
    let (shape, values) = out.try_extract_tensor::<f32>().map_err(|e| session_err(card, e))?;
    let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    let dims4 = match shape.as_slice() {
        [n, c, h, w] => (*n, *c, *h, *w),
        // direct regression: [N,1] → [N,1,1,1]
        [n, 1] => (*n, 1, 1, 1),
        [n] => (*n, 1, 1, 1),
        _ => {
            return Err(InferenceError::OutputShape {
                model: card.name.clone(),
                shape,
            })
        }
    };
    Array4::from_shape_vec(dims4, values.to_vec()).map_err(|_| InferenceError::OutputShape {
        model: card.name.clone(),
        shape,
    })
}

/// Find the ONNX Runtime library for tests: `ORT_DYLIB_PATH`, else the one
/// inside the `onnxruntime` wheel that scripts/install-deps.sh installs.
#[cfg(test)]
pub(crate) fn test_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"])
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so.")))
}

/// Tests that need ONNX Runtime: skip on a developer machine without it,
/// but never in CI, where install-deps.sh provides it.
#[cfg(test)]
pub(crate) fn init_for_tests() -> bool {
    match test_library() {
        Some(p) => {
            init(Some(&p)).expect("ONNX Runtime loads");
            true
        }
        None if std::env::var_os("CI").is_some() => panic!("ONNX Runtime library missing in CI"),
        None => {
            eprintln!("skipping: no ONNX Runtime library (set ORT_DYLIB_PATH)");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inference/testdata/sigmoid_map.yaml")
    }

    #[test]
    fn missing_library_is_a_clear_error() {
        // Not resolve_library: a developer's ORT_DYLIB_PATH would be found.
        let e = resolve_library_from(Some(Path::new("/nonexistent/libonnxruntime.so")), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/libonnxruntime.so"), "{e}");
        let e = resolve_library_from(Some(Path::new("/nonexistent/a.so")), Some("/nonexistent/b.so".into())).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/a.so, /nonexistent/b.so"), "both places are named: {e}");
        let e = resolve_library_from(None, None).unwrap_err();
        assert!(e.to_string().contains("nothing configured"), "{e}");
    }

    /// Whether this machine can run the CUDA provider: the loaded ONNX
    /// Runtime was built with it (the onnxruntime-gpu libraries) and an NVIDIA
    /// device is present. `BIOMARKER_TEST_CUDA=1` (a GPU CI) or `=0` overrides
    /// the guess, so a detection mistake cannot turn the CUDA check into the
    /// fallback check unnoticed. Needs [`init_for_tests`] first.
    fn cuda_usable() -> bool {
        use ort::ep::ExecutionProvider as _;
        match std::env::var("BIOMARKER_TEST_CUDA").as_deref() {
            Ok("1") => return true,
            Ok("0") => return false,
            _ => {}
        }
        let built_with_cuda = ort::ep::CUDA::is_available().unwrap_or(false);
        let device = std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut d| d.next().is_some())
            || Path::new("/dev/nvidia0").exists();
        eprintln!("CUDA provider built in: {built_with_cuda}; NVIDIA device present: {device}");
        built_with_cuda && device
    }

    /// Runs `f` with this thread's log lines captured, and returns them.
    fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt().with_writer(move || w.clone()).with_ansi(false).finish();
        let out = tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (out, text)
    }

    /// A deterministic input in the range the shipped cards feed their models
    /// (HU clipped and scaled to about [-1, 1]): smooth blobs plus a ramp, so
    /// the map has structure on both sides of 0.5.
    fn test_batch(n: usize, h: usize, w: usize) -> Array4<f32> {
        Array4::from_shape_fn((n, 1, h, w), |(b, _, y, x)| {
            let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
            ((fy * 9.0 + b as f32).sin() * (fx * 7.0).cos() + fx - 0.5).clamp(-1.0, 1.0)
        })
    }

    /// The largest absolute difference between two maps of the same shape.
    fn max_abs_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
        a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    /// Median wall time (ms) of `run` on `input` over 15 runs after 3
    /// warm-ups; the input's copy is made before the clock starts.
    fn median_ms(input: &Array4<f32>, mut run: impl FnMut(Array4<f32>)) -> f64 {
        for _ in 0..3 {
            run(input.clone());
        }
        let mut ms: Vec<f64> = (0..15)
            .map(|_| {
                let x = input.clone();
                let t = std::time::Instant::now();
                run(x);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    }

    /// The provider test adapts to the machine. Without a usable CUDA device
    /// a CUDA model falls back to CPU, says so in the log and the counter,
    /// and `fail_hard` refuses to load instead. With one, the CUDA provider
    /// runs the shipped PMA UNet (profiled: its Conv nodes ran on
    /// `CUDAExecutionProvider`, not on a silent CPU fallback per node) and its
    /// map equals the CPU map within 1e-4 absolute (fp32 both sides: the node
    /// turns TF32 off, see [`cuda_provider`]; with ORT's default, TF32 on, the
    /// H200 measured 2.0e-4).
    #[test]
    fn cuda_provider_matches_the_machine() {
        if !init_for_tests() {
            return;
        }
        let opts = RuntimeOptions { execution_provider: ExecutionProvider::Cuda, ..Default::default() };
        let hard = RuntimeOptions { fail_hard: true, ..opts.clone() };
        if !cuda_usable() {
            let before = crate::telemetry::METRICS.cuda_fallbacks.get();
            let (m, log) = capture_logs(|| Model::load(&fixture(), &opts));
            let m = m.expect("falls back to CPU");
            assert_eq!(m.provider, ExecutionProvider::Cpu);
            assert!(log.contains("CUDA execution provider unusable; falling back to CPU"), "{log}");
            assert!(
                log.lines().any(|l| l.contains("model loaded") && (l.contains("provider=cpu") || l.contains("provider=\"cpu\""))),
                "the load line names the provider in use: {log}"
            );
            assert!(crate::telemetry::METRICS.cuda_fallbacks.get() > before);
            let out = m.run(Array4::zeros((2, 1, 8, 8))).unwrap();
            assert_eq!(out.shape(), &[2, 1, 8, 8]);
            assert!((out[[1, 0, 3, 3]] - 0.5).abs() < 1e-6, "sigmoid(0) = 0.5");
            assert!(matches!(Model::load(&fixture(), &hard), Err(InferenceError::CudaRequired { .. })));
            return;
        }

        // A usable device: no fallback, even for the tiny fixture.
        let before = crate::telemetry::METRICS.cuda_fallbacks.get();
        let m = Model::load(&fixture(), &hard).expect("CUDA loads with fail_hard on a GPU machine");
        assert_eq!(m.provider, ExecutionProvider::Cuda);
        assert_eq!(crate::telemetry::METRICS.cuda_fallbacks.get(), before, "no CUDA fallback was logged");

        // A real model and a real inference: CUDA map == CPU map.
        let card_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pma.yaml");
        let gpu = Model::load(&card_path, &hard).expect("PMA on CUDA");
        assert_eq!(gpu.provider, ExecutionProvider::Cuda);
        let cpu = Model::load(&card_path, &RuntimeOptions::default()).expect("PMA on CPU");
        let [h, w] = gpu.card.input.size;
        let input = test_batch(4, h, w);
        let (a, b) = (gpu.run(input.clone()).unwrap(), cpu.run(input.clone()).unwrap());
        assert_eq!(a.shape(), b.shape());
        let max_diff = max_abs_diff(&a, &b);
        eprintln!("PMA map, CUDA vs CPU: max |diff| = {max_diff:e} over {} values", a.len());
        assert!(max_diff <= 1e-4, "CUDA and CPU maps differ by {max_diff}");
        assert!(a.iter().any(|&v| v > 0.5) || a.iter().any(|&v| v < 0.5), "the map is not constant");

        // Where the nodes ran: ORT's profile names each node's provider.
        let dir = tempfile::tempdir().unwrap();
        let env = environment().unwrap();
        let mut s = Session::builder(env)
            .unwrap()
            .with_profiling(dir.path().join("pma"))
            .unwrap()
            .with_execution_providers([cuda_provider(0)])
            .unwrap()
            .commit_from_file(gpu.card.onnx_path())
            .unwrap();
        run_session(&gpu.card, &mut s, input).unwrap();
        let profile = std::fs::read_to_string(s.end_profiling().unwrap()).unwrap();
        let events: Vec<serde_json::Value> = serde_json::from_str(&profile).unwrap();
        let conv_providers: Vec<&str> = events
            .iter()
            .filter(|e| e["cat"] == "Node" && e["args"]["op_name"].as_str().is_some_and(|o| o.contains("Conv")))
            .filter_map(|e| e["args"]["provider"].as_str())
            .collect();
        assert!(!conv_providers.is_empty(), "the profile lists the Conv nodes");
        assert!(
            conv_providers.iter().all(|p| *p == "CUDAExecutionProvider"),
            "every convolution (Conv, FusedConv, ConvTranspose) ran on CUDA: {conv_providers:?}"
        );
    }

    #[test]
    fn tampered_model_is_refused_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = fixture();
        let card = std::fs::read_to_string(&src).unwrap();
        std::fs::write(dir.path().join("sigmoid_map.yaml"), card).unwrap();
        let mut onnx = std::fs::read(src.with_file_name("sigmoid_map.onnx")).unwrap();
        onnx.push(0);
        std::fs::write(dir.path().join("sigmoid_map.onnx"), onnx).unwrap();
        let c = ModelCard::load(&dir.path().join("sigmoid_map.yaml")).unwrap();
        assert!(matches!(c.verify_digest(), Err(CardError::Digest { .. })));
    }

    /// Which CUDA provider options pay on these nets: the node's (heuristic
    /// algorithm choice, TF32 off) against ORT's exhaustive search and the
    /// NHWC layout, with TF32 on for reference, each with its largest
    /// difference from the CPU map. A benchmark that prints, run by
    /// `integration-tests/bench/gpu/run.sh`; needs a CUDA device.
    #[test]
    #[ignore]
    fn cuda_option_variants() {
        use ort::ep::cuda::ConvAlgorithmSearch::{Exhaustive, Heuristic};
        if !init_for_tests() || !cuda_usable() {
            eprintln!("skipping: no usable CUDA device");
            return;
        }
        let variants = [
            ("node (heuristic, tf32 off)", Heuristic, false, false),
            ("exhaustive, tf32 off", Exhaustive, false, false),
            ("heuristic, nhwc", Heuristic, false, true),
            ("exhaustive, nhwc", Exhaustive, false, true),
            ("exhaustive, tf32 on (ORT default)", Exhaustive, true, false),
        ];
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for name in ["pma", "liver"] {
            let cpu = Model::load(&models.join(format!("{name}.yaml")), &RuntimeOptions::default()).unwrap();
            let [h, w] = cpu.card.input.size;
            for batch in [1, 110] {
                let input = test_batch(batch, h, w);
                let want = cpu.run(input.clone()).unwrap();
                for &(label, ref search, tf32, nhwc) in &variants {
                    let ep = ort::ep::CUDA::default()
                        .with_tf32(tf32)
                        .with_prefer_nhwc(nhwc)
                        .with_conv_algorithm_search(search.clone())
                        .build()
                        .error_on_failure();
                    let mut s = Session::builder(environment().unwrap())
                        .unwrap()
                        .with_execution_providers([ep])
                        .unwrap()
                        .commit_from_file(cpu.card.onnx_path())
                        .unwrap();
                    let diff = max_abs_diff(&run_session(&cpu.card, &mut s, input.clone()).unwrap(), &want);
                    let ms = median_ms(&input, |x| {
                        run_session(&cpu.card, &mut s, x).unwrap();
                    });
                    println!("variant {name} batch {batch} {label}: median {ms:.2} ms, max |diff| vs CPU {diff:.1e}");
                }
            }
        }
    }

    /// Issue 15's GPU figures: median wall time of `Model::run` (the node's
    /// own path: input to map, host to device and back) of every shipped
    /// model, ORT CPU and, where usable, ORT CUDA, at batch 1 and at the
    /// batch of a whole series (110: the 3 mm slabs of a 300-slice 1.1 mm
    /// chest, what CAC runs on). Ignored: a benchmark that prints, run by
    /// `integration-tests/bench/gpu/run.sh` on the GPU machine (and by hand:
    /// `cargo test --release --lib provider_timings -- --ignored --nocapture`).
    /// `models/training/biomarker_training/bench_eager.py` times PyTorch
    /// eager on the same architectures and shapes.
    #[test]
    #[ignore]
    fn provider_timings() {
        if !init_for_tests() {
            return;
        }
        let mut providers = vec![ExecutionProvider::Cpu];
        if cuda_usable() {
            providers.push(ExecutionProvider::Cuda);
        }
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for name in ["pma", "sfa", "cac", "liver"] {
            for &provider in &providers {
                let opts = RuntimeOptions { execution_provider: provider, fail_hard: true, ..Default::default() };
                let m = Model::load(&models.join(format!("{name}.yaml")), &opts).expect("shipped card loads");
                let [h, w] = m.card.input.size;
                for batch in [1, 110] {
                    let ms = median_ms(&test_batch(batch, h, w), |x| {
                        m.run(x).unwrap();
                    });
                    println!("timing ort-{provider:?} {name} batch {batch} {h}x{w}: median {ms:.2} ms");
                }
            }
        }
    }
}
