"""Candidate masks, Agatston lesions, resampling index maps and the value aggregation (NumPy).

This module is the reference the Rust inference reimplements; keep it free of torch.

Conventions (all shared with Rust, see models/golden/README.md):
* HU arrays are float32 [slices, rows, cols] in patient-sorted slice order.
* Candidate ranges are inclusive: hu_min <= HU <= hu_max.
* CAC components are 2D, 8-connected, per slice; a component is kept iff
  n_pixels * pixel_area_mm2 >= min_area_mm2 (1 mm^2). Its weight comes from its peak HU:
  [130,200) -> 1, [200,300) -> 2, [300,400) -> 3, >= 400 -> 4.
* Model -> native upsampling is nearest with integer index src = (dst * model_n) // native_n
  per axis. Aggregation is linear in the map, so it is computed at model resolution with a
  weight image pooled through that same index map (exactly equal to upsample-then-sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .tasks import TaskSpec

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

RISK_CATEGORIES = ["0", "1-10", "11-100", "101-400", ">400"]


def agatston_weight(peak_hu: float) -> int:
    """Agatston density weight from a lesion's peak HU (lesions start at 130 HU)."""
    if peak_hu < 130:
        return 0
    if peak_hu < 200:
        return 1
    if peak_hu < 300:
        return 2
    if peak_hu < 400:
        return 3
    return 4


def risk_category(score: float) -> str:
    """0 -> "0", (0,10] -> "1-10", (10,100] -> "11-100", (100,400] -> "101-400", > 400 -> ">400"."""
    if score <= 0:
        return "0"
    if score <= 10:
        return "1-10"
    if score <= 100:
        return "11-100"
    if score <= 400:
        return "101-400"
    return ">400"


def risk_index(score: float) -> int:
    return RISK_CATEGORIES.index(risk_category(score))


@dataclass
class Lesion:
    slice: int
    label: int  # label inside that slice's label image (1-based)
    n_pixels: int
    area_mm2: float
    peak_hu: float
    weight: int
    score: float  # area_mm2 * weight * thickness / 3 (the lesion's Agatston contribution at map = 1)


def candidate_mask(hu: np.ndarray, spec: TaskSpec, pixel_area_mm2: float) -> np.ndarray:
    """Boolean candidate mask with the shape of `hu` ([S,R,C])."""
    cand = hu >= spec.hu_min
    if spec.hu_max is not None:
        cand &= hu <= spec.hu_max
    if spec.min_area_mm2 > 0:
        out = np.zeros_like(cand)
        for s in range(cand.shape[0]):
            lab, n = ndimage.label(cand[s], structure=EIGHT_CONNECTED)
            if n == 0:
                continue
            counts = np.bincount(lab.ravel(), minlength=n + 1)
            keep = counts * pixel_area_mm2 >= spec.min_area_mm2
            keep[0] = False
            out[s] = keep[lab]
        cand = out
    return cand


def cac_lesions(hu: np.ndarray, spec: TaskSpec, pixel_area_mm2: float, thickness_mm: float):
    """Lesions (kept components) and a per-slice int32 label image (0 = background)."""
    labels = np.zeros(hu.shape, dtype=np.int32)
    lesions: list[Lesion] = []
    for s in range(hu.shape[0]):
        lab, n = ndimage.label(hu[s] >= spec.hu_min, structure=EIGHT_CONNECTED)
        if n == 0:
            continue
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        peaks = ndimage.maximum(hu[s], lab, index=np.arange(1, n + 1))
        next_label = 1
        for k in range(1, n + 1):
            if counts[k] * pixel_area_mm2 < spec.min_area_mm2:
                continue
            area = float(counts[k] * pixel_area_mm2)
            w = agatston_weight(float(peaks[k - 1]))
            labels[s][lab == k] = next_label
            lesions.append(Lesion(s, next_label, int(counts[k]), area, float(peaks[k - 1]), w,
                                  area * w * thickness_mm / 3.0))
            next_label += 1
    return lesions, labels


def weight_image(hu: np.ndarray, spec: TaskSpec, pixel_area_mm2: float, thickness_mm: float):
    """Per-pixel contribution at map = 1, native resolution: value = sum(map_up * W).

    area tasks: W = cand * pixel_area_mm2 * unit_scale (cm^2).
    agatston:   W = cand * lesion_weight * pixel_area_mm2 * thickness_mm / 3.
    Returns (W float64 [S,R,C], cand bool, lesions or None, labels or None).
    """
    if spec.aggregation == "area":
        cand = candidate_mask(hu, spec, pixel_area_mm2)
        return cand * (pixel_area_mm2 * spec.unit_scale), cand, None, None
    lesions, labels = cac_lesions(hu, spec, pixel_area_mm2, thickness_mm)
    w = np.zeros(hu.shape, dtype=np.float64)
    for les in lesions:
        w[les.slice][labels[les.slice] == les.label] = les.weight * pixel_area_mm2 * thickness_mm / 3.0
    return w, labels > 0, lesions, labels


