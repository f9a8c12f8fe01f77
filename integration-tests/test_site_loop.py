"""The site training loop end to end (issue 14), on phantoms, on CPU: what a hospital does with the values already in
its records.

1. Phantoms are sent to a running node with storescu; the node scores them with the shipped PMA model and sends its
   SRs to Orthanc.
2. `biomarker-node dataset export` writes them, from the node's own spool, with a labels CSV built from their truth
   values (keyed by series, as a site would key its records).
3. `python -m biomarker_training.train` trains 2 epochs on the export and writes an ONNX, its card and report.html.
4. `biomarker-node models register` adds the result as a candidate: the running node loads it without a restart.
5. New series are scored by both versions: shadow results are stored, and nothing of the candidate reaches Orthanc.
6. `models promote`: the next SR in Orthanc names the new version.
7. `models rollback`: the node goes back to the shipped version, and the audit log holds every step.

A 2-epoch model is not a good model; the test checks the loop, not accuracy (docs/SITE-TRAINING.md has the learning
curve). test_model_versions.py checks the agreement statistics and the API's promote; test_dataset_export.py each
export outcome.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import yaml

from nodeharness import REPO_ROOT, node_binary, run_tool, storescu
from test_model_versions import TOKEN, jobs, model, models_cli, orthanc_srs, series_jobs_done, series_uid
from test_results_orthanc import (FAST_OUTBOX, node_overrides, nodes, orthancs,  # noqa: F401
                                  outbox, routes_named, wait_for)

SITE_VERSION = "0.2.0-site.7"
TRAINING = REPO_ROOT / "models" / "training"


def phantom_set(out: Path, seed: int, count: int) -> dict[Path, float]:
    """`count` single-slice PMA phantoms: series folder -> truth (cm2)."""
    r = run_tool([str(node_binary()), "phantom", "--task", "pma", "--seed", str(seed), "--out", str(out),
                  "--count", str(count)])
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == count, rows
    return {out / Path(row["series_dir"]).name: float(row["value"]) for row in rows}


def send(node, dirs) -> set[str]:
    r = storescu(node, [d / "CT0001.dcm" for d in dirs])
    assert r.returncode == 0, r.stdout + r.stderr
    return {series_uid(d) for d in dirs}


def test_export_train_register_shadow_promote_rollback(tmp_path, nodes, orthancs):  # noqa: F811
    shipped = REPO_ROOT / "models" / "pma.yaml"
    active_version = yaml.safe_load(shipped.read_text())["version"]
    over = node_overrides(0, routes_named("pma-single-slice"), outbox=FAST_OUTBOX, cards={"pma": shipped})
    o = orthancs().start()
    over["destinations"]["pacs"]["port"] = o.dicom_port
    over["http"] = {"token": TOKEN}
    node = nodes(over)

    # --- 1. the site's archive: 16 series scored by the shipped model, SRs in Orthanc.
    archive = phantom_set(tmp_path / "archive", seed=71, count=16)
    uids = send(node, archive)
    wait_for(lambda: series_jobs_done(node, uids, shadow=False), 240, "the archive scored",
             diag=lambda: f"{jobs(node)}\n{node.log_tail(30)}")
    wait_for(lambda: len(orthanc_srs(o)) == 16 or None, 120, "16 SRs in Orthanc",
             diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")

    # --- 2. export with the site's values (here: the phantoms' truth), keyed by series.
    labels = tmp_path / "values.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series_instance_uid", "value", "unit"])
        for d, v in archive.items():
            w.writerow([series_uid(d), repr(v), "cm2"])
    export = tmp_path / "export"
    r = subprocess.run([str(node_binary()), "dataset", "export", "--config", str(node.config_path), "--task", "pma",
                        "--labels", str(labels), "--out", str(export)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((export / "dataset.json").read_text())["report"]
    assert (rep["rows"], rep["exported"]) == (16, 16), rep
    exported = list(csv.DictReader(open(export / "labels.csv")))
    assert sorted(float(row["value"]) for row in exported) == sorted(archive.values())

    # --- 3. train 2 epochs on the export, CPU.
    trained = tmp_path / "trained"
    env = dict(os.environ, PYTHONPATH=str(TRAINING))
    r = subprocess.run([sys.executable, "-m", "biomarker_training.train", "--task", "pma", "--csv",
                        str(export / "labels.csv"), "--device", "cpu", "--epochs", "2", "--batch-size", "4",
                        "--val-fraction", "0.25", "--seed", "3", "--version", SITE_VERSION, "--out", str(trained)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    card = yaml.safe_load((trained / "pma.yaml").read_text())
    assert card["version"] == SITE_VERSION and card["task"] == "pma"
    assert card["training"]["data_summary"]["cases"] == 16, card["training"]["data_summary"]
    assert (trained / "report.html").is_file() and (trained / "pma.onnx").is_file()

    # --- 4. register as the candidate; the running node loads it.
    r = models_cli(node, "register", "--model", "pma", "--card", str(trained / "pma.yaml"))
    assert SITE_VERSION in r.stdout and "candidate" in r.stdout, r.stdout
    wait_for(lambda: model(node).get("candidate_version") == SITE_VERSION, 15, "the node to load the candidate",
             diag=lambda: f"{model(node)}\n{node.log_tail(20)}")

    # --- 5. shadow: both versions score new series; only the active one's SRs leave the node.
    fresh = phantom_set(tmp_path / "fresh", seed=72, count=3)
    new_uids = send(node, fresh)
    wait_for(lambda: series_jobs_done(node, new_uids, shadow=False), 120, "the active jobs",
             diag=lambda: f"{jobs(node)}\n{node.log_tail(30)}")
    shadow_jobs = wait_for(lambda: series_jobs_done(node, new_uids, shadow=True), 120, "the shadow jobs",
                           diag=lambda: f"{jobs(node)}\n{node.log_tail(30)}")
    assert {j["result"]["model_version"] for j in shadow_jobs} == {SITE_VERSION}
    shadow_sops = {rp["sop_instance_uid"] for j in shadow_jobs for rp in j["result"]["reports"]}
    srs = wait_for(lambda: (lambda s: s if len(s) == 19 else None)(orthanc_srs(o)), 120, "19 SRs in Orthanc",
                   diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    assert all(v == {active_version} for v in srs.values()), srs
    assert not set(o.received_sops()) & shadow_sops, "a shadow result reached Orthanc"
    assert not {i["sop_instance_uid"] for i in outbox(node)} & shadow_sops, "a shadow result was queued"
    a = node.http_json("/api/models/pma/agreement", token=TOKEN)
    assert a["candidate_version"] == SITE_VERSION and a["n"] == 3, a

    # --- 6. promote from the command line: the next SR names the site's version.
    r = models_cli(node, "promote", "pma", SITE_VERSION)
    wait_for(lambda: model(node)["version"] == SITE_VERSION, 15, "the node to promote",
             diag=lambda: f"{model(node)}\n{node.log_tail(20)}")
    last = phantom_set(tmp_path / "last", seed=73, count=1)
    send(node, last)
    after = wait_for(lambda: (lambda s: s if len(s) == 20 else None)(orthanc_srs(o)), 120, "the 20th SR",
                     diag=lambda: f"{outbox(node)}\n{jobs(node)[-3:]}\n{node.log_tail(30)}")
    assert [v for uid, v in after.items() if uid not in srs] == [{SITE_VERSION}], after

    # --- 7. roll back; the audit log has every step.
    r = models_cli(node, "rollback", "pma")
    wait_for(lambda: model(node)["version"] == active_version, 15, "the node to roll back",
             diag=lambda: f"{model(node)}\n{node.log_tail(20)}")
    log = [json.loads(line) for line in models_cli(node, "audit", "--json").stdout.splitlines()]
    assert [(e["action"], e["version"]) for e in log] == [
        ("register", SITE_VERSION), ("candidate", SITE_VERSION), ("promote", SITE_VERSION),
        ("rollback", active_version)], log
