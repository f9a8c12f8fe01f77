"""No patient names or IDs in the node's log (working rule: log UIDs, AE
titles and counts), at the default log level and at debug.

A study whose PatientName and PatientID are distinctive strings goes the
whole way: C-STORE from DCMTK storescu (ingest, spool, index), the route
tester over HTTP, routing, the job (model, SR and SC, which copy the
patient module), delivery to Orthanc, and the HTTP API listing it all.
Orthanc must hold the SR with those very strings (so they did go through
the node); the node's log (stdout and stderr, nodeharness writes both to
node.log) must not contain them, nor any part of them.
"""

from __future__ import annotations

import io

import pydicom
import pytest

from e2e import clone, jobs_of, orthanc_sr_uids
from nodeharness import assert_serving, free_port, storescu
from test_results_orthanc import (FAST_OUTBOX, all_delivered, nodes, node_overrides, orthancs,  # noqa: F401
                                  outbox, pma_phantom, routes_named, wait_for)

# Distinctive, and each part long enough that a hit is not chance. Kept
# ASCII so every logger writes them verbatim (no escaping can hide a leak).
FAMILY, GIVEN = "Quoxvendel", "Trabimurk"
PATIENT_NAME = f"{FAMILY}^{GIVEN}"
PATIENT_ID = "PIDZ7Q4418KX"
OTHER_ID = "OPIDW93J2"
NEEDLES = [FAMILY, GIVEN, PATIENT_ID, OTHER_ID]


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [n for n in NEEDLES if n.lower() in low]


@pytest.mark.parametrize("fmt,level", [("text", "info,ort=warn"), ("text", "debug"), ("json", "debug")],
                         ids=["default", "debug", "debug-json"])
def test_patient_identity_never_logged(tmp_path, nodes, orthancs, pma_phantom, monkeypatch, fmt, level):
    monkeypatch.delenv("RUST_LOG", raising=False)  # it would override log.level
    dicom_port = free_port()
    # A route keyed on the patient that never matches: its explanation names
    # the attribute's value, and must not reach the log either.
    by_patient = {"name": "by-patient", "model": "pma", "send_to": ["pacs"], "slices": {"mode": "single"},
                  "match": {"keyword": "PatientName", "regex": "^NOBODY$"}}
    over = node_overrides(dicom_port, routes_named("pma-single-slice") + [by_patient], outbox=FAST_OUTBOX)
    over["log"] = {"format": fmt, "level": level}
    over["http"] = {"token": "privacy-test-token"}
    o = orthancs(dicom_port=dicom_port).start()
    node = nodes(over)

    src = clone(pma_phantom / "CT0001.dcm", tmp_path / "in" / "ct.dcm", PatientName=PATIENT_NAME,
                PatientID=PATIENT_ID, OtherPatientIDs=OTHER_ID)
    # The route tester parses the file too (nothing stored).
    status, _, body = node.http("/api/routes/test", "POST", (tmp_path / "in" / "ct.dcm").read_bytes(),
                                token="privacy-test-token", headers={"Content-Type": "application/dicom"})
    assert status == 200, body[:500]
    r = storescu(node, [tmp_path / "in" / "ct.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    # One the node refuses (no SeriesInstanceUID): the refusal is logged, the patient is not.
    bad = clone(pma_phantom / "CT0001.dcm", tmp_path / "bad" / "ct.dcm", PatientName=PATIENT_NAME,
                PatientID=PATIENT_ID, SeriesInstanceUID="")
    r = storescu(node, [tmp_path / "bad" / "ct.dcm"])
    assert "Received Store Response (Success)" not in r.stderr, r.stderr
    assert bad.SOPInstanceUID not in node.spool_files()

    jobs = wait_for(lambda: (lambda js: js if js and all(j["state"] == "done" for j in js) else None)(
        jobs_of(node, src.SeriesInstanceUID)), 60, "the job done", diag=lambda: node.log_tail(40))
    assert len(jobs) == 1, jobs
    items = wait_for(lambda: (lambda it: it if it and all_delivered(it, len(it)) else None)(outbox(node)),
                     60, "results delivered to Orthanc", diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    assert len(items) >= 2, f"an SR and at least one SC: {items}"
    srs = orthanc_sr_uids(o)
    assert len(srs) == 1, srs
    sr = pydicom.dcmread(io.BytesIO(o.instance_file(o.find_instances(Modality="SR")[0]["ID"])))
    # The strings went through the node: the SR carries them.
    assert str(sr.PatientName) == PATIENT_NAME and sr.PatientID == PATIENT_ID, (sr.PatientName, sr.PatientID)
    # Every listing the operator reads over HTTP, while the log is watched.
    for path in ("/api/status", "/api/series", "/api/jobs", "/api/outbox", f"/api/jobs/{jobs[0]['id']}",
                 "/", "/metrics"):
        status, _, _ = node.http(path, token="privacy-test-token")
        assert status == 200, path
    assert_serving(node)
    node.stop()

    log = node.log_text()
    assert len(log.splitlines()) > 10, f"suspiciously short log:\n{log}"
    # The log does talk about this series, by UID: the check reads the right log.
    assert src.SeriesInstanceUID in log, "the series' UID is not in the log at all"
    leaks = _leaks(log)
    lines = [ln for ln in log.splitlines() if _leaks(ln)][:5]
    assert not leaks, f"patient identity in the node's log ({fmt}, {level}): {leaks}\n" + "\n".join(lines)
