"""The default `liver-abdomen` route by anatomy from HU (`covers: liver`, docs/ROUTING.md), through
`biomarker-node route` as an admin runs it, on real scans read in place from ../shared:

- realct-labelled/liver-ircad07 (abdominal CT, no Series/Study description, no body part): routed to the liver model
  by anatomy alone, and `route` says why (lung bases, how much of the extent lies below them);
- realct-labelled/chest-lidc0001 (chest CT from the shoulders to the kidneys, most of the liver in it): not routed,
  "a chest scan";
- realct/head-philips/S2010 (head): not routed, no lung bases; realct/head-ge-tilted: not axial, never decoded.
"""

from __future__ import annotations

import json
import subprocess

from ci_no_skip import require_dir
from nodeharness import REALCT, REPO_ROOT

CONFIG = REPO_ROOT / "config" / "node.yaml"
LABELLED = REALCT.parent / "realct-labelled"


def _route(binary, path, json_mode=False):
    args = [str(binary), "route", "--config", str(CONFIG), *(["--json"] if json_mode else []), str(path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"route exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _liver_line(binary, path) -> dict:
    lines = [json.loads(l) for l in _route(binary, path, True).splitlines() if l.startswith("{")]
    (line,) = [l for l in lines if l["route"] == "liver-abdomen"]
    return line


def test_abdomen_without_descriptions_is_routed_to_liver_by_anatomy(binary):
    ct = require_dir(LABELLED / "liver-ircad07" / "ct", "liver-ircad07")
    line = _liver_line(binary, ct)
    assert line["matched"] is True, line
    assert line["job"]["model"] == "liver" and line["job"]["slices"] == "all"
    assert line["liver_coverage"].startswith("liver covered:"), line
    text = _route(binary, ct)
    print(text)
    assert "anatomy (HU): liver covered:" in text and "lung bases at z" in text
    assert "MATCH    liver-abdomen" in text


def test_chest_reaching_the_kidneys_is_not_routed_to_liver(binary):
    ct = require_dir(LABELLED / "chest-lidc0001" / "ct", "chest-lidc0001")
    line = _liver_line(binary, ct)
    print(line)
    assert line["matched"] is False
    assert line["failed_at"] == "match.all[1].any"
    assert "liver not covered" in line["reason"] and "a chest scan" in line["reason"], line["reason"]
    assert "liver not covered" in line["liver_coverage"]
    # the chest routes still take it
    text = _route(binary, ct)
    assert "MATCH    pma-single-slice" in text and "no match liver-abdomen" in text


def test_head_ct_is_not_routed_to_liver(binary):
    head = require_dir(REALCT / "head-philips" / "S2010", "head-philips S2010")
    line = _liver_line(binary, head)
    print(line)
    assert line["matched"] is False and "no lung bases" in line["reason"], line
    tilted = require_dir(REALCT / "head-ge-tilted", "head-ge-tilted")
    line = _liver_line(binary, tilted)
    assert line["matched"] is False and line["failed_at"].startswith("match.all[0]"), line
    assert "liver_coverage" not in line, "a series that fails the header tests is never decoded"
