"""The status page in a real browser: Debian's headless Chromium driven by
chromedriver (selenium). It must show the node's live state, a result with
its overlay thumbnail, a dead letter whose Retry button delivers it, and a
route tester that explains its verdicts, all behind the bearer token. It
must work under its own Content-Security-Policy, show hostile strings from
the images as text, keep the token out of localStorage, and its node must
refuse the requests another page in the same browser forges.

BIOMARKER_SCREENSHOT=path keeps the final screenshot (docs/status-page.png
was made that way).
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from nodeharness import REPO_ROOT, free_port, storescu
from test_http import metric
from test_results_orthanc import (FAST_OUTBOX, node_overrides, nodes, orthancs, pma_phantom,  # noqa: F401
                                  routes_named, wait_for)

TOKEN = "page-test-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN_KEY = "biomarker-node-token"
XSS = "<img src=x onerror=alert(1)>"

# Runs in every page before its own scripts: records dialogs (instead of
# opening them) and Content-Security-Policy violations, for the asserts.
WATCH = """
window.__dialogs = [];
for (const f of ["alert", "confirm", "prompt"]) window[f] = (m) => { window.__dialogs.push(f + ": " + m); };
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        msg = f"browser test needs {missing} (scripts/install-deps.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # This machine has no network: without the background-networking flags
    # Chromium keeps trying (and failing) to reach Google's services.
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    yield driver
    driver.quit()


def test_status_page_shows_results_retries_dead_letters_and_tests_routes(tmp_path, nodes, orthancs, pma_phantom,
                                                                          browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice", "cac-non-contrast"), outbox=FAST_OUTBOX,
                          cards={"pma": REPO_ROOT / "models" / "pma.yaml"})
    over["http"] = {"token": TOKEN}
    refusing = orthancs(dicom_port=dicom_port, modalities={}, always_allow_store=False).start()
    node = nodes(over)
    assert storescu(node, [pma_phantom / "CT0001.dcm"]).returncode == 0
    wait_for(lambda: any(i["state"] == "dead" for i in node.http_json("/api/outbox", token=TOKEN)), 30,
             "a dead letter", diag=lambda: node.log_tail(30))

    b = browser
    wait = WebDriverWait(b, 20, poll_frequency=0.2)
    b.get(f"http://127.0.0.1:{node.http_port}/")
    # without a token the page asks for one instead of showing data
    wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
    b.find_element(By.ID, "token").send_keys(TOKEN)
    b.find_element(By.ID, "token-btn").click()
    wait.until(lambda d: not d.find_element(By.ID, "auth").is_displayed())
    wait.until(lambda d: d.find_element(By.ID, "ready").text == "ready")
    assert "BIOMARKER" in b.find_element(By.ID, "node-id").text

    # the result card: value, model, and an overlay image that really decoded
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result-card"))[0]
    job = node.http_json("/api/jobs", token=TOKEN)[0]
    assert f"{job['result']['value']:.2f}" in card.text and "cm2" in card.text, card.text
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('#results .result-card img');"
        "return i && i.complete && i.naturalWidth === 256 && i.naturalHeight > 0;"))

    # series and jobs tables are live
    series_rows = b.find_elements(By.CSS_SELECTOR, "#series-table tbody tr")
    assert len(series_rows) == 1 and job["series_instance_uid"] in series_rows[0].text
    assert "pma-single-slice" in b.find_element(By.CSS_SELECTOR, "#jobs-table tbody").text

    # dead letters: retry from the page once the PACS accepts us
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#dead-table tbody tr"))
    n_dead = len(rows)
    assert n_dead >= 1
    refusing.kill()
    accepting = orthancs(dicom_port=dicom_port).start()
    for _ in range(n_dead):
        btn = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#dead-table button.retry"))[0]
        item = btn.find_element(By.XPATH, "./ancestor::tr").get_attribute("data-item")
        btn.click()
        wait.until(lambda d: f"Outbox item {item}: retry requested" in d.find_element(By.ID, "message").text)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f"#dead-table tr[data-item='{item}']"))
    wait_for(lambda: all(i["state"] == "delivered" for i in node.http_json("/api/outbox", token=TOKEN)), 30,
             "delivered after the page's retries", diag=lambda: node.log_tail(30))
    assert len(accepting.find_instances(Modality="SR")) == 1
    wait.until(lambda d: "delivered" in d.find_element(By.CSS_SELECTOR, "#jobs-table tbody").text)

    # route tester: upload the slice, see which routes match and why not
    b.find_element(By.ID, "route-file").send_keys(str(pma_phantom / "CT0001.dcm"))
    b.find_element(By.ID, "route-test-btn").click()
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#route-result-table tbody tr"))
    verdicts = {r.get_attribute("data-route"): r.text for r in rows}
    assert "MATCH" in verdicts["pma-single-slice"] and "model pma" in verdicts["pma-single-slice"]
    assert "no match" in verdicts["cac-non-contrast"] and "match." in verdicts["cac-non-contrast"]

    # models with the execution provider in use
    assert "cpu" in b.find_element(By.CSS_SELECTOR, "#models-table tbody").text

    # all of it under the Content-Security-Policy, which blocked nothing
    assert b.execute_script("return window.__csp") == []

    b.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "status-page.png"
    b.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("BIOMARKER_SCREENSHOT"):
        shutil.copy(shot, os.environ["BIOMARKER_SCREENSHOT"])


