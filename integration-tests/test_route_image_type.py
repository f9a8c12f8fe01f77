"""The default routes take axial CT by geometry and SOP class, whatever ImageType says about derivation.

Real archives hold axial CT labelled DERIVED\\PRIMARY\\MPR, DERIVED\\SECONDARY\\AXIAL or
ORIGINAL\\SECONDARY\\AXIAL (3 mm axials reconstructed from thin data, lossy copies). The shipped
config/node.yaml must route them exactly as it routes ORIGINAL\\PRIMARY\\AXIAL, while localizers,
secondary captures and non-axial (coronal) reformats stay out, with the reason. Checked with the
dry run `biomarker-node route --json` on a real chest slice from shared/realct rewritten with pydicom
(into tmp_path only) and on the real localizers and secondary captures there (SOURCES.md).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from nodeharness import REPO_ROOT, node_binary, run_tool

CONFIG = REPO_ROOT / "config" / "node.yaml"
# dicom-rs opens this encoding as shipped (SOURCES.md: the others' file meta is refused).
CHEST = "chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm"
ORIGINAL = "ORIGINAL\\PRIMARY\\AXIAL"
DERIVATIONS = ["DERIVED\\PRIMARY\\MPR", "DERIVED\\SECONDARY\\AXIAL", "ORIGINAL\\SECONDARY\\AXIAL"]
AXIAL_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL_IOP = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]


def _series(src: Path, out: Path, image_type: str, slices: int = 1, thickness: float | None = None,
            iop: list[float] = AXIAL_IOP) -> str:
    """Write `slices` copies of `src` as one new series under `out`: the given ImageType and
    orientation, positions stepped by `thickness` along the plane normal. Returns the series UID."""
    base = pydicom.dcmread(src)
    # SourceApplicationEntityTitle is over AE's 16 bytes in some of these files; dicom-rs refuses it.
    if "SourceApplicationEntityTitle" in base.file_meta:
        del base.file_meta.SourceApplicationEntityTitle
    series_uid = generate_uid()
    out.mkdir(parents=True)
    row, col = iop[:3], iop[3:]
    normal = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]]
    step = thickness if thickness is not None else float(base.SliceThickness)
    for i in range(slices):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = image_type.split("\\")
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [float(p) + i * step * n for p, n in zip(base.ImagePositionPatient, normal)]
        ds.InstanceNumber = i + 1
        if thickness is not None:
            ds.SliceThickness = thickness
        if "SliceLocation" in ds:
            del ds.SliceLocation
        ds.save_as(out / f"{i:03d}.dcm", enforce_file_format=True)
    return series_uid


def _route(*paths: Path) -> dict[str, dict[str, dict]]:
    """`route --json` with the shipped config: series UID -> route name -> JSON line."""
    r = run_tool([str(node_binary()), "route", "--json", "--config", str(CONFIG), *map(str, paths)])
    assert r.returncode == 0, f"route exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    by: dict[str, dict[str, dict]] = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            j = json.loads(line)
            by.setdefault(j["series_instance_uid"], {})[j["route"]] = j
    assert by, f"route printed no series:\n{r.stdout}\n{r.stderr}"
    return by


def _matched(lines: dict[str, dict]) -> set[str]:
    return {name for name, j in lines.items() if j["matched"]}


def test_axial_ct_is_routed_whatever_its_image_type_says_about_derivation(realct, binary, tmp_path):
    src = realct / CHEST
    shapes = {
        # The real chest slice as a single-image series (PMA/SFA's shape).
        "single": dict(slices=1),
        # 24 copies at 3 mm: the CAC route's shape (non-contrast volume).
        "volume": dict(slices=24, thickness=3.0),
    }
    for shape, kw in shapes.items():
        uids = {it: _series(src, tmp_path / shape / f"it{k}", it, **kw)
                for k, it in enumerate([ORIGINAL, *DERIVATIONS])}
        routed = _route(tmp_path / shape)
        assert set(routed) == set(uids.values()), routed
        want = _matched(routed[uids[ORIGINAL]])
        assert want, f"{shape}: the original axial series matched no default route: {routed[uids[ORIGINAL]]}"
        if shape == "single":
            assert "pma" in {routed[uids[ORIGINAL]][r]["job"]["model"] for r in want}, want
        else:
            assert "cac-non-contrast" in want, routed[uids[ORIGINAL]]["cac-non-contrast"]
        for it in DERIVATIONS:
            lines = routed[uids[it]]
            got = _matched(lines)
            print(f"{shape} {it}: {sorted(got)}")
            assert got == want, (
                f"{shape} labelled {it}: matched {sorted(got)}, as ORIGINAL\\PRIMARY\\AXIAL {sorted(want)}; "
                + "; ".join(f"{r}: {j.get('failed_at')}: {j.get('reason')}" for r, j in lines.items() if not j["matched"]))


def test_localizers_and_secondary_captures_take_no_default_route(realct, binary):
    localizer = realct / "head-philips" / "S1000"
    sc = realct / "head-philips" / "S4010"
    for folder, why in [(localizer, "LOCALIZER"), (sc, "Secondary Capture Image Storage")]:
        routed = _route(folder)
        assert len(routed) == 1, f"{folder}: {list(routed)}"
        (lines,) = routed.values()
        assert lines, folder
        for name, j in lines.items():
            print(f"{folder.name} / {name}: {j.get('failed_at')}: {j.get('reason')}")
            assert not j["matched"], f"{folder.name} matched default route {name}"
            assert why in j["reason"], f"{folder.name} / {name}: reason {j['reason']!r} does not name {why}"


def test_projections_and_maps_take_no_default_route(realct, binary, tmp_path):
    """An axial MIP/MinIP slab or a perfusion map is not one slice's HU: no model may read it."""
    src = realct / CHEST
    kinds = ["DERIVED\\SECONDARY\\AXIAL\\MIP", "DERIVED\\SECONDARY\\AXIAL\\MINIP",
             "DERIVED\\PRIMARY\\PERFUSION\\RCBF"]
    for k, it in enumerate(kinds):
        _series(src, tmp_path / f"it{k}", it)
    routed = _route(tmp_path)
    assert len(routed) == len(kinds), routed
    for uid, lines in routed.items():
        for name, j in lines.items():
            assert not j["matched"], f"{uid} matched default route {name}"
            assert "ImageType" in j["reason"], (name, j)


def test_coronal_reformat_takes_no_default_route(realct, binary, tmp_path):
    src = realct / CHEST
    for shape, kw in {"single": dict(slices=1), "volume": dict(slices=24, thickness=3.0)}.items():
        for k, it in enumerate([ORIGINAL, "DERIVED\\SECONDARY\\MPR"]):
            _series(src, tmp_path / shape / f"it{k}", it, iop=CORONAL_IOP, **kw)
        routed = _route(tmp_path / shape)
        assert len(routed) == 2, routed
        for uid, lines in routed.items():
            for name, j in lines.items():
                assert not j["matched"], f"coronal {shape} matched default route {name}"
                assert j["reason"] == "axial = false does not equal true", (shape, name, j)
