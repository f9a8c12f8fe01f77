"""CSV + DICOM loading, HU conversion and per-case preparation for training.

Input: a CSV with header `series_dir,value`; `series_dir` is a folder of one DICOM series,
relative to the CSV's folder or absolute. Output: `Case` records holding the model input and the
pooled aggregation weights (see candidates.py), cached as one .npz per (csv, task).

A `series_dir` may also be a case folder of `biomarker-node dataset export` (volume.npy + meta.json):
then the HU are the node's own, exactly the slices the node's model sees (see load_export_case).

Slices are sorted along the slice normal (ImagePositionPatient . (row x col direction cosines)),
HU = stored * RescaleSlope + RescaleIntercept, and stored values equal to PixelPaddingValue are
set to -1024 HU (air) before anything else sees them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pydicom

from . import candidates as C
from .tasks import TaskSpec


@dataclass
class Series:
    hu: np.ndarray  # float32 [S, R, C], slices sorted along the normal
    pixel_spacing: tuple  # (row spacing, column spacing) mm
    thickness_mm: float
    files: list  # file names in sorted (patient) order
    file_rank: np.ndarray  # file_rank[k] = index of sorted slice k in name order (mask.npy order)

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.pixel_spacing[0] * self.pixel_spacing[1])


def read_csv(path) -> list[tuple[Path, float]]:
    path = Path(path)
    rows = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            d = Path(rec["series_dir"])
            if not d.is_absolute():
                d = path.parent / d
            rows.append((d, float(rec["value"])))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _slice_hu(ds) -> np.ndarray:
    raw = ds.pixel_array
    hu = raw.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1.0)) + float(
        getattr(ds, "RescaleIntercept", 0.0))
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is not None:
        hu[raw == pad] = -1024.0
    return hu


def is_export_case(series_dir) -> bool:
    """A case folder written by `biomarker-node dataset export`."""
    d = Path(series_dir)
    return (d / "volume.npy").is_file() and (d / "meta.json").is_file()


def load_export_case(case_dir) -> Series:
    """A case of `biomarker-node dataset export`: volume.npy (float32 HU [S, R, C], patient order, the slices the
    node's model sees after its route's slice selection) and meta.json (pixel_spacing_mm, slice_thickness_mm,
    z_mm, rows, cols). The node already converted to HU, padding included, so nothing is rescaled here."""
    case_dir = Path(case_dir)
    meta = json.loads((case_dir / "meta.json").read_text())
    hu = np.load(case_dir / "volume.npy")
    if hu.ndim != 3:
        raise ValueError(f"{case_dir}: volume.npy has shape {hu.shape}, expected [slices, rows, cols]")
    if (hu.shape[1], hu.shape[2]) != (meta["rows"], meta["cols"]):
        raise ValueError(f"{case_dir}: volume.npy is {hu.shape[1]}x{hu.shape[2]}, meta.json says "
                         f"{meta['rows']}x{meta['cols']}")
    z = meta.get("z_mm") or []
    if z and len(z) != hu.shape[0]:
        raise ValueError(f"{case_dir}: {hu.shape[0]} slices in volume.npy, {len(z)} in meta.json z_mm")
    ps = tuple(float(v) for v in meta["pixel_spacing_mm"])
    n = hu.shape[0]
    return Series(np.ascontiguousarray(hu, dtype=np.float32), ps, float(meta["slice_thickness_mm"]),
                  ["volume.npy"] * n, np.arange(n, dtype=np.int64))


def load_series(series_dir) -> Series:
    series_dir = Path(series_dir)
    if is_export_case(series_dir):
        return load_export_case(series_dir)
    names = sorted(p.name for p in series_dir.iterdir()
                   if p.is_file() and (p.suffix.lower() == ".dcm" or not p.suffix))
    if not names:
        raise ValueError(f"{series_dir}: no DICOM files")
    dss = [pydicom.dcmread(series_dir / n) for n in names]
    if len(dss) > 1:
        iop = np.array(dss[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        pos = np.array([float(np.dot(np.array(d.ImagePositionPatient, dtype=np.float64), normal))
                        for d in dss])
        order = np.argsort(pos, kind="stable")
    else:
        pos = None
        order = np.array([0])
    hu = np.stack([_slice_hu(dss[i]) for i in order]).astype(np.float32)
    ps = tuple(float(v) for v in dss[0].PixelSpacing)
    thick = getattr(dss[0], "SliceThickness", None)
    if thick is not None and float(thick) > 0:
        thickness = float(thick)
    elif pos is not None:
        thickness = float(np.median(np.diff(np.sort(pos))))
    else:
        thickness = 1.0
    return Series(hu, ps, thickness, [names[i] for i in order], order.astype(np.int64))


def load_mask(series_dir, series: Series) -> np.ndarray | None:
    """mask.npy (file-name order) reordered to the sorted slice order, or None if absent."""
    p = Path(series_dir) / "mask.npy"
    if not p.exists():
        return None
    m = np.load(p).astype(bool)
    return m[series.file_rank]


@dataclass
class Case:
    x: np.ndarray  # float32 [S, H, W] model input (S = 1 for single-slice tasks)
    w: np.ndarray  # float32 [S, H, W] pooled aggregation weights
    value: float
    source: str = ""  # series folder, for checks that need native resolution (CAC lesions)


def prepare_series(series: Series, spec: TaskSpec):
    """(x, w_model, w_native, cand, lesions, labels) for one series."""
    hu = series.hu
    if spec.slices == "single":
        if hu.shape[0] != 1:
            raise ValueError(f"task {spec.name} expects one slice, got {hu.shape[0]}")
    w, cand, lesions, labels = C.weight_image(hu, spec, series.pixel_area_mm2, series.thickness_mm)
    x = C.normalise(hu, spec)
    wm = C.pool_to_model(w, spec.size)
    return x, wm, w, cand, lesions, labels


def _prepare_one(args):
    d, value, task, size = args
    from .tasks import get, with_size
    spec = with_size(get(task), size[0]) if tuple(size) != get(task).size else get(task)
    s = load_series(d)
    x, wm, *_ = prepare_series(s, spec)
    return x.astype(np.float16), wm.astype(np.float32), value


def load_cases(csv_path, spec: TaskSpec, cache_dir=None, workers: int = 2) -> list[Case]:
    """Prepare all cases of a CSV, cached in `cache_dir` (default: beside the CSV)."""
    rows = read_csv(csv_path)
    csv_path = Path(csv_path)
    key = hashlib.sha256(json.dumps([str(csv_path.resolve()), os.path.getmtime(csv_path), spec.name,
                                     list(spec.size), list(spec.hu_clip), spec.scale_subtract,
                                     spec.scale_divide, "v1"]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir) if cache_dir else csv_path.parent
    cache = cache_dir / f".bmcache-{spec.name}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:  # each z[...] access re-reads the array: read each once
            x, w, v, off = z["x"], z["w"], z["v"], z["offsets"]
        return [Case(x[off[i]:off[i + 1]].astype(np.float32), w[off[i]:off[i + 1]], float(v[i]), str(rows[i][0]))
                for i in range(len(off) - 1)]
    jobs = [(str(d), v, spec.name, tuple(spec.size)) for d, v in rows]
    if workers > 1 and len(jobs) > 8:
        with Pool(workers) as pool:
            out = pool.map(_prepare_one, jobs, chunksize=8)
    else:
        out = [_prepare_one(j) for j in jobs]
    offsets = np.cumsum([0] + [o[0].shape[0] for o in out])
    try:
        np.savez(cache, x=np.concatenate([o[0] for o in out]), w=np.concatenate([o[1] for o in out]),
                 v=np.array([o[2] for o in out]), offsets=offsets)
    except OSError:
        pass  # read-only data folder: just don't cache
    return [Case(o[0].astype(np.float32), o[1], float(o[2]), str(d)) for o, (d, _) in zip(out, rows)]
