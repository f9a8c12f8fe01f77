//! The model registry: every configured model and the versions of it the
//! node runs, shared by routing (a job's model version, and whether a
//! candidate runs in shadow), the job worker (the session to run) and the
//! HTTP API (the models page).
//!
//! Input: the config's `models` and `onnxruntime` sections, and the model
//! store ([`super::versions`]) under the data dir. Output: a [`Models`]
//! that hands out loaded models by name (the active version) or by name and
//! version (what a job was routed with).
//!
//! Invariants: each version is loaded at most once and then kept, so a job
//! holds an `Arc` of the version it started with and finishes on it however
//! the roles change meanwhile. The active version is the configured card's
//! until a promotion in the store says otherwise; [`Models::refresh`] applies
//! the store's roles without a restart. Failure modes: a `fail_hard` model
//! that does not load fails [`Models::load`]; any other is recorded, and
//! every job for it fails with [`ModelUnavailable`] and the load error as its
//! reason. A promoted version that does not load leaves the active one as it
//! was, with an error in the log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use super::versions::{ModelStore, VersionsError};
use super::{InferenceError, Model, RuntimeOptions};
use crate::config::Config;

/// A job's model is not loaded (not configured, or it failed to load).
#[derive(Debug, Clone, thiserror::Error)]
#[error("model `{model}` is not loaded: {reason}")]
pub struct ModelUnavailable {
    pub model: String,
    pub reason: String,
}

/// The versions of one model the node runs.
struct Live {
    active: Arc<Model>,
    /// Runs in shadow beside the active one.
    candidate: Option<Arc<Model>>,
    /// Every version loaded so far, by version string.
    loaded: BTreeMap<String, Arc<Model>>,
}

/// Every configured model, with its active and candidate versions.
pub struct Models {
    live: RwLock<BTreeMap<String, Live>>,
    /// Models that failed to load and why; their jobs fail with this reason.
    failed: BTreeMap<String, String>,
    /// The runtime options of each configured model; every version of it
    /// is loaded with them.
    opts: BTreeMap<String, RuntimeOptions>,
    store: Option<Arc<ModelStore>>,
    /// The store revision whose roles are applied.
    seen: Mutex<Option<i64>>,
}

