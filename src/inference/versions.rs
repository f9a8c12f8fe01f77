//! The model store: every version of every configured model this node
//! holds, which one is `active` (its results are reported), which one is
//! the `candidate` (it runs in shadow beside the active one, its results
//! are kept and never sent), and the audit log of every change.
//!
//! Layout, under `<data_dir>/models/`:
//! - `models.sqlite`: `versions` (one row per model and version: where its
//!   card is, the card's sha256 of the ONNX, whether it came from the config
//!   or was registered), `roles` (per model: active, candidate, previous),
//!   `audit` (time, action, model, version, from which version, caller) and
//!   `meta.revision`, bumped by every change of roles.
//! - `<name>/<version>/`: a registered version's card (`card.yaml`) and its
//!   ONNX file beside it, copied at registration; never changed afterwards.
//!
//! The configured card (`models.<name>.card`) is a version too, recorded in
//! place (not copied) with source `config`. `roles.active` NULL means "the
//! configured version", so a node that was never promoted behaves exactly as
//! its config says, with no extra steps, and a new card in the config takes
//! effect as it always did.
//!
//! Input: registrations, promotions and rollbacks from the CLI and the API.
//! Output: the roles the registry ([`super::registry::Models`]) loads.
//!
//! Invariants:
//! - A registered version is refused unless its card parses, its ONNX has
//!   the sha256 the card records, its name, task and unit are the configured
//!   model's, and the ONNX loads and maps an input of the card's size to an
//!   output of the card's shape ([`register`]). A refused version leaves
//!   nothing behind.
//! - A version's files never change after registration: a version string
//!   that is already registered with other bytes is refused.
//! - Every change of roles is in one transaction with its audit row and the
//!   revision bump, so the running node sees a change together with its
//!   record. SQLite (through `crate::store`) serialises the CLI and the node.
//!
//! Failure modes: [`VersionsError`]; SQLite busy and I/O errors are the
//! environment's, an unknown version or model is the caller's.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::{CardError, InferenceError, Model, ModelCard, RuntimeOptions};
use crate::store::{Locked, Mode, Synchronous};

#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    #[error("model store {path}: {source}")]
    Sql { path: PathBuf, source: rusqlite::Error },
    #[error("model store: {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("model `{model}` has no version `{version}` (see `biomarker-node models list`)")]
    UnknownVersion { model: String, version: String },
    #[error("model `{0}` has no earlier active version to roll back to")]
    NothingToRollBack(String),
    #[error("model `{model}` version `{version}` is already active")]
    AlreadyActive { model: String, version: String },
}

