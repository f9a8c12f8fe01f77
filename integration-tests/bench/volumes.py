"""Real-size CT volumes for bench/time_to_result.sh, built from the real scans in ../shared/realct-labelled.

    python3 volumes.py chest300 OUT_DIR SEED   # 300 axial slices, chest (PMA, SFA and CAC routes)
    python3 volumes.py liver150 OUT_DIR SEED   # 150 axial slices, contrast abdomen (liver route)
    python3 volumes.py chest133 OUT_DIR SEED   # the real chest as scanned (2.5 mm), for comparison
    python3 volumes.py chest300nc OUT_DIR SEED # chest300 with its contrast taken out, so CAC is scored, not refused
    python3 volumes.py chest133ncb OUT_DIR SEED # the real chest (2.5 mm), blood de-enhanced, bone and table kept

chest300: LIDC-IDRI-0001 (133 slices of 2.5 mm, shoulders to kidneys) resampled to 300 slices over the same z range
(linear interpolation of HU between neighbouring slices: 1.1 mm apart, SliceThickness 1.1), so the series has the
size of a thin-slice chest CT. Its ContrastBolusAgent ("IV") is removed, so the header no longer says contrast and
the cac-non-contrast route matches; the CAC card's own pixel check still sees the contrast in the aorta.
chest300nc: chest300 with every voxel of 150-600 HU (opacified blood and heart, and some cancellous bone) set to
unenhanced blood (40 HU) before the interpolation, as landmark.rs's finds_the_same_level_without_contrast does: the
CAC card's contrast check passes, so the CAC route runs its whole path (3 mm slabs, heart region, inference, SR) on
a real-size chest. For time only: its Agatston value means nothing (calcium below 600 HU is gone too).
chest133ncb: a calcium-free non-contrast chest as far as one can be made from a contrast scan, for looking at what
the CAC path counts that is not coronary (not for time). The blood pool (the largest 3D component of >= 150 HU after
one erosion, 26-connected: aorta, chambers, pulmonary arteries, the dense SVC inflow) and a 2-pixel partial-volume
rim around it are set to 40 HU + noise; then, within 12 mm of it in-plane (and one slice up and down), every voxel
above 60 HU outside large 3D structures of >= 150 HU (bone: >= 5000 voxels, grown 2 pixels) is too (enhanced
myocardium, contrast-filled coronary arteries). Bone, cancellous and cortical, and the patient table stay as
scanned. Left as scanned and not realistic: enhanced pulmonary vessels in the lungs, liver and spleen (portal
phase), and any real coronary calcium further than 12 mm from the blood pool.
liver150: 3D-IRCADb-01 patient 7, its first 150 slices as they are, with SeriesDescription "LIVER" and
BodyPartExamined "ABDOMEN" added (its headers are sparse and match no route otherwise).
Each call writes new Study/Series/SOP UIDs (from SEED), so repeated runs are new studies. Prints the series UID,
study UID and slice count as JSON. Nothing written here may leave the machine (the scans' licences).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

SHARED = Path(__file__).resolve().parents[3] / "shared" / "realct-labelled"


def uids(seed: str):
    study = generate_uid(entropy_srcs=[sys.argv[1], seed, "study"])
    series = generate_uid(entropy_srcs=[sys.argv[1], seed, "series"])
    return study, series


def read_sorted(folder: Path):
    ds = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    ds.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return ds


def hu_of(d) -> np.ndarray:
    return d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)


def set_hu(d, img: np.ndarray, tmpl) -> None:
    """Store `img` (HU) as d's pixels: signed 16 bit, with tmpl's rescale."""
    stored = np.round((img - float(tmpl.RescaleIntercept)) / float(tmpl.RescaleSlope)).astype(np.int16)
    d.PixelData = stored.tobytes()
    d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 1
    d.RescaleSlope, d.RescaleIntercept = tmpl.RescaleSlope, tmpl.RescaleIntercept


def chest300(out: Path, seed: str, without_contrast: bool = False) -> dict:
    src = read_sorted(SHARED / "chest-lidc0001" / "ct")
    z = np.array([float(d.ImagePositionPatient[2]) for d in src])
    hu = [hu_of(d) for d in src]
    if without_contrast:
        hu = [np.where((h >= 150) & (h < 600), np.float32(40), h) for h in hu]
    n = 300
    zs = np.linspace(z[0], z[-1], n)
    step = float(zs[1] - zs[0])
    study, series = uids(seed)
    tmpl = src[0]
    for i, zi in enumerate(zs):
        k = min(int(np.searchsorted(z, zi, side="right")) - 1, len(z) - 2)
        w = (zi - z[k]) / (z[k + 1] - z[k])
        img = (1 - w) * hu[k] + w * hu[k + 1]
        d = src[k].copy() if hasattr(src[k], "copy") else pydicom.dcmread(src[k].filename)
        set_hu(d, img, tmpl)
        d.ImagePositionPatient = [d.ImagePositionPatient[0], d.ImagePositionPatient[1], f"{zi:.3f}"]
        d.SliceLocation = f"{zi:.3f}"
        d.SliceThickness = f"{step:.3f}"
        if "SpacingBetweenSlices" in d:
            d.SpacingBetweenSlices = f"{step:.3f}"
        if "ContrastBolusAgent" in d:
            del d.ContrastBolusAgent
        write(d, out / f"{i:04d}.dcm", study, series, seed, i)
    return {"study": study, "series": series, "slices": n}


def chest300nc(out: Path, seed: str) -> dict:
    return chest300(out, seed, without_contrast=True)


def chest133(out: Path, seed: str) -> dict:
    """The real chest as it is (2.5 mm), new UIDs, ContrastBolusAgent removed like chest300's."""
    src = read_sorted(SHARED / "chest-lidc0001" / "ct")
    study, series = uids(seed)
    for i, d in enumerate(src):
        if "ContrastBolusAgent" in d:
            del d.ContrastBolusAgent
        write(d, out / f"{i:04d}.dcm", study, series, seed, i)
    return {"study": study, "series": series, "slices": len(src)}


