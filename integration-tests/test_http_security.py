"""The admin API against forged requests: a web page the administrator
happens to open must not be able to reload the config, re-run jobs, retry
or dismiss deliveries or upload files to the route tester (CSRF), nor read
the API by re-pointing its own host name at 127.0.0.1 (DNS rebinding). And
every answer carries the browser headers that keep the status page from
being framed, sniffed or made to run injected script.

The forged requests carry exactly the headers a browser adds to a
cross-origin request (`Origin`, `Sec-Fetch-Site`); test_status_page.py sends
them from a real Chromium.
"""

from __future__ import annotations

import json
import re

import pytest

from nodeharness import REPO_ROOT, free_port, storescu
from test_http import TOKEN, metric
from test_results_orthanc import FAST_OUTBOX, node_overrides, nodes, pma_phantom, routes_named, wait_for  # noqa: F401

# What a browser sends from a page that is not the node's own.
FORGERIES = {
    "other site": {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    "other site, Origin only": {"Origin": "http://evil.example"},
    "other site, Sec-Fetch-Site only": {"Sec-Fetch-Site": "cross-site"},
    # another web app on this machine: same site, other origin
    "other port": {"Origin": "http://127.0.0.1:{other}", "Sec-Fetch-Site": "same-site"},
    "same-site, own Origin": {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-site"},
    "other scheme": {"Origin": "https://127.0.0.1:{port}"},
    "sandboxed frame or file:": {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
}


def forged(kind: str, node) -> dict:
    return {k: v.format(port=node.http_port, other=node.http_port + 1) for k, v in FORGERIES[kind].items()}


def own(node) -> dict:
    """What Chromium sends from the node's own page."""
    return {"Origin": f"http://127.0.0.1:{node.http_port}", "Sec-Fetch-Site": "same-origin"}


def post_json(node, path: str, headers: dict, body: bytes | None = None):
    status, _, data = node.http(path, "POST", body, headers=headers)
    assert status == 200, (path, status, data[:300])
    return json.loads(data)


def no_cors_headers(headers: dict) -> None:
    cors = [k for k in headers if k.lower().startswith("access-control-")]
    assert not cors, f"CORS headers would let other origins in: {cors}"


def assert_security_headers(headers: dict, what: str) -> None:
    h = {k.lower(): v for k, v in headers.items()}
    csp = h.get("content-security-policy")
    assert csp, f"{what}: no Content-Security-Policy"
    directives = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}
    assert directives["default-src"] == ["'self'"], csp
    assert directives["frame-ancestors"] == ["'none'"], csp
    assert directives.get("script-src", ["'self'"]) == ["'self'"], csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp and "*" not in csp, csp
    assert h.get("x-content-type-options") == "nosniff", what
    assert h.get("referrer-policy") == "no-referrer", what
    assert h.get("x-frame-options") == "DENY", what
    no_cors_headers(headers)


@pytest.fixture
def busy_node(nodes, pma_phantom):
    """A node without a token that has a finished job and dead letters: one
    single PMA slice, results for a PACS that is not there."""
    dead = dict(FAST_OUTBOX, max_attempts=1, connect_timeout_s=1.0)
    node = nodes(node_overrides(free_port(), routes_named("pma-single-slice"), outbox=dead))
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: (lambda it: it and all(i["state"] == "dead" for i in it))(node.http_json("/api/outbox")),
             30, "dead letters", diag=lambda: node.log_tail(30))
    [job] = node.http_json("/api/jobs")
    assert job["state"] == "done" and job["attempts"] == 1, job
    return node


def snapshot(node) -> dict:
    """What the state-changing endpoints would change."""
    text = node.http("/metrics")[2].decode()
    return {
        "reloads": [metric(text, "biomarker_node_config_reloads_total", outcome=o) for o in ("ok", "refused")],
        "jobs": [(j["id"], j["state"], j["attempts"]) for j in node.http_json("/api/jobs")],
        "outbox": [(i["id"], i["state"], i["attempts"]) for i in node.http_json("/api/outbox")],
        "tmp": sorted(p.name for p in (node.data_dir / "tmp").glob("*")),
    }


def test_cross_origin_posts_are_refused_and_change_nothing(busy_node, pma_phantom):
    node = busy_node
    job = node.http_json("/api/jobs")[0]["id"]
    item = node.http_json("/api/outbox")[0]["id"]
    dicom = (pma_phantom / "CT0001.dcm").read_bytes()
    endpoints = [
        ("/api/config/reload", None),
        (f"/api/jobs/{job}/retry", None),
        (f"/api/outbox/{item}/retry", None),
        (f"/api/outbox/{item}/dismiss", None),
        ("/api/routes/test", dicom),  # writes a temporary file: state-changing enough
    ]
    before = snapshot(node)
    refused = 0
    for kind in FORGERIES:
        for path, body in endpoints:
            status, headers, data = node.http(path, "POST", body, headers=forged(kind, node))
            assert status == 403, (kind, path, status, data[:300])
            assert "cross-origin request refused" in json.loads(data)["error"], (kind, path, data)
            no_cors_headers(headers)
            refused += 1
    # PUT/DELETE/PATCH are checked like POST, even where no route takes them
    for method in ("PUT", "DELETE", "PATCH"):
        assert node.http("/api/config/reload", method, headers=forged("other site", node))[0] == 403, method
    assert snapshot(node) == before, "a refused request changed something"
    log = node.log_path.read_text()
    assert log.count("HTTP request refused") >= refused
    assert "config reloaded" not in log and "re-run requested" not in log and "outbox operation" not in log

    # a CORS preflight gets no CORS answer, so a browser will not send the real request
    status, headers, _ = node.http("/api/config/reload", "OPTIONS", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert status >= 400, status
    no_cors_headers(headers)

    # the node's own page may do all of it ...
    assert post_json(node, "/api/config/reload", own(node)) == {"reloaded": True, "routes": 1}
    assert post_json(node, "/api/routes/test", own(node), dicom)["routes"][0]["matched"] is True
    assert post_json(node, f"/api/outbox/{item}/dismiss", own(node))["state"] == "dismissed"
    assert post_json(node, f"/api/jobs/{job}/retry", own(node)) == {"id": job, "state": "pending"}
    # ... and so may a browser that sends only one of the two headers, and a
    # typed-in or bookmarked request (Sec-Fetch-Site: none)
    for h in ({"Origin": f"http://127.0.0.1:{node.http_port}"}, {"Sec-Fetch-Site": "same-origin"},
              {"Sec-Fetch-Site": "none"}, {"Origin": f"http://localhost:{node.http_port}",
                                          "Host": f"localhost:{node.http_port}"}):
        assert node.http("/api/config/reload", "POST", headers=h)[0] == 200, h
    # curl and scripts send neither header: no browser, so no forgery
    assert node.http("/api/config/reload", "POST")[0] == 200
    text = node.http("/metrics")[2].decode()
    assert metric(text, "biomarker_node_config_reloads_total", outcome="ok") == 6


def test_dns_rebinding_is_refused_without_a_token(tmp_path, nodes):
    """A page on evil.example whose name now resolves to 127.0.0.1 is
    same-origin with itself: only the Host header shows the name it used."""
    node = nodes({})
    port = node.http_port
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
               "Sec-Fetch-Site": "same-origin"}
    status, headers, body = node.http("/api/config/reload", "POST", headers=rebound)
    assert status == 403 and "not a loopback name" in json.loads(body)["error"], body
    for path in ("/api/status", "/api/series", "/metrics", "/"):
        status, headers, body = node.http(path, headers={"Host": f"evil.example:{port}"})
        assert status == 403, (path, status)
        assert_security_headers(headers, f"403 {path}")
    assert node.http("/api/status", headers={"Host": f"10.1.2.3:{port}"})[0] == 403
    # probes carry no data and may use any name
    assert node.http("/healthz", headers={"Host": f"node.example:{port}"})[0] == 200
    # loopback names are fine
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1"):
        assert node.http("/api/status", headers={"Host": host})[0] == 200, host
    assert metric(node.http("/metrics")[2].decode(), "biomarker_node_config_reloads_total", outcome="ok") is None


def test_the_token_is_proof_enough_from_anywhere(tmp_path, nodes):
    node = nodes({"http": {"token": TOKEN}})
    evil = forged("other site", node)
    # the token cannot come from a forged request: a browser attaches it
    # cross-origin only after a CORS preflight that this node never answers
    assert node.http("/api/config/reload", "POST", token=TOKEN, headers=evil)[0] == 200
    # a token node answers to any name (it may sit behind a proxy)
    assert node.http("/api/status", token=TOKEN, headers={"Host": "node.example"})[0] == 200
    # without it: cross-origin is refused before the token is even asked for
    assert node.http("/api/config/reload", "POST", headers=evil)[0] == 403
    assert node.http("/api/config/reload", "POST", token="wrong", headers=evil)[0] == 403
    assert node.http("/api/config/reload", "POST", token="wrong")[0] == 401
    assert node.http("/api/config/reload", "POST", headers=own(node))[0] == 401
    text = node.http("/metrics", token=TOKEN)[2].decode()
    assert metric(text, "biomarker_node_config_reloads_total", outcome="ok") == 1


def test_security_headers_on_every_response(tmp_path, nodes):
    node = nodes({"http": {"token": TOKEN}})
    for path, token, expect in [("/", None, 200), ("/assets/app.js", None, 200), ("/assets/style.css", None, 200),
                                ("/api/status", TOKEN, 200), ("/healthz", None, 200), ("/metrics", TOKEN, 200),
                                ("/api/status", None, 401), ("/api/nope", TOKEN, 404), ("/assets/nope", None, 404)]:
        status, headers, _ = node.http(path, token=token, headers={"Origin": "http://evil.example"})
        assert status == expect, (path, status)
        assert_security_headers(headers, f"{status} {path}")
    status, headers, _ = node.http("/api/config/reload", "POST", headers=forged("other site", node))
    assert status == 403
    assert_security_headers(headers, "403 forged POST")


def test_page_has_no_inline_script_and_no_html_from_data(tmp_path, nodes):
    """The CSP forbids inline script and handlers; the page must not need
    them, and must never parse data as HTML (test_status_page.py shows it
    in Chromium)."""
    node = nodes({})
    html = node.http("/")[2].decode()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S | re.I)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts), scripts
    assert not re.search(r"\son[a-z]+\s*=", html, re.I), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html, re.I), "inline style"
    assert "javascript:" not in html.lower()
    js = node.http("/assets/app.js")[2].decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage.setItem"):
        assert sink not in js, sink
    assert (REPO_ROOT / "src" / "http" / "assets" / "app.js").read_text() == js
