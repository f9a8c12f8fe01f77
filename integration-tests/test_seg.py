"""DICOM SEG of a result's localization on real CT (issue 16 item 1).

`biomarker-node analyze --out` on a real 3-slice GE abdomen series, with the
shipped CAC card (BINARY: the lesions that count) and liver card
(FRACTIONAL): dciodvfy finds no error in the SEG; highdicom's segread gives,
per source slice, exactly the mask recomputed here, independently of the
node, from the map and candidates (map.npy and candidates.npy for one slice, maps.npz for the 3-slice volume)
and result.json it wrote; the frames
sit on the source slices' planes; the SR's TID 1411 Referenced Segment
resolves to the SEG. (Orthanc storing the SEG in the source study:
test_results_orthanc.py's end-to-end tests.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml

from cards import without_guard
from nodeharness import REPO_ROOT, node_binary, run_tool
from test_results_orthanc import SEG_CLASS, ort_dylib

SERIES = "abdomen-ge-3slice"


def label8(mask: np.ndarray) -> np.ndarray:
    """8-connected components numbered in raster order of their first pixel
    (scipy.ndimage.label's order), written out so the test needs no scipy."""
    lab = np.zeros(mask.shape, np.int32)
    n = 0
    rows, cols = mask.shape
    for r, c in zip(*np.nonzero(mask)):
        if lab[r, c]:
            continue
        n += 1
        lab[r, c] = n
        stack = [(r, c)]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < rows and 0 <= nx < cols and mask[ny, nx] and not lab[ny, nx]:
                        lab[ny, nx] = n
                        stack.append((ny, nx))
    return lab


def dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is required under CI")
        pytest.skip("dciodvfy not installed")
    r = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, realct) -> Path:
    work = tmp_path_factory.mktemp("seg")
    cfg = {
        "node": {"ae_title": "BIOMARKER", "port": 11112, "data_dir": str(work / "data")},
        "onnxruntime": {"library": ort_dylib()},
        # The shipped CAC card's guard refuses this contrast abdomen (check `contrast`); the SEG encoding is what
        # is tested here, so CAC runs on the card as a site would write it without the guard.
        "models": {"cac": {"card": str(without_guard("cac", work / "cards"))},
                   "liver": {"card": str(REPO_ROOT / "models" / "liver.yaml")}},
        "routes": [
            {"name": "cac-all", "model": "cac", "match": {"keyword": "Modality", "equals": "CT"}},
            {"name": "liver-mid", "model": "liver", "slices": {"mode": "middle"},
             "match": {"keyword": "Modality", "equals": "CT"}},
        ],
    }
    (work / "node.yaml").write_text(yaml.safe_dump(cfg))
    r = run_tool([str(node_binary()), "analyze", "--config",
                  str(work / "node.yaml"), "--out", str(work / "out"), str(realct / SERIES)])
    assert r.returncode == 0, r.stdout + r.stderr
    return work / "out"


def route_dir(out: Path, route: str) -> Path:
    (d,) = list(out.glob(f"*/{route}"))
    return d


def load_maps(d: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """The map and candidates a result directory holds: map.npy (float32) and candidates.npy for one slice;
    maps.npz for a volume, whose `map` is already the FRACTIONAL SEG's encoding (uint8,
    round(clip(map, 0, 1) * 255) inside the candidates, 0 outside). Returns (map, candidates, quantised)."""
    if (d / "maps.npz").exists():
        assert not (d / "map.npy").exists()
        z = np.load(d / "maps.npz")
        return z["map"], z["candidates"].astype(bool), True
    return np.load(d / "map.npy"), np.load(d / "candidates.npy").astype(bool), False


def expected_mask(d: Path, kind: str, card: dict) -> np.ndarray:
    result = json.loads((d / "result.json").read_text())
    mp, cand, quantised = load_maps(d)
    assert len(cand) == len(result["source_instances"])
    assert quantised == (len(cand) > 1), "a volume's maps are in maps.npz, one slice's in map.npy"
    if kind == "FRACTIONAL":
        if quantised:
            return mp
        return np.where(cand, np.round(np.clip(mp, 0, 1) * np.float32(255)), 0).astype(np.uint8)
    if card["aggregation"]["kind"] == "agatston":
        want = np.zeros(cand.shape, np.uint8)
        for s in range(cand.shape[0]):
            counted = {les["label"] for les in result["measurement"]["lesions"]
                       if les["slice"] == s and les["counted"]}
            if counted:
                want[s] = np.isin(label8(cand[s]), list(counted))
        return want
    assert not quantised, "a thresholded BINARY mask needs the float map"
    return (cand & (mp >= np.float32(card["segmentation"].get("threshold", 0.5)))).astype(np.uint8)


@pytest.mark.parametrize("route,model,kind", [("cac-all", "cac", "BINARY"), ("liver-mid", "liver", "FRACTIONAL")])
def test_seg_on_real_ct(analyzed, realct, route, model, kind):
    d = route_dir(analyzed, route)
    card = yaml.safe_load((REPO_ROOT / "models" / f"{model}.yaml").read_text())
    assert card["segmentation"]["type"] == kind
    seg_path = d / "seg.dcm"
    errors = dciodvfy_errors(seg_path)
    assert not errors, "\n".join(errors)

    ds = pydicom.dcmread(seg_path)
    assert ds.SOPClassUID == SEG_CLASS and ds.Modality == "SEG"
    assert ds.SegmentationType == kind
    (segment,) = ds.SegmentSequence
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodingSchemeDesignator, prop.CodeValue) == ("SCT", card["segmentation"]["property_type"]["value"])
    alg = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == (card["name"], card["version"])

    sources = json.loads((d / "result.json").read_text())["source_instances"]
    seg = hd.seg.segread(seg_path)
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[1],
                                           combine_segments=False, rescale_fractional=False)[..., 0]
    want = expected_mask(d, kind, card)
    assert want.sum() > 0, "empty mask: the comparison would prove nothing"
    assert np.array_equal(px.astype(np.uint8), want), (int(px.astype(np.int64).sum()), int(want.sum()))

    cts = {c.SOPInstanceUID: c for c in (pydicom.dcmread(f, stop_before_pixels=True)
                                         for f in sorted((realct / SERIES).rglob("*")) if f.is_file())}
    first = cts[sources[0]]
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    for uid, f in zip(sources, ds.PerFrameFunctionalGroupsSequence):
        assert f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        assert np.allclose([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in cts[uid].ImagePositionPatient], atol=0)

    sr = hd.sr.srread(d / "sr.dcm")
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    ref = group.referenced_segment[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (SEG_CLASS, ds.SOPInstanceUID)
    assert int(ref.ReferencedSegmentNumber) == int(segment.SegmentNumber)
    assert not dciodvfy_errors(d / "sr.dcm")
