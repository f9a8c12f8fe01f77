//! `biomarker-node series | jobs | outbox`: the stores as operators read
//! them, one JSON object per line with `--json`, else an aligned table.
//!
//! Every listing opens its store read-only (or as a plain reader), so it is
//! safe while `serve` runs and never creates a store that is not there.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::series::{SeriesIndex, SeriesSummary};
use crate::job::{JobStore, SqliteJobStore};
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
    print_series(&path, json, &mut out)?;
    Ok(())
}

/// `biomarker-node series`: list the index, safe while `serve` writes it.
///
/// `json`: one object per line (a [`SeriesSummary`]); otherwise an aligned
/// table, newest activity first in both.
pub fn print_series(index_path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let index = SeriesIndex::open_readonly(index_path)?;
    let rows = index.list_series()?;
    if json {
        for row in &rows {
            let line = serde_json::to_string(row)?;
            writeln!(out, "{line}").context("cannot write the listing")?;
        }
        return Ok(());
    }
    write_table(&rows, out).context("cannot write the listing")
}

fn write_table(rows: &[SeriesSummary], out: &mut dyn Write) -> std::io::Result<()> {
    const HEAD: [&str; 8] = [
        "STATE",
        "INST",
        "GEN",
        "REASON",
        "MOD",
        "LAST RECEIVED",
        "SERIES UID",
        "DESCRIPTION",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.state.to_string(),
                r.instances.to_string(),
                r.generation.to_string(),
                r.completion_reason.clone().unwrap_or_else(|| "-".into()),
                r.modality.clone().unwrap_or_else(|| "-".into()),
                r.last_received_at.clone(),
                r.series_instance_uid.to_string(),
                r.series_description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut width = HEAD.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |fields: [&str; 8]| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (f, w)) in fields.iter().zip(width).enumerate() {
            if i + 1 == fields.len() {
                s.push_str(f);
            } else if i == 1 || i == 2 {
                // Counts read better right-aligned.
                s.push_str(&format!("{f:>w$}  "));
            } else {
                s.push_str(&format!("{f:<w$}  "));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(HEAD)?;
    for row in &cells {
        line(row.each_ref().map(String::as_str))?;
    }
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
    use crate::series::{CompletionReason, StoredInstance};
    use std::path::PathBuf;
    use std::time::SystemTime;

    fn indexed(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("index.sqlite");
        let mut ix = SeriesIndex::open(&path).unwrap();
        for (series, n) in [("1.2.3", 3), ("1.2.4", 1)] {
            for i in 1..=n {
                let header = crate::series::test_slice(series, i, f64::from(i));
                let inst = StoredInstance {
                    rel_path: PathBuf::from(format!("s/{series}/{i}.dcm")),
                    header,
                    transfer_syntax: "1.2.840.10008.1.2.1".into(),
                    size_bytes: 1,
                    association_id: 1,
                    calling_ae: "CT01".into(),
                };
                ix.insert_instance(&inst, SystemTime::now()).unwrap();
            }
        }
        let ev = ix
            .pending_completion(&Uid::parse("1.2.3").unwrap(), CompletionReason::QuietTimer)
            .unwrap()
            .unwrap();
        ix.mark_complete(&ev, SystemTime::now()).unwrap();
        path
    }

    #[test]
    fn print_series_json_has_one_object_per_series_with_required_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = indexed(dir.path());
        let mut out = Vec::new();
        print_series(&path, true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        for key in [
            "series_instance_uid",
            "state",
            "instances",
            "completion_reason",
        ] {
            assert!(
                rows.iter().all(|r| r.get(key).is_some()),
                "missing {key}: {text}"
            );
        }
        let done = rows
            .iter()
            .find(|r| r["series_instance_uid"] == "1.2.3")
            .unwrap();
        assert_eq!(done["state"], "complete");
        assert_eq!(done["instances"], 3);
        assert_eq!(done["completion_reason"], "quiet_timer");
        let open = rows
            .iter()
            .find(|r| r["series_instance_uid"] == "1.2.4")
            .unwrap();
        assert_eq!(open["completion_reason"], serde_json::Value::Null);
    }

    #[test]
    fn print_series_text_is_an_aligned_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = indexed(dir.path());
        let mut out = Vec::new();
        print_series(&path, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("STATE"), "{text}");
        let col = lines[0].find("SERIES UID").unwrap();
        assert!(
            lines[1..].iter().all(|l| l[col..].starts_with("1.2.")),
            "{text}"
        );
    }

    use crate::outbox::store::{NewItem, OutboxStore, SqliteOutboxStore};

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
