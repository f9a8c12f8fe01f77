"""Model versions on a running node with Orthanc as the PACS: a candidate is
registered, runs in shadow beside the active version (its results kept,
nothing of it sent), is promoted over the API (the next SR names it), and
rolled back from the command line; every change is in the audit log.

The candidate is the shipped PMA model under a new version string, as a site
would register a retrained one: card and ONNX copied, `version:` changed, the
card's sha256 recomputed from the ONNX it sits beside (`sha256:` binds the
card to its ONNX; `biomarker-node models register` refuses a mismatch). So
that the two versions disagree a little, as a retrained model would, the
candidate scales its input by 5% more (`input.scale.divide`), a small change
of the network's input that changes its maps a little, series by series.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from nodeharness import REPO_ROOT, node_binary, run_tool, storescu
from test_results_orthanc import (FAST_OUTBOX, SR_STORAGE_CLASSES, node_overrides, nodes, orthancs,  # noqa: F401
                                  outbox, routes_named, wait_for)
from test_status_page import browser  # noqa: F401

TOKEN = "model-versions-test-token"
CANDIDATE = "0.2.0-site.1"
ALGORITHM_VERSION = "111003"


def models_cli(node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(node_binary()), "models", *args[:1], "--config", str(node.config_path), *args[1:]],
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"models {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def candidate_card(src_card: Path, out: Path, version: str, tamper: bool = False,
                   rescale: float | None = None) -> Path:
    """A copy of a shipped card and its ONNX as version `version`, with the
    sha256 recomputed (or, with `tamper`, an ONNX whose bytes no longer
    match the card)."""
    out.mkdir(parents=True, exist_ok=True)
    card = yaml.safe_load(src_card.read_text())
    onnx = (src_card.parent / card["onnx"]).read_bytes()
    (out / card["onnx"]).write_bytes(onnx + (b"\0" if tamper else b""))
    card["version"] = version
    card["sha256"] = hashlib.sha256(onnx).hexdigest()
    if rescale is not None:
        card["input"]["scale"]["divide"] *= rescale
    path = out / src_card.name
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def algorithm_versions(ds) -> set[str]:
    """The TID 4019 Algorithm Version of every content item of an SR."""
    found = set()

    def walk(items):
        for it in items:
            concept = getattr(it, "ConceptNameCodeSequence", None)
            if concept and concept[0].CodeValue == ALGORITHM_VERSION and "TextValue" in it:
                found.add(str(it.TextValue))
            walk(getattr(it, "ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def orthanc_srs(o) -> dict[str, set[str]]:
    """SOP Instance UID -> algorithm versions of every SR Orthanc holds."""
    out = {}
    for iid in o.instances():
        tags = o.instance_tags(iid)
        if tags["SOPClassUID"] in SR_STORAGE_CLASSES:
            ds = pydicom.dcmread(io.BytesIO(o.instance_file(iid)))
            out[ds.SOPInstanceUID] = algorithm_versions(ds)
    return out


def jobs(node) -> list[dict]:
    return node.http_json("/api/jobs?limit=500", token=TOKEN)


def model(node, name: str = "pma") -> dict:
    return next(m for m in node.http_json("/api/models", token=TOKEN) if m["name"] == name)


def series_jobs_done(node, series: set[str], shadow: bool) -> list[dict] | None:
    js = [j for j in jobs(node) if j["series_instance_uid"] in series and bool(j.get("shadow")) == shadow]
    if len(js) == len(series) and all(j["state"] == "done" for j in js):
        return js
    return None


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    """Five single-slice PMA phantoms, one series each."""
    out = tmp_path_factory.mktemp("phantoms")
    r = run_tool([str(node_binary()), "phantom", "--task", "pma", "--seed", "11", "--out", str(out), "--count", "5"])
    assert r.returncode == 0, r.stderr
    dirs = sorted(d for d in out.iterdir() if (d / "CT0001.dcm").is_file())
    assert len(dirs) == 5, list(out.rglob("*"))
    return dirs


def series_uid(phantom: Path) -> str:
    return pydicom.dcmread(phantom / "CT0001.dcm", stop_before_pixels=True).SeriesInstanceUID


def check_status_page(b, node, a: dict, shot: Path) -> None:
    """The status page shows the comparison: the statistics, the plot (an
    SVG that decoded) and both overlays of each discordant series; nothing
    breaks the Content-Security-Policy. A screenshot of the section goes to
    `shot` (and to $SHADOW_SCREENSHOT, when set, for the docs)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(b, 30, poll_frequency=0.2)
    b.get(f"http://127.0.0.1:{node.http_port}/")
    wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
    b.find_element(By.ID, "token").send_keys(TOKEN)
    b.find_element(By.ID, "token-btn").click()
    box = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#shadow .shadow-model"))[0]
    assert f"candidate {CANDIDATE}" in box.text and f"n = {a['n']}" in box.text and "limits of agreement" in box.text
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('#shadow img.bland-altman');"
        "return i && i.complete && i.naturalWidth > 0;"))
    wait.until(lambda d: d.execute_script(
        "const im = [...document.querySelectorAll('#shadow table.worst img')];"
        f"return im.length === {2 * len(a['worst'])} && im.every(i => i.complete && i.naturalWidth > 0);"))
    # shadow runs are marked in the jobs table and are not among the results sent
    assert "(shadow)" in b.find_element(By.CSS_SELECTOR, "#jobs-table tbody").text
    assert CANDIDATE in b.find_element(By.CSS_SELECTOR, "#models-table tbody").text
    assert b.execute_script("return window.__csp") == []
    section = b.find_element(By.ID, "shadow-section")
    b.execute_script("arguments[0].scrollIntoView()", section)
    section.screenshot(str(shot))
    if os.environ.get("SHADOW_SCREENSHOT"):
        shutil.copy(shot, os.environ["SHADOW_SCREENSHOT"])


