"""The real-CT evaluation (`python -m biomarker_training.evaluate --realct ... --realct-only`) end to end on the
real data in `../shared/realct-labelled` (CI has it), written to a temporary report.

Checked: the Real CT section is there with its targets; the node's slice above the arch on chest-lidc0001 and its
PMA/SFA values equal what the Python mirror computes on that slice; the node and the Python mirror agree on one
liver slice; IRCAD overlays go only to the private folder (CC BY-NC-ND: never into the repository's docs); the
phantom part of the report is left byte for byte. The accuracy numbers themselves are reported, not asserted,
except the slice-level target (15 mm), which the node meets and must keep meeting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ci_no_skip import require_dir
from nodeharness import REALCT, REPO_ROOT

LABELLED = REALCT.parent / "realct-labelled"
PHANTOM = "# Held-out evaluation\n\n| task | method |\n|---|---|\n\n## Targets\n\n- pma: met\n\n## Data\n\nnotes\n"


@pytest.mark.slow
def test_realct_evaluation_end_to_end(binary, tmp_path):
    require_dir(LABELLED / "liver-ircad07", "real liver CT with masks")
    require_dir(LABELLED / "chest-lidc0001", "real chest CT volume")
    report = tmp_path / "EVALUATION.md"
    report.write_text(PHANTOM)
    pub, priv = tmp_path / "pub", tmp_path / "priv"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "models" / "training"), BIOMARKER_NODE_BIN=str(binary))
    r = subprocess.run(
        [sys.executable, "-m", "biomarker_training.evaluate", "--models", str(REPO_ROOT / "models"),
         "--realct", str(LABELLED), "--realct-only", "--report", str(report), "--overlays", str(pub),
         "--overlays-private", str(priv)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = report.read_text()
    assert md.startswith(PHANTOM[:PHANTOM.index("## Data")]) and md.endswith("## Data\n\nnotes\n")
    assert "## Real CT" in md and "liver per-slice r:" in md and "liver tumour volume:" in md
    res = {x["set"]: x for x in json.loads((tmp_path / "evaluation-realct.json").read_text())}

    liver = res["liver-ircad07"]
    print("liver-ircad07:", json.dumps({k: liver[k] for k in ("per_slice", "volume", "parity")}))
    assert liver["per_slice"]["n"] == 109  # files 37-145: liver mask or tumour mask non-empty
    assert liver["volume"]["truth_ml"] == pytest.approx(668.8, abs=0.2)
    assert liver["parity"]["node"] == pytest.approx(liver["parity"]["python"], rel=1e-4)
    assert len(list((priv / "liver-ircad07").glob("*.png"))) == 109
    assert not any("ircad" in p.name.lower() for p in pub.iterdir())

    lidc = res["chest-lidc0001"]
    print("chest-lidc0001:", json.dumps({k: lidc[k] for k in ("chosen", "values", "parity")}))
    for task, c in lidc["chosen"].items():
        assert c["distance_mm"] <= 15.0, (task, c)
        assert lidc["parity"][task]["node"] == pytest.approx(lidc["parity"][task]["python"], rel=1e-4)
    for name in ("lidc0001-pma.png", "lidc0001-sfa.png", "lidc0001-levels.png", "chest-lungmask-0-pma.png"):
        assert (pub / name).stat().st_size > 10_000, name
    assert res["chest-lungmask"]["slices"]["1.dcm"]["identical_to"] == "0.dcm"
