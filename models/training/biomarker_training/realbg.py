"""Synthetic liver tumours inserted into real CT backgrounds: liver training data closer to real CT.

The phantom generator draws its own anatomy; on real CT the liver model under-measures (issue 11, part 5). Here the
anatomy, parenchyma texture, noise and kernel are real, and only the tumours are synthetic, so their area is known.

Input: real axial CT slices that show the liver (read in place; never copied into the repository).
Output: the training layout of `biomarker-node phantom` and `synth.py`: OUT/<background>-<seed>-<k>/CT0001.dcm
(one slice, HU stored with intercept -1024, the background's pixel spacing), mask.npy (uint8 [1, R, C], the
inserted tumour, alpha >= 0.5, used only for Dice on validation), truth.json, and OUT/labels.csv
(`series_dir,value`, value = inserted tumour area in cm2). Deterministic for a given --seed and background list.

Backgrounds (all read from ../shared; the attribution travels with the code and the model card):
- `lidc`: LIDC-IDRI-0001 (the lower slices of `realct-labelled/chest-lidc0001/ct`, GE LightSpeed Plus, contrast,
  0.703 mm, 2.5 mm). CC BY 3.0. Armato III SG et al. (2015) Data From LIDC-IDRI. The Cancer Imaging Archive.
  doi:10.7937/K9/TCIA.2015.LO9QL9SX; Armato SG III et al., Med Phys 38:915-931, 2011; Clark K et al., TCIA, J Digit
  Imaging 26(6):1045-1057, 2013. Via github drivendataorg/concept-to-clinic, tests/assets/LIDC-IDRI-0001/.
- `ge`: `realct/abdomen-ge-3slice` (GE LightSpeed Ultra CT colonography, non-contrast, 3 slices), from
  QIICR/dcmqi via robyoung/dicom-test-files, BSD-3-Clause.
- `siemens`: `realct/abdomen-siemens-j2k` (Siemens Biograph40 mCT, CT Body 3.0, Br38f, 20 slices of 3 mm), from
  wasserth/TotalSegmentator tests/reference_files/example_ct_dicom/, Apache-2.0 (data CC-BY).
`liver-ircad07` is an evaluation set and is never a background.

Liver region (a documented HU heuristic, not a segmentation; `liver_region`): body = largest component of
HU > -400 with holes filled; HU smoothed (Gaussian, sigma 2 mm); soft tissue = smoothed HU in [20, 200] inside the
body eroded by 12 mm (drops the abdominal wall); morphological opening with a 5 mm disk cuts thin bridges to
neighbouring organs; of the components whose centroid lies on the patient's right (low columns for an image row
direction of +x), the largest is the seed; the liver is then the pixels whose smoothed HU is within 30 HU of the
seed's median, opened again (5 mm), the component that overlaps the seed most, holes filled. A background slice is
used when that region is >= 40 cm2 (below the diaphragm, the right upper quadrant is liver-dominated; `--show`
writes a PNG montage of the regions to check by eye).

Tumours (`insert_tumours`): 0-4 per slice (P = 0.2, 0.3, 0.25, 0.15, 0.1), diameter uniform 5-80 mm, a smooth
irregular outline (radius modulated by harmonics 2-5, aspect 0.6-1, random rotation), soft edge (logistic, 0.3-1.5
mm), centre inside the region, clipped to the region. Inside, the low-frequency background (Gaussian 1.5 mm) is
replaced by (local liver HU - delta), delta uniform 15-90 HU, plus a smooth heterogeneity field (0-12 HU); the
background's own high-frequency texture (HU minus its 1.5 mm Gaussian) is kept, so noise and kernel stay real.
20 % get a rim 15-45 HU brighter than the core. Tumour HU never goes below 0 (the liver candidates start at -20).
`--large P` draws a tumour's diameter from 80-150 mm with probability P, and `--confluent P` makes a tumour, with
probability P, a confluent mass: 2-5 overlapping nodules of 40-75 % of its diameter around its centre, with one
attenuation and a lobulated outline (metastases of 8-15 cm and merging nodules are common in clinical liver CT; the
default 5-80 mm single nodules seldom reach the liver model's larger contrast box, 21 model pixels or about 65 mm,
beyond which a lesion's centre no longer differs from its surroundings in that channel). Both default to 0, which
draws exactly the cases made before the options existed. No shipped model is trained with them yet (the liver
candidates of stop 31 in EVALUATION_NOTES.md were).
Augmentation before insertion: left-right flip (p 0.25, `--flip`; 0 for validation sets), rotation +-10 degrees, isotropic scale 0.85-1.15, shift
+-20 px (affine on HU and region together); after insertion: Gaussian blur 0-0.8 px (p 0.5, softer kernels), added
correlated noise 0-12 HU (p 0.6), global HU offset +-8.

    python -m biomarker_training.realbg --out DIR --backgrounds lidc,ge --count 1800 --seed 11
    python -m biomarker_training.realbg --out DIR --backgrounds lidc,ge --count 1200 --seed 13 --large 0.25 --confluent 0.3
    python -m biomarker_training.realbg --show /tmp/regions.png --backgrounds lidc,ge,siemens
"""