/// Why a version was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("the card's {field} is `{candidate}`, the configured model `{model}` has `{configured}`")]
    Mismatch { model: String, field: &'static str, configured: String, candidate: String },
    #[error("version `{0}` is not usable: 1 to 64 characters of letters, digits, `.`, `-`, `_` and `+`")]
    BadVersion(String),
    #[error("model `{model}` already has a version `{version}` with other contents (sha256 {existing}); give the new model a new version")]
    VersionConflict { model: String, version: String, existing: String },
    #[error("the ONNX model does not load or run: {0}")]
    Onnx(#[from] InferenceError),
    #[error("the ONNX model maps an input of {input:?} to {output:?}; the card wants {expected:?}")]
    Shape { input: [usize; 4], output: Vec<usize>, expected: [usize; 4] },
    #[error(transparent)]
    Store(#[from] VersionsError),
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRow {
    pub model: String,
    pub version: String,
    pub card_path: PathBuf,
    pub sha256: String,
    /// `config` (the configured card, in place) or `registered` (copied in).
    pub source: String,
    pub registered_at: String,
}

/// A model's roles. `active: None` is the configured version.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Roles {
    pub active: Option<String>,
    pub candidate: Option<String>,
    /// The version that was active before the last promotion: what a
    /// rollback returns to.
    pub previous: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    /// `register`, `candidate`, `promote`, `rollback`.
    pub action: String,
    pub model: String,
    pub version: Option<String>,
    pub from_version: Option<String>,
    /// CLI: `cli user=<name> uid=<n>`; API: `http <address> token=yes|no`.
    pub caller: String,
}

/// What a promotion or rollback changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Switch {
    pub model: String,
    pub from: String,
    pub to: String,
}

pub struct ModelStore {
    root: PathBuf,
    db_path: PathBuf,
    db: Locked,
}

fn version_ok(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v != "."
        && v != ".."
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

impl ModelStore {
    /// Opens (creating) `<data_dir>/models/models.sqlite`.
    pub fn open(data_dir: &Path) -> Result<ModelStore, VersionsError> {
        let root = data_dir.join("models");
        std::fs::create_dir_all(&root).map_err(|e| VersionsError::Io(root.clone(), e))?;
        let db_path = root.join("models.sqlite");
        let sql = |source| VersionsError::Sql { path: db_path.clone(), source };
        // Roles and the audit log exist nowhere else: FULL, like jobs.
        let conn = crate::store::open(&db_path, Mode::ReadWrite(Synchronous::Full)).map_err(sql)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS versions (
                model TEXT NOT NULL, version TEXT NOT NULL, card_path TEXT NOT NULL,
                sha256 TEXT NOT NULL, source TEXT NOT NULL, registered_at TEXT NOT NULL,
                PRIMARY KEY (model, version));
             CREATE TABLE IF NOT EXISTS roles (
                model TEXT PRIMARY KEY, active TEXT, candidate TEXT, previous TEXT);
             CREATE TABLE IF NOT EXISTS audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, action TEXT NOT NULL,
                model TEXT NOT NULL, version TEXT, from_version TEXT, caller TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0);",
        )
        .map_err(sql)?;
        Ok(ModelStore { root, db_path, db: Locked::new(conn) })
    }

    /// Opens the store read-only when a node has made one (the offline
    /// commands must not create it); `None` when there is none yet.
    pub fn open_existing(data_dir: &Path) -> Result<Option<ModelStore>, VersionsError> {
        let root = data_dir.join("models");
        let db_path = root.join("models.sqlite");
        if !db_path.is_file() {
            return Ok(None);
        }
        let conn = crate::store::open(&db_path, Mode::ReadOnly)
            .map_err(|source| VersionsError::Sql { path: db_path.clone(), source })?;
        Ok(Some(ModelStore { root, db_path, db: Locked::new(conn) }))
    }

    fn sql(&self, source: rusqlite::Error) -> VersionsError {
        VersionsError::Sql { path: self.db_path.clone(), source }
    }

    /// Where a registered version's files go.
    pub fn version_dir(&self, model: &str, version: &str) -> PathBuf {
        self.root.join(model).join(version)
    }

    /// Records the configured card as a version (source `config`, in
    /// place). A config row for the same version follows the config's path;
    /// a registered row of that version is left alone.
    pub fn ensure_configured(&self, model: &str, card: &ModelCard) -> Result<(), VersionsError> {
        let path = std::path::absolute(&card.path).unwrap_or_else(|_| card.path.clone());
        let c = self.db.lock();
        c.execute(
            "INSERT INTO versions (model, version, card_path, sha256, source, registered_at)
             VALUES (?1, ?2, ?3, ?4, 'config', ?5)
             ON CONFLICT (model, version) DO UPDATE SET card_path = excluded.card_path, sha256 = excluded.sha256
             WHERE versions.source = 'config'",
            params![model, card.version, path.display().to_string(), card.sha256.trim(), now()],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn revision(&self) -> Result<i64, VersionsError> {
        self.db
            .lock()
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get(0))
            .map_err(|e| self.sql(e))
    }

    pub fn versions(&self, model: &str) -> Result<Vec<VersionRow>, VersionsError> {
        let c = self.db.lock();
        let mut st = c
            .prepare(
                "SELECT model, version, card_path, sha256, source, registered_at FROM versions
                 WHERE model = ?1 ORDER BY registered_at, version",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st.query_map([model], row_to_version).map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    pub fn version(&self, model: &str, version: &str) -> Result<Option<VersionRow>, VersionsError> {
        find_version(&self.db.lock(), model, version).map_err(|e| self.sql(e))
    }

    pub fn roles(&self, model: &str) -> Result<Roles, VersionsError> {
        roles(&self.db.lock(), model).map_err(|e| self.sql(e))
    }

    /// The active version's string: the promoted one, else the configured one.
    pub fn active_version(&self, model: &str) -> Result<Option<String>, VersionsError> {
        let c = self.db.lock();
        active_of(&c, model).map_err(|e| self.sql(e))
    }

    /// The audit log, oldest first; of one model or all.
    pub fn audit(&self, model: Option<&str>) -> Result<Vec<AuditEntry>, VersionsError> {
        let c = self.db.lock();
        let mut st = c
            .prepare(
                "SELECT id, at, action, model, version, from_version, caller FROM audit
                 WHERE ?1 IS NULL OR model = ?1 ORDER BY id",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([model], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    action: r.get(2)?,
                    model: r.get(3)?,
                    version: r.get(4)?,
                    from_version: r.get(5)?,
                    caller: r.get(6)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Makes `version` (or nothing) the candidate that runs in shadow.
    pub fn set_candidate(&self, model: &str, version: Option<&str>, caller: &str) -> Result<(), VersionsError> {
        self.change(model, |tx, roles| {
            if let Some(v) = version {
                self.require(tx, model, v)?;
                if active_of(tx, model).map_err(|e| self.sql(e))?.as_deref() == Some(v) {
                    return Err(VersionsError::AlreadyActive { model: model.into(), version: v.into() });
                }
            }
            let from = roles.candidate.clone();
            roles.candidate = version.map(str::to_owned);
            Ok(Audit { action: "candidate", version: version.map(str::to_owned), from, caller })
        })
    }

    /// Makes `version` active. The active one becomes `previous` (what a
    /// rollback returns to); a candidate promoted stops being the candidate.
    pub fn promote(&self, model: &str, version: &str, caller: &str) -> Result<Switch, VersionsError> {
        let mut switch = None;
        self.change(model, |tx, roles| {
            self.require(tx, model, version)?;
            let from = active_of(tx, model).map_err(|e| self.sql(e))?.unwrap_or_default();
            if from == version {
                return Err(VersionsError::AlreadyActive { model: model.into(), version: version.into() });
            }
            roles.previous = Some(from.clone()).filter(|f| !f.is_empty());
            roles.active = Some(version.to_owned());
            if roles.candidate.as_deref() == Some(version) {
                roles.candidate = None;
            }
            switch = Some(Switch { model: model.into(), from: from.clone(), to: version.into() });
            Ok(Audit { action: "promote", version: Some(version.into()), from: Some(from), caller })
        })?;
        Ok(switch.expect("set by a committed change"))
    }

    /// Makes the version that was active before the last promotion active
    /// again. One step: a second rollback without a promotion in between
    /// has nothing to return to.
    pub fn rollback(&self, model: &str, caller: &str) -> Result<Switch, VersionsError> {
        let mut switch = None;
        self.change(model, |tx, roles| {
            let Some(to) = roles.previous.take() else {
                return Err(VersionsError::NothingToRollBack(model.into()));
            };
            let from = active_of(tx, model).map_err(|e| self.sql(e))?.unwrap_or_default();
            roles.active = Some(to.clone());
            switch = Some(Switch { model: model.into(), from: from.clone(), to: to.clone() });
            Ok(Audit { action: "rollback", version: Some(to), from: Some(from), caller })
        })?;
        Ok(switch.expect("set by a committed change"))
    }

    fn require(&self, c: &Connection, model: &str, version: &str) -> Result<(), VersionsError> {
        match find_version(c, model, version).map_err(|e| self.sql(e))? {
            Some(_) => Ok(()),
            None => Err(VersionsError::UnknownVersion { model: model.into(), version: version.into() }),
        }
    }

    /// Adds a registered version's row (its files are in place) and its
    /// audit entry.
    fn add_registered(&self, card: &ModelCard, model: &str, card_path: &Path, caller: &str) -> Result<(), VersionsError> {
        let mut c = self.db.lock();
        let tx = c.transaction().map_err(|e| self.sql(e))?;
        tx.execute(
            "INSERT INTO versions (model, version, card_path, sha256, source, registered_at)
             VALUES (?1, ?2, ?3, ?4, 'registered', ?5)",
            params![model, card.version, card_path.display().to_string(), card.sha256.trim(), now()],
        )
        .map_err(|e| self.sql(e))?;
        audit(&tx, model, &Audit { action: "register", version: Some(card.version.clone()), from: None, caller })
            .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))
    }

    /// One change of roles: read, let `f` edit them (or refuse), write them
    /// with the audit row and a revision bump, in one transaction.
    fn change<'c>(
        &self,
        model: &str,
        f: impl FnOnce(&Connection, &mut Roles) -> Result<Audit<'c>, VersionsError>,
    ) -> Result<(), VersionsError> {
        let mut c = self.db.lock();
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        let mut r = roles(&tx, model).map_err(|e| self.sql(e))?;
        let entry = f(&tx, &mut r)?;
        tx.execute(
            "INSERT INTO roles (model, active, candidate, previous) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (model) DO UPDATE SET active = ?2, candidate = ?3, previous = ?4",
            params![model, r.active, r.candidate, r.previous],
        )
        .map_err(|e| self.sql(e))?;
        audit(&tx, model, &entry).map_err(|e| self.sql(e))?;
        tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'", []).map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))
    }
}

struct Audit<'a> {
    action: &'static str,
    version: Option<String>,
    from: Option<String>,
    caller: &'a str,
}

