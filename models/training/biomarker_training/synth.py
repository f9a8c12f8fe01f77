"""Tiny synthetic DICOM phantoms (pydicom) for tests and CI when the Rust generator is absent.

Writes the same layout as `biomarker-node phantom`: OUT/<task>-<seed>-<k>/CT0001.dcm..., truth.json,
mask.npy (uint8 [slices, rows, cols], file order) and OUT/labels.csv (series_dir,value). The
anatomy is deliberately crude: a target structure plus a distractor of the same HU, so that the
candidate heuristic alone over-counts and the map has something to learn.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from . import candidates as C
from .tasks import get


def write_slice(path, hu2d: np.ndarray, spacing: float, z: float, thickness: float, study: str,
                series: str, number: int, padding: bool = False) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.PatientID = "SYNTH"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = hu2d.shape
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    raw = np.clip(np.round(hu2d) + 1024, 0, 65535).astype(np.uint16)
    if padding:  # outside the scan circle: padding value, read back as air
        ds.PixelPaddingValue = 0
    ds.PixelData = raw.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _ellipse(n, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:n, 0:n]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def phantom(task: str, rng: np.random.Generator, n: int = 64, slices: int = 6):
    """(hu [S,n,n] float32, mask bool, spacing, thickness)."""
    spacing = float(rng.uniform(0.6, 0.9)) * 512 / n
    thickness = float(rng.uniform(2.5, 3.0))
    s = slices if task == "cac" else 1
    hu = np.full((s, n, n), -1000.0)
    body = _ellipse(n, n / 2, n / 2, n * 0.42, n * 0.47)
    hu[:, body] = -100.0
    mask = np.zeros((s, n, n), dtype=bool)
    if task == "pma":
        tgt = _ellipse(n, n * 0.22, n * rng.uniform(0.3, 0.45), n * rng.uniform(0.04, 0.12), n * rng.uniform(0.1, 0.2))
        dis = _ellipse(n, n * 0.65, n * 0.5, n * rng.uniform(0.05, 0.15), n * rng.uniform(0.1, 0.25))
        hu[0][tgt | dis] = 45.0
        mask[0] = tgt
    elif task == "sfa":
        inner = _ellipse(n, n / 2, n / 2, n * rng.uniform(0.25, 0.38), n * rng.uniform(0.3, 0.43))
        hu[0][inner] = 45.0
        vis = _ellipse(n, n * 0.55, n * 0.5, n * rng.uniform(0.05, 0.15), n * rng.uniform(0.05, 0.2))
        hu[0][vis & inner] = -100.0
        mask[0] = body & ~inner
    elif task == "liver":
        hu[0][body] = 40.0  # soft tissue body, candidate HU too
        liver = _ellipse(n, n * 0.45, n * 0.35, n * 0.22, n * 0.2)
        hu[0][liver] = 110.0
        tum = _ellipse(n, n * 0.45 + rng.uniform(-3, 3), n * 0.35 + rng.uniform(-3, 3),
                       n * rng.uniform(0.03, 0.12), n * rng.uniform(0.03, 0.12))
        hu[0][tum & liver] = -10.0 + 0 * tum[0, 0]
        hu[0][~body] = -1000.0
        hu[0][body & ~liver] = -100.0
        hu[0][_ellipse(n, n * 0.6, n * 0.7, n * 0.08, n * 0.08)] = -10.0  # distractor: fluid blob
        mask[0] = tum & liver
    elif task == "cac":
        heart = _ellipse(n, n * 0.45, n * 0.5, n * 0.2, n * 0.22)
        spine = _ellipse(n, n * 0.8, n * 0.5, n * 0.06, n * 0.06)
        for k in range(s):
            hu[k][heart] = 40.0
            hu[k][spine] = 500.0
        for _ in range(rng.integers(0, 4)):
            k = rng.integers(0, s)
            cy, cx = n * 0.45 + rng.uniform(-0.12, 0.12) * n, n * 0.5 + rng.uniform(-0.12, 0.12) * n
            r = rng.uniform(1.0, 2.5)
            blob = _ellipse(n, cy, cx, r, r)
            hu[k][blob] = rng.uniform(150, 700)
            mask[k] |= blob
    hu += rng.normal(0, 5, hu.shape)
    spec = get(task)
    cand = C.candidate_mask(hu, spec, spacing * spacing)
    mask &= cand
    if task == "pma":
        # the target region may not touch a distractor of the same HU: only mask pixels count
        pass
    return hu.astype(np.float32), mask, spacing, thickness


def truth_value(task: str, hu, mask, spacing, thickness):
    spec = get(task)
    w, cand, lesions, labels = C.weight_image(hu, spec, spacing * spacing, thickness)
    if spec.aggregation == "area":
        return float((w * mask).sum())
    # a lesion counts if it overlaps the truth mask
    total = 0.0
    for les in lesions:
        if mask[les.slice][labels[les.slice] == les.label].any():
            total += les.score
    return total


def generate(task: str, seed: int, out, count: int, n: int = 64, slices: int = 6) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        rng = np.random.default_rng([seed, k])
        hu, mask, spacing, thick = phantom(task, rng, n, slices)
        name = f"{task}-{seed}-{k}"
        d = out / name
        d.mkdir(exist_ok=True)
        study, series = generate_uid(), generate_uid()
        for i in range(hu.shape[0]):
            write_slice(d / f"CT{i + 1:04d}.dcm", hu[i], spacing, i * thick, thick, study, series, i + 1)
        value = truth_value(task, hu, mask, spacing, thick)
        truth = {"task": task, "value": value, "unit": get(task).unit_ucum,
                 "pixel_spacing_mm": [spacing, spacing], "slice_thickness_mm": thick, "source": "synth.py"}
        if task == "cac":
            truth["risk_category"] = C.risk_category(value)
        (d / "truth.json").write_text(json.dumps(truth))
        np.save(d / "mask.npy", mask.astype(np.uint8))
        rows.append((name, value))
    with open(out / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["series_dir", "value"])
        wr.writerows(rows)
    return out / "labels.csv"


def main(argv=None):
    p = argparse.ArgumentParser(description="write tiny synthetic DICOM phantoms")
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    print(generate(a.task, a.seed, a.out, a.count, a.size))


if __name__ == "__main__":
    main()
