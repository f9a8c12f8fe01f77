//! `biomarker-node models list | audit | register | promote | rollback`: the
//! model store (`inference::versions`) as an operator works it.
//!
//! These commands write the store under the config's data dir directly;
//! they need no running node and no HTTP token (whoever may write the data
//! dir may change the node's models), and a running node applies a change
//! within a second or two: it polls the store's revision
//! (`node::watch_models`). Every change is in the store's audit log with the
//! OS user as its caller.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::config::{Config, ExecutionProvider};
use crate::inference::versions::{self, ModelStore};
use crate::inference::{ModelCard, RuntimeOptions};

/// The config, and the store with every configured card recorded as a
/// version (a node that never ran has not recorded them yet).
fn open(config: &Path) -> anyhow::Result<(Config, ModelStore)> {
    let (cfg, _) = crate::node::check::checked(config)?;
    let store = ModelStore::open(&cfg.node.data_dir)?;
    for (name, m) in &cfg.models {
        match ModelCard::load(&m.card) {
            Ok(card) => store.ensure_configured(name, &card)?,
            Err(e) => eprintln!("warning: model `{name}`: {e}"),
        }
    }
    Ok((cfg, store))
}

fn known(cfg: &Config, name: &str) -> anyhow::Result<()> {
    if !cfg.models.contains_key(name) {
        let names: Vec<&str> = cfg.models.keys().map(String::as_str).collect();
        anyhow::bail!("no model `{name}` in the config (configured: {})", names.join(", "));
    }
    Ok(())
}

/// `models list`: each configured model's versions and roles.
pub fn list(config: &Path, json: bool) -> anyhow::Result<()> {
    let (cfg, store) = open(config)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for name in cfg.models.keys() {
        let roles = store.roles(name)?;
        let active = store.active_version(name)?;
        let versions = store.versions(name)?;
        if json {
            let line = serde_json::json!({
                "model": name,
                "active": active,
                "candidate": roles.candidate,
                "previous": roles.previous,
                "versions": versions,
            });
            writeln!(out, "{line}")?;
            continue;
        }
        writeln!(out, "{name}")?;
        for v in &versions {
            let role = if Some(&v.version) == active.as_ref() {
                "active"
            } else if Some(&v.version) == roles.candidate.as_ref() {
                "candidate"
            } else if Some(&v.version) == roles.previous.as_ref() {
                "previous"
            } else {
                ""
            };
            writeln!(out, "  {:<16} {:<10} {:<10} {}  {}", v.version, role, v.source, v.registered_at, v.card_path.display())?;
        }
    }
    Ok(())
}

/// `models audit`: every registration, candidacy, promotion and rollback.
pub fn audit(config: &Path, json: bool) -> anyhow::Result<()> {
    let (_, store) = open(config)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for e in store.audit(None)? {
        if json {
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
        } else {
            let v = e.version.as_deref().unwrap_or("-");
            let from = e.from_version.as_deref().unwrap_or("-");
            writeln!(out, "{}  {:<9} {:<10} {from} -> {v}  by {}", e.at, e.action, e.model, e.caller)?;
        }
    }
    Ok(())
}

/// `models register`: copy a trained model into the store, after the checks
/// of [`versions::register`]; as the candidate unless `candidate` is false.
pub fn register(config: &Path, card: &Path, model: Option<&str>, candidate: bool) -> anyhow::Result<()> {
    let (cfg, store) = open(config)?;
    let new = ModelCard::load(card)?;
    // The configured model it is a version of: named, or the one whose
    // card measures the same task.
    let name = match model {
        Some(n) => {
            known(&cfg, n)?;
            n.to_owned()
        }
        None => {
            // The configured model whose card has the new card's name and
            // task; failing that, the one measuring its task.
            let cards: Vec<(&String, ModelCard)> =
                cfg.models.iter().filter_map(|(n, m)| Some((n, ModelCard::load(&m.card).ok()?))).collect();
            let mut same: Vec<&String> =
                cards.iter().filter(|(_, c)| c.task == new.task && c.name == new.name).map(|(n, _)| *n).collect();
            if same.is_empty() {
                same = cards.iter().filter(|(_, c)| c.task == new.task).map(|(n, _)| *n).collect();
            }
            match same[..] {
                [one] => one.clone(),
                [] => anyhow::bail!("no configured model measures task `{}`; name one with --model", new.task),
                _ => anyhow::bail!("several configured models measure task `{}`; name one with --model", new.task),
            }
        }
    };
    let configured = ModelCard::load(&cfg.models[&name].card)?;
    crate::inference::init(cfg.onnxruntime.library_path().as_deref())?;
    // The check run is on CPU: registration must not need, or take, the GPU.
    let opts = RuntimeOptions { execution_provider: ExecutionProvider::Cpu, ..Default::default() };
    let caller = versions::cli_caller();
    let row = versions::register(&store, &name, &configured, card, &opts, &caller)
        .with_context(|| format!("{} refused", card.display()))?;
    println!("registered {name} {} at {}", row.version, row.card_path.display());
    if candidate {
        store.set_candidate(&name, Some(&row.version), &caller)?;
        println!("{name} {} is the candidate: it runs in shadow beside the active version, and sends nothing", row.version);
    }
    Ok(())
}

/// `models promote`.
pub fn promote(config: &Path, name: &str, version: &str) -> anyhow::Result<()> {
    let (cfg, store) = open(config)?;
    known(&cfg, name)?;
    let s = store.promote(name, version, &versions::cli_caller())?;
    println!("promoted {} {} -> {} (a running node switches within seconds)", s.model, s.from, s.to);
    Ok(())
}

/// `models rollback`.
pub fn rollback(config: &Path, name: &str) -> anyhow::Result<()> {
    let (cfg, store) = open(config)?;
    known(&cfg, name)?;
    let s = store.rollback(name, &versions::cli_caller())?;
    println!("rolled back {} {} -> {} (a running node switches within seconds)", s.model, s.from, s.to);
    Ok(())
}
