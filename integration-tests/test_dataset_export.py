"""`biomarker-node dataset export` (issue 14 part 1): phantoms sent to a running node with storescu, exported from its
own spool with a labels CSV built from their truth values, then trained on with `biomarker_training.train`.

The node runs the shipped PMA and SFA cards (their input guard on): the single-slice PMA phantoms pass it (kVp, body
part, pixel spacing, HU calibration, level). Variants made from them with pydicom exercise every row outcome:
- an unknown key (unmatched);
- a copy with KVP 60 (refused by the guard's `kvp` check);
- a copy whose body part and descriptions say HEAD (matches no route of the task: not routed);
- a second series in the study of one phantom (a study-keyed CSV is ambiguous there).

What the model will see is checked against pydicom: volume.npy is the HU of the slice (stored × slope + intercept,
padding to -1024), candidates.npy the card's HU range on it. Nothing in the export folder names a UID, a patient or an
accession number; the mapping beside it does. A CAC export (a whole-volume card whose candidates are Agatston's
lesions) is checked the same way on its own node.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from nodeharness import REPO_ROOT, Node, completed, free_port, node_binary, run_tool, storescu
from test_results_orthanc import node_overrides, routes_named

SEED = 21
TRAINING = REPO_ROOT / "models" / "training"


def _hu(ds) -> np.ndarray:
    raw = ds.pixel_array
    hu = raw.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    pad = ds.get("PixelPaddingValue")
    if pad is not None:
        hu[raw == pad] = -1024.0
    return hu


def _variant(src: Path, dst: Path, study: str | None = None, **attrs) -> pydicom.Dataset:
    """A copy of a single-file phantom as a new series (new study unless given), with attributes changed."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    dst.mkdir(parents=True)
    ds.save_as(dst / "CT0001.dcm")
    return ds


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Three PMA phantoms (name -> (dataset, truth cm2)) and the variants."""
    out = tmp_path_factory.mktemp("phantoms")
    r = run_tool([str(node_binary()), "phantom", "--task", "pma", "--seed", str(SEED), "--out", str(out / "pma"),
                  "--count", "3"])
    assert r.returncode == 0, r.stderr
    truth = {Path(row["series_dir"]).name: float(row["value"])
             for row in csv.DictReader(open(out / "pma" / "labels.csv"))}
    sets = {name: (pydicom.dcmread(out / "pma" / name / "CT0001.dcm"), v) for name, v in truth.items()}
    first, second, third = (out / "pma" / f"pma-{SEED}-{i}" / "CT0001.dcm" for i in range(3))
    twin_study = sets[f"pma-{SEED}-1"][0].StudyInstanceUID
    sets["kvp60"] = (_variant(third, out / "kvp60", KVP=60), truth[f"pma-{SEED}-2"])
    sets["head"] = (_variant(first, out / "head", BodyPartExamined="HEAD", SeriesDescription="Phantom head",
                             StudyDescription="Synthetic head"), 1.0)
    sets["twin"] = (_variant(second, out / "twin", study=twin_study), truth[f"pma-{SEED}-1"])
    files = [out / "pma" / n / "CT0001.dcm" for n in truth] + [out / v / "CT0001.dcm" for v in ("kvp60", "head", "twin")]
    return sets, files


@pytest.fixture(scope="module")
def node_with_phantoms(phantoms, tmp_path_factory):
    """A node (shipped PMA/SFA cards and routes) that has received and completed every phantom series."""
    sets, files = phantoms
    over = node_overrides(free_port(), routes_named("pma-single-slice", "sfa-single-slice"),
                          cards={m: REPO_ROOT / "models" / f"{m}.yaml" for m in ("pma", "sfa", "liver", "cac")})
    node = Node(tmp_path_factory.mktemp("node"), over).start()
    try:
        r = storescu(node, files)
        assert r.returncode == 0, r.stdout + r.stderr
        for ds, _ in sets.values():
            s = node.wait_series(str(ds.SeriesInstanceUID), completed, timeout=60)
            assert completed(s), (s, node.log_tail(40))
        yield node, sets
    finally:
        node.kill()


def _export(node, tmp: Path, name: str, rows: list[list], header: list[str], *extra: str, task: str = "pma"):
    labels = tmp / f"{name}.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    out = tmp / name
    r = subprocess.run([str(node_binary()), "dataset", "export", "--config", str(node.config_path), "--task", task,
                        "--labels", str(labels), "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=300)
    return r, out


def test_export_by_series_writes_the_layout_the_trainer_reads(node_with_phantoms, tmp_path):
    node, sets = node_with_phantoms
    names = [f"pma-{SEED}-0", f"pma-{SEED}-1", "unknown", "kvp60", "head", f"pma-{SEED}-2"]
    rows = []
    for n in names:
        if n == "unknown":
            rows.append(["1.2.826.0.1.3680043.99.1", "10.0", "cm2"])
        else:
            ds, v = sets[n]
            rows.append([str(ds.SeriesInstanceUID), repr(v), "" if n.endswith("-1") else "cm2"])
    r, out = _export(node, tmp_path, "export", rows, ["series_instance_uid", "value", "unit"])
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr

    # The report: printed, written, and in dataset.json; every row accounted for, by CSV line.
    report_txt = (out / "export-report.txt").read_text()
    assert report_txt == r.stdout
    dataset = json.loads((out / "dataset.json").read_text())
    rep = dataset["report"]
    assert (rep["rows"], rep["exported"], rep["unmatched"], rep["ambiguous"], rep["not_routed"], rep["refused"],
            rep["failed"]) == (6, 3, 1, 0, 1, 1, 0), rep
    assert rep["refused_by_check"] == {"kvp": 1}
    by_line = {o["line"]: o for o in rep["outcomes"]}
    assert [by_line[l]["outcome"] for l in range(2, 8)] == [
        "exported", "exported", "unmatched", "refused", "not_routed", "exported"]
    assert "no series in the node's index" in by_line[4]["reason"]
    assert by_line[5]["check"] == "kvp" and "60" in by_line[5]["reason"]
    assert "matches no route of task pma" in by_line[6]["reason"], by_line[6]
    # the failed condition's path, not the header values it saw
    assert "match.all[2].any does not hold" in by_line[6]["reason"] and "HEAD" not in report_txt, by_line[6]
    assert [by_line[l].get("case") for l in (2, 3, 7)] == ["c0001", "c0002", "c0003"]
    assert "line 5: refused by the input guard (kvp)" in report_txt
    assert {k: dataset[k] for k in ("format", "task", "unit", "route", "cases")} == {
        "format": "biomarker-node-export/1", "task": "pma", "unit": "cm2", "route": "pma-single-slice", "cases": 3}
    assert dataset["node_version"]

    # labels.csv: relative case folders and the CSV's values.
    exported = [sets[n] for n in (f"pma-{SEED}-0", f"pma-{SEED}-1", f"pma-{SEED}-2")]
    lab = list(csv.DictReader(open(out / "labels.csv")))
    assert [row["series_dir"] for row in lab] == ["cases/c0001", "cases/c0002", "cases/c0003"]
    assert [float(row["value"]) for row in lab] == [v for _, v in exported]

    # Each case is the HU the node's model sees, its candidates and its geometry.
    for i, (ds, _) in enumerate(exported):
        case = out / "cases" / f"c{i + 1:04d}"
        assert sorted(p.name for p in case.iterdir()) == ["candidates.npy", "meta.json", "volume.npy"]
        vol = np.load(case / "volume.npy")
        assert vol.dtype == np.float32 and vol.shape == (1, ds.Rows, ds.Columns)
        hu = _hu(ds)
        assert np.array_equal(vol[0], hu)
        cand = np.load(case / "candidates.npy")
        assert cand.dtype == np.uint8 and cand.shape == vol.shape
        assert np.array_equal(cand[0].astype(bool), (hu >= -29.0) & (hu <= 150.0))  # models/pma.yaml candidates
        meta = json.loads((case / "meta.json").read_text())
        assert meta["pixel_spacing_mm"] == [float(v) for v in ds.PixelSpacing]
        assert meta["slice_thickness_mm"] == float(ds.SliceThickness)
        assert meta["z_mm"] == [float(ds.ImagePositionPatient[2])]
        assert (meta["rows"], meta["cols"]) == (ds.Rows, ds.Columns)

    # The trainer's loader reads each case as the node wrote it, and its own candidate rule (the reference the Rust
    # code reimplements) gives the node's mask.
    sys.path.insert(0, str(TRAINING))
    from biomarker_training import candidates as C, data as D
    from biomarker_training.tasks import get
    for i, (ds, _) in enumerate(exported):
        case = out / "cases" / f"c{i + 1:04d}"
        s = D.load_series(case)
        assert np.array_equal(s.hu, np.load(case / "volume.npy"))
        _, cand, _, _ = C.weight_image(s.hu, get("pma"), s.pixel_area_mm2, s.thickness_mm)
        assert np.array_equal(cand.astype(np.uint8), np.load(case / "candidates.npy"))

    # Nothing in the folder identifies a study, a series, an image or a patient.
    secrets = set()
    for ds, _ in sets.values():
        secrets |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID),
                    str(ds.AccessionNumber), str(ds.PatientName)}
    secrets.add("1.2.826.0.1.3680043.99.1")
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            found = [s for s in secrets if s.encode() in data]
            assert not found, f"{p} holds {found}"
    assert b"PHANTOM" not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())

    # The mapping is beside the folder, owner-only, and names the series.
    mapping = out.parent / "export.mapping.csv"
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    m = list(csv.DictReader(open(mapping)))
    assert [(row["case_id"], row["series_instance_uid"]) for row in m] == [
        (f"c{i + 1:04d}", str(ds.SeriesInstanceUID)) for i, (ds, _) in enumerate(exported)]
    assert all(row["study_instance_uid"] == str(ds.StudyInstanceUID) for row, (ds, _) in zip(m, exported))

    # The trainer reads the export unchanged.
    train_out = tmp_path / "trained"
    env = dict(os.environ, PYTHONPATH=str(TRAINING))
    t = subprocess.run([sys.executable, "-m", "biomarker_training.train", "--task", "pma",
                        "--csv", str(out / "labels.csv"), "--epochs", "1", "--max-steps", "2",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(train_out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    print(t.stdout[-2000:], t.stderr[-2000:])
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
    assert (train_out / "pma.onnx").stat().st_size > 0
    assert "task: pma" in (train_out / "pma.yaml").read_text()


def test_export_by_study_is_ambiguous_where_two_series_route(node_with_phantoms, tmp_path):
    node, sets = node_with_phantoms
    rows = [[str(sets[f"pma-{SEED}-0"][0].StudyInstanceUID), "12.5"],
            [str(sets[f"pma-{SEED}-1"][0].StudyInstanceUID), "20.0"]]
    r, out = _export(node, tmp_path, "by-study", rows, ["study_instance_uid", "value"])
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "dataset.json").read_text())["report"]
    assert (rep["exported"], rep["ambiguous"]) == (1, 1), rep
    amb = [o for o in rep["outcomes"] if o["outcome"] == "ambiguous"][0]
    assert amb["line"] == 3 and amb["reason"].startswith("2 series"), amb


def test_export_by_accession_picks_the_one_series_that_routes(node_with_phantoms, tmp_path):
    """The variants kept the accession numbers of the phantoms they were copied from: phantom 0's accession has the
    HEAD copy beside it (not routed, so phantom 0 is taken); phantom 2's has the KVP 60 copy (it routes: ambiguous,
    as the guard is not what decides which series a value is of)."""
    node, sets = node_with_phantoms
    acc0, acc2 = (str(sets[f"pma-{SEED}-{i}"][0].AccessionNumber) for i in (0, 2))
    assert str(sets["head"][0].AccessionNumber) == acc0 and str(sets["kvp60"][0].AccessionNumber) == acc2
    r, out = _export(node, tmp_path, "by-accession", [[acc0, "12.5"], [acc2, "20.0"]], ["accession_number", "value"])
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "dataset.json").read_text())["report"]
    assert [o["outcome"] for o in rep["outcomes"]] == ["exported", "ambiguous"], rep
    m = list(csv.DictReader(open(out.parent / "by-accession.mapping.csv")))
    assert [(row["key_column"], row["key"], row["series_instance_uid"]) for row in m] == [
        ("accession_number", acc0, str(sets[f"pma-{SEED}-0"][0].SeriesInstanceUID))]


def test_exit_codes_for_a_bad_export(node_with_phantoms, tmp_path):
    node, sets = node_with_phantoms
    uid = str(sets[f"pma-{SEED}-0"][0].SeriesInstanceUID)
    # A unit that is not the task's: exit 4, the line named, nothing written.
    r, out = _export(node, tmp_path, "mm2", [[uid, "4200", "mm2"]], ["series_instance_uid", "value", "unit"])
    assert r.returncode == 4, r.stdout + r.stderr
    assert "line 2: unit `mm2` is not the task's unit `cm2`" in r.stderr and not out.exists()
    # An unusable CSV: 3.
    r, _ = _export(node, tmp_path, "novalue", [[uid, "1"]], ["series_instance_uid", "area"])
    assert r.returncode == 3 and "no `value` column" in r.stderr, r.stderr
    # An unknown task: 5.
    r, _ = _export(node, tmp_path, "task", [[uid, "1"]], ["series_instance_uid", "value"], task="spleen")
    assert r.returncode == 5 and "unknown task `spleen`" in r.stderr, r.stderr
    # Nothing exported: the report, then 1.
    r, _ = _export(node, tmp_path, "none", [["1.2.3.4.5", "1"]], ["series_instance_uid", "value"])
    assert r.returncode == 1 and "unmatched" in r.stdout and "no case was exported" in r.stderr, r.stdout + r.stderr
    # A folder that is not empty: 6.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    r, _ = _export(node, tmp_path, "full", [[uid, "1"]], ["series_instance_uid", "value"])
    assert r.returncode == 6, r.stderr


def test_cac_exports_the_volume_and_agatstons_lesions(tmp_path):
    """CAC (a whole-volume card, candidates = Agatston's lesions): the phantoms' 3 mm slices are exported whole, in
    patient order, and the trainer's own lesion rule gives the node's candidate mask."""
    r = run_tool([str(node_binary()), "phantom", "--task", "cac", "--seed", "4", "--out", str(tmp_path / "ph"),
                  "--count", "2"])
    assert r.returncode == 0, r.stderr
    over = node_overrides(free_port(), routes_named("cac-non-contrast"),
                          cards={m: REPO_ROOT / "models" / f"{m}.yaml" for m in ("pma", "sfa", "liver", "cac")})
    node = Node(tmp_path / "node", over).start()
    try:
        stacks, rows = [], []
        for row in csv.DictReader(open(tmp_path / "ph" / "labels.csv")):
            dss = [pydicom.dcmread(f) for f in sorted((tmp_path / "ph" / row["series_dir"]).glob("*.dcm"))]
            dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
            assert float(dss[0].SliceThickness) == 3.0  # no slabs: the slices are what the model sees
            stacks.append(dss)
            rows.append([str(dss[0].SeriesInstanceUID), row["value"], "Agatston"])
            assert storescu(node, [f for f in (tmp_path / "ph" / row["series_dir"]).glob("*.dcm")]).returncode == 0
        for uid, _, _ in rows:
            assert completed(node.wait_series(uid, completed, timeout=60)), node.log_tail(30)
        r, out = _export(node, tmp_path, "cac", rows, ["series_instance_uid", "value", "unit"], task="cac")
    finally:
        node.kill()
    assert r.returncode == 0, r.stdout + r.stderr
    dataset = json.loads((out / "dataset.json").read_text())
    assert (dataset["unit"], dataset["route"], dataset["cases"]) == ("{Agatston}", "cac-non-contrast", 2)
    sys.path.insert(0, str(TRAINING))
    from biomarker_training import candidates as C, data as D
    from biomarker_training.tasks import get
    for i, dss in enumerate(stacks):
        case = out / "cases" / f"c{i + 1:04d}"
        vol = np.load(case / "volume.npy")
        assert np.array_equal(vol, np.stack([_hu(d) for d in dss]))
        meta = json.loads((case / "meta.json").read_text())
        assert meta["z_mm"] == [float(d.ImagePositionPatient[2]) for d in dss]
        s = D.load_series(case)
        _, cand, _, _ = C.weight_image(s.hu, get("cac"), s.pixel_area_mm2, s.thickness_mm)
        assert cand.any() and np.array_equal(cand.astype(np.uint8), np.load(case / "candidates.npy"))