fn now() -> String {
    crate::store::rfc3339(std::time::SystemTime::now())
}

fn audit(c: &Connection, model: &str, a: &Audit<'_>) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO audit (at, action, model, version, from_version, caller) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now(), a.action, model, a.version, a.from, a.caller],
    )?;
    tracing::info!(action = a.action, model, version = ?a.version, from = ?a.from, caller = a.caller, "model store changed");
    Ok(())
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        model: r.get(0)?,
        version: r.get(1)?,
        card_path: PathBuf::from(r.get::<_, String>(2)?),
        sha256: r.get(3)?,
        source: r.get(4)?,
        registered_at: r.get(5)?,
    })
}

fn find_version(c: &Connection, model: &str, version: &str) -> rusqlite::Result<Option<VersionRow>> {
    c.query_row(
        "SELECT model, version, card_path, sha256, source, registered_at FROM versions WHERE model = ?1 AND version = ?2",
        [model, version],
        row_to_version,
    )
    .optional()
}

fn roles(c: &Connection, model: &str) -> rusqlite::Result<Roles> {
    Ok(c
        .query_row("SELECT active, candidate, previous FROM roles WHERE model = ?1", [model], |r| {
            Ok(Roles { active: r.get(0)?, candidate: r.get(1)?, previous: r.get(2)? })
        })
        .optional()?
        .unwrap_or_default())
}

