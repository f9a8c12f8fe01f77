//! `biomarker-node series | jobs | outbox`: the stores as operators read
//! them, one JSON object per line with `--json`, else an aligned table.
//!
//! Every listing opens its store read-only (or as a plain reader), so it is
//! safe while `serve` runs and never creates a store that is not there.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::jobs::{JobStore, SqliteJobStore};
use crate::outbox::store::{list_read_only, rfc3339};
use crate::outbox::{ItemState, OutboxError};

/// `biomarker-node series`.
pub fn series(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let path = cfg.index_path();
    if !path.exists() {
        anyhow::bail!("no series index at {} yet: has `serve` run with this config?", path.display());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    crate::series::print_series(&path, json, &mut out)?;
    Ok(())
}

/// `biomarker-node jobs`.
pub fn jobs(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let path = cfg.index_path();
    if !path.exists() {
        anyhow::bail!("no job store at {} yet: has `serve` run with this config?", path.display());
    }
    let store = SqliteJobStore::open(&path)?;
    let stdout = std::io::stdout();
    print_jobs(&store, json, &mut stdout.lock())?;
    Ok(())
}

/// `biomarker-node outbox`.
pub fn outbox(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let stdout = std::io::stdout();
    print_outbox(&cfg.node.data_dir.join("outbox.sqlite"), json, &mut stdout.lock())?;
    Ok(())
}

/// Every job in `store`, oldest first.
pub fn print_jobs(store: &dyn JobStore, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let jobs = store.list()?;
    if json {
        for j in &jobs {
            writeln!(out, "{}", serde_json::to_string(j).unwrap_or_default()).context("cannot write the listing")?;
        }
        return Ok(());
    }
    writeln!(out, "{:>5}  {:<8} {:<20} {:<8} {:>3}  {:<64}  RESULT/ERROR", "ID", "STATE", "ROUTE", "MODEL", "GEN", "SERIES")
        .context("cannot write the listing")?;
    for j in &jobs {
        let detail = match (&j.result, &j.error) {
            (Some(r), _) => format!("{} {}", r["value"], r["unit"].as_str().unwrap_or("")),
            (_, Some(e)) => e.clone(),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:>5}  {:<8} {:<20} {:<8} {:>3}  {:<64}  {}",
            j.id, j.state, j.key.route, j.key.model, j.key.generation, j.key.series_instance_uid, detail
        )
        .context("cannot write the listing")?;
    }
    Ok(())
}

/// List every item of the outbox in `db_path`: one JSON object per line
/// with `json`, else an aligned table. Opens the file read-only, so it is
/// safe while the node runs and never creates the file.
pub fn print_outbox(db_path: &Path, json: bool, out: &mut dyn Write) -> Result<(), OutboxError> {
    let items = list_read_only(db_path)?;
    if json {
        for it in &items {
            let line = serde_json::to_string(it).map_err(|e| OutboxError::Io(e.into()))?;
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:>6}  {:<9}  {:>8}  {:<16}  {:<64}  {:<25}  LAST ERROR",
        "ID", "STATE", "ATTEMPTS", "DESTINATION", "SOP INSTANCE UID", "NEXT ATTEMPT / DELIVERED"
    )?;
    for it in &items {
        let when = match (it.state, it.delivered_at) {
            (ItemState::Delivered, Some(t)) => rfc3339(t),
            (ItemState::Pending, _) => rfc3339(it.next_attempt_at),
            _ => "-".into(),
        };
        // One line per item: a multi-line reason would break `grep`.
        let err = it
            .last_error
            .as_deref()
            .unwrap_or("-")
            .replace(['\n', '\r'], " ");
        writeln!(
            out,
            "{:>6}  {:<9}  {:>8}  {:<16}  {:<64}  {:<25}  {}",
            it.id, it.state, it.attempts, it.destination, it.sop_instance_uid, when, err
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::Uid;
    use crate::outbox::store::{NewItem, OutboxStore, SqliteOutboxStore};
    use std::time::SystemTime;

    #[test]
    fn outbox_json_lines_and_table() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.sqlite");
        let s = SqliteOutboxStore::open(&p).unwrap();
        for sop in ["1.2.3", "1.2.4"] {
            s.enqueue(
                &NewItem {
                    destination: "pacs".into(),
                    path: d.path().join(format!("{sop}.dcm")),
                    sop_class_uid: Uid::parse("1.2.840.10008.5.1.4.1.1.7").unwrap(),
                    sop_instance_uid: Uid::parse(sop).unwrap(),
                },
                SystemTime::now(),
            )
            .unwrap();
        }
        let c = s.claim_due(SystemTime::now(), &[], 1).unwrap();
        s.mark_dead(c[0].id, "C-STORE status 0xA900\nsecond line")
            .unwrap();

        let mut buf = Vec::new();
        print_outbox(&p, true, &mut buf).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(buf)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["state"], "dead");
        assert_eq!(lines[0]["attempts"], 1);
        assert_eq!(lines[0]["last_error"], "C-STORE status 0xA900\nsecond line");
        assert_eq!(lines[1]["state"], "pending");
        assert!(lines[1]["created_at"].as_str().unwrap().ends_with('Z'));

        let mut buf = Vec::new();
        print_outbox(&p, false, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains("dead") && text.contains("0xA900 second line"),
            "{text}"
        );
    }
}
