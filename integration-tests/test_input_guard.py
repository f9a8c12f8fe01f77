"""The out-of-distribution guard (issue 11, part 4): input the shipped models were not validated on is refused.

A site config sends every CT series to PMA and SFA (the shipped cards, slice above the aortic arch). Four inputs are
refused, each with its check named:
- a head CT (shared/realct/head-philips/S2010): no aortic arch in the volume (the slice selection refuses it first);
- a localizer (head-philips/S1000, ImageType LOCALIZER): `image_type`;
- pure noise (a pydicom CT slice of uniform random HU): no fat peak in the HU histogram, `hu_fat`;
- real chest slices at the heart (shared/realct-labelled/chest-lungmask 0.dcm and 1.dcm, Apache-2.0): `level`.
  Their source stripped HighBit and Modality; the copies get them back (pixels untouched) and a series each.
Through `analyze` (a `note:` line with the check, exit 0, no JSON line) and through a running node: the job state is
`refused` with the reason, biomarker_node_jobs_refused_total{model,check} counts it, and nothing of it reaches the
outbox or Orthanc, while a PMA phantom sent alongside is measured and delivered. The route testers (the CLI's and the
HTTP API's, for an uploaded file and for a stored series) show the verdicts.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import instances
from ci_no_skip import require_dir
from nodeharness import REALCT, REPO_ROOT, free_port, storescu
from test_results_orthanc import (FAST_OUTBOX, cli_json, node_overrides, nodes, orthancs, ort_dylib,  # noqa: F401
                                  pma_phantom, wait_for)

LUNGMASK = REALCT.parent / "realct-labelled" / "chest-lungmask"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ANY_CT = {"derived": "modality", "equals": "CT"}
ROUTES = [
    {"name": f"{m}-any-ct", "model": m, "send_to": ["pacs"], "slices": {"mode": "above_aortic_arch"}, "match": ANY_CT}
    for m in ("pma", "sfa")
]
CARDS = {m: REPO_ROOT / "models" / f"{m}.yaml" for m in ("pma", "sfa")}


def _noise_series(out: Path, slices: int = 1, seed: int = 11) -> Path:
    """A CT series whose pixels are uniform random HU (-1024..1500), with an ordinary chest CT header."""
    rng = np.random.default_rng(seed)
    study, series = instances.new_uid(), instances.new_uid()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(slices):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = instances.new_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = instances.new_uid()
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "NOISE^TEST", "NOISE"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.KVP = 120
        ds.SliceThickness = 2.5
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-179.2, -179.2, -100 + 2.5 * i]
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = rng.integers(-1024, 1500, size=(512, 512), dtype=np.int16).tobytes()
        ds.save_as(out / f"noise{i:02d}.dcm", enforce_file_format=True)
    return out


def _heart_slices(out: Path) -> list[Path]:
    """chest-lungmask 0.dcm and 1.dcm, each its own series, with the HighBit and Modality their source dropped."""
    src = require_dir(LUNGMASK, "real chest slices at the heart level (chest-lungmask)")
    made = []
    study = instances.new_uid()
    for name in ("0.dcm", "1.dcm"):
        ds = pydicom.dcmread(src / name)
        ds.HighBit, ds.Modality = 15, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, instances.new_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = instances.new_uid()
        p = out / f"heart-{name}"
        out.mkdir(parents=True, exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        made.append(p)
    return made


def _inputs(realct: Path, tmp: Path) -> dict[str, list[Path]]:
    """name -> files of one (or, for the heart, two) series, and the check that must refuse it."""
    head = sorted(p for p in (realct / "head-philips" / "S2010").iterdir() if p.name != "DIRFILE")
    localizer = sorted(p for p in (realct / "head-philips" / "S1000").iterdir() if p.name != "DIRFILE")
    return {
        "head": head,
        "localizer": localizer,
        "noise": sorted(_noise_series(tmp / "noise").iterdir()),
        "heart": _heart_slices(tmp / "heart"),
    }


# Uniform noise over -1024..1500 HU has a flat fat window (its air window is cut at -1024, so it looks peaked).
EXPECTED_CHECK = {"head": "aortic_arch", "localizer": "image_type", "noise": "hu_fat", "heart": "level"}


def _series_uid(p: Path) -> str:
    return str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)


def _site_config(tmp: Path, extra: dict | None = None) -> Path:
    cfg = {
        "node": {"ae_title": "BIOMARKER", "data_dir": str(tmp / "data")},
        "onnxruntime": {"library": ort_dylib()},
        "models": {m: {"card": str(c)} for m, c in CARDS.items()},
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 1}},
        "routes": ROUTES,
    }
    path = tmp / "site.yaml"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def test_analyze_refuses_head_localizer_noise_and_heart(realct, binary, tmp_path):
    inputs = _inputs(realct, tmp_path / "in")
    config = _site_config(tmp_path)
    for name, files in inputs.items():
        r = subprocess.run([str(binary), "analyze", "--config", str(config), "--out", str(tmp_path / "out" / name),
                            *map(str, files)], capture_output=True, text=True, timeout=300)
        # A refusal is the route's answer: exit 0, no JSON line, a note per route with the reason.
        assert r.returncode == 0, (name, r.stderr)
        assert r.stdout.strip() == "", (name, r.stdout)
        notes = [l for l in r.stderr.splitlines() if l.startswith("note: series") and ": refused: " in l]
        series = {_series_uid(f) for f in files}
        assert len(notes) == 2 * len(series), (name, r.stderr)
        for route in ("pma-any-ct", "sfa-any-ct"):
            assert any(f"route {route}: refused: " in n for n in notes), (name, r.stderr)
        check = EXPECTED_CHECK[name]
        if check == "aortic_arch":
            assert all("the aortic arch is not in this series" in n for n in notes), r.stderr
        else:
            assert all(f"(check: {check})" in n for n in notes), (name, r.stderr)
        print(name, notes[0])


# What the route testers name: the head is refused from its header (BodyPartExamined BRAIN) before any pixel is read.
WANT_HEADER = {"head": "body_part", "localizer": "image_type"}


def test_the_route_tester_shows_the_refusals(realct, binary, tmp_path):
    inputs = _inputs(realct, tmp_path / "in")
    config = _site_config(tmp_path)
    want_header = WANT_HEADER
    for name, files in inputs.items():
        r = subprocess.run([str(binary), "route", "--config", str(config), "--json", "--guard-pixels",
                            *map(str, files)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
        assert lines and all(l["matched"] for l in lines), r.stdout
        for l in lines:
            g = l["guard"]
            assert g["verdict"] == "refused" and g["reason"].startswith("refused: "), (name, g)
            # The head is refused from its header (BodyPartExamined BRAIN) before any pixel is read.
            assert g["check"] == want_header.get(name, EXPECTED_CHECK[name]), (name, g)
    # Without --guard-pixels, the header checks only: the header names the head and the localizer.
    r = subprocess.run([str(binary), "route", "--config", str(config), *map(str, inputs["localizer"])],
                       capture_output=True, text=True, timeout=60)
    assert "guard (header): would be refused: the image is a localizer" in r.stdout, r.stdout


def _metric(text: str, model: str, check: str) -> float:
    m = re.search(rf'^biomarker_node_jobs_refused_total\{{(?=[^}}]*model="{model}")(?=[^}}]*check="{check}")[^}}]*\}} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_running_node_ends_the_jobs_refused_and_sends_nothing(realct, tmp_path, nodes, orthancs, pma_phantom):
    inputs = _inputs(realct, tmp_path / "in")
    dicom_port = free_port()
    orthanc = orthancs(dicom_port=dicom_port).start()
    over = node_overrides(dicom_port, ROUTES, outbox=FAST_OUTBOX, cards=CARDS)
    node = nodes(over)
    refused_series = {}
    for name, files in inputs.items():
        r = storescu(node, files)
        assert r.returncode == 0, r.stdout + r.stderr
        for f in files:
            refused_series[_series_uid(f)] = name
    # A phantom in the validated range, alongside: measured and delivered.
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    phantom_series = _series_uid(pma_phantom / "CT0001.dcm")
    want = 2 * (len(refused_series) + 1)
    jobs = wait_for(lambda: (lambda js: js if len(js) == want and all(j["state"] in ("done", "refused", "failed")
                                                                         for j in js) else None)(cli_json(node, "jobs")),
                    180, "every job finished", diag=lambda: node.log_tail(30))
    for j in jobs:
        s = j["series_instance_uid"]
        if s == phantom_series:
            assert j["state"] == "done", j
            continue
        name = refused_series[s]
        assert j["state"] == "refused", (name, j)
        assert j["error"].startswith("refused: "), j
        assert j["attempts"] == 1, j  # not retried
        if EXPECTED_CHECK[name] != "aortic_arch":
            assert f"(check: {EXPECTED_CHECK[name]})" in j["error"], (name, j)
    # The API and the metrics say the same.
    api = {j["id"]: j["state"] for j in node.http_json("/api/jobs")}
    assert sorted(api.values()).count("refused") == 2 * len(refused_series)
    text = node.http("/metrics")[2].decode()
    for model in ("pma", "sfa"):
        assert _metric(text, model, "image_type") == 1, text
        assert _metric(text, model, "hu_fat") == 1
        assert _metric(text, model, "level") == 2
        assert _metric(text, model, "aortic_arch") == 1
    assert 'biomarker_node_jobs_by_state{state="refused"} ' + str(2 * len(refused_series)) in text, text
    # The HTTP route testers say it too: for a stored series (every slice, header and pixel checks) ...
    for s, name in refused_series.items():
        res = node.http_json(f"/api/series/{s}/routes")
        assert res["series_instance_uid"] == s and res["routes"], res
        for r in res["routes"]:
            g = r["guard"]
            assert r["matched"] and g["verdict"] == "refused" and g["checks"] == "header+pixels", (name, r)
            assert g["check"] == WANT_HEADER.get(name, EXPECTED_CHECK[name]), (name, g)
            assert g["reason"].startswith("refused: "), (name, g)
    res = node.http_json(f"/api/series/{phantom_series}/routes")
    assert all(r["guard"]["verdict"] == "pass" for r in res["routes"] if r["matched"]), res
    assert node.http("/api/series/1.2.3.4/routes")[0] == 404
    # ... and for one uploaded file, as if it were the series.
    res = node.http_json("/api/routes/test", "POST", inputs["localizer"][0].read_bytes())
    assert [r["guard"]["check"] for r in res["routes"]] == ["image_type", "image_type"], res
    res = node.http_json("/api/routes/test", "POST", (pma_phantom / "CT0001.dcm").read_bytes())
    assert [r["guard"]["verdict"] for r in res["routes"]] == ["pass", "pass"], res
    # Nothing numeric left the node for the refused series: the outbox holds the phantom's reports only, and
    # Orthanc receives exactly those.
    phantom_reports = {r["sop_instance_uid"] for j in jobs if j["series_instance_uid"] == phantom_series
                       for r in j["result"]["reports"]}
    items = wait_for(lambda: (lambda it: it if it and all(i["state"] == "delivered" for i in it) else None)(
        cli_json(node, "outbox")), 60, "the phantom's reports delivered", diag=lambda: node.log_tail(30))
    assert {i["sop_instance_uid"] for i in items} == phantom_reports
    in_orthanc = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.find_instances()}
    assert in_orthanc == phantom_reports, in_orthanc
    assert "job refused" in node.log_text()


def test_a_contrast_chest_without_a_contrast_tag_is_refused_for_cac(binary, tmp_path):
    """Archives often leave ContrastBolusAgent empty. LIDC-IDRI-0001 (IV contrast, aorta about 390 HU) with that
    tag removed is a 2.5 mm axial chest CT that the default CAC route matches; the shipped CAC card (validated on
    non-contrast CT only) must refuse it from its pixels (the heart region's opacified blood, check `contrast`),
    not score the blood pool as calcium."""
    src = require_dir(REALCT.parent / "realct-labelled" / "chest-lidc0001" / "ct", "real chest CT volume")
    series = tmp_path / "lidc-untagged"
    series.mkdir()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for kw in ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume"):
            if kw in ds:
                delattr(ds, kw)
        ds.save_as(series / f.name)
    r = subprocess.run([str(binary), "analyze", "--config", str(REPO_ROOT / "config" / "node.yaml"), "--out",
                        str(tmp_path / "out"), str(series)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert not [l for l in lines if l["model"] == "cac"], lines
    notes = [l for l in r.stderr.splitlines() if "route cac-non-contrast: refused: " in l]
    assert len(notes) == 1 and "(check: contrast)" in notes[0] and "130 HU" in notes[0], r.stderr
    print(notes[0])
    # PMA and SFA (validated on any phase) still measure the same volume.
    assert {l["model"] for l in lines} == {"pma", "sfa"}, lines