from __future__ import annotations

import argparse
import csv
import json
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy import ndimage as ndi

from . import data as D
from .synth import write_slice

SHARED = Path(__file__).resolve().parents[4] / "shared"  # <repo>/../shared, as the tests find it

BACKGROUNDS = {
    "lidc": "realct-labelled/chest-lidc0001/ct",
    "ge": "realct/abdomen-ge-3slice",
    "siemens": "realct/abdomen-siemens-j2k",
}
MIN_LIVER_CM2 = 40.0


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def _largest(m: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def liver_region(hu: np.ndarray, spacing: float, right_is_low_column: bool = True) -> np.ndarray:
    """Boolean liver region of one slice by the HU heuristic in the module header (empty if none found)."""
    body = ndi.binary_fill_holes(_largest(hu > -400))
    sm = ndi.gaussian_filter(hu.astype(np.float32), 2.0 / spacing)
    inner = ndi.binary_erosion(body, structure=_disk(max(1, round(12 / spacing))))
    soft = (sm >= 20) & (sm <= 200) & inner
    k5 = _disk(max(1, round(5 / spacing)))
    soft = ndi.binary_opening(soft, structure=k5)
    lab, n = ndi.label(soft)
    if n == 0:
        return np.zeros_like(body)
    cols = np.nonzero(body.any(0))[0]
    cx = (cols[0] + cols[-1]) / 2
    idx = np.arange(1, n + 1)
    sizes = ndi.sum(soft, lab, index=idx)
    cents = ndi.center_of_mass(soft, lab, idx)
    best, best_size = 0, 0
    for i, (sz, c) in enumerate(zip(sizes, cents)):
        right = c[1] < cx if right_is_low_column else c[1] > cx
        if right and sz > best_size:
            best, best_size = i + 1, sz
    if best == 0:
        return np.zeros_like(body)
    seed = lab == best
    med = float(np.median(sm[seed]))
    grown = (np.abs(sm - med) <= 30) & inner
    grown = ndi.binary_opening(grown, structure=k5)
    lab2, n2 = ndi.label(grown)
    if n2 == 0:
        return seed
    ov = ndi.sum(seed, lab2, index=np.arange(1, n2 + 1))
    return ndi.binary_fill_holes(lab2 == (1 + int(np.argmax(ov))))


def load_backgrounds(names, shared: Path = SHARED):
    """[(name, slice index, hu [R,C] float32, spacing mm, region bool)] for every slice with a liver region."""
    out = []
    for name in names:
        d = shared / BACKGROUNDS[name]
        s = D.load_series(d)
        ds = pydicom.dcmread(d / s.files[0], stop_before_pixels=True)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        right_low = iop[0] > 0  # row direction +x (towards the patient's left): the patient's right is column 0
        sp = float(s.pixel_spacing[1])
        for k in range(s.hu.shape[0]):
            reg = liver_region(s.hu[k], sp, right_low)
            if reg.sum() * s.pixel_area_mm2 / 100 >= MIN_LIVER_CM2:
                out.append((name, k, s.hu[k].astype(np.float32), sp, reg))
    return out


def _augment_geometry(hu, reg, rng, flip_p=0.25):
    n0, n1 = hu.shape
    ang = np.deg2rad(rng.uniform(-10, 10))
    sc = rng.uniform(0.85, 1.15)
    flip = rng.random() < flip_p
    sh = rng.uniform(-20, 20, size=2)
    c, s = np.cos(ang), np.sin(ang)
    # output -> input mapping: in = A @ out + off
    a = np.array([[c, -s], [s, c]]) / sc
    if flip:
        a = a @ np.array([[1, 0], [0, -1]])
    ctr = np.array([(n0 - 1) / 2, (n1 - 1) / 2])
    off = ctr - a @ (ctr + sh)
    hu2 = ndi.affine_transform(hu, a, offset=off, order=1, cval=-1024.0, mode="constant")
    reg2 = ndi.affine_transform(reg.astype(np.float32), a, offset=off, order=1, cval=0.0) >= 0.5
    return hu2.astype(np.float32), reg2


def _smooth_field(shape, rng, sigma_px):
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return f / (f.std() + 1e-6)


def insert_tumours(hu, reg, spacing, rng, n_tumours, large_p=0.0, confluent_p=0.0):
    """(new hu, tumour mask bool, tumour records). Tumours are clipped to `reg`.

    `large_p`: probability that a tumour's diameter is drawn from 80-150 mm instead of 5-80 mm. `confluent_p`:
    probability that a tumour is a confluent mass, 2-5 overlapping nodules of 40-75 % of its diameter around its
    centre, sharing one attenuation (a lobulated outline, as merging metastases have). Both 0 (the default) draw
    exactly the cases of liver 0.4.0's data: no random number is drawn for them then."""
    n0, n1 = hu.shape
    low = ndi.gaussian_filter(hu, 1.5 / spacing)
    hf = hu - low
    out = hu.copy()
    alpha_all = np.zeros_like(hu)
    recs = []
    inside = np.argwhere(ndi.binary_erosion(reg, iterations=3)) if reg.sum() > 50 else np.argwhere(reg)
    if len(inside) == 0:
        return out, alpha_all >= 0.5, recs
    yy, xx = np.mgrid[0:n0, 0:n1].astype(np.float32)
    for _ in range(n_tumours):
        cy, cx = inside[rng.integers(len(inside))]
        large = large_p > 0 and rng.random() < large_p
        diam = rng.uniform(80, 150) if large else rng.uniform(5, 80)
        confluent = confluent_p > 0 and rng.random() < confluent_p
        if confluent:
            # nodule centres within half the mass's radius of its centre
            parts = []
            for _ in range(int(rng.integers(2, 6))):
                ang, off = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5) * diam / 2 / spacing
                parts.append((cy + off * np.sin(ang), cx + off * np.cos(ang), diam * rng.uniform(0.4, 0.75)))
        else:
            parts = [(cy, cx, diam)]
        # d: signed distance (px) to the outline; for a confluent mass the nearest nodule's, so the union's
        d = None
        for py, px, pd in parts:
            r0 = pd / 2 / spacing
            aspect = rng.uniform(0.6, 1.0)
            rot = rng.uniform(0, np.pi)
            dy, dx = yy - py, xx - px
            u = dx * np.cos(rot) + dy * np.sin(rot)
            v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
            rho = np.hypot(u, v)
            th = np.arctan2(v, u)
            rad = np.ones_like(th)
            for k in range(2, 6):
                rad += rng.uniform(0, 0.25 / k) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
            dp = rho - r0 * rad
            d = dp if d is None else np.minimum(d, dp)
        edge = rng.uniform(0.3, 1.5) / spacing
        alpha = 1 / (1 + np.exp(np.clip(d / edge, -30, 30)))
        alpha = (alpha * reg).astype(np.float32)
        if alpha.max() < 0.5:
            continue
        near = reg & (np.hypot(yy - cy, xx - cx) <= 50 / spacing)
        liver_hu = float(np.median(low[near])) if near.any() else float(np.median(low[reg]))
        delta = rng.uniform(15, 90)
        core = liver_hu - delta + rng.uniform(0, 12) * _smooth_field(hu.shape, rng, rng.uniform(3, 6) / spacing)
        rim = None
        if rng.random() < 0.2 and diam / 2 > 6:
            rim = rng.uniform(15, 45)
            w = rng.uniform(1.5, 3.0) / spacing
            ring = np.exp(-((d + w) / w) ** 2)
            core = core + rim * ring
        core = np.maximum(core, 0.0)
        out = out * (1 - alpha) + alpha * (core + hf)
        alpha_all = np.maximum(alpha_all, alpha)
        recs.append({"centre_px": [int(cy), int(cx)], "diameter_mm": round(diam, 2), "delta_hu": round(delta, 1),
                     "liver_hu": round(liver_hu, 1), "rim_hu": None if rim is None else round(rim, 1),
                     "nodules": len(parts)})
    return out.astype(np.float32), alpha_all >= 0.5, recs


