"""Results back to a PACS: the node's TID 1500 SR and Secondary Capture
overlays delivered to a real Orthanc, and the outbox's faults.

Every test starts its own node (nodeharness.Node) and its own Orthanc
(orthanc.Orthanc) on free ports with temporary storage. The models are the
fixture card src/inference/testdata/sigmoid_map.yaml (a real ONNX file,
map = sigmoid(input)) unless a test says otherwise, so these tests check the
plumbing, not the models' accuracy.

"Exactly once" is checked on what Orthanc *received* (a Lua filter logs
every incoming C-STORE), not only on what it kept: Orthanc silently keeps
one copy of a re-sent SOP Instance UID.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from nodeharness import (DEFAULT_CALLERS, REPO_ROOT, Node, assert_serving, dcmtk, free_port, node_binary,
                         run_tool, storescu)
from orthanc import Orthanc, orthanc_available

# Hard imports: scripts/install-deps.sh installs highdicom, and PyYAML through
# models/training/install.sh; a missing one is an error, not a silent skip.
import highdicom as hd  # noqa: E402
import yaml  # noqa: E402

FIXTURE_CARD = REPO_ROOT / "src" / "inference" / "testdata" / "sigmoid_map.yaml"
MODEL_NAMES = ("pma", "sfa", "liver", "cac")
SR_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# Fast retries so a fault test takes seconds; max_attempts high so only a
# permanent refusal dead-letters within a test's time.
FAST_OUTBOX = {"retry_base_s": 0.5, "retry_cap_s": 1.0, "max_attempts": 50,
               "connect_timeout_s": 2.0, "dimse_timeout_s": 10.0}


# ------------------------------------------------------------------ environment


def ort_dylib() -> str:
    env = os.environ.get("ORT_DYLIB_PATH")
    if env:
        return env
    try:
        import onnxruntime as ort
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("onnxruntime not installed and ORT_DYLIB_PATH not set")
        pytest.skip("onnxruntime not installed and ORT_DYLIB_PATH not set")
    capi = Path(ort.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"), key=lambda p: len(p.name), reverse=True)
    if not libs:
        pytest.skip(f"no libonnxruntime.so under {capi}")
    return str(libs[0])


def default_routes() -> list[dict]:
    """The routes of config/node.yaml, anchors resolved."""
    return yaml.safe_load((REPO_ROOT / "config" / "node.yaml").read_text())["routes"]


def routes_named(*names: str) -> list[dict]:
    rs = [r for r in default_routes() if r["name"] in names]
    assert len(rs) == len(names), f"config/node.yaml lacks a route of {names}"
    return rs


def models(cards: dict[str, Path] | None = None) -> dict:
    cards = cards or {}
    return {m: {"card": str(cards.get(m, FIXTURE_CARD))} for m in MODEL_NAMES}


def node_overrides(dest_port: int, routes: list[dict], outbox: dict | None = None,
                   cards: dict | None = None, dest_ae: str = "ORTHANC") -> dict:
    over = {
        "node": {"allowed_callers": copy.deepcopy(DEFAULT_CALLERS) + [{"ae_title": "ORTHANC"}]},
        "onnxruntime": {"library": ort_dylib()},
        "models": models(cards),
        "destinations": {"pacs": {"ae_title": dest_ae, "host": "127.0.0.1", "port": dest_port}},
        "routes": routes,
        "log": {"format": "text", "level": "info,ort=warn"},
    }
    if outbox:
        over["outbox"] = outbox
    return over


def cli_json(node: Node, command: str) -> list[dict]:
    """`biomarker-node <command> --config F --json` as a list; [] before the
    node has created the store the command reads."""
    r = subprocess.run([str(node_binary()), command, "--config", str(node.config_path), "--json"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        store = node.data_dir / ("outbox.sqlite" if command == "outbox" else "index.sqlite")
        if not store.exists():
            return []
        raise AssertionError(f"`{command} --json` exited {r.returncode}:\n{r.stderr}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def outbox(node: Node) -> list[dict]:
    return cli_json(node, "outbox")


def wait_for(pred, timeout: float, what: str, diag=lambda: "", poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{diag()}")
        time.sleep(poll)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pma_phantom(tmp_path_factory) -> Path:
    """One single-slice PMA phantom: the directory holding CT0001.dcm."""
    out = tmp_path_factory.mktemp("phantom")
    r = run_tool([str(node_binary()), "phantom", "--task", "pma", "--seed", "7", "--out", str(out), "--count", "1"])
    assert r.returncode == 0, r.stderr
    d = out / "pma-7-0"
    assert (d / "CT0001.dcm").is_file(), list(out.rglob("*"))
    return d


def analyze(workdir: Path, overrides: dict, phantom: Path) -> dict[str, dict]:
    """`biomarker-node analyze` on the same config: route name -> its JSON line,
    plus 'sr' (the SR file it wrote) per route."""
    n = Node(workdir, overrides)  # only for its config file; never started
    out = workdir / "analyze-out"
    r = run_tool([str(node_binary()), "analyze", "--config", str(n.config_path), "--out", str(out), str(phantom)])
    assert r.returncode == 0, f"analyze exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    lines = {}
    for line in r.stdout.splitlines():
        if line.strip().startswith("{"):
            j = json.loads(line)
            j["sr"] = out / j["series_instance_uid"] / j["route"] / "sr.dcm"
            lines[j["route"]] = j
    assert lines, f"analyze printed no result:\n{r.stdout}\n{r.stderr}"
    return lines


@pytest.fixture
def nodes(tmp_path, binary):
    made: list[Node] = []

    def make(overrides: dict, start: bool = True, name: str | None = None) -> Node:
        n = Node(tmp_path / (name or f"node{len(made)}"), overrides)
        made.append(n)
        if start:
            n.start()
        return n

    yield make
    died = [n for n in made if n.died_unexpectedly()]
    for n in made:
        n.kill()
        print(f"--- {n.log_path} (last lines) ---\n{n.log_tail(40)}")
    if died:
        pytest.fail(f"node exited on its own ({died[0].proc.returncode}):\n{died[0].log_tail(80)}", pytrace=False)


@pytest.fixture
def orthancs(tmp_path):
    """make(dicom_port=..., modalities=..., always_allow_store=...) -> Orthanc
    (not started). Orthanc missing: a failure in CI, a skip elsewhere."""
    if not orthanc_available():
        msg = "Orthanc not installed (scripts/install-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    made: list[Orthanc] = []

    def make(name: str = "orthanc", **kw) -> Orthanc:
        o = Orthanc(tmp_path / f"{name}{len(made)}", **kw)
        made.append(o)
        return o

    yield make
    for o in made:
        o.kill()
        print(f"--- {o.log_path} (last lines) ---\n{o.log_tail(30)}")


@pytest.fixture
def procs():
    """Other peers (storescp); terminated at teardown."""
    made: list[subprocess.Popen] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


# ------------------------------------------------------------------ SR reading


def sr_measurements(data: bytes) -> list[dict]:
    """Every NUM of every measurement group of a TID 1500 SR, via highdicom."""
    ds = pydicom.dcmread(io.BytesIO(data))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds) if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" \
        else hd.sr.srread(io.BytesIO(data))
    groups = list(sr.content.get_image_measurement_groups()) \
        + list(sr.content.get_planar_roi_measurement_groups()) \
        + list(sr.content.get_volumetric_roi_measurement_groups())
    out = []
    for g in groups:
        for m in g.get_measurements():
            mv = m[0].MeasuredValueSequence[0]  # m[0]: the NUM content item
            out.append({
                "concept": (m.name.scheme_designator, m.name.value),
                "value": float(m.value),
                "ds": float(mv.NumericValue),
                "ds_text": getattr(mv.NumericValue, "original_string", None) or str(mv.NumericValue),
                "unit": (m.unit.scheme_designator, m.unit.value),
            })
    return out


def ds_rel_tol(ds_text: str) -> float:
    """Relative precision a DS string carries: one unit of its last
    significant digit, relative to its leading digit, with margin."""
    mantissa = ds_text.strip().lower().split("e")[0].lstrip("+-").replace(".", "").lstrip("0")
    digits = max(len(mantissa), 1)
    return 10.0 ** (2 - digits)


def referenced_uids(ds) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in a dataset."""
    out = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out


