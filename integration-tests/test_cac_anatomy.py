"""CAC on a real chest CT never counts bone or the aorta: the anatomical exclusion (src/volume/heart.rs).

Data: `../shared/realct-labelled/chest-lidc0001/ct` (LIDC-IDRI-0001, CC BY 3.0: 133 axial slices of 2.5 mm,
z -340..-10 mm, with IV contrast). It is never copied into the repository. With contrast the aorta's lumen is
~390 HU and every vessel and chamber is >= 130 HU, so every contrast-filled structure, the spine, the ribs and
the sternum are Agatston "lesions": a stress test. The default CAC route refuses contrast; a permissive site
config (one CAC route for any axial CT) makes `analyze` score it anyway.

Before the exclusion the node counted 953 lesions here, 48662 Agatston (the phantom-trained map is high over
the spine and the contrast pool). The checks below are independent of the node's own anatomy code: they
find, in Python, what a counted lesion must never be, and read the counted lesions from the SEG the node
writes (it holds exactly the counted lesions' pixels):
- part of a >= 130 HU structure of >= 2 cm2 in its slice (vertebra, sternum, ribs joined to the spine, the
  contrast-filled aorta and heart chambers);
- in a slice above the carina (about z -115 mm here; the arch top is -80 mm: test_chest_volume.py);
- lateral of the lungs in its slice (the lateral chest wall and its ribs, outside the body), or in a slice
  without lungs (abdomen);
and the score falls by more than 80% (measured: 48662 -> 2429 Agatston, 953 -> 58 lesions before the chest-wall
step of heart.rs; 387.7, 21 lesions with it). What still counts here is contrast-filled small vessels in the
mediastinum and hila (a contrast scan is no CAC scan; the default route refuses it) and a few cartilage fragments:
see "Known gaps" in src/volume/heart.rs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from cards import without_guard
from ci_no_skip import require_dir
from nodeharness import REALCT, REPO_ROOT

CHEST = REALCT.parent / "realct-labelled" / "chest-lidc0001" / "ct"
CONFIG = REPO_ROOT / "config" / "node.yaml"
# Measured with the node before the exclusion (commit 06ebcad): 48662 Agatston, 953 lesions.
SCORE_WITHOUT_EXCLUSION = 48662.0
CARINA_Z_MM = -115.0
LARGE_STRUCTURE_CM2 = 2.0


@pytest.fixture(scope="module")
def chest() -> Path:
    return require_dir(CHEST, "real chest CT")


def _permissive_config(tmp: Path) -> Path:
    """config/node.yaml with one CAC route for any axial CT and absolute paths. The CAC card is a site copy
    without the input guard: the shipped card refuses this contrast-enhanced chest (contrast check), and the
    test is about which calcium the anatomy lets count, on exactly such a stress case."""
    text = CONFIG.read_text()
    text = text.replace("../models/cac.yaml", str(without_guard("cac", tmp / "cards")))
    text = text.replace("../models/", f"{REPO_ROOT}/models/").replace("../ort/", f"{REPO_ROOT}/ort/")
    head = text[: text.index("\nroutes:")]
    routes = """
routes:
  - name: cac-permissive
    model: cac
    send_to: [pacs]
    match:
      all:
        - { derived: modality, equals: CT }
        - { derived: axial, equals: true }
"""
    p = tmp / "permissive.yaml"
    p.write_text(head + routes)
    return p


def _volume(chest: Path):
    ds = [pydicom.dcmread(f) for f in chest.glob("*.dcm")]
    ds.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    return hu, ds


def test_no_counted_lesion_is_bone_aorta_or_outside_the_chest(chest, binary, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([str(binary), "analyze", "--config", str(_permissive_config(tmp_path)), "--out", str(out),
                        str(chest)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1 and lines[0]["model"] == "cac", r.stdout
    line = lines[0]
    print(f"lidc0001 CAC with exclusion: {line['value']:.1f} Agatston, {line['lesions']} counted lesions, "
          f"excluded {line.get('lesions_excluded')} (without: {SCORE_WITHOUT_EXCLUSION:.0f}, 953 lesions)")
    excluded = line.get("lesions_excluded") or {}
    # The structures that must go are there and were excluded for their reasons.
    for reason in ("above_arch", "bone", "outside_mediastinum"):
        assert excluded.get(reason, 0) > 0, excluded
    assert line["value"] < 0.2 * SCORE_WITHOUT_EXCLUSION, line

    hu, ds = _volume(chest)
    z = np.array([float(d.ImagePositionPatient[2]) for d in ds])
    uid_index = {str(d.SOPInstanceUID): i for i, d in enumerate(ds)}
    px_cm2 = float(ds[0].PixelSpacing[0]) * float(ds[0].PixelSpacing[1]) / 100.0

    counted, segs = _counted(out, hu.shape, uid_index)
    assert counted.any() == (line["lesions"] > 0), (line, len(segs))

    structure = np.ones((3, 3), dtype=bool)
    lung_lo = hu < -400
    for s in np.unique(np.nonzero(counted)[0]):
        where = f"slice z {z[s]:.1f} mm"
        assert z[s] <= CARINA_Z_MM + 5.0, f"counted lesion above the carina, {where}"
        lab, n = ndimage.label(hu[s] >= 130, structure=structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_cm2
        hit = np.unique(lab[counted[s]])
        large = [int(l) for l in hit if l > 0 and sizes[l] >= LARGE_STRUCTURE_CM2]
        assert not large, f"counted pixels in a >= {LARGE_STRUCTURE_CM2} cm2 bone/contrast structure, {where}"
        lungs, _ = ndimage.label(lung_lo[s] & ~_touches_border(lung_lo[s]))
        rows, cols = np.nonzero(lungs)
        cr, cc = np.nonzero(counted[s])
        assert rows.size, f"counted in a slice without lungs, {where}"
        assert cols.min() <= cc.min() and cc.max() <= cols.max(), f"counted lateral of the lungs, {where}"


def _counted(out: Path, shape, uid_index: dict) -> tuple[np.ndarray, list]:
    """The counted lesions' pixels, from the SEGs the node wrote under `out` (it holds exactly those)."""
    segs = [p for p in out.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    counted = np.zeros(shape, dtype=bool)
    for p in segs:
        seg = pydicom.dcmread(p)
        frames = seg.pixel_array.reshape(-1, *shape[1:]).astype(bool)
        for f, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence):
            src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            counted[uid_index[str(src)]] |= f
    return counted, segs