def test_candidate_shadows_then_promote_and_rollback(tmp_path, nodes, orthancs, phantoms, browser):  # noqa: F811
    shipped = REPO_ROOT / "models" / "pma.yaml"
    active_version = yaml.safe_load(shipped.read_text())["version"]
    cards = {"pma": shipped}
    over = node_overrides(0, routes_named("pma-single-slice"), outbox=FAST_OUTBOX, cards=cards)
    o = orthancs().start()
    over["destinations"]["pacs"]["port"] = o.dicom_port
    over["http"] = {"token": TOKEN}
    node = nodes(over)
    assert model(node)["version"] == active_version

    # --- registration: a card whose checksum is wrong is refused, clearly.
    bad = candidate_card(shipped, tmp_path / "bad", CANDIDATE, tamper=True)
    r = models_cli(node, "register", "--card", str(bad), check=False)
    assert r.returncode != 0 and "sha256" in r.stderr, (r.returncode, r.stderr)
    wrong_task = candidate_card(shipped, tmp_path / "task", CANDIDATE)
    wrong_task.write_text(wrong_task.read_text().replace("task: pma", "task: sfa"))
    r = models_cli(node, "register", "--model", "pma", "--card", str(wrong_task), check=False)
    assert r.returncode != 0 and "task" in r.stderr, (r.returncode, r.stderr)

    good = candidate_card(shipped, tmp_path / "good", CANDIDATE, rescale=1.05)
    r = models_cli(node, "register", "--card", str(good))
    assert CANDIDATE in r.stdout and "candidate" in r.stdout, r.stdout
    listed = json.loads(next(line for line in models_cli(node, "list", "--json").stdout.splitlines()
                             if json.loads(line)["model"] == "pma"))
    assert (listed["active"], listed["candidate"]) == (active_version, CANDIDATE), listed
    # The running node picks the candidate up without a restart.
    wait_for(lambda: model(node).get("candidate_version") == CANDIDATE, 15, "the node to load the candidate",
             diag=lambda: f"{model(node)}\n{node.log_tail(20)}")

    # --- shadow: four series, each measured by both versions; only the
    # active version's results reach Orthanc.
    first = phantoms[:4]
    uids = {series_uid(p) for p in first}
    for p in first:
        r = storescu(node, [p / "CT0001.dcm"])
        assert r.returncode == 0, r.stdout + r.stderr
    active_jobs = wait_for(lambda: series_jobs_done(node, uids, shadow=False), 120, "the active jobs",
                           diag=lambda: f"{jobs(node)}\n{node.log_tail(30)}")
    shadow_jobs = wait_for(lambda: series_jobs_done(node, uids, shadow=True), 120, "the shadow jobs",
                           diag=lambda: f"{jobs(node)}\n{node.log_tail(30)}")
    assert {j["model_version"] for j in active_jobs} == {active_version}
    assert {j["model_version"] for j in shadow_jobs} == {CANDIDATE}
    assert all(j["result"]["model_version"] == CANDIDATE for j in shadow_jobs)
    shadow_sops = {r["sop_instance_uid"] for j in shadow_jobs for r in j["result"]["reports"]}
    active_sops = {r["sop_instance_uid"] for j in active_jobs for r in j["result"]["reports"]}
    assert shadow_sops and not shadow_sops & active_sops
    # Shadow results are files under results/, beside (not over) the active ones.
    for j in shadow_jobs:
        for rep in j["result"]["reports"]:
            assert Path(rep["path"]).is_file() and f"shadow-{CANDIDATE}" in rep["path"], rep

    items = wait_for(lambda: (lambda it: it if it and all(i["state"] == "delivered" for i in it)
                              and {i["sop_instance_uid"] for i in it} == active_sops else None)(outbox(node)),
                     60, "the active results delivered", diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    assert not {i["sop_instance_uid"] for i in items} & shadow_sops, "a shadow result was queued"
    time.sleep(1.0)
    received = set(o.received_sops())
    assert received == active_sops and not received & shadow_sops, (received, shadow_sops)
    srs = orthanc_srs(o)
    assert len(srs) == 4 and all(v == {active_version} for v in srs.values()), srs

    # --- agreement: the API's statistics are those of the stored values.
    a = node.http_json("/api/models/pma/agreement", token=TOKEN)
    value = {(j["series_instance_uid"], bool(j.get("shadow"))): j["result"]["value"] for j in active_jobs + shadow_jobs}
    pairs = [(value[(u, False)], value[(u, True)]) for u in uids]
    diffs = [c - x for x, c in pairs]
    assert any(abs(d) > 1e-6 for d in diffs), f"the versions should disagree a little: {pairs}"
    bias, sd = statistics.mean(diffs), statistics.stdev(diffs)
    close = lambda x, y: abs(x - y) <= 1e-9 * max(1.0, abs(y))  # noqa: E731
    assert (a["candidate_version"], a["n"], a["pending"], a["unpaired"]) == (CANDIDATE, 4, 0, 0), a
    assert close(a["bias"], bias) and close(a["sd"], sd), (a, bias, sd)
    assert close(a["limits_of_agreement"][0], bias - 1.96 * sd) and close(a["limits_of_agreement"][1], bias + 1.96 * sd)
    assert close(a["r"], statistics.correlation([p[0] for p in pairs], [p[1] for p in pairs])), a
    assert [abs(w["difference"]) for w in a["worst"]] == sorted((abs(d) for d in diffs), reverse=True), a["worst"]
    assert len(a["worst"]) == 4
    for w in a["worst"]:
        for key in ("active_overlay", "candidate_overlay"):
            status, headers, body = node.http(w[key], token=TOKEN)
            assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n", (w[key], status)
    status, headers, svg = node.http("/api/models/pma/agreement.svg", token=TOKEN)
    assert status == 200 and svg.startswith(b"<svg") and svg.count(b"<circle") == 4, svg[:200]
    check_status_page(browser, node, a, tmp_path / "status-page-shadow.png")

    # --- promote over the API: the token is required; the switch is immediate.
    status, _, body = node.http("/api/models/pma/promote", "POST", json.dumps({"version": CANDIDATE}).encode(),
                                headers={"Content-Type": "application/json"})
    assert status == 401, (status, body)
    status, _, body = node.http("/api/models/pma/promote", "POST", json.dumps({"version": CANDIDATE}).encode(),
                                token=TOKEN, headers={"Content-Type": "application/json"})
    assert status == 200, body
    assert json.loads(body)["active_version"] == CANDIDATE
    m = model(node)
    assert (m["version"], m.get("candidate_version")) == (CANDIDATE, None), m

    third = phantoms[4]
    r = storescu(node, [third / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    new_sr = wait_for(lambda: (lambda s: s if len(s) == 5 else None)(orthanc_srs(o)), 120, "the fifth SR in Orthanc",
                      diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    fresh = [v for uid, v in new_sr.items() if uid not in srs]
    assert fresh == [{CANDIDATE}], new_sr
    third_jobs = [j for j in jobs(node) if j["series_instance_uid"] == series_uid(third)]
    assert [(j["model_version"], bool(j.get("shadow"))) for j in third_jobs] == [(CANDIDATE, False)], third_jobs

    # --- rollback from the command line: the running node notices.
    r = models_cli(node, "rollback", "pma")
    assert f"{CANDIDATE} -> {active_version}" in r.stdout, r.stdout
    wait_for(lambda: model(node)["version"] == active_version, 15, "the node to roll back",
             diag=lambda: f"{model(node)}\n{node.log_tail(20)}")

    # --- the audit log: who did what, in order, over both interfaces.
    log = [json.loads(line) for line in models_cli(node, "audit", "--json").stdout.splitlines()]
    assert [(e["action"], e["version"]) for e in log] == [
        ("register", CANDIDATE), ("candidate", CANDIDATE), ("promote", CANDIDATE), ("rollback", active_version),
    ], log
    assert log[0]["caller"].startswith("cli user=") and log[3]["caller"].startswith("cli user="), log
    assert log[2]["caller"].startswith("http 127.0.0.1:") and log[2]["caller"].endswith("token=yes"), log
    assert log[2]["from_version"] == active_version and log[3]["from_version"] == CANDIDATE
    assert node.http_json("/api/models/audit", token=TOKEN) == [
        {k: e[k] for k in ("id", "at", "action", "model", "version", "from_version", "caller")} for e in log]