impl Models {
    /// Loads ONNX Runtime and every model in `cfg.models`, with the roles of
    /// the model store under the data dir if a node made one (opened
    /// read-only: the offline commands run what `serve` runs, and create
    /// nothing). A model marked `fail_hard` that fails to load is an error;
    /// others are recorded.
    pub fn load(cfg: &Config) -> Result<Models, InferenceError> {
        let store = match ModelStore::open_existing(&cfg.node.data_dir) {
            Ok(s) => s.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "model store unreadable: running the configured versions");
                None
            }
        };
        Models::load_with(cfg, store)
    }

    /// [`Models::load`] with the given store (`serve` opens it read-write
    /// and records the configured cards in it).
    pub fn load_with(cfg: &Config, store: Option<Arc<ModelStore>>) -> Result<Models, InferenceError> {
        let mut live = BTreeMap::new();
        let mut failed = BTreeMap::new();
        let opts: BTreeMap<String, RuntimeOptions> = cfg
            .models
            .iter()
            .map(|(name, m)| {
                let o = RuntimeOptions {
                    execution_provider: m.execution_provider,
                    device_id: m.device_id as i32,
                    fail_hard: m.fail_hard,
                    max_concurrency: m.max_concurrency,
                    intra_threads: cfg.jobs.intra_threads(),
                };
                (name.clone(), o)
            })
            .collect();
        let done = |live, failed, opts| Models { live: RwLock::new(live), failed, opts, store: store.clone(), seen: Mutex::new(None) };
        if cfg.models.is_empty() {
            return Ok(done(live, failed, opts));
        }
        if let Err(e) = super::init(cfg.onnxruntime.library_path().as_deref()) {
            if cfg.models.values().any(|m| m.fail_hard) {
                return Err(e);
            }
            tracing::error!(error = %e, "ONNX Runtime unavailable: every model's jobs will fail");
            for name in cfg.models.keys() {
                failed.insert(name.clone(), e.to_string());
            }
            return Ok(done(live, failed, opts));
        }
        for (name, m) in &cfg.models {
            match Model::load(&m.card, &opts[name]) {
                Ok(model) => {
                    if let Some(s) = &store {
                        // Read-only for the offline commands: nothing to record.
                        if let Err(e) = s.ensure_configured(name, &model.card) {
                            tracing::debug!(model = %name, error = %e, "configured version not recorded");
                        }
                    }
                    let model = Arc::new(model);
                    let loaded = BTreeMap::from([(model.card.version.clone(), model.clone())]);
                    live.insert(name.clone(), Live { active: model, candidate: None, loaded });
                }
                Err(e) if m.fail_hard => return Err(e),
                Err(e) => {
                    tracing::error!(model = %name, error = %e, "model failed to load; its jobs will fail");
                    failed.insert(name.clone(), e.to_string());
                }
            }
        }
        let models = done(live, failed, opts);
        if let Err(e) = models.refresh() {
            tracing::error!(error = %e, "model store unreadable: running the configured versions");
        }
        Ok(models)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Live>> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The active version of `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Model>, ModelUnavailable> {
        self.read().get(name).map(|l| l.active.clone()).ok_or_else(|| self.unavailable(name))
    }

    /// The candidate version of `name`, which runs in shadow, if any.
    pub fn candidate(&self, name: &str) -> Option<Arc<Model>> {
        self.read().get(name).and_then(|l| l.candidate.clone())
    }

    fn unavailable(&self, name: &str) -> ModelUnavailable {
        ModelUnavailable {
            model: name.to_owned(),
            reason: self.failed.get(name).cloned().unwrap_or_else(|| "not configured".into()),
        }
    }

    /// Version `version` of `name`: the one loaded, else loaded now from the
    /// model store and kept. Blocking (a load takes a while).
    pub fn get_version(&self, name: &str, version: &str) -> Result<Arc<Model>, ModelUnavailable> {
        match self.read().get(name) {
            None => return Err(self.unavailable(name)),
            Some(l) => {
                if let Some(m) = l.loaded.get(version) {
                    return Ok(m.clone());
                }
            }
        }
        let missing = |reason: String| ModelUnavailable { model: name.to_owned(), reason };
        let store = self.store.as_ref().ok_or_else(|| missing(format!("version {version} is not loaded")))?;
        let row = store
            .version(name, version)
            .map_err(|e| missing(e.to_string()))?
            .ok_or_else(|| missing(format!("version {version} is not in the model store")))?;
        let model = Model::load(&row.card_path, &self.opts[name]).map_err(|e| missing(e.to_string()))?;
        if model.card.version != version || !model.card.sha256.trim().eq_ignore_ascii_case(&row.sha256) {
            return Err(missing(format!(
                "the card at {} is version {} (sha256 {}), the store recorded {version} ({})",
                row.card_path.display(),
                model.card.version,
                model.card.sha256,
                row.sha256
            )));
        }
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        let l = live.get_mut(name).ok_or_else(|| self.unavailable(name))?;
        Ok(l.loaded.entry(version.to_owned()).or_insert_with(|| Arc::new(model)).clone())
    }

    /// The version a job for `model` would run, for job identity.
    pub fn version(&self, name: &str) -> String {
        self.read().get(name).map(|m| m.active.card.version.clone()).unwrap_or_else(|| "unavailable".into())
    }

    /// The configured model names that are loaded.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn store(&self) -> Option<&Arc<ModelStore>> {
        self.store.as_ref()
    }

    /// Applies the store's roles when they changed since the last call
    /// (its revision): loads a newly active or candidate version, then
    /// swaps it in. Jobs already running keep the `Arc` they hold. Blocking.
    /// Returns whether anything was read.
    pub fn refresh(&self) -> Result<bool, VersionsError> {
        let Some(store) = &self.store else { return Ok(false) };
        let rev = store.revision()?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == Some(rev) {
            return Ok(false);
        }
        for name in self.names() {
            let roles = store.roles(&name)?;
            // Never promoted (no active role): the configured card, as loaded.
            let active = roles.active.as_deref().and_then(|v| match self.get_version(&name, v) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(model = %name, version = %v, error = %e, "active version does not load; the previous one stays");
                    None
                }
            });
            let candidate = roles.candidate.as_deref().and_then(|v| match self.get_version(&name, v) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(model = %name, version = %v, error = %e, "candidate version does not load; no shadow runs");
                    None
                }
            });
            let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = live.get_mut(&name) {
                if let Some(a) = active {
                    if a.card.version != l.active.card.version {
                        tracing::info!(model = %name, from = %l.active.card.version, to = %a.card.version, "active model version switched");
                    }
                    l.active = a;
                }
                l.candidate = candidate.filter(|c| c.card.version != l.active.card.version);
            }
        }
        *seen = Some(rev);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::versions::{register, ModelStore};
    use std::path::Path;

    /// A promotion switches what `get` hands out without a restart, while an
    /// `Arc` taken before (a job in flight) keeps the version it had; each
    /// version is loaded once, so a rollback gets the very same model back.
    #[test]
    fn roles_switch_live_and_jobs_keep_their_version() {
        if !crate::inference::init_for_tests() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inference/testdata/sigmoid_map.yaml");
        let cfg_path = d.path().join("node.yaml");
        std::fs::write(
            &cfg_path,
            format!(
                "node: {{ae_title: N, data_dir: {data}}}\nonnxruntime: {{library: {lib}}}\nmodels: {{pma: {{card: {card}}}}}\n",
                data = d.path().join("data").display(),
                lib = crate::inference::test_library().unwrap().display(),
                card = fixture.display(),
            ),
        )
        .unwrap();
        let cfg = crate::config::Config::load(&cfg_path).unwrap();
        let store = Arc::new(ModelStore::open(&cfg.node.data_dir).unwrap());
        let models = Models::load_with(&cfg, Some(store.clone())).unwrap();
        assert_eq!((models.version("pma"), models.candidate("pma").is_none()), ("0".to_owned(), true));

        // A trained "version 2": the same ONNX, a new version string.
        let site = d.path().join("site");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::copy(fixture.with_file_name("sigmoid_map.onnx"), site.join("sigmoid_map.onnx")).unwrap();
        let text = std::fs::read_to_string(&fixture).unwrap().replace("version: \"0\"", "version: \"2\"");
        std::fs::write(site.join("pma.yaml"), text).unwrap();
        let configured = models.get("pma").unwrap().card.clone();
        register(&store, "pma", &configured, &site.join("pma.yaml"), &RuntimeOptions::default(), "t").unwrap();
        store.set_candidate("pma", Some("2"), "t").unwrap();
        assert!(models.refresh().unwrap());
        assert!(!models.refresh().unwrap(), "nothing changed: nothing read");
        assert_eq!(models.candidate("pma").unwrap().card.version, "2");

        let in_flight = models.get("pma").unwrap();
        store.promote("pma", "2", "t").unwrap();
        models.refresh().unwrap();
        assert_eq!(models.version("pma"), "2");
        assert!(models.candidate("pma").is_none(), "a promoted candidate is no longer shadowed");
        assert_eq!(in_flight.card.version, "0", "a job in flight keeps its version");
        assert!(Arc::ptr_eq(&models.get_version("pma", "0").unwrap(), &in_flight));

        store.rollback("pma", "t").unwrap();
        models.refresh().unwrap();
        assert!(Arc::ptr_eq(&models.get("pma").unwrap(), &in_flight), "rolled back to the same loaded version");
        assert!(models.get_version("pma", "9").is_err());
    }
}