# chest133ncb (below) scored 5448.5 Agatston, 109 lesions, before the chest-wall step (heart.rs step 8; commit
# c6aba2e): almost all of it the sternum and calcified costal cartilage, within ~30 mm of the skin.
NCB_SCORE_BEFORE_CHEST_WALL = 5448.5
# The anterior chest wall here: skin to the back of the sternum and cartilages is 20-35 mm; the heart's front lies
# deeper than 30 mm (measured on this scan by hand, not by the node).
CHEST_WALL_DEPTH_MM = 30.0


def test_a_calcium_free_non_contrast_chest_is_scored_without_its_chest_wall(chest, binary, tmp_path):
    """The bench's `chest133ncb` (integration-tests/bench/volumes.py): chest-lidc0001 with its blood pool
    de-enhanced and its bone, cartilage and table kept, the nearest to a calcium-free non-contrast chest that can be
    made here. The default config must score it (the patient table is not opacified blood), and the sternum and
    costal cartilage must not count: the counted pixels within CHEST_WALL_DEPTH_MM of the anterior skin (found here
    from HU, not by the node's code) fall from most of the score to a few fragments. Measured: 5448.5 -> 309.4
    Agatston, 109 -> 25 lesions; counted pixels within 30 mm of the skin 13 mm2, deeper 143 mm2. What still counts
    is mostly enhanced hilar vessels the proxy leaves as scanned, and cartilage with a thin fat plane behind it
    (see heart.rs step 8)."""
    vol = tmp_path / "ncb"
    subprocess.run([sys.executable, str(REPO_ROOT / "integration-tests" / "bench" / "volumes.py"), "chest133ncb",
                    str(vol), "test"], check=True, capture_output=True, timeout=600)
    text = CONFIG.read_text().replace("../models/", f"{REPO_ROOT}/models/").replace("../ort/", f"{REPO_ROOT}/ort/")
    config = tmp_path / "node.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    r = subprocess.run([str(binary), "analyze", "--config", str(config), "--out", str(out), str(vol)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    cac = [l for l in lines if l.get("model") == "cac"]
    assert len(cac) == 1, (r.stdout, r.stderr[-2000:])
    line = cac[0]
    print(f"chest133ncb CAC: {line.get('value')} Agatston, {line.get('lesions')} lesions, "
          f"excluded {line.get('lesions_excluded')} (before the chest-wall step: {NCB_SCORE_BEFORE_CHEST_WALL})")
    assert line["route"] == "cac-non-contrast" and isinstance(line.get("value"), float), line
    assert line["lesions_excluded"].get("chest_wall", 0) > 0, line
    assert line["value"] < 0.1 * NCB_SCORE_BEFORE_CHEST_WALL, line

    ds = [pydicom.dcmread(f) for f in vol.glob("*.dcm")]
    ds.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    counted, _ = _counted(out / line["series_instance_uid"] / line["route"], hu.shape, {str(d.SOPInstanceUID): i for i, d in enumerate(ds)})
    assert counted.any()
    dy = float(ds[0].PixelSpacing[0])
    assert [float(v) for v in ds[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0], "row index grows posterior"
    px_mm2 = dy * float(ds[0].PixelSpacing[1])
    # Depth below the anterior skin along each column: rows below the first body (> -300 HU) row.
    body = hu > -300
    skin = np.argmax(body, axis=1)  # [slice, col]
    rows = np.arange(hu.shape[1])[None, :, None]
    depth_mm = (rows - skin[:, None, :]) * dy
    wall_mm2 = float((counted & (depth_mm < CHEST_WALL_DEPTH_MM)).sum()) * px_mm2
    deep_mm2 = float((counted & (depth_mm >= CHEST_WALL_DEPTH_MM)).sum()) * px_mm2
    print(f"counted within {CHEST_WALL_DEPTH_MM} mm of the skin: {wall_mm2:.0f} mm2, deeper: {deep_mm2:.0f} mm2")
    # Before the step: nearly all of ~2500 mm2 counted lay there.
    assert wall_mm2 < 0.25 * deep_mm2 + 50.0, (wall_mm2, deep_mm2)


def _touches_border(mask: np.ndarray) -> np.ndarray:
    """The parts of `mask` connected to the image border (the air outside the body)."""
    lab, _ = ndimage.label(mask)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return np.isin(lab, edge[edge > 0])
