"""SIGHUP really changes the routes in force (README, docs/ROUTING.md), and a
bad config on SIGHUP leaves the old routes working.

test_cli.py only checks that SIGHUP does not kill the node; this test
checks what the reload does to the next series: before it, a series that
the route does not match makes no job; after the config file is changed
and SIGHUP sent, a new series of the same kind makes a job whose SR reaches
Orthanc; after a broken config and another SIGHUP, the reload is refused and
the next series still gets its job and SR.
"""

from __future__ import annotations

import json
import signal
import time

from e2e import clone, jobs_of, orthanc_sr_uids, report_sops
from nodeharness import assert_serving, free_port, storescu
from test_results_orthanc import (FAST_OUTBOX, nodes, node_overrides, orthancs, pma_phantom,  # noqa: F401
                                  wait_for)

DESCRIPTION = "HUP RELOAD PROBE"


def _route(regex: str) -> dict:
    return {"name": "probe", "model": "pma", "send_to": ["pacs"], "slices": {"mode": "single"},
            "match": {"keyword": "SeriesDescription", "regex": regex}}


def _hup_and_wait(node, marker: str, before: int) -> None:
    """SIGHUP, then wait until the log shows one more `marker` line than `before`."""
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: node.log_text().count(marker) > before, 15, f"'{marker}' logged after SIGHUP",
             diag=lambda: node.log_tail(20))


def _send(node, phantom, out) -> str:
    ds = clone(phantom / "CT0001.dcm", out, SeriesDescription=DESCRIPTION)
    r = storescu(node, [out])
    assert r.returncode == 0, r.stdout + r.stderr
    return ds.SeriesInstanceUID


def _routed(node, series: str, timeout: float = 30) -> dict:
    """The series' index entry once routing has dealt with it."""
    e = node.wait_series(series, lambda e: e["state"] not in ("receiving", "complete"), timeout=timeout)
    assert e is not None and e["state"] not in ("receiving", "complete"), f"not routed: {e}\n{node.log_tail(20)}"
    return e


def _job_and_sr(node, o, series: str) -> str:
    jobs = wait_for(lambda: (lambda js: js if js and all(j["state"] == "done" for j in js) else None)(
        jobs_of(node, series)), 60, f"a done job for {series}", diag=lambda: node.log_tail(30))
    assert [j["route"] for j in jobs] == ["probe"], jobs
    sr = report_sops(jobs[0])[0]
    wait_for(lambda: sr in orthanc_sr_uids(o), 60, f"SR {sr} in Orthanc",
             diag=lambda: f"{node.log_tail(20)}\n{o.log_tail(10)}")
    return sr


def test_sighup_swaps_routes_and_a_bad_config_keeps_them(tmp_path, nodes, orthancs, pma_phantom):
    dicom_port = free_port()
    over = node_overrides(dicom_port, [_route("^NO SUCH DESCRIPTION$")], outbox=FAST_OUTBOX)
    o = orthancs(dicom_port=dicom_port).start()
    node = nodes(over)

    # 1. No route matches: the series is routed to nothing.
    a = _send(node, pma_phantom, tmp_path / "a" / "ct.dcm")
    assert _routed(node, a)["state"] == "no_route"
    time.sleep(1.0)  # a job, had one been made, would be listed by now
    assert jobs_of(node, a) == []

    # 2. The file now matches the series; SIGHUP swaps the table in.
    ok_before = node.log_text().count("config reloaded")
    node.config["routes"] = [_route(f"^{DESCRIPTION}$")]
    node.write_config()
    _hup_and_wait(node, "config reloaded", ok_before)
    b = _send(node, pma_phantom, tmp_path / "b" / "ct.dcm")
    assert _routed(node, b)["state"] in ("routed", "analyzed"), node.series_by_uid()[b]
    sr_b = _job_and_sr(node, o, b)

    # 3. A broken file (unknown model) on SIGHUP is refused; the routes stay.
    refused_before = node.log_text().count("config reload refused")
    good = node.config_path.read_text()
    broken = json.loads(good)
    broken["routes"] = [dict(_route("^NOTHING$"), model="no-such-model")]
    node.config_path.write_text(json.dumps(broken, indent=2))
    _hup_and_wait(node, "config reload refused", refused_before)
    assert_serving(node)
    c = _send(node, pma_phantom, tmp_path / "c" / "ct.dcm")
    sr_c = _job_and_sr(node, o, c)
    assert sr_c != sr_b
    assert sorted(orthanc_sr_uids(o)) == sorted([sr_b, sr_c]), "one SR per matched series, none for the first"
    # The first series was not routed again by the reloads.
    assert jobs_of(node, a) == []
