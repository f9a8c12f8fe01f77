"""The volume budget (`jobs.max_volume_mb`): a job's HU volume is bounded per series, whatever the number of files or
frames, and a series past it ends `failed` with the reason, while the node goes on with other series.

The real chest volume `../shared/realct-labelled/chest-lidc0001/ct` (133 slices of 512x512: 133 MiB of f32 HU) is sent
to a node whose budget is 64 MiB (16777216 voxels), routed to PMA (slice above the aortic arch). Its job fails with the
budget named and nothing else decoded past it; a single-slice PMA phantom sent alongside (1 MiB) is measured. `analyze`
with the same config says the same on stderr and exits non-zero. The default budget (4096 MiB) measures the chest
volume: test_chest_volume.py. The budget's unit tests, Enhanced CT of 1025 frames among them, are in src/volume/tests.rs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml

from ci_no_skip import require_dir
from nodeharness import REALCT, REPO_ROOT, free_port, storescu
from test_results_orthanc import cli_json, node_overrides, nodes, ort_dylib, pma_phantom, wait_for  # noqa: F401

CHEST = REALCT.parent / "realct-labelled" / "chest-lidc0001" / "ct"
ROUTES = [{"name": "pma-any-ct", "model": "pma", "send_to": ["pacs"], "slices": {"mode": "above_aortic_arch"},
           "match": {"derived": "modality", "equals": "CT"}}]
CARDS = {"pma": REPO_ROOT / "models" / "pma.yaml"}
BUDGET_MB = 64
SAYS = f"more than the {BUDGET_MB << 18} one volume may hold (jobs.max_volume_mb)"


@pytest.fixture(scope="module")
def chest() -> Path:
    return require_dir(CHEST, "real chest CT")


def _overrides() -> dict:
    # Nothing listens on the destination: no job here gets as far as sending.
    over = node_overrides(free_port(), ROUTES, cards=CARDS)
    over["jobs"] = {"max_volume_mb": BUDGET_MB}
    return over


def test_a_series_past_the_volume_budget_fails_and_the_node_goes_on(chest, nodes, pma_phantom):
    node = nodes(_overrides())
    files = sorted(chest.glob("*.dcm"))
    assert len(files) == 133
    r = storescu(node, files)
    assert r.returncode == 0, r.stdout + r.stderr
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    chest_series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    phantom_series = str(pydicom.dcmread(pma_phantom / "CT0001.dcm", stop_before_pixels=True).SeriesInstanceUID)
    jobs = wait_for(lambda: (lambda js: js if len(js) == 2 and all(j["state"] in ("done", "refused", "failed")
                                                                    for j in js) else None)(cli_json(node, "jobs")),
                    180, "both jobs finished", diag=lambda: node.log_tail(30))
    by_series = {j["series_instance_uid"]: j for j in jobs}
    big = by_series[chest_series]
    assert big["state"] == "failed", big
    error = str(big.get("error"))
    assert SAYS in error, big
    # The file that passed the budget is the 65th of 1 MiB: the count at that point is named.
    assert f"describes at least {65 * 512 * 512} voxels" in error, big
    assert by_series[phantom_series]["state"] == "done", by_series[phantom_series]
    assert node.proc.poll() is None, "the node keeps running"


def test_analyze_names_the_budget_and_exits_non_zero(chest, binary, tmp_path):
    config = {
        "node": {"ae_title": "BIOMARKER", "data_dir": str(tmp_path / "data")},
        "onnxruntime": {"library": ort_dylib()},
        "models": {m: {"card": str(c)} for m, c in CARDS.items()},
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 1}},
        "routes": ROUTES,
        "jobs": {"max_volume_mb": BUDGET_MB},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    r = subprocess.run([str(binary), "analyze", "--config", str(path), "--out", str(tmp_path / "out"), str(chest)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    assert r.stdout.strip() == "", r.stdout
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: series") and SAYS in l]
    assert len(errors) == 1, r.stderr
    assert "route pma-any-ct" in errors[0], errors