def make_case(bg, rng, flip_p=0.25, large_p=0.0, confluent_p=0.0):
    """One augmented slice: (hu, mask, spacing, truth dict)."""
    name, k, hu, sp, reg = bg
    hu, reg = _augment_geometry(hu, reg, rng, flip_p)
    n = int(rng.choice(5, p=[0.2, 0.3, 0.25, 0.15, 0.1]))
    hu, mask, recs = insert_tumours(hu, reg, sp, rng, n, large_p, confluent_p)
    if rng.random() < 0.5:
        hu = ndi.gaussian_filter(hu, rng.uniform(0, 0.8))
    if rng.random() < 0.6:
        hu = hu + rng.uniform(0, 12) * _smooth_field(hu.shape, rng, 0.7)
    hu = hu + rng.uniform(-8, 8)
    value = float(mask.sum() * sp * sp / 100)
    truth = {"background": name, "background_slice": int(k), "value": value, "unit": "cm2",
             "liver_region_cm2": round(float(reg.sum() * sp * sp / 100), 2), "tumours": recs}
    return hu, mask, sp, truth


_BGS = None
_FLIP = 0.25
_SHAPES = (0.0, 0.0)


def _init(names, shared, flip_p=0.25, large_p=0.0, confluent_p=0.0):
    global _BGS, _FLIP, _SHAPES
    _BGS = load_backgrounds(names, Path(shared))
    _FLIP = flip_p
    _SHAPES = (large_p, confluent_p)