class _EvilSite:
    """Another web app on this machine (127.0.0.1, another port: same site,
    other origin) whose page forges requests to the node."""

    def __init__(self, page: str):
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_page_shows_hostile_strings_as_text_refuses_forged_requests_and_keeps_no_token(tmp_path, nodes,
                                                                                      pma_phantom, browser):
    import pydicom
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    b = browser
    wait = WebDriverWait(b, 20, poll_frequency=0.2)
    node = nodes({})  # loopback, no token: the case CSRF is about
    base = f"http://127.0.0.1:{node.http_port}"
    reloads = lambda: metric(node.http("/metrics")[2].decode(), "biomarker_node_config_reloads_total",  # noqa: E731
                             outcome="ok")

    # 1. a page on another origin forges a form POST and a no-cors fetch;
    # the browser sends both (with Origin and Sec-Fetch-Site), the node
    # refuses both
    evil = _EvilSite(f"""<!doctype html><title>evil</title><body>
<iframe name="sink"></iframe>
<form id="f" method="POST" action="{base}/api/config/reload" target="sink"><input name="x" value="1"></form>
<script>
document.getElementById("f").submit();
fetch("{base}/api/config/reload", {{method: "POST", mode: "no-cors", body: "x"}})
  .finally(() => {{ document.title = "sent"; }});
</script></body>""")
    try:
        b.get(evil.url)
        wait.until(lambda d: d.title == "sent")
        wait_for(lambda: node.log_path.read_text().count("HTTP request refused") >= 2, 20,
                 "both forged requests refused", diag=lambda: node.log_tail(20))
    finally:
        evil.close()
    log = node.log_path.read_text()
    assert "same-site" in log and "config reloaded" not in log
    assert reloads() is None

    # 2. a series whose description is markup, sent with DCMTK
    ds = pydicom.dcmread(pma_phantom / "CT0001.dcm")
    ds.SeriesDescription = XSS
    hostile = tmp_path / "hostile.dcm"
    ds.save_as(hostile)
    assert storescu(node, [hostile]).returncode == 0
    wait_for(lambda: node.http_json("/api/series"), 20, "the series indexed")

    b.get(base + "/")
    row = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#series-table tbody tr"))[0]
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert XSS in cells, cells  # shown as the text it is
    # the route tester shows what it derives from the same file, also as text
    b.find_element(By.ID, "route-file").send_keys(str(hostile))
    b.find_element(By.ID, "route-test-btn").click()
    wait.until(lambda d: "Derived:" in d.find_element(By.ID, "route-result").text)
    assert b.execute_script("return document.querySelectorAll('img').length") == 0  # no routes, no results
    assert b.execute_script("return window.__dialogs") == []
    # the page's own POSTs carry its origin and pass
    b.find_element(By.ID, "reload-btn").click()
    wait.until(lambda d: "Config reloaded" in d.find_element(By.ID, "message").text)
    assert reloads() == 1
    assert b.execute_script("return window.__csp") == []

    # 3. with a token: kept for this tab only, and one an older page left in
    # localStorage is removed rather than used
    locked = nodes({"http": {"token": TOKEN}})
    page = f"http://127.0.0.1:{locked.http_port}/"
    b.get(page)
    b.execute_script(f"localStorage.setItem('{TOKEN_KEY}', '{TOKEN}')")
    b.refresh()
    wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
    assert b.execute_script(f"return localStorage.getItem('{TOKEN_KEY}')") is None
    b.find_element(By.ID, "token").send_keys(TOKEN)
    b.find_element(By.ID, "token-btn").click()
    wait.until(lambda d: d.find_element(By.ID, "ready").text == "ready")
    assert b.execute_script("return localStorage.length") == 0
    assert b.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") == TOKEN
    assert b.find_element(By.ID, "token").get_attribute("value") == ""
    b.refresh()  # same tab: still signed in
    wait.until(lambda d: d.find_element(By.ID, "ready").text == "ready")
    assert not b.find_element(By.ID, "auth").is_displayed()
    assert b.execute_script("return window.__dialogs") == [] and b.execute_script("return window.__csp") == []
