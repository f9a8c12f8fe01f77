"""`analyze` on the held-out phantoms reproduces models/EVALUATION.md.

EVALUATION.md's numbers were computed in Python (ONNX Runtime) on the phantoms
`biomarker-node phantom --task T --seed 901 --count 100`. The generator is
deterministic, so the node regenerates the same cases, runs the shipped models
through `analyze` (Rust volume assembly, candidates, aggregation) and must land
on the same Pearson r and MAE against the phantom truth.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from nodeharness import REPO_ROOT

EVAL = REPO_ROOT / "models" / "evaluation.json"
CONFIG = REPO_ROOT / "config" / "node.yaml"
ROUTE = {"pma": "pma-single-slice", "sfa": "sfa-single-slice", "liver": "liver-abdomen"}


def _pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = math.sqrt(sum((x - ma) ** 2 for x in a))
    vb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (va * vb)


@pytest.fixture(scope="module")
def evaluation():
    if not EVAL.exists():
        pytest.fail("models/evaluation.json missing: the shipped models have no evaluation")
    return {e["task"]: e for e in json.loads(EVAL.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pma", "sfa", "liver"])
def test_analyze_matches_evaluation(task, evaluation, binary, tmp_path):
    ref = evaluation[task]["methods"]["localization"]
    n = ref["n"]
    ph = tmp_path / "phantoms"
    subprocess.run([str(binary), "phantom", "--task", task, "--seed", "901", "--out", str(ph),
                    "--count", str(n)], check=True, capture_output=True)
    truth = {}
    for d in sorted(ph.glob(f"{task}-901-*")):
        t = json.loads((d / "truth.json").read_text())
        truth[t["series_instance_uid"]] = t["value"]
    assert len(truth) == n
    out = subprocess.run([str(binary), "analyze", "--config", str(CONFIG), "--out", str(tmp_path / "out"), str(ph)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    pred = {}
    for line in out.stdout.splitlines():
        r = json.loads(line)
        if r["route"] == ROUTE[task]:
            assert r["execution_provider"] == "cpu"
            pred[r["series_instance_uid"]] = r["value"]
    assert set(pred) == set(truth), "every phantom is routed to its model exactly once"
    uids = sorted(truth)
    p = [pred[u] for u in uids]
    t = [truth[u] for u in uids]
    r = _pearson(p, t)
    mae = sum(abs(x - y) for x, y in zip(p, t)) / n
    print(f"{task}: r {r:.4f} (EVALUATION.md {ref['r']:.4f}), MAE {mae:.3f} (EVALUATION.md {ref['mae']:.3f})")
    assert abs(r - ref["r"]) <= 1e-3, (r, ref["r"])
    assert abs(mae - ref["mae"]) <= 1e-3 * max(1.0, ref["mae"]), (mae, ref["mae"])