# ------------------------------------------------------------------ scenario helpers


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def pending_after_failure(items: list[dict], n: int) -> bool:
    """Every item has failed at least once and waits for a retry. One batch
    per destination is in flight at a time, so against a slow failure (a
    timeout) one item may be `sending` its next attempt while the others wait."""
    return (len(items) == n
            and all(i["state"] in ("pending", "sending") and i["attempts"] >= 1 and i.get("last_error")
                    for i in items)
            and any(i["state"] == "pending" for i in items))


def all_delivered(items: list[dict], n: int) -> bool:
    return len(items) == n and all(i["state"] == "delivered" for i in items)


def expected_outputs(analyzed: dict[str, dict]) -> int:
    """Outbox items per series: one SR, its SC overlays and its SEG per route."""
    n = 0
    for j in analyzed.values():
        n += 1 + len(list(j["sr"].parent.glob("sc-*.dcm"))) + (j["sr"].parent / "seg.dcm").exists()
    return n


def check_seg(seg_bytes: bytes, sr_bytes: bytes, ct_files: list[Path], out_dir: Path, card: Path) -> None:
    """The SEG as a viewer reads it: highdicom's segread gives, per source
    CT slice, exactly the node's own mask, recomputed here from the map and
    candidates `analyze --out` wrote (map >= the card's threshold inside the
    candidates, or the map x 255 for FRACTIONAL); its planes and Frame of
    Reference are the CT's; the SR's TID 1411 Referenced Segment resolves
    to it."""
    import numpy as np
    ds = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert ds.SOPClassUID == SEG_CLASS
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    cts = {c.SOPInstanceUID: c for c in (pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files)}
    result = json.loads((out_dir / "result.json").read_text())
    sources = result["source_instances"]
    assert len(sources) == int(ds.NumberOfFrames), (sources, ds.NumberOfFrames)
    spec = yaml.safe_load(card.read_text()).get("segmentation") or {}
    kind = spec.get("type", "BINARY")
    assert ds.SegmentationType == kind
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[1],
                                           combine_segments=False, rescale_fractional=False)[..., 0]
    mp, cand = np.load(out_dir / "map.npy"), np.load(out_dir / "candidates.npy").astype(bool)
    if kind == "BINARY":
        want = (cand & (mp >= np.float32(spec.get("threshold", 0.5)))).astype(np.uint8)
    else:
        want = np.where(cand, np.round(np.clip(mp, 0, 1) * np.float32(255)), 0).astype(np.uint8)
    assert want.sum() > 0, "the mask is empty: the test would prove nothing"
    assert np.array_equal(px.astype(np.uint8), want), (int(px.sum()), int(want.sum()))
    # geometry: the source CT's Frame of Reference, planes and spacing
    first = cts[sources[0]]
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [float(v) for v in first.ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in first.PixelSpacing]
    assert (ds.Rows, ds.Columns) == (first.Rows, first.Columns)
    for uid, f in zip(sources, ds.PerFrameFunctionalGroupsSequence):
        assert f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        assert [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] == \
            [float(v) for v in cts[uid].ImagePositionPatient]
    # the SR's measurement group references this SEG's segment
    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    ref = group.referenced_segment[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (SEG_CLASS, ds.SOPInstanceUID)
    assert int(ref.ReferencedSegmentNumber) in {int(s.SegmentNumber) for s in ds.SegmentSequence}


def assert_delivered_once(o: Orthanc, node: Node, items: list[dict], n_sr: int = 1,
                          also_stored: list[str] = ()) -> None:
    """Orthanc received each outbox item exactly once from the node, and
    stores exactly those (plus `also_stored`)."""
    sops = [i["sop_instance_uid"] for i in items]
    got = o.received_sops(from_aet=node.ae_title)
    dup = sorted({s for s in got if got.count(s) > 1})
    assert not dup, f"delivered more than once: {dup}\nreceived: {got}"
    assert sorted(got) == sorted(sops), f"Orthanc received {got}, outbox has {sops}"
    stored = {o.instance_tags(i)["SOPInstanceUID"] for i in o.instances()}
    assert stored == set(sops) | set(also_stored), f"Orthanc stores {stored}, outbox has {sops}"
    srs = [i for i in items if i["sop_class_uid"] in SR_STORAGE_CLASSES]
    assert len(srs) == n_sr, f"expected {n_sr} SR(s) in the outbox: {items}"


# ================================================================== 1. end to end


def _end_to_end(tmp_path, nodes, orthancs, pma_phantom, cards: dict | None):
    dicom_port = free_port()
    over = node_overrides(dicom_port, default_routes(), outbox=FAST_OUTBOX, cards=cards)
    analyzed = analyze(tmp_path / "analyze", over, pma_phantom)
    assert {"pma-single-slice"} <= set(analyzed), analyzed

    node = nodes(over, start=False)
    o = orthancs(dicom_port=dicom_port, modalities={"node": [node.ae_title, "127.0.0.1", node.port]}).start()
    node.start()

    ct = o.upload(pma_phantom / "CT0001.dcm")
    study = ct["ParentStudy"]
    ct_tags = o.instance_tags(ct["ID"])
    o.store_to("node", [ct["ID"]])  # Orthanc -> node, one association

    n_sr, n_out = len(analyzed), expected_outputs(analyzed)

    def results():
        inst = o.study_instances(study)
        srs = [i for i in inst if i["Series"].get("Modality") == "SR"]
        others = [i for i in inst if i["ID"] != ct["ID"] and i["Series"].get("Modality") != "SR"]
        return (srs, others) if len(srs) >= n_sr and len(others) >= n_out - n_sr else None

    srs, others = wait_for(results, 60, f"{n_sr} SR and {n_out - n_sr} SC/SEG in the CT's study",
                        diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{o.log_tail(20)}", poll=0.2)
    # Nothing else arrived (a duplicate with a fresh UID would be an extra instance).
    assert len(o.study_instances(study)) == 1 + n_out, o.study_instances(study)
    assert len(o.instances()) == 1 + n_out, "a result landed outside the CT's study"

    for i in srs + others:
        t = o.instance_tags(i["ID"])
        assert t["StudyInstanceUID"] == ct_tags["StudyInstanceUID"]
        assert t.get("PatientID") == ct_tags.get("PatientID")
        assert t["SeriesInstanceUID"] != ct_tags["SeriesInstanceUID"]
    classes = [o.instance_tags(i["ID"])["SOPClassUID"] for i in others]
    segs = [i for i, c in zip(others, classes) if c == SEG_CLASS]
    assert len(segs) == n_sr, f"one SEG per result in the CT's study: {classes}"
    assert all(c in (SC_CLASS, SEG_CLASS) for c in classes), classes
    # Each SEG Orthanc stored: segread = the node's mask, CT geometry, SR -> SEG.
    sr_by_seg = {}
    for i in srs:
        data = o.instance_file(i["ID"])
        uids = referenced_uids(pydicom.dcmread(io.BytesIO(data)))
        for s in segs:
            if o.instance_tags(s["ID"])["SOPInstanceUID"] in uids:
                sr_by_seg[s["ID"]] = data
    for s in segs:
        seg_bytes = o.instance_file(s["ID"])
        assert s["ID"] in sr_by_seg, "no SR references this SEG"
        seg_ds = pydicom.dcmread(io.BytesIO(seg_bytes))
        out_dir = next(j["sr"].parent for j in analyzed.values()
                       if pydicom.dcmread(j["sr"].parent / "seg.dcm").ContentDescription == seg_ds.ContentDescription)
        model = next(r["model"] for r in over["routes"] if r["name"] == out_dir.name)
        check_seg(seg_bytes, sr_by_seg[s["ID"]], [pma_phantom / "CT0001.dcm"], out_dir,
                  Path(over["models"][model]["card"]))

    # The SR's measurement equals `analyze` on the same series and config.
    want = sorted(j["value"] for j in analyzed.values())
    got = []
    for i in srs:
        data = o.instance_file(i["ID"])
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPClassUID in SR_STORAGE_CLASSES
        assert ct_tags["SOPInstanceUID"] in referenced_uids(ds), "the SR does not reference the CT it measured"
        ms = sr_measurements(data)
        assert len(ms) == 1, ms
        m = ms[0]
        assert m["unit"] == ("UCUM", "cm2"), m
        # NumericValue (DS) carries ≤16 characters; FloatingPointValue the full double.
        assert math.isclose(m["value"], m["ds"], rel_tol=1e-4), m
        got.append(m)
    got.sort(key=lambda m: m["value"])
    for w, m in zip(want, got):
        assert math.isclose(m["value"], w, rel_tol=1e-6), (m, want)
        # NumericValue equals the value to the digits it carries, and carries at least 5.
        tol = ds_rel_tol(m["ds_text"])
        assert tol <= 1e-4, f"NumericValue {m['ds_text']!r} carries too few digits"
        assert math.isclose(m["ds"], w, rel_tol=tol), (m, want, tol)
    by_unit = {j["unit"] for j in analyzed.values()}
    assert by_unit == {"cm2"}, analyzed

    items = outbox(node)
    assert all_delivered(items, n_out), items
    assert_delivered_once(o, node, items, n_sr=n_sr, also_stored=[ct_tags["SOPInstanceUID"]])
    return analyzed, got


def test_orthanc_end_to_end_fixture_model(tmp_path, nodes, orthancs, pma_phantom):
    """Orthanc C-STOREs a PMA slice to the node; the SR and SC come back into
    the same study, and the SR's number is what `analyze` computes."""
    _end_to_end(tmp_path, nodes, orthancs, pma_phantom, cards=None)


def test_orthanc_end_to_end_trained_pma(tmp_path, nodes, orthancs, pma_phantom):
    card = REPO_ROOT / "models" / "pma.yaml"
    if not card.exists():
        pytest.skip("models/pma.yaml not trained yet")
    cards = {m: REPO_ROOT / "models" / f"{m}.yaml" for m in MODEL_NAMES if (REPO_ROOT / "models" / f"{m}.yaml").exists()}
    _end_to_end(tmp_path, nodes, orthancs, pma_phantom, cards=cards)


def test_destination_send_filter(tmp_path, nodes, orthancs, pma_phantom):
    """`destinations.<name>.send: [sr, seg]`: Orthanc gets the SR and the
    SEG of the result, no Secondary Capture; the SC is still written."""
    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    over["destinations"]["pacs"]["send"] = ["sr", "seg"]
    node = nodes(over, start=False)
    o = orthancs(dicom_port=dicom_port).start()
    node.start()
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    items = wait_for(lambda: (lambda it: it if all_delivered(it, 2) else None)(outbox(node)), 60,
                     "the SR and the SEG delivered", diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    assert sorted(i["sop_class_uid"] for i in items) == sorted([SEG_CLASS, "1.2.840.10008.5.1.4.1.1.88.34"]), items
    stored = sorted(o.instance_tags(i)["SOPClassUID"] for i in o.instances())
    assert stored == sorted([SEG_CLASS, "1.2.840.10008.5.1.4.1.1.88.34"]), stored
    written = list((node.data_dir / "results").rglob("sc-*.dcm"))
    assert written, "the SC is still written under results/"


# ================================================================== 2. faults


def _send_and_wait_pending(node: Node, phantom: Path, n_items: int) -> list[dict]:
    r = storescu(node, [phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    return wait_for(lambda: (lambda it: it if pending_after_failure(it, n_items) else None)(outbox(node)),
                    30, f"{n_items} outbox item(s) pending after a failed attempt",
                    diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")


def test_destination_down_then_up(tmp_path, nodes, orthancs, pma_phantom):
    """Nobody listens at the destination when the result is ready: the item
    retries; once Orthanc is up it is delivered, exactly once."""
    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    node = nodes(over)

    before = _send_and_wait_pending(node, pma_phantom, n_items)
    o = orthancs(dicom_port=dicom_port).start()
    items = wait_for(lambda: (lambda it: it if all_delivered(it, n_items) else None)(outbox(node)),
                     30, "delivered after Orthanc came up",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{o.log_tail(20)}")
    assert {i["sop_instance_uid"] for i in items} == {i["sop_instance_uid"] for i in before}
    assert all(i["attempts"] >= 2 for i in items), items  # failed at least once, then delivered
    time.sleep(1.5)  # a late duplicate send (a second retry timer) would land here
    assert_delivered_once(o, node, items)
    assert len(o.find_instances(Modality="SR")) == 1


def test_node_killed_with_results_waiting(tmp_path, nodes, orthancs, pma_phantom):
    """SIGKILL while results wait in the outbox (destination down), restart:
    they are delivered after the restart, exactly once, and the job is not
    run again (no second SR under a new UID)."""
    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    node = nodes(over)

    before = _send_and_wait_pending(node, pma_phantom, n_items)
    jobs_before = cli_json(node, "jobs")
    node.kill()
    node.start()
    time.sleep(1.0)  # let a restarted pipeline re-run what it (wrongly) thinks is unfinished
    o = orthancs(dicom_port=dicom_port).start()
    items = wait_for(lambda: (lambda it: it if all_delivered(it, n_items) else None)(outbox(node)),
                     30, "delivered after the restart",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(40)}\n{o.log_tail(20)}")
    assert {i["sop_instance_uid"] for i in items} == {i["sop_instance_uid"] for i in before}
    assert {i["id"] for i in items} == {i["id"] for i in before}
    time.sleep(1.5)
    assert_delivered_once(o, node, items)
    assert len(o.find_instances(Modality="SR")) == 1
    jobs_after = cli_json(node, "jobs")
    assert len(jobs_after) == len(jobs_before), (jobs_before, jobs_after)


@pytest.mark.parametrize("refuser", ["storescp-refuse", "orthanc-unknown-caller"])
def test_destination_refuses_is_dead_letter(tmp_path, nodes, orthancs, procs, pma_phantom, refuser):
    """A destination that refuses the association: dead letter at once (not
    after max_attempts), with the reason in `outbox --json`."""
    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    if refuser == "storescp-refuse":
        log = open(tmp_path / "storescp.log", "wb")
        p = subprocess.Popen([dcmtk("storescp"), "-v", "--refuse", str(dicom_port)], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, TCP_NODELAY="1"))
        procs.append(p)
        wait_for(lambda: _listening(dicom_port) or p.poll() is not None, 10, "storescp --refuse listening")
        assert p.poll() is None, (tmp_path / "storescp.log").read_text()
        peer_log = lambda: (tmp_path / "storescp.log").read_text(errors="replace")[-2000:]
        o = None
    else:
        o = orthancs(dicom_port=dicom_port, modalities={}, always_allow_store=False).start()
        peer_log = o.log_tail
    node = nodes(over)
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr

    t0 = time.monotonic()
    items = wait_for(lambda: (lambda it: it if len(it) == n_items and all(i["state"] == "dead" for i in it) else None)(outbox(node)),
                     20, "every item dead-lettered",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{peer_log()}")
    elapsed = time.monotonic() - t0
    for i in items:
        assert i["last_error"] and i["last_error"].strip(), i
        # A refusal is permanent: dead at the first attempt, not after 50 retries.
        assert i["attempts"] < FAST_OUTBOX["max_attempts"], i
        assert "gave up after" not in i["last_error"], i
    assert elapsed < 15, f"dead letter took {elapsed:.1f}s"
    if o is not None:
        assert o.received_sops() == [] and o.instances() == []
    # Dead letters stay dead (they wait for an operator).
    time.sleep(1.5)
    assert [i["state"] for i in outbox(node)] == ["dead"] * n_items


class HungPeer:
    """Accepts TCP connections and never says a word (a wedged PACS)."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        # shutdown() wakes the blocked accept(); close() alone leaves the
        # socket listening while accept() holds it, and a connection accepted
        # after the loop below would hang its client.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "HungPeer: accept thread did not stop"
        for c in self.conns:
            c.close()


def test_hung_destination_times_out_then_delivers(tmp_path, nodes, orthancs, pma_phantom):
    """A destination that accepts TCP and never answers the A-ASSOCIATE-RQ:
    the attempt times out (dimse_timeout_s), the item stays pending with the
    reason, the node keeps serving; once a real PACS is there, it is
    delivered exactly once."""
    dicom_port = free_port()
    hung = HungPeer(dicom_port)
    try:
        over = node_overrides(dicom_port, routes_named("pma-single-slice"),
                              outbox=dict(FAST_OUTBOX, dimse_timeout_s=1.0))
        n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
        node = nodes(over)
        r = storescu(node, [pma_phantom / "CT0001.dcm"])
        assert r.returncode == 0, r.stdout + r.stderr
        items = wait_for(lambda: (lambda it: it if pending_after_failure(it, n_items) else None)(outbox(node)),
                         20, "pending after a timed-out attempt",
                         diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
        assert all("time" in i["last_error"].lower() for i in items), items
        assert hung.conns, "the node never connected to the hung peer"
        assert_serving(node)
    finally:
        hung.close()
    o = orthancs(dicom_port=dicom_port).start()
    items = wait_for(lambda: (lambda it: it if all_delivered(it, n_items) else None)(outbox(node)),
                     30, "delivered once a real PACS answers",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{o.log_tail(20)}")
    time.sleep(1.0)
    assert_delivered_once(o, node, items)


def test_resent_series_is_not_reported_twice(tmp_path, nodes, orthancs, pma_phantom):
    """The PACS sends the same series again (same SOP Instance UIDs): the
    node keeps its first copy and does not make or send a second report."""
    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    node = nodes(over, start=False)
    o = orthancs(dicom_port=dicom_port, modalities={"node": [node.ae_title, "127.0.0.1", node.port]}).start()
    node.start()
    ct = o.upload(pma_phantom / "CT0001.dcm")
    o.store_to("node", [ct["ID"]])
    first = wait_for(lambda: (lambda it: it if all_delivered(it, n_items) else None)(outbox(node)),
                     30, "first report delivered", diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    o.store_to("node", [ct["ID"]])  # the same instance again, in a new association
    time.sleep(3.0)  # completion, routing, analysis and delivery take < 1 s here
    assert outbox(node) == first
    assert len(cli_json(node, "jobs")) == 1
    assert_delivered_once(o, node, first, also_stored=[ct_uid(o, ct)])


def ct_uid(o: Orthanc, uploaded: dict) -> str:
    return o.instance_tags(uploaded["ID"])["SOPInstanceUID"]


def test_hung_destination_does_not_delay_another(tmp_path, nodes, orthancs, pma_phantom):
    """A route sends to two destinations, one hung (accepts TCP, never
    answers; the attempt waits dimse_timeout_s = 20 s): Orthanc gets its
    results within seconds anyway, while the hung destination's items wait."""
    dicom_port, hung_port = free_port(), free_port()
    hung = HungPeer(hung_port)
    try:
        route = copy.deepcopy(routes_named("pma-single-slice")[0])
        route["send_to"] = ["hung", "pacs"]
        over = node_overrides(dicom_port, [route], outbox=dict(FAST_OUTBOX, dimse_timeout_s=20.0))
        over["destinations"]["hung"] = {"ae_title": "WEDGED", "host": "127.0.0.1", "port": hung_port}
        n_per_dest = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
        o = orthancs(dicom_port=dicom_port).start()
        node = nodes(over)
        r = storescu(node, [pma_phantom / "CT0001.dcm"])
        assert r.returncode == 0, r.stdout + r.stderr

        def split():
            it = outbox(node)
            pacs = [i for i in it if i["destination"] == "pacs"]
            other = [i for i in it if i["destination"] == "hung"]
            return (pacs, other) if all_delivered(pacs, n_per_dest) and len(other) == n_per_dest else None

        pacs, other = wait_for(split, 8, "Orthanc's items delivered while the other destination hangs",
                               diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
        assert hung.conns, "the node never tried the hung destination"
        assert all(i["state"] in ("pending", "sending") for i in other), other
        assert {i["sop_instance_uid"] for i in pacs} == {i["sop_instance_uid"] for i in other}
        assert_delivered_once(o, node, pacs)
    finally:
        hung.close()


def test_stop_and_kill_while_sending(tmp_path, nodes, orthancs, pma_phantom):
    """Items `sending` to a hung destination (dimse_timeout_s = 60): SIGTERM
    stops the node at once (it does not wait out the timeout); SIGKILL while
    sending leaves them `sending` on disk, and the next start-up requeues
    them. Once a real PACS is there, each is delivered exactly once."""
    dicom_port = free_port()
    hung = HungPeer(dicom_port)
    try:
        over = node_overrides(dicom_port, routes_named("pma-single-slice"),
                              outbox=dict(FAST_OUTBOX, dimse_timeout_s=60.0))
        n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
        node = nodes(over)
        r = storescu(node, [pma_phantom / "CT0001.dcm"])
        assert r.returncode == 0, r.stdout + r.stderr
        sending = lambda: (lambda it: it if len(it) == n_items and any(i["state"] == "sending" for i in it)
                           else None)(outbox(node))
        wait_for(sending, 10, "an item sending to the hung destination", diag=lambda: node.log_tail(30))

        t = time.monotonic()
        rc = node.stop(timeout=20)
        took = time.monotonic() - t
        assert rc == 0 and took < 5, f"SIGTERM with a hung delivery: exit {rc} after {took:.1f}s"

        node.start()
        wait_for(sending, 10, "sending again after the restart", diag=lambda: node.log_tail(30))
        node.kill()
        assert any(i["state"] == "sending" for i in outbox(node))  # as the crash left it
        node.start()
        time.sleep(0.5)
    finally:
        hung.close()
    o = orthancs(dicom_port=dicom_port).start()
    items = wait_for(lambda: (lambda it: it if all_delivered(it, n_items) else None)(outbox(node)),
                     20, "delivered after the restarts",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{o.log_tail(20)}")
    time.sleep(1.0)
    assert_delivered_once(o, node, items)