fn active_of(c: &Connection, model: &str) -> rusqlite::Result<Option<String>> {
    if let Some(a) = roles(c, model)?.active {
        return Ok(Some(a));
    }
    c.query_row(
        "SELECT version FROM versions WHERE model = ?1 AND source = 'config' ORDER BY registered_at DESC LIMIT 1",
        [model],
        |r| r.get(0),
    )
    .optional()
}

/// Who made a change from the command line: the OS user.
pub fn cli_caller() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid().to_string()).unwrap_or_else(|_| "?".into());
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "?".into());
    format!("cli user={user} uid={uid}")
}

/// Registers the model whose card is `card_path` (its ONNX beside it, as
/// `python -m biomarker_training.train` writes them) as a version of the
/// configured model `model`, whose card is `configured`. Checks everything
/// the module header lists, copies card and ONNX into the store, and loads
/// the copy with `opts` (ONNX Runtime must be initialised). Registering the
/// same version with the same bytes again is a no-op that returns its row.
pub fn register(
    store: &ModelStore,
    model: &str,
    configured: &ModelCard,
    card_path: &Path,
    opts: &RuntimeOptions,
    caller: &str,
) -> Result<VersionRow, RegisterError> {
    let card = ModelCard::load(card_path)?;
    card.verify_digest()?;
    let mismatch = |field, configured: &str, candidate: &str| {
        (configured != candidate).then(|| RegisterError::Mismatch {
            model: model.into(),
            field,
            configured: configured.into(),
            candidate: candidate.into(),
        })
    };
    let checks = [
        mismatch("name", &configured.name, &card.name),
        mismatch("task", &configured.task, &card.task),
        mismatch("biomarker unit", &configured.biomarker.unit.ucum, &card.biomarker.unit.ucum),
        mismatch("aggregation kind", &configured.aggregation.kind, &card.aggregation.kind),
    ];
    if let Some(e) = checks.into_iter().flatten().next() {
        return Err(e);
    }
    if !version_ok(&card.version) {
        return Err(RegisterError::BadVersion(card.version.clone()));
    }
    if let Some(existing) = store.version(model, &card.version)? {
        if existing.sha256.eq_ignore_ascii_case(card.sha256.trim()) {
            return Ok(existing);
        }
        return Err(RegisterError::VersionConflict {
            model: model.into(),
            version: card.version.clone(),
            existing: existing.sha256,
        });
    }
    // Copy into a temporary folder beside the final one, check the copy,
    // then rename: the store never holds a half-copied or unchecked version.
    let dest = store.version_dir(model, &card.version);
    let tmp = dest.with_file_name(format!(".incoming-{}-{}", card.version, std::process::id()));
    let io = |p: &Path, e| RegisterError::Store(VersionsError::Io(p.to_owned(), e));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let cleanup = scopeguard(&tmp);
    let onnx_name = Path::new(&card.onnx).file_name().map(PathBuf::from).unwrap_or_else(|| "model.onnx".into());
    let text = std::fs::read_to_string(card_path).map_err(|e| io(card_path, e))?;
    let text = if Path::new(&card.onnx) == onnx_name {
        text
    } else {
        // The card names its ONNX by a path; the copy lies beside it.
        let mut y: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|source| CardError::Parse {
            path: card_path.to_owned(),
            source,
        })?;
        if let Some(m) = y.as_mapping_mut() {
            m.insert("onnx".into(), onnx_name.display().to_string().into());
        }
        serde_yaml::to_string(&y).map_err(|source| CardError::Parse { path: card_path.to_owned(), source })?
    };
    let new_card = tmp.join("card.yaml");
    write_synced(&new_card, text.as_bytes()).map_err(|e| io(&new_card, e))?;
    let onnx = tmp.join(&onnx_name);
    std::fs::copy(card.onnx_path(), &onnx).map_err(|e| io(&onnx, e))?;
    std::fs::File::open(&onnx).and_then(|f| f.sync_all()).map_err(|e| io(&onnx, e))?;
    let copy = ModelCard::load(&new_card)?;
    copy.verify_digest()?;
    check_runs(&new_card, &copy, opts)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
    cleanup.disarm();
    if let Some(parent) = dest.parent() {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    let final_card = dest.join("card.yaml");
    if let Err(e) = store.add_registered(&card, model, &final_card, caller) {
        let _ = std::fs::remove_dir_all(&dest);
        return Err(e.into());
    }
    Ok(store.version(model, &card.version)?.expect("just inserted"))
}