def chest133ncb(out: Path, seed: str) -> dict:
    import scipy.ndimage as ndi

    src = read_sorted(SHARED / "chest-lidc0001" / "ct")
    hu = np.stack([hu_of(d) for d in src])
    rng = np.random.default_rng(int.from_bytes(seed.encode(), "little") % 2**32)
    cube = np.ones((3, 3, 3), bool)
    dense = hu >= 150
    lab, _ = ndi.label(ndi.binary_erosion(dense, structure=cube), structure=cube)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    pool = ndi.binary_dilation(lab == np.argmax(sizes), structure=cube) & dense
    rim = ndi.binary_dilation(pool, structure=np.ones((1, 5, 5), bool)) & (hu > 40)
    out_hu = hu.copy()
    out_hu[rim] = 40 + rng.normal(0, 12, rim.sum()).astype(np.float32)
    near = ndi.binary_dilation(ndi.binary_dilation(pool, structure=np.ones((3, 1, 1), bool)), structure=np.ones((1, 35, 35), bool))
    lab2, _ = ndi.label(out_hu >= 150, structure=cube)
    s2 = np.bincount(lab2.ravel())
    s2[0] = 0
    bone = ndi.binary_dilation(np.isin(lab2, np.nonzero(s2 >= 5000)[0]), structure=np.ones((1, 5, 5), bool))
    soft = near & ~bone & (out_hu > 60)
    out_hu[soft] = 40 + rng.normal(0, 12, soft.sum()).astype(np.float32)
    study, series = uids(seed)
    for i, d in enumerate(src):
        set_hu(d, out_hu[i], d)
        if "ContrastBolusAgent" in d:
            del d.ContrastBolusAgent
        write(d, out / f"{i:04d}.dcm", study, series, seed, i)
    return {"study": study, "series": series, "slices": len(src)}


def liver150(out: Path, seed: str) -> dict:
    src = read_sorted(SHARED / "liver-ircad07" / "ct")[:150]
    study, series = uids(seed)
    for i, d in enumerate(src):
        d.SeriesDescription = "LIVER"
        d.BodyPartExamined = "ABDOMEN"
        write(d, out / f"{i:04d}.dcm", study, series, seed, i)
    return {"study": study, "series": series, "slices": len(src)}


def write(d, path: Path, study: str, series: str, seed: str, i: int) -> None:
    d.StudyInstanceUID, d.SeriesInstanceUID = study, series
    d.SOPInstanceUID = generate_uid(entropy_srcs=[sys.argv[1], seed, "sop", str(i)])
    d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
    d.InstanceNumber = i + 1
    if "FrameOfReferenceUID" in d:
        d.FrameOfReferenceUID = generate_uid(entropy_srcs=[sys.argv[1], seed, "for"])
    d.save_as(path, enforce_file_format=True)


if __name__ == "__main__":
    kind, out, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    kinds = {"chest300": chest300, "chest300nc": chest300nc, "chest133": chest133, "chest133ncb": chest133ncb, "liver150": liver150}
    print(json.dumps(kinds[kind](out, seed)))
