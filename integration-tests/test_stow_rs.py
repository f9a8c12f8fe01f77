"""Results by STOW-RS (PS3.18 10.5): a `stow_rs` destination against a real
Orthanc with Debian's DICOMweb plugin (`orthanc-dicomweb`).

The node gets the PMA phantom by C-STORE from storescu and sends its SR and
SC overlays to `{url}/studies`. "Exactly once" is checked on what Orthanc
*received* (its Lua ReceivedInstanceFilter logs every incoming instance,
STOW uploads included), not only on what it kept.
"""

from __future__ import annotations

import http.server
import os
import threading
import time

import pytest
import requests

from nodeharness import free_port, storescu
from orthanc import dicomweb_plugin
from test_results_orthanc import (FAST_OUTBOX, SC_CLASS, SR_STORAGE_CLASSES, _send_and_wait_pending,  # noqa: F401
                                  all_delivered, analyze, expected_outputs, node_overrides, nodes, orthancs,
                                  outbox, pma_phantom, routes_named, wait_for)


@pytest.fixture(autouse=True)
def _need_plugin():
    if dicomweb_plugin() is None:
        msg = "Orthanc's DICOMweb plugin not installed (scripts/install-deps.sh installs orthanc-dicomweb)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def stow_overrides(stow: dict) -> dict:
    over = node_overrides(0, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    over["destinations"] = {"pacs": {"stow_rs": stow}}
    return over


def delivered(node, n: int):
    return (lambda it: it if all_delivered(it, n) else None)(outbox(node))


def assert_received_once(o, items: list[dict]) -> None:
    """Orthanc received each outbox item exactly once and stores exactly those."""
    sops = [i["sop_instance_uid"] for i in items]
    got = o.received_sops()
    dup = sorted({s for s in got if got.count(s) > 1})
    assert not dup, f"delivered more than once: {dup}\nreceived: {got}"
    assert sorted(got) == sorted(sops), f"Orthanc received {got}, outbox has {sops}"
    stored = {o.instance_tags(i)["SOPInstanceUID"] for i in o.instances()}
    assert stored == set(sops), f"Orthanc stores {stored}, outbox has {sops}"
    classes = {o.instance_tags(i)["SOPClassUID"] for i in o.instances()}
    assert classes & SR_STORAGE_CLASSES and SC_CLASS in classes, classes


def test_stow_rs_delivers_sr_and_sc_once(tmp_path, nodes, orthancs, pma_phantom):
    """Delivery with basic auth (password from a file): the SR and SC arrive
    in Orthanc by STOW-RS, exactly once."""
    o = orthancs(dicomweb=True, users={"node": "pw-from-file"}).start()
    pw = tmp_path / "stow-password"
    pw.write_text("pw-from-file\n")
    over = stow_overrides({"url": o.dicomweb_url + "/", "auth": "basic", "username": "node",
                           "password_file": str(pw)})
    n = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    node = nodes(over)
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    items = wait_for(lambda: delivered(node, n), 60, "delivered by STOW-RS",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{o.log_tail(20)}")
    assert all(i["attempts"] == 1 for i in items), items
    time.sleep(1.0)  # a late duplicate would land here
    assert_received_once(o, items)
    # The secret is in no log line.
    assert "pw-from-file" not in node.log_path.read_text(errors="replace")


def test_stow_rs_orthanc_stopped_then_restarted(tmp_path, nodes, orthancs, pma_phantom):
    """Orthanc (and its plugin) stopped while results are ready: the items
    retry; once it is back they are delivered, exactly once."""
    o = orthancs(dicomweb=True).start()
    o.stop()
    over = stow_overrides({"url": o.dicomweb_url})
    n = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    node = nodes(over)
    before = _send_and_wait_pending(node, pma_phantom, n)
    assert all("connect" in i["last_error"] for i in before), before
    o.start()
    items = wait_for(lambda: delivered(node, n), 60, "delivered after Orthanc came back",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{o.log_tail(20)}")
    assert {i["sop_instance_uid"] for i in items} == {i["sop_instance_uid"] for i in before}
    assert all(i["attempts"] >= 2 for i in items), items
    time.sleep(1.5)
    assert_received_once(o, items)


@pytest.mark.parametrize("fault", ["wrong-path-404", "bad-password-401"])
def test_stow_rs_client_error_is_dead_letter(tmp_path, nodes, orthancs, pma_phantom, fault, monkeypatch):
    """A 4xx is the request's fault: dead letter at the first attempt, with
    the HTTP status and an excerpt of the body in `outbox --json`."""
    if fault == "wrong-path-404":
        o = orthancs(dicomweb=True).start()
        stow = {"url": o.url + "/no-such-root"}
        want = "HTTP 404"
    else:
        o = orthancs(dicomweb=True, users={"node": "right"}).start()
        monkeypatch.setenv("BMN_TEST_STOW_PASSWORD", "pw-Wr0ng-7731")
        stow = {"url": o.dicomweb_url, "auth": "basic", "username": "node", "password_env": "BMN_TEST_STOW_PASSWORD"}
        want = "HTTP 401"
    over = stow_overrides(stow)
    n = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    node = nodes(over)
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    items = wait_for(lambda: (lambda it: it if len(it) == n and all(i["state"] == "dead" for i in it) else None)(
        outbox(node)), 60, "dead letters", diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    for i in items:
        assert i["attempts"] == 1, i
        assert i["last_error"].startswith(want), i
    assert o.received_sops() == [] and o.instances() == []
    assert "pw-Wr0ng-7731" not in node.log_path.read_text(errors="replace")


class Flaky503:
    """An HTTP proxy to Orthanc that answers 503 to the first `failures`
    POSTs, then forwards them."""

    def __init__(self, upstream: str, failures: int):
        self.upstream = upstream
        self.failures = failures
        self.posts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts += 1
                if outer.posts <= outer.failures:
                    msg = b"overloaded, try later"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                hdr = {k: self.headers[k] for k in ("Content-Type", "Accept") if self.headers[k]}
                r = requests.post(outer.upstream + self.path, data=body, headers=hdr, timeout=30)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_stow_rs_503_is_retried_then_delivered(tmp_path, nodes, orthancs, pma_phantom):
    """A 5xx is the server's state: the items retry with backoff (the 503
    and its body in last_error meanwhile) and are delivered once after."""
    o = orthancs(dicomweb=True).start()
    proxy = Flaky503(o.url, failures=3)
    try:
        over = stow_overrides({"url": f"http://127.0.0.1:{proxy.port}/dicom-web"})
        n = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
        node = nodes(over)
        r = storescu(node, [pma_phantom / "CT0001.dcm"])
        assert r.returncode == 0, r.stdout + r.stderr
        items = wait_for(lambda: delivered(node, n), 60, "delivered after the 503s",
                         diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
        assert sum(i["attempts"] for i in items) == n + 3, items
        log = node.log_path.read_text(errors="replace")
        assert "HTTP 503 Service Unavailable: overloaded, try later" in log
        time.sleep(1.0)
        assert_received_once(o, items)
    finally:
        proxy.close()
