"""The CAC SR the node writes carries the standard PS3.16 codes (docs/CONFORMANCE.md "CAC codes").

`biomarker-node analyze` with the shipped config and the trained CAC model on
one CAC phantom; the SR it writes must pass dciodvfy without errors, and
highdicom must read the score back under (450360000, SCT, "Coronary artery
calcium score") with Measurement Method (112055, DCM, "Agatston scoring
method"). The risk category stays a private (99BMN) code, declared in the
Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import json
import subprocess

import highdicom as hd
import pydicom

from nodeharness import REPO_ROOT, node_binary, run_tool

CONFIG = REPO_ROOT / "config" / "node.yaml"
SCORE = ("450360000", "SCT", "Coronary artery calcium score")
AGATSTON = ("112055", "DCM", "Agatston scoring method")
METHOD = ("370129005", "SCT", "Measurement Method")


def _code(c) -> tuple[str, str, str]:
    return (c.value, c.scheme_designator, c.meaning)


def test_cac_sr_uses_standard_score_and_method_codes(tmp_path):
    ph = tmp_path / "phantom"
    r = run_tool([str(node_binary()), "phantom", "--task", "cac", "--seed", "11", "--out", str(ph), "--count", "1"])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = run_tool([str(node_binary()), "analyze", "--config", str(CONFIG), "--out", str(out), str(ph)], timeout=900)
    assert r.returncode == 0, f"analyze exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    cac = [j for j in lines if j["model"] == "cac"]
    assert len(cac) == 1, lines
    line = cac[0]
    sr_path = out / line["series_instance_uid"] / line["route"] / "sr.dcm"
    assert sr_path.is_file(), list(out.rglob("*"))

    v = subprocess.run(["/usr/bin/dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
    errors = [l for l in (v.stdout + v.stderr).splitlines() if "Error" in l]
    assert not errors, "\n".join(errors)

    sr = hd.sr.srread(sr_path)
    # With a SEG, the score's group is TID 1411 (it references the segment);
    # the per-lesion groups stay TID 1501.
    groups = list(sr.content.get_image_measurement_groups()) + list(
        sr.content.get_volumetric_roi_measurement_groups())
    main = [g for g in groups if not g.tracking_identifier.startswith("Lesion")]
    assert len(main) == 1, [g.tracking_identifier for g in groups]
    scores = [m for m in main[0].get_measurements() if _code(m.name) == SCORE]
    assert len(scores) == 1, [_code(m.name) for m in main[0].get_measurements()]
    assert abs(scores[0].value - line["value"]) < 1e-6 * max(1.0, abs(line["value"])), (scores[0].value, line)
    assert scores[0].unit.value == "{Agatston}"
    assert scores[0].method is not None and _code(scores[0].method) == AGATSTON, scores[0].method
    print(f"highdicom: {scores[0].name.meaning} = {scores[0].value} {scores[0].unit.value}, "
          f"method {scores[0].method.meaning}; {len(groups) - 1} lesion group(s)")
    # Each lesion group's Agatston contribution names the same concept and method.
    for g in groups:
        if g in main:
            continue
        contrib = [m for m in g.get_measurements() if _code(m.name) == SCORE]
        assert len(contrib) == 1 and _code(contrib[0].method) == AGATSTON, g.tracking_identifier

    ds = pydicom.dcmread(sr_path)
    text = str(ds)
    assert "CAC-AGATSTON" not in text
    for value, scheme, meaning in (SCORE, AGATSTON, METHOD):
        assert value in text and meaning in text, f"{value} {scheme} {meaning} missing"
    # Private codes only for the risk category, and the scheme is declared.
    private = [c for c in ds.iterall() if c.keyword == "CodingSchemeDesignator" and c.value == "99BMN"]
    if line.get("risk_category"):
        schemes = [i.CodingSchemeDesignator for i in ds.get("CodingSchemeIdentificationSequence", [])]
        assert "99BMN" in schemes, schemes
        evals = [e for e in main[0].get_qualitative_evaluations()]
        assert [e.value.scheme_designator for e in evals] == ["99BMN"], evals
        assert [e.name.value for e in evals] == ["CAC-RISK"], evals
    else:
        assert not private
