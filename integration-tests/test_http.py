"""The administrator's HTTP interface against a real node, Orthanc and
DCMTK: health and readiness, the bearer token, Prometheus metrics, the JSON
API (series, jobs with their timeline, outbox retry/dismiss, routes, models,
route tester, reload) and the overlay thumbnails.

The models are the fixture card (map = sigmoid(input)) except where a test
says otherwise: these tests check the interface, not the models.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from nodeharness import REALCT, Node, node_binary, run_tool, storescu
from test_results_orthanc import (FAST_OUTBOX, expected_outputs, analyze, node_overrides, nodes,  # noqa: F401
                                  orthancs, pma_phantom, routes_named, wait_for)

TOKEN = "s3cret-token-for-tests"


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample of the OpenMetrics text, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_health_ready_and_token(tmp_path, nodes):
    node = nodes({"http": {"token": TOKEN}})
    # health and readiness need no token: load balancers and systemd probe them
    assert node.http_json("/healthz") == {"status": "ok"}
    ready = node.http_json("/readyz")
    assert ready["ready"] is True and set(ready["checks"].values()) == {"ok"}, ready
    # which provider each model really runs on (cpu after a CUDA fallback)
    for name, m in ready["models"].items():
        assert m["execution_provider"] in ("cpu", "cuda"), (name, m)
    for path in ("/api/status", "/api/series", "/api/jobs", "/api/outbox", "/metrics"):
        status, headers, _ = node.http(path)
        assert status == 401, path
        assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
        assert node.http(path, token="wrong")[0] == 401
        assert node.http(path, token=TOKEN)[0] == 200, path
    assert node.http("/api/config/reload", "POST")[0] == 401
    # the page itself is static and carries no data; its API calls need the token
    status, _, body = node.http("/")
    assert status == 200 and b"/assets/app.js" in body
    assert node.http("/assets/app.js")[0] == 200
    assert node.http("/api/nope", token=TOKEN)[0] == 404
    # an embedded node has no cluster view: the page's Cluster card stays hidden
    assert node.http("/api/cluster")[0] == 401
    assert node.http("/api/cluster", token=TOKEN)[0] == 404
    assert node.http("/assets/cluster.js")[0] == 200
    assert TOKEN not in node.log_path.read_text()  # the secret never reaches the log


def test_exposed_listener_needs_a_token(tmp_path):
    n = Node(tmp_path / "n", {"http": {"listen": "0.0.0.0:0"}})
    r = run_tool([str(node_binary()), "check-config", "--config", str(n.config_path)])
    assert r.returncode != 0
    assert "http.token" in r.stderr and "loopback" in r.stderr, r.stderr
    # and `serve` refuses to start on it
    r = run_tool([str(node_binary()), "serve", "--config", str(n.config_path)], timeout=20)
    assert r.returncode != 0 and "http.token" in r.stderr, r.stderr
    # with a token in the environment (kept out of the file) it passes
    env_ok = subprocess.run([str(node_binary()), "check-config", "--config", str(n.config_path)],
                            capture_output=True, text=True, timeout=30,
                            env={"BIOMARKER_HTTP_TOKEN": "x" * 20, "PATH": "/usr/bin:/bin"})
    assert env_ok.returncode == 0, env_ok.stderr


def test_metrics_are_prometheus_text(tmp_path, nodes):
    node = nodes({})
    status, headers, body = node.http("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.rstrip().endswith("# EOF")
    for family in ("biomarker_node_associations", "biomarker_node_instances", "biomarker_node_series",
                   "biomarker_node_jobs", "biomarker_node_inference_seconds", "biomarker_node_outbox_items",
                   "biomarker_node_outbox_attempts", "biomarker_node_data_dir_free_bytes"):
        assert f"# TYPE {family} " in text, family
    assert metric(text, "biomarker_node_data_dir_free_bytes") > 0
    # an echo is an accepted association, and the counter says so
    r = run_tool(["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", node.ae_title, "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr
    text = node.http("/metrics")[2].decode()
    assert metric(text, "biomarker_node_associations_total", outcome="accepted") == 1
    r = run_tool(["/usr/bin/echoscu", "-aet", "NOBODY", "-aec", node.ae_title, "127.0.0.1", str(node.port)])
    assert r.returncode != 0
    text = node.http("/metrics")[2].decode()
    assert metric(text, "biomarker_node_associations_total", outcome="rejected") == 1
    # an association holds a slot until it goes away; a bare connection that
    # has not associated holds none (issue 12: silent peers cannot starve slots)
    assert metric(text, "biomarker_node_association_limit") == 16
    assert metric(text, "biomarker_node_connections_open") == 0
    import socket

    import rawdul as ul
    with socket.create_connection(("127.0.0.1", node.port)):
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            a.associate()
            assert metric(node.http("/metrics")[2].decode(), "biomarker_node_connections_open") == 1
            a.release()
    wait_for(lambda: metric(node.http("/metrics")[2].decode(), "biomarker_node_connections_open") == 0,
             15, "the slot freed after the peer left")


def test_result_timeline_dead_letter_retry_and_overlay(tmp_path, nodes, orthancs, pma_phantom):
    """One slice through the whole node: the job's timeline fills in step by
    step, a refused delivery shows as a dead letter, and an administrator's
    retry over the API delivers it once the PACS accepts us."""
    from orthanc import Orthanc  # noqa: F401  (the fixture makes them)

    dicom_port = __import__("nodeharness").free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    refusing = orthancs(dicom_port=dicom_port, modalities={}, always_allow_store=False).start()
    node = nodes(over)
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr

    dead = wait_for(lambda: (lambda it: it if len(it) == n_items and all(i["state"] == "dead" for i in it) else None)(
        node.http_json("/api/outbox")), 30, "dead letters in /api/outbox", diag=lambda: node.log_tail(30))
    jobs = node.http_json("/api/jobs")
    assert len(jobs) == 1
    job = jobs[0]
    assert job["state"] == "done" and job["route"] == "pma-single-slice" and job["model"] == "pma"
    t = job["timeline"]
    for k in ("first_received_at", "last_received_at", "completed_at", "queued_at", "inference_started_at",
              "inference_finished_at", "reported_at"):
        assert t[k], (k, t)
    order = [t[k] for k in ("last_received_at", "completed_at", "queued_at", "inference_started_at",
                            "inference_finished_at", "reported_at")]
    assert order == sorted(order), t  # RFC 3339 UTC with the same format sorts by time
    assert t["delivery"] == "dead" and t["delivered_at"] is None and t["time_to_result_s"] is None
    assert job["overlay"] == f"/api/jobs/{job['id']}/overlay.png"

    status, headers, png = node.http(job["overlay"])
    assert status == 200 and headers["content-type"] == "image/png"
    w, h = png_size(png)
    assert max(w, h) == 256 and min(w, h) > 0

    series = node.http_json("/api/series")
    assert [s["state"] for s in series] == ["analyzed"]
    assert series[0]["series_instance_uid"] == job["series_instance_uid"]

    # dismiss/retry only apply to dead letters; unknown ids are 404
    assert node.http("/api/outbox/999999/retry", "POST")[0] == 404
    refusing.kill()
    accepting = orthancs(dicom_port=dicom_port).start()
    for item in dead:
        after = node.http_json(f"/api/outbox/{item['id']}/retry", "POST")
        assert after["state"] in ("pending", "sending", "delivered"), after
    delivered = wait_for(lambda: (lambda it: it if all(i["state"] == "delivered" for i in it) else None)(
        node.http_json("/api/outbox")), 30, "delivered after retry", diag=lambda: node.log_tail(30))
    assert {i["sop_instance_uid"] for i in delivered} == {i["sop_instance_uid"] for i in dead}
    assert len(accepting.find_instances(Modality="SR")) == 1
    status, _, body = node.http(f"/api/outbox/{dead[0]['id']}/dismiss", "POST")
    assert status == 409 and b"delivered" in body

    t = node.http_json(f"/api/jobs/{job['id']}")["timeline"]
    assert t["delivery"] == "delivered" and t["delivered_at"] >= t["reported_at"]
    assert 0 < t["time_to_result_s"] < 120

    text = node.http("/metrics")[2].decode()
    assert metric(text, "biomarker_node_instances_total", status="0x0000", outcome="stored") == 1
    assert metric(text, "biomarker_node_jobs_total", route="pma-single-slice", model="pma", outcome="done") == 1
    assert metric(text, "biomarker_node_inference_seconds_count", model="pma", provider="cpu") == 1
    assert metric(text, "biomarker_node_series", state="analyzed") == 1
    assert metric(text, "biomarker_node_outbox_items", state="delivered") == n_items
    assert metric(text, "biomarker_node_outbox_attempts_total", destination="pacs", outcome="dead") == n_items
    assert metric(text, "biomarker_node_outbox_attempts_total", destination="pacs", outcome="delivered") == n_items

    # re-running a finished job over the API runs it again (same outputs)
    assert node.http_json(f"/api/jobs/{job['id']}/retry", "POST") == {"id": job["id"], "state": "pending"}
    again = wait_for(lambda: (lambda j: j if j["state"] == "done" and j["attempts"] == 2 else None)(
        node.http_json(f"/api/jobs/{job['id']}")), 30, "job re-run", diag=lambda: node.log_tail(30))
    assert again["result"]["value"] == job["result"]["value"]


def test_route_tester_models_routes_and_reload(tmp_path, nodes, pma_phantom):
    over = node_overrides(9, routes_named("pma-single-slice", "cac-non-contrast"))
    node = nodes(over)

    models = {m["name"]: m for m in node.http_json("/api/models")}
    assert set(models) == {"pma", "sfa", "liver", "cac"}
    assert models["pma"]["status"] == "loaded" and models["pma"]["execution_provider"] == "cpu"
    assert models["pma"]["execution_provider_requested"] == "cpu"

    routes = node.http_json("/api/routes")
    assert [r["name"] for r in routes] == ["pma-single-slice", "cac-non-contrast"]
    assert routes[0]["model"] == "pma" and "all" in routes[0]["match"]

    # a chest slice matches the single-slice PMA route, not the CAC route
    res = node.http_json("/api/routes/test", "POST", (pma_phantom / "CT0001.dcm").read_bytes())
    by = {r["route"]: r for r in res["routes"]}
    assert by["pma-single-slice"]["matched"] is True and by["pma-single-slice"]["model"] == "pma"
    assert by["cac-non-contrast"]["matched"] is False and by["cac-non-contrast"]["reason"]
    assert res["derived"]["modality"] == "CT"
    # a localizer matches nothing, and the reason names the failed condition
    localizers = sorted(p for p in REALCT.rglob("*") if p.is_file() and "locali" in str(p).lower())
    if localizers:
        res = node.http_json("/api/routes/test", "POST", localizers[0].read_bytes())
        assert not any(r["matched"] for r in res["routes"]), res
        assert all(r["failed_at"].startswith("match") for r in res["routes"]), res
    # not DICOM, or nothing at all: a clear 4xx, and nothing left behind
    status, _, body = node.http("/api/routes/test", "POST", b"this is not DICOM" * 10)
    assert status == 422 and b"error" in body
    assert node.http("/api/routes/test", "POST", b"")[0] == 400
    assert list((node.data_dir / "tmp").glob("route-test-*")) == []
    assert node.http_json("/api/series") == []  # the tester stores nothing

    # reload: a broken config is refused and the old routes stay
    good = json.loads(node.config_path.read_text())
    bad = json.loads(json.dumps(good))
    bad["routes"][0]["model"] = "no-such-model"
    node.config_path.write_text(json.dumps(bad))
    status, _, body = node.http("/api/config/reload", "POST")
    assert status == 422, body
    problems = json.loads(body)["problems"]
    assert any("no-such-model" in p for p in problems), problems
    assert len(node.http_json("/api/routes")) == 2
    # a good one with one route less takes effect without a restart
    good["routes"] = good["routes"][:1]
    node.config_path.write_text(json.dumps(good))
    assert node.http_json("/api/config/reload", "POST") == {"reloaded": True, "routes": 1}
    assert [r["name"] for r in node.http_json("/api/routes")] == ["pma-single-slice"]
    text = node.http("/metrics")[2].decode()
    assert metric(text, "biomarker_node_config_reloads_total", outcome="refused") == 1
    assert metric(text, "biomarker_node_config_reloads_total", outcome="ok") == 1


def test_http_can_be_turned_off(tmp_path, nodes):
    node = nodes({"http": {"enabled": False}})
    status = None
    try:
        status = node.http("/healthz")[0]
    except OSError:
        pass
    assert status is None, "nothing should listen on the HTTP port"


def test_send_now_skips_the_backoff(tmp_path, nodes, orthancs, pma_phantom):
    """The PACS was down and the items wait out a long backoff; once it is
    back, the administrator's retry sends them at once instead."""
    dicom_port = __import__("nodeharness").free_port()
    slow = dict(FAST_OUTBOX, retry_base_s=600.0, retry_cap_s=600.0)
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=slow)
    node = nodes(over)
    assert storescu(node, [pma_phantom / "CT0001.dcm"]).returncode == 0
    waiting = wait_for(lambda: (lambda it: it if it and all(i["state"] == "pending" and i["attempts"] >= 1
                                                           for i in it) else None)(node.http_json("/api/outbox")),
                       30, "items pending after a failed attempt", diag=lambda: node.log_tail(30))
    o = orthancs(dicom_port=dicom_port).start()
    time.sleep(1.0)
    assert all(i["state"] == "pending" for i in node.http_json("/api/outbox")), "the backoff is 600 s"
    for i in waiting:
        after = node.http_json(f"/api/outbox/{i['id']}/retry", "POST")
        assert after["attempts"] >= 1, after  # attempts kept: the dead-letter limit still counts them
    wait_for(lambda: all(i["state"] == "delivered" for i in node.http_json("/api/outbox")), 20,
             "delivered right after the retry", diag=lambda: node.log_tail(30))
    assert len(o.find_instances(Modality="SR")) == 1
    status, _, body = node.http(f"/api/outbox/{waiting[0]['id']}/retry", "POST")
    assert status == 409 and b"delivered" in body