/// The ONNX loads, takes the card's input and gives the card's output: a
/// map `[1,1,H,W]` of the input size, or one value for a direct model.
fn check_runs(card_path: &Path, card: &ModelCard, opts: &RuntimeOptions) -> Result<(), RegisterError> {
    let one = RuntimeOptions { max_concurrency: 1, ..opts.clone() };
    let m = Model::load(card_path, &one)?;
    let [h, w] = card.input.size;
    let out = m.run(ndarray::Array4::zeros((1, 1, h, w)))?;
    let expected = if card.aggregation.kind == "direct" { [1, 1, 1, 1] } else { [1, 1, h, w] };
    if out.shape() != expected {
        return Err(RegisterError::Shape { input: [1, 1, h, w], output: out.shape().to_vec(), expected });
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Removes a folder when dropped, unless disarmed.
struct Cleanup<'a>(&'a Path, std::cell::Cell<bool>);

fn scopeguard(p: &Path) -> Cleanup<'_> {
    Cleanup(p, std::cell::Cell::new(true))
}

impl Cleanup<'_> {
    fn disarm(&self) {
        self.1.set(false);
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.1.get() {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inference/testdata/sigmoid_map.yaml")
    }

    /// A copy of the fixture model in `dir` as version `version`, its card
    /// edited by `edit` (text) and its sha256 recomputed, as a site's
    /// training run would write it.
    fn trained(dir: &Path, version: &str, edit: impl Fn(String) -> String, onnx_extra: &[u8]) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let mut onnx = std::fs::read(fixture().with_file_name("sigmoid_map.onnx")).unwrap();
        onnx.extend_from_slice(onnx_extra);
        std::fs::write(dir.join("pma.onnx"), &onnx).unwrap();
        let sha = format!("{:x}", Sha256::digest(&onnx));
        let text = std::fs::read_to_string(fixture())
            .unwrap()
            .replace("version: \"0\"", &format!("version: \"{version}\""))
            .replace("onnx: sigmoid_map.onnx", "onnx: pma.onnx")
            .replace("sha256: 10e0e97a84823ba7c1ebab5980fd257e71afc19cf3472c57385db211c97f0c9d", &format!("sha256: {sha}"));
        let card = dir.join("pma.yaml");
        std::fs::write(&card, edit(text)).unwrap();
        card
    }

    fn store_with_config(dir: &Path) -> (ModelStore, ModelCard) {
        let store = ModelStore::open(&dir.join("data")).unwrap();
        let configured = ModelCard::load(&fixture()).unwrap();
        store.ensure_configured("pma", &configured).unwrap();
        (store, configured)
    }

    #[test]
    fn promote_and_rollback_move_the_roles_and_are_audited() {
        let d = tempfile::tempdir().unwrap();
        let (store, configured) = store_with_config(d.path());
        // Never promoted: the configured version is active.
        assert_eq!(store.active_version("pma").unwrap().as_deref(), Some("0"));
        assert_eq!(store.roles("pma").unwrap(), Roles::default());
        let rev0 = store.revision().unwrap();
        assert!(matches!(store.promote("pma", "2", "t"), Err(VersionsError::UnknownVersion { .. })));
        assert!(matches!(store.rollback("pma", "t"), Err(VersionsError::NothingToRollBack(_))));
        assert!(matches!(store.promote("pma", "0", "t"), Err(VersionsError::AlreadyActive { .. })));
        assert_eq!(store.revision().unwrap(), rev0, "a refused change changes nothing");

        let mut v2 = configured.clone();
        v2.version = "2".into();
        store.add_registered(&v2, "pma", &d.path().join("card.yaml"), "cli user=a").unwrap();
        store.set_candidate("pma", Some("2"), "cli user=a").unwrap();
        assert_eq!(store.roles("pma").unwrap().candidate.as_deref(), Some("2"));
        assert!(matches!(store.set_candidate("pma", Some("0"), "t"), Err(VersionsError::AlreadyActive { .. })));

        let s = store.promote("pma", "2", "http 127.0.0.1:5 token=yes").unwrap();
        assert_eq!((s.from.as_str(), s.to.as_str()), ("0", "2"));
        let r = store.roles("pma").unwrap();
        assert_eq!((r.active.as_deref(), r.candidate, r.previous.as_deref()), (Some("2"), None, Some("0")));

        let s = store.rollback("pma", "cli user=b").unwrap();
        assert_eq!((s.from.as_str(), s.to.as_str()), ("2", "0"));
        assert_eq!(store.active_version("pma").unwrap().as_deref(), Some("0"));
        assert!(matches!(store.rollback("pma", "t"), Err(VersionsError::NothingToRollBack(_))), "one step back only");
        assert!(store.revision().unwrap() >= rev0 + 3);

        let log: Vec<(String, Option<String>, Option<String>, String)> = store
            .audit(Some("pma"))
            .unwrap()
            .into_iter()
            .map(|e| (e.action, e.from_version, e.version, e.caller))
            .collect();
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(
            log,
            vec![
                ("register".into(), None, s("2"), "cli user=a".into()),
                ("candidate".into(), None, s("2"), "cli user=a".into()),
                ("promote".into(), s("0"), s("2"), "http 127.0.0.1:5 token=yes".into()),
                ("rollback".into(), s("2"), s("0"), "cli user=b".into()),
            ]
        );
        // A reader opened read-only sees the same roles.
        let ro = ModelStore::open_existing(&d.path().join("data")).unwrap().unwrap();
        assert_eq!(ro.active_version("pma").unwrap().as_deref(), Some("0"));
        assert!(ModelStore::open_existing(&d.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn registration_refuses_wrong_cards_and_keeps_nothing_of_them() {
        if !super::super::init_for_tests() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (store, configured) = store_with_config(d.path());
        let opts = RuntimeOptions::default();
        let reg = |card: &Path| register(&store, "pma", &configured, card, &opts, "t");

        let bad_digest = trained(&d.path().join("a"), "2", |t| t, &[]);
        let onnx = bad_digest.with_file_name("pma.onnx");
        let mut bytes = std::fs::read(&onnx).unwrap();
        bytes.push(0);
        std::fs::write(&onnx, bytes).unwrap();
        assert!(matches!(reg(&bad_digest), Err(RegisterError::Card(CardError::Digest { .. }))));

        let unparsable = trained(&d.path().join("b"), "2", |t| t.replace("input:", "input: [oops"), &[]);
        assert!(matches!(reg(&unparsable), Err(RegisterError::Card(CardError::Parse { .. }))));

        let other_task = trained(&d.path().join("c"), "2", |t| t.replace("task: pma", "task: sfa"), &[]);
        assert!(matches!(reg(&other_task), Err(RegisterError::Mismatch { field: "task", .. })));
        let other_unit = trained(&d.path().join("c2"), "2", |t| t.replace("ucum: cm2", "ucum: mm2"), &[]);
        assert!(matches!(reg(&other_unit), Err(RegisterError::Mismatch { field: "biomarker unit", .. })));

        let bad_version = trained(&d.path().join("e"), "../x", |t| t, &[]);
        assert!(matches!(reg(&bad_version), Err(RegisterError::BadVersion(_))));

        // The graph has no input of this name: it does not run.
        let wrong_input =
            trained(&d.path().join("f"), "2", |t| t.replace("  slices: single", "  slices: single\n  input_name: nope"), &[]);
        assert!(matches!(reg(&wrong_input), Err(RegisterError::Onnx(_))), "{:?}", reg(&wrong_input));
        assert_eq!(store.versions("pma").unwrap().len(), 1, "nothing refused is kept");
        let leftovers: Vec<_> = std::fs::read_dir(store.root.join("pma")).map(|r| r.count()).into_iter().collect();
        assert!(leftovers.iter().all(|n| *n == 0), "no half-registered folder: {leftovers:?}");

        let good = trained(&d.path().join("g"), "2", |t| t, &[]);
        let row = reg(&good).unwrap();
        assert_eq!((row.version.as_str(), row.source.as_str()), ("2", "registered"));
        assert!(row.card_path.starts_with(store.version_dir("pma", "2")));
        ModelCard::load(&row.card_path).unwrap().verify_digest().unwrap();
        assert_eq!(reg(&good).unwrap(), row, "the same bytes again: a no-op");
        // Same version, other bytes (an ONNX with trailing bytes still loads).
        let conflict = trained(&d.path().join("h"), "2", |t| t, &[0, 0]);
        assert!(matches!(reg(&conflict), Err(RegisterError::VersionConflict { .. })));
    }
}
