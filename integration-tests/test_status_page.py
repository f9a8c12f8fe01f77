"""The status page in a real browser: Debian's headless Chromium driven by
chromedriver (selenium). It must show the node's live state, a result with
its overlay thumbnail, a dead letter whose Retry button delivers it, and a
route tester that explains its verdicts, all behind the bearer token.

BIOMARKER_SCREENSHOT=path keeps the final screenshot (docs/status-page.png
was made that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nodeharness import REPO_ROOT, free_port, storescu
from test_results_orthanc import (FAST_OUTBOX, node_overrides, nodes, orthancs, pma_phantom,  # noqa: F401
                                  routes_named, wait_for)

TOKEN = "page-test-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


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

    b.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "status-page.png"
    b.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("BIOMARKER_SCREENSHOT"):
        shutil.copy(shot, os.environ["BIOMARKER_SCREENSHOT"])