def _one(args):
    out, seed, i = args
    rng = np.random.default_rng([seed, i])
    bg = _BGS[int(rng.integers(len(_BGS)))]
    name = f"{bg[0]}-{seed}-{i}"
    d = Path(out) / name
    if (d / "truth.json").exists():  # made by an interrupted run: the same (seed, i) gives the same case
        return name, float(json.loads((d / "truth.json").read_text())["value"])
    hu, mask, sp, truth = make_case(bg, rng, _FLIP, *_SHAPES)
    d.mkdir(parents=True, exist_ok=True)
    uid_rng = f"2.25.{int(rng.integers(1, 2**62))}{i:06d}"
    write_slice(d / "CT0001.dcm", hu, sp, 0.0, 2.5, generate_uid(prefix=None, entropy_srcs=[uid_rng, "st"]),
                generate_uid(prefix=None, entropy_srcs=[uid_rng, "se"]), 1)
    np.save(d / "mask.npy", mask[None].astype(np.uint8))
    truth.update({"seed": seed, "index": i})
    (d / "truth.json").write_text(json.dumps(truth, indent=1))
    return name, truth["value"]


def show(names, path, shared=SHARED):
    from PIL import Image
    bgs = load_backgrounds(names, Path(shared))
    tiles = []
    for name, k, hu, sp, reg in bgs:
        g = (np.clip((hu + 140) / 400, 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([g, g, g], -1)
        edge = reg & ~ndi.binary_erosion(reg, iterations=2)
        rgb[edge] = [255, 0, 0]
        tiles.append(np.array(Image.fromarray(rgb).resize((192, 192))))
    cols = 8
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
    Image.fromarray(np.vstack(rows)).save(path)
    print(f"[realbg] {len(bgs)} background slices: " + ", ".join(f"{n}:{k}" for n, k, *_ in bgs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backgrounds", default="lidc,ge", help="comma separated: " + ",".join(BACKGROUNDS))
    p.add_argument("--shared", default=str(SHARED), help="the ../shared folder")
    p.add_argument("--out")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flip", type=float, default=0.25,
                   help="probability of a left-right flip (0 for a validation set: real scans are not mirrored)")
    p.add_argument("--large", type=float, default=0.0,
                   help="probability that a tumour is 80-150 mm across instead of 5-80 mm")
    p.add_argument("--confluent", type=float, default=0.0,
                   help="probability that a tumour is a confluent mass of 2-5 nodules")
    p.add_argument("--show", help="write a PNG montage of the liver regions instead of data")
    a = p.parse_args(argv)
    names = [n for n in a.backgrounds.split(",") if n]
    if a.show:
        show(names, a.show, Path(a.shared))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), a.seed, i) for i in range(a.count)]
    with Pool(a.workers, initializer=_init, initargs=(names, a.shared, a.flip, a.large, a.confluent)) as pool:
        res = pool.map(_one, jobs, chunksize=16)
    with open(out / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["series_dir", "value"])
        for name, v in res:
            wr.writerow([name, repr(v)])
    vals = np.array([v for _, v in res])
    print(f"[realbg] {len(res)} slices -> {out}; value mean {vals.mean():.2f} cm2, zero {np.mean(vals == 0):.2f}, "
          f"max {vals.max():.1f}")


if __name__ == "__main__":
    main()
