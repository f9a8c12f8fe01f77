//! The model registry: every configured model, loaded once at start-up and
//! shared by routing (a job's model version), the job worker (the session to
//! run) and the HTTP API (the models page).
//!
//! Input: the config's `models` and `onnxruntime` sections. Output: a
//! [`Models`] that hands out loaded models by name.
//!
//! Invariants: loading happens once; the set never changes while the node
//! runs (a reload swaps routes only). Failure modes: a `fail_hard` model that
//! does not load fails [`Models::load`]; any other is recorded, and every job
//! for it fails with [`ModelUnavailable`] and the load error as its reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{InferenceError, Model, RuntimeOptions};
use crate::config::Config;

/// A job's model is not loaded (not configured, or it failed to load).
#[derive(Debug, Clone, thiserror::Error)]
#[error("model `{model}` is not loaded: {reason}")]
pub struct ModelUnavailable {
    pub model: String,
    pub reason: String,
}

/// Every configured model, loaded once at start.
pub struct Models {
    loaded: BTreeMap<String, Arc<Model>>,
    /// Models that failed to load and why; their jobs fail with this reason.
    failed: BTreeMap<String, String>,
}

impl Models {
    /// Loads ONNX Runtime and every model in `cfg.models`. A model marked
    /// `fail_hard` that fails to load is an error; others are recorded.
    pub fn load(cfg: &Config) -> Result<Models, InferenceError> {
        let mut loaded = BTreeMap::new();
        let mut failed = BTreeMap::new();
        if cfg.models.is_empty() {
            return Ok(Models { loaded, failed });
        }
        if let Err(e) = super::init(cfg.onnxruntime.library_path().as_deref()) {
            if cfg.models.values().any(|m| m.fail_hard) {
                return Err(e);
            }
            tracing::error!(error = %e, "ONNX Runtime unavailable: every model's jobs will fail");
            for name in cfg.models.keys() {
                failed.insert(name.clone(), e.to_string());
            }
            return Ok(Models { loaded, failed });
        }
        for (name, m) in &cfg.models {
            let opts = RuntimeOptions {
                execution_provider: m.execution_provider,
                device_id: m.device_id as i32,
                fail_hard: m.fail_hard,
                max_concurrency: m.max_concurrency,
                intra_threads: 0,
            };
            match Model::load(&m.card, &opts) {
                Ok(model) => {
                    loaded.insert(name.clone(), Arc::new(model));
                }
                Err(e) if m.fail_hard => return Err(e),
                Err(e) => {
                    tracing::error!(model = %name, error = %e, "model failed to load; its jobs will fail");
                    failed.insert(name.clone(), e.to_string());
                }
            }
        }
        Ok(Models { loaded, failed })
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Model>, ModelUnavailable> {
        self.loaded.get(name).ok_or_else(|| ModelUnavailable {
            model: name.to_owned(),
            reason: self.failed.get(name).cloned().unwrap_or_else(|| "not configured".into()),
        })
    }

    /// The version a job for `model` would run, for job identity.
    pub fn version(&self, name: &str) -> String {
        self.loaded.get(name).map(|m| m.card.version.clone()).unwrap_or_else(|| "unavailable".into())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Model>)> {
        self.loaded.iter()
    }
}