# --- resampling -------------------------------------------------------------------------------

def area_bins(n_in: int, n_out: int):
    """Adaptive-average-pool bins (PyTorch semantics): [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    starts = (np.arange(n_out) * n_in) // n_out
    ends = -((-(np.arange(n_out) + 1) * n_in) // n_out)
    return starts, ends


def area_resample(img: np.ndarray, out_hw) -> np.ndarray:
    """Area (box) resampling of [..., R, C] to [..., H, W] in float64, torch adaptive_avg_pool2d bins."""
    img = np.asarray(img, dtype=np.float64)
    r, c = img.shape[-2:]
    h, w = out_hw
    rs, re = area_bins(r, h)
    cs, ce = area_bins(c, w)
    # cumulative sums make non-integer ratios (overlapping bins) exact and cheap
    cum = np.zeros(img.shape[:-2] + (r + 1, c + 1))
    cum[..., 1:, 1:] = img.cumsum(-2).cumsum(-1)
    tot = (cum[..., re[:, None], ce[None, :]] - cum[..., rs[:, None], ce[None, :]]
           - cum[..., re[:, None], cs[None, :]] + cum[..., rs[:, None], cs[None, :]])
    return tot / ((re - rs)[:, None] * (ce - cs)[None, :])


def nearest_src(native_n: int, model_n: int) -> np.ndarray:
    """For each native index i, the model index that feeds it: (i * model_n) // native_n."""
    return (np.arange(native_n) * model_n) // native_n


def upsample_nearest(m: np.ndarray, native_hw) -> np.ndarray:
    r = nearest_src(native_hw[0], m.shape[-2])
    c = nearest_src(native_hw[1], m.shape[-1])
    return m[..., r[:, None], c[None, :]]


def pool_to_model(w: np.ndarray, model_hw) -> np.ndarray:
    """Sum a native [..., R, C] image into model cells along the nearest index map (adjoint of upsample)."""
    pr = np.zeros((model_hw[0], w.shape[-2]))
    pr[nearest_src(w.shape[-2], model_hw[0]), np.arange(w.shape[-2])] = 1.0
    pc = np.zeros((model_hw[1], w.shape[-1]))
    pc[nearest_src(w.shape[-1], model_hw[1]), np.arange(w.shape[-1])] = 1.0
    return pr @ np.asarray(w, dtype=np.float64) @ pc.T


def normalise(hu: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """Model input from native HU: clip -> area resample -> (x - subtract) / divide, float32."""
    lo, hi = spec.hu_clip
    x = area_resample(np.clip(hu, lo, hi), spec.size)
    return ((x - spec.scale_subtract) / spec.scale_divide).astype(np.float32)


def aggregate(map_model: np.ndarray, w_model: np.ndarray) -> float:
    """The biomarker: sum over slices and pixels of map * pooled weight (float64)."""
    return float(np.sum(np.asarray(map_model, dtype=np.float64) * w_model))


LESION_THRESHOLD = 0.5


def lesion_means(map_native: np.ndarray, lesions, labels: np.ndarray) -> np.ndarray:
    """Mean of the (native-resolution) map over each lesion, in `lesions` order (float64)."""
    out = np.zeros(len(lesions))
    by_slice: dict = {}
    for i, les in enumerate(lesions):
        by_slice.setdefault(les.slice, []).append(i)
    for s, idx in by_slice.items():
        lab_ids = [lesions[i].label for i in idx]
        out[idx] = ndimage.mean(np.asarray(map_native[s], dtype=np.float64), labels[s], index=lab_ids)
    return out


def agatston_from_map(map_model: np.ndarray, lesions, labels: np.ndarray, native_hw, mode: str) -> float:
    """CAC value from a model-resolution map [S,H,W].

    mode "soft": sum_L mean_map(L) * score(L)   (the trained quantity; equals the pixel sum)
    mode "lesion_threshold": sum_L score(L) * [mean_map(L) >= 0.5]   (shipped: a lesion counts fully or not)
    """
    if not lesions:
        return 0.0
    means = lesion_means(upsample_nearest(map_model, native_hw), lesions, labels)
    scores = np.array([les.score for les in lesions])
    if mode == "soft":
        return float(np.sum(means * scores))
    if mode == "lesion_threshold":
        return float(np.sum(scores[means >= LESION_THRESHOLD]))
    raise ValueError(mode)
