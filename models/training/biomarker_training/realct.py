"""Real-CT evaluation of the shipped ONNX models -> the "Real CT" section of models/EVALUATION.md.

Input: `../shared/realct-labelled` (README there) and, optionally, `../shared/realct`:
- `liver-ircad07`: 151 slices with manual tumour and liver masks (3D-IRCADb-01 patient 7, CC BY-NC-ND 4.0,
  EVALUATION ONLY: never train or tune on it; overlays of it must not be shared, so they go to a folder outside
  the repository). Per slice: tumour area r, MAE and Dice; over the volume: tumour volume in mL.
- `chest-lidc0001`: a whole chest volume without labels. The slice above the aortic arch is chosen by the node
  (`biomarker-node analyze`, the default PMA/SFA routes), because slice selection exists only in Rust; its
  distance to the reference level (src/volume/landmark.rs) is the measured number, PMA/SFA values are shown only.
- `chest-lungmask`: two heart-level slices without labels: PMA/SFA values and overlays only.
- `../shared/realct`: the chest slice (explicit little endian) and the abdomen-siemens-j2k volume (liver map).

Every map is computed here with ONNX Runtime exactly as `evaluate.py` and the node do (candidates from HU, area
resample to the model size, map upsampled by nearest neighbour, value = sum(map * cand) * pixel area); where the
node is called, its value is compared with the Python one (`parity`).

Output: a dict per set (JSON-serialisable), PNG overlays, and the markdown section (`markdown_section`), which
`rewrite_section` puts into an existing EVALUATION.md without touching anything outside its markers.
Failure modes: a missing data folder skips its set with a note in the section (no number is invented); a node
that refuses or fails is recorded with its stderr tail.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import yaml
from scipy import ndimage

from . import candidates as C
from . import data as D
from . import export as E

REPO = Path(__file__).resolve().parents[3]
DICE_THRESHOLD = 0.5  # as the phantom table: map >= 0.5 (native, nearest) AND candidates
SECTION_BEGIN = "<!-- realct:begin -->"
SECTION_END = "<!-- realct:end -->"
CHEST_TOLERANCE_MM = 15.0
TARGETS = {"liver_r": 0.90, "liver_mae_cm2": 2.0, "liver_dice": 0.70, "liver_volume_rel": 0.15,
           "chest_slice_mm": CHEST_TOLERANCE_MM}
LUNGMASK_FILES = ("0.dcm", "1.dcm")
CHEST_SLICE_FILE = "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
ABDOMEN_DIR = "abdomen-siemens-j2k"


# --- metrics (pure, tested on synthetic arrays) ------------------------------------------------

def volume_ml(areas_cm2, spacing_mm: float) -> float:
    """Tumour volume from per-slice areas: sum(area cm2) * slice spacing (cm) = mL."""
    return float(np.sum(np.asarray(areas_cm2, dtype=np.float64)) * spacing_mm / 10.0)


def slab_widths_mm(z_mm) -> np.ndarray:
    """The slab each slice stands for (the node's rule, src/biomarkers/burden.rs): half the gap to each
    neighbour; an end slice counts its one inner half-gap twice, so n slices at spacing d cover n * d."""
    z = np.asarray(z_mm, dtype=np.float64)
    if len(z) < 2:
        return np.zeros(0)
    gaps = np.abs(np.diff(z))
    below = np.concatenate([[gaps[0]], gaps])
    above = np.concatenate([gaps, [gaps[-1]]])
    return (below + above) / 2.0


def volume_ml_slabs(areas_cm2, z_mm) -> float:
    """sum(area_i cm2 * slab_i mm) / 10 = mL; equals volume_ml(areas, spacing) on an evenly spaced stack."""
    a = np.asarray(areas_cm2, dtype=np.float64)
    w = slab_widths_mm(z_mm)
    if len(a) != len(w):
        raise ValueError("a volume needs one area per slice position and at least two slices")
    return float(np.sum(a * w) / 10.0)


def slice_spacing_mm(z_mm) -> float:
    """Median distance between consecutive slice positions (the spacing the volume is integrated with)."""
    z = np.sort(np.asarray(z_mm, dtype=np.float64))
    if len(z) < 2:
        raise ValueError("slice spacing needs at least two slices")
    return float(np.median(np.diff(z)))


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (undefined, left out of means)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    if s == 0:
        return None
    return float(2.0 * np.logical_and(a, b).sum() / s)


def shows_liver(liver: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """Slices [S] that show the liver: liver mask OR tumour mask non-empty.

    In 3D-IRCADb the tumour mask lies beside the liver mask (the liver mask excludes the tumour), and in
    patient 7 the tumour reaches 11 slices (files 37-47) below the lowest slice of the liver mask; those slices
    show liver (tumour) tissue and truth > 0, so leaving them out would hide tumour area from the metrics.
    """
    return liver.reshape(liver.shape[0], -1).any(1) | tumour.reshape(tumour.shape[0], -1).any(1)


def slice_metrics(truth_cm2, pred_cm2, pred_masks, truth_masks) -> dict:
    """Per-slice area r / MAE / bias and Dice (mean over slices where truth or prediction is non-empty),
    plus the pooled Dice over all given slices (one 3D overlap)."""
    y, p = np.asarray(truth_cm2, float), np.asarray(pred_cm2, float)
    d = p - y
    r = float(np.corrcoef(y, p)[0, 1]) if len(y) > 1 and np.std(y) > 0 and np.std(p) > 0 else float("nan")
    dl = [dice(pm, tm) for pm, tm in zip(pred_masks, truth_masks)]
    dl = [v for v in dl if v is not None]
    inter = sum(int(np.logical_and(pm, tm).sum()) for pm, tm in zip(pred_masks, truth_masks))
    tot = sum(int(np.asarray(pm).sum()) + int(np.asarray(tm).sum()) for pm, tm in zip(pred_masks, truth_masks))
    return {"n": int(len(y)), "r": r, "mae": float(np.mean(np.abs(d))), "bias": float(np.mean(d)),
            "dice": float(np.mean(dl)) if dl else None, "dice_n": len(dl),
            "dice_pooled": float(2 * inter / tot) if tot else None,
            "truth_mean": float(np.mean(y)), "pred_mean": float(np.mean(p))}


def ranges(idx) -> str:
    """[37, 38, 39, 45] -> '37-39, 45' (which slices a number is over)."""
    idx = sorted(int(i) for i in idx)
    out, start, prev = [], None, None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(out)


# --- the model, as the node runs it ---------------------------------------------------------------

class Model:
    """One localization model (card + ONNX) run the way the node runs it, on a stack of single slices."""

    def __init__(self, models_dir, task: str):
        card_path = Path(models_dir) / E.card_name(task, "localization")
        onnx_path = Path(models_dir) / E.onnx_name(task, "localization")
        self.card = E.read_card(card_path)
        self.spec = E.spec_from_card(self.card)
        self.sess = E.ort_session(onnx_path)
        self.card_path = card_path
        self.version = str(self.card.get("version", "?"))

    def run(self, hu: np.ndarray, pixel_area_mm2: float, thickness_mm: float = 1.0):
        """(values [S], map_native float32 [S,R,C], cand bool [S,R,C]); each slice is its own case."""
        w, cand, _, _ = C.weight_image(hu, self.spec, pixel_area_mm2, thickness_mm)
        x = C.normalise(hu, self.spec)
        wm = C.pool_to_model(w, self.spec.size)
        maps = []
        for i in range(0, x.shape[0], 32):  # batches bound the memory on the small machine
            maps.append(self.sess.run(None, {"input": x[i:i + 32, None].astype(np.float32)})[0][:, 0])
        m = np.concatenate(maps)
        values = np.sum(m.astype(np.float64) * wm, axis=(1, 2))
        return values, C.upsample_nearest(m, hu.shape[1:]).astype(np.float32), cand


def load_files(paths) -> D.Series:
    """A Series from explicit files, in the given order (single slices or a selected slice)."""
    dss = [pydicom.dcmread(p) for p in paths]
    hu = np.stack([D._slice_hu(d) for d in dss]).astype(np.float32)
    thick = getattr(dss[0], "SliceThickness", None)
    return D.Series(hu, tuple(float(v) for v in dss[0].PixelSpacing),
                    float(thick) if thick else 1.0, [Path(p).name for p in paths], np.arange(len(dss)))


# --- the node -----------------------------------------------------------------------------------

def node_binary(explicit=None) -> Path | None:
    for c in (explicit, os.environ.get("BIOMARKER_NODE_BIN"), REPO / "target" / "release" / "biomarker-node"):
        if c and Path(c).is_file():
            return Path(c)
    return None


def node_config(base_config, models_dir, tmp: Path, routes=None) -> Path:
    """A copy of the node's config with every path absolute, the model cards taken from `models_dir` where it has
    them, the data dir in `tmp`, and (when given) other routes. Written without YAML aliases."""
    base_config = Path(base_config).resolve()
    cfg = yaml.safe_load(base_config.read_text())
    here = base_config.parent
    cfg.setdefault("node", {})["data_dir"] = str(tmp / "data")
    lib = cfg.get("onnxruntime", {}).get("library")
    if lib:
        cfg["onnxruntime"]["library"] = str((here / lib).resolve())
    for task, entry in (cfg.get("models") or {}).items():
        own = Path(models_dir).resolve() / f"{task}.yaml"
        entry["card"] = str(own if own.is_file() else (here / entry["card"]).resolve())
    if routes is not None:
        cfg["routes"] = routes
    for r in cfg.get("routes", []):
        r.pop("send_to", None)  # analyze sends nothing; no destination needed
    cfg.pop("destinations", None)

    class NoAlias(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    path = tmp / "node.yaml"
    path.write_text(yaml.dump(cfg, Dumper=NoAlias, sort_keys=False))
    return path


def analyze(binary: Path, config: Path, paths, out: Path) -> dict:
    """`biomarker-node analyze --config C --out O PATHS`: its JSON lines and the stderr tail."""
    p = subprocess.run([str(binary), "analyze", "--config", str(config), "--out", str(out), *map(str, paths)],
                       capture_output=True, text=True, timeout=600)
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    return {"rc": p.returncode, "lines": lines, "stderr_tail": p.stderr.strip().splitlines()[-5:]}


def lidc_reference_z() -> float:
    """The documented reference level (slice just above the arch) for chest-lidc0001, read from landmark.rs so
    there is one source for it."""
    src = (REPO / "src" / "volume" / "landmark.rs").read_text()
    m = re.search(r"LIDC0001_ABOVE_ARCH_Z_MM\s*:\s*f64\s*=\s*(-?[0-9.]+)", src)
    if not m:
        raise ValueError("LIDC0001_ABOVE_ARCH_Z_MM not found in src/volume/landmark.rs")
    return float(m.group(1))


# --- overlays -----------------------------------------------------------------------------------

def outline(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))


def render(hu: np.ndarray, prob=None, cand=None, truth=None, caption: str = "", level=40.0, width=400.0):
    """RGB uint8: HU in a soft-tissue window, the map inside candidates as a red-yellow wash (opacity = map),
    the thresholded map (>= 0.5 inside candidates) outlined in magenta, and the truth outlined in green."""
    g = np.clip((hu - (level - width / 2)) / width, 0, 1)[..., None] * np.ones(3)
    rgb = g * 255.0
    if prob is not None:
        m = np.clip(np.asarray(prob, np.float64) * np.asarray(cand, bool), 0, 1)[..., None]
        col = np.concatenate([np.full(m.shape, 255.0), 255.0 * m, np.zeros(m.shape)], -1)
        rgb = rgb * (1 - 0.7 * m) + col * 0.7 * m
        rgb[outline((np.asarray(prob) >= DICE_THRESHOLD) & np.asarray(cand, bool))] = (255, 0, 255)
    if truth is not None:
        rgb[outline(truth)] = (0, 255, 0)
    img = rgb.astype(np.uint8)
    if caption:
        from PIL import Image, ImageDraw
        im = Image.fromarray(img)
        ImageDraw.Draw(im).rectangle([0, 0, img.shape[1], 14], fill=(0, 0, 0))
        ImageDraw.Draw(im).text((3, 2), caption, fill=(255, 255, 255))
        img = np.asarray(im)
    return img


def save_png(img: np.ndarray, path: Path) -> str:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    # an adaptive palette keeps the committed PNGs small (~100 kB) with no visible loss at this size
    Image.fromarray(img).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return str(path)


def coronal_with_levels(series: D.Series, z_sorted, lines: dict, path: Path) -> str:
    """A coronal reformat through the middle of the volume (superior up) with horizontal lines at given z."""
    from PIL import Image, ImageDraw
    hu = series.hu[::-1, series.hu.shape[1] // 2 + 20, :]  # a bit posterior of the middle: trachea, arch
    z = np.asarray(z_sorted)[::-1]
    g = (np.clip((hu + 160.0) / 400.0, 0, 1) * 255).astype(np.uint8)
    dz = abs(float(np.median(np.diff(z_sorted))))
    h = int(round(g.shape[0] * dz / series.pixel_spacing[1]))
    im = Image.fromarray(g).convert("RGB").resize((g.shape[1], h), Image.BILINEAR)
    d = ImageDraw.Draw(im)
    for k, (label, (zz, colour)) in enumerate(lines.items()):
        y = (z[0] - zz) / (z[0] - z[-1]) * (h - 1)
        # the reference on the left half, the choices on the right, so equal levels stay readable
        x0, x1 = (0, g.shape[1] // 2) if k == 0 else (g.shape[1] // 2, g.shape[1])
        d.line([x0, y, x1, y], fill=colour, width=2)
        d.text((x0 + 3, y - 13 - 12 * max(k - 1, 0)), label, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, optimize=True)
    return str(path)


# --- the sets -----------------------------------------------------------------------------------

def eval_liver_ircad(folder: Path, models_dir, private_dir: Path, binary=None, base_config=None) -> dict:
    """Per-slice tumour area / Dice over the slices that show the liver, and the whole-volume tumour volume."""
    res = {"set": "liver-ircad07", "task": "liver"}
    model = Model(models_dir, "liver")
    res["model"] = f"{model.card_path} {model.version}"
    s = D.load_series(folder / "ct")
    masks = np.load(folder / "masks.npz")
    # masks are indexed by file number (= name order); Series is sorted along the normal
    tumour = masks["tumour"].astype(bool)[s.file_rank]
    liver = masks["liver"].astype(bool)[s.file_rank]
    with open(folder / "labels.csv", newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    truth = np.array([float(rows[n]["tumour_area_cm2"]) for n in s.files])
    z = np.array([float(rows[n]["z_mm"]) for n in s.files])
    file_no = np.array([int(re.sub(r"\D", "", n)) for n in s.files])
    values, maps, cand = model.run(s.hu, s.pixel_area_mm2, s.thickness_mm)
    pred_masks = (maps >= DICE_THRESHOLD) & cand
    # labels.csv areas are the mask areas; check so a mismatch in ordering cannot pass unnoticed
    mask_area = tumour.reshape(len(s.files), -1).sum(1) * s.pixel_area_mm2 / 100.0
    if not np.allclose(mask_area, truth, atol=1e-3):
        raise ValueError("labels.csv tumour areas do not match masks.npz (slice order?)")
    sel = shows_liver(liver, tumour)
    liver_only = liver.reshape(len(s.files), -1).any(1)
    res["slices"] = {"shows_liver": ranges(file_no[sel]), "liver_mask": ranges(file_no[liver_only]),
                     "tumour": ranges(file_no[truth > 0])}
    res["per_slice"] = slice_metrics(truth[sel], values[sel], pred_masks[sel], tumour[sel])
    res["per_slice_liver_mask"] = slice_metrics(truth[liver_only], values[liver_only], pred_masks[liver_only],
                                                tumour[liver_only])
    spacing = slice_spacing_mm(z)
    # slab rule over the sorted positions, as the node's liver_tumour_volume (= area sum x spacing here)
    res["volume"] = {"spacing_mm": spacing, "n_slices": int(len(values)),
                     "truth_ml": volume_ml_slabs(truth, z),
                     "pred_ml": volume_ml_slabs(values, z),  # every slice, as the node sees the volume
                     "pred_ml_liver_slices": volume_ml_slabs(np.where(sel, values, 0.0), z)}
    v = res["volume"]
    it, ip = int(np.argmax(truth)), int(np.argmax(values))
    res["largest"] = {"truth_cm2": float(truth[it]), "truth_file": s.files[it],
                      "pred_cm2": float(values[ip]), "pred_file": s.files[ip], "pred_at_truth_cm2": float(values[it])}
    v["rel_err"] = (v["pred_ml"] - v["truth_ml"]) / v["truth_ml"]
    # overlays and the per-slice table hold IRCAD-derived data: NOT for sharing (CC BY-NC-ND: no modified
    # copies), so only under private_dir, never in the report or its JSON
    out = private_dir / "liver-ircad07"
    out.mkdir(parents=True, exist_ok=True)
    res["overlays_private"] = str(out)
    with open(out / "per_slice.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["file", "z_mm", "truth_cm2", "pred_cm2", "dice"])
        for i in np.nonzero(sel)[0]:
            dd = dice(pred_masks[i], tumour[i])
            wr.writerow([s.files[i], f"{z[i]:.2f}", f"{truth[i]:.4f}", f"{values[i]:.4f}",
                         "" if dd is None else f"{dd:.4f}"])
    for i in np.nonzero(sel)[0]:
        cap = f"IRCAD07 {s.files[i]} z {z[i]:.1f}: pred {values[i]:.1f} cm2, truth {truth[i]:.1f} cm2 (green)"
        save_png(render(s.hu[i], maps[i], cand[i], tumour[i], cap), out / f"{Path(s.files[i]).stem}.png")
    # the node on the largest-tumour slice as its own series: the Python mirror must give the node's number
    binary = node_binary(binary)
    if binary and base_config:
        i = int(np.argmax(truth))
        route = [{"name": "liver-eval", "model": "liver", "slices": {"mode": "middle"},
                  "match": {"derived": "modality", "equals": "CT"}}]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = node_config(base_config, models_dir, Path(tmp), route)
            a = analyze(binary, cfg, [folder / "ct" / s.files[i]], Path(tmp) / "out")
            node_v = [ln["value"] for ln in a["lines"] if ln.get("model") == "liver"]
            res["parity"] = {"file": s.files[i], "python": float(values[i]),
                             "node": node_v[0] if node_v else None, "node_rc": a["rc"],
                             "node_stderr": a["stderr_tail"] if not node_v else []}
            # the whole volume through the default liver route: a `liver_tumour_volume` line when the node has one
            routes = [r for r in yaml.safe_load(Path(base_config).read_text()).get("routes", [])
                      if r.get("model") == "liver"]
            for r in routes:
                r["match"] = {"derived": "modality", "equals": "CT"}  # IRCAD headers carry no description
            if routes:
                cfg = node_config(base_config, models_dir, Path(tmp), routes)
                a = analyze(binary, cfg, [folder / "ct"], Path(tmp) / "out-volume")
                vol = [ln for ln in a["lines"] if ln.get("biomarker") == "liver_tumour_volume"]
                res["volume"]["node_ml"] = float(vol[0]["value"]) if vol else None
                if vol and vol[0].get("largest_area_cm2") is not None:
                    res["largest"]["node_cm2"] = float(vol[0]["largest_area_cm2"])
                    res["largest"]["node_z_mm"] = vol[0].get("slice_z_mm")
    return res


def _chest_slice_result(models: dict, series: D.Series, name: str, out_dir: Path, public: bool,
                        node_values=None) -> dict:
    r = {"values": {}, "overlays": {}}
    for task, model in models.items():
        v, m, cand = model.run(series.hu, series.pixel_area_mm2, series.thickness_mm)
        r["values"][task] = float(v[0])
        if node_values and task in node_values:
            r.setdefault("parity", {})[task] = {"python": float(v[0]), "node": node_values[task]}
        cap = f"{name} {task} {model.version}: {v[0]:.1f} cm2 (no labels)"
        r["overlays"][task] = save_png(render(series.hu[0], m[0], cand[0], None, cap),
                                       out_dir / f"{name}-{task}.png")
    r["public"] = public
    return r


def eval_chest_lidc(folder: Path, models_dir, tasks, public_dir: Path, binary, base_config) -> dict:
    res = {"set": "chest-lidc0001", "tasks": list(tasks)}
    binary = node_binary(binary)
    if not binary:
        res["error"] = "no biomarker-node binary (slice selection is the node's): set BIOMARKER_NODE_BIN"
        return res
    with tempfile.TemporaryDirectory() as tmp:
        cfg = node_config(base_config, models_dir, Path(tmp))
        a = analyze(binary, cfg, [folder / "ct"], Path(tmp) / "out")
    lines = {ln["model"]: ln for ln in a["lines"] if ln.get("model") in tasks}
    # without timings, so a rerun on the same data rewrites the JSON identically
    res["node"] = {"rc": a["rc"], "lines": [{k: v for k, v in ln.items() if k != "elapsed_ms"}
                                            for ln in lines.values()], "stderr_tail": a["stderr_tail"]}
    ref = lidc_reference_z()
    res["reference_z_mm"] = ref
    if not lines:
        res["error"] = "the node chose no slice: " + " / ".join(a["stderr_tail"])
        return res
    zs = {t: ln.get("slice_z_mm") for t, ln in lines.items()}
    res["chosen"] = {t: {"z_mm": z, "distance_mm": None if z is None else abs(z - ref),
                         "sop_instance_uid": lines[t].get("slice_sop_instance_uid")} for t, z in zs.items()}
    uid = next(iter(lines.values())).get("slice_sop_instance_uid")
    files = sorted((folder / "ct").glob("*.dcm"))
    hdr = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    chosen = [f for f, h in hdr.items() if str(h.SOPInstanceUID) == uid]
    if not chosen:
        res["error"] = f"chosen SOP Instance UID {uid} not in {folder / 'ct'}"
        return res
    res["chosen_file"] = chosen[0].name
    models = {t: Model(models_dir, t) for t in tasks}
    res.update(_chest_slice_result(models, load_files(chosen), "lidc0001", public_dir, True,
                                   {t: ln["value"] for t, ln in lines.items()}))
    vol = D.load_series(folder / "ct")
    z_sorted = sorted(float(h.ImagePositionPatient[2]) for h in hdr.values())
    lv = {f"reference {ref:g}": (ref, (0, 255, 0))}
    for t, z in zs.items():
        if z is not None:
            lv[f"chosen {z:g} ({'/'.join(k for k, zz in zs.items() if zz == z)})"] = (z, (255, 0, 0))
    res["overlays"]["levels"] = coronal_with_levels(vol, z_sorted, lv, public_dir / "lidc0001-levels.png")
    return res


def eval_single_slices(name: str, files, models_dir, tasks, out_dir: Path, public: bool) -> dict:
    res = {"set": name, "tasks": list(tasks), "slices": {}}
    models = {t: Model(models_dir, t) for t in tasks}
    seen = {}
    for f in files:
        label = f"{name}-{Path(f).stem}" if len(files) > 1 else name
        s = load_files([f])
        same = [n for n, hu in seen.items() if hu.shape == s.hu.shape and np.array_equal(hu, s.hu)]
        if same:  # lungmask's 0.dcm and 1.dcm: two instances, one image; say so instead of a second picture
            res["slices"][Path(f).name] = {**res["slices"][same[0]], "identical_to": same[0], "overlays": {}}
            continue
        seen[Path(f).name] = s.hu
        res["slices"][Path(f).name] = _chest_slice_result(models, s, label, out_dir, public)
    return res


def eval_abdomen_liver(folder: Path, models_dir, out_dir: Path) -> dict:
    """The liver map on a real upper-abdomen volume without labels (TotalSegmentator's example, Apache-2.0 /
    data CC BY): values per slice, an overlay of the slice with the largest predicted area."""
    model = Model(models_dir, "liver")
    s = D.load_series(folder)
    values, maps, cand = model.run(s.hu, s.pixel_area_mm2, s.thickness_mm)
    i = int(np.argmax(values))
    cap = f"abdomen-siemens, slice {i}: liver tumour map {values[i]:.1f} cm2 (no labels)"
    return {"set": "abdomen-siemens-j2k", "task": "liver", "n": int(len(values)),
            "values_cm2": [float(v) for v in values], "max_slice": i,
            "overlay": save_png(render(s.hu[i], maps[i], cand[i], None, cap), out_dir / "abdomen-siemens-liver.png")}


def evaluate(labelled: Path, extra: Path | None, models_dir, tasks, public_dir: Path, private_dir: Path,
             binary=None, base_config=None) -> list[dict]:
    """Every real-CT set whose data and model are there; a missing one is recorded, never invented."""
    results = []
    chest_tasks = [t for t in ("pma", "sfa") if t in tasks]

    def missing(name, path):
        results.append({"set": name, "error": f"not found: {path}"})

    if "liver" in tasks:
        d = labelled / "liver-ircad07"
        if d.is_dir():
            results.append(eval_liver_ircad(d, models_dir, private_dir, binary, base_config))
        else:
            missing("liver-ircad07", d)
    if chest_tasks:
        d = labelled / "chest-lidc0001"
        if d.is_dir():
            results.append(eval_chest_lidc(d, models_dir, chest_tasks, public_dir, binary, base_config))
        else:
            missing("chest-lidc0001", d)
        d = labelled / "chest-lungmask"
        if d.is_dir():
            results.append(eval_single_slices("chest-lungmask", [d / f for f in LUNGMASK_FILES], models_dir,
                                              chest_tasks, public_dir, True))
        else:
            missing("chest-lungmask", d)
        if extra is not None:
            f = extra / "chest-slice-encodings" / CHEST_SLICE_FILE
            if f.is_file():
                results.append(eval_single_slices("chest-slice", [f], models_dir, chest_tasks, public_dir, True))
            else:
                missing("chest-slice", f)
    if "liver" in tasks and extra is not None:
        d = extra / ABDOMEN_DIR
        if d.is_dir():
            results.append(eval_abdomen_liver(d, models_dir, public_dir))
        else:
            missing(ABDOMEN_DIR, d)
    return results


# --- the markdown section -----------------------------------------------------------------------

def _f(v, nd=3):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _met(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def _img(path, report_dir: Path, alt: str) -> str:
    return f"![{alt}]({os.path.relpath(path, report_dir)})"


def markdown_section(results: list[dict], command: str, report_dir: Path, private_dir: Path) -> str:
    L = [SECTION_BEGIN, "## Real CT", "",
         "Generated by `python -m biomarker_training.evaluate --realct ...` (models/training, module `realct.py`); "
         "do not edit by hand. Real scans nobody on this project made (`../shared/realct-labelled`, README there; "
         "`../shared/realct`); nothing from them is committed except the overlays marked as committed below. "
         "Maps come from the shipped ONNX models in ONNX Runtime, computed as the node computes them; the chest "
         "slice is chosen by the node itself (`biomarker-node analyze`, default config). Where no labels exist "
         "the value and the picture are shown and no accuracy is claimed.", "",
         "Regenerate (from the repository root, with `PYTHONPATH=models/training` and a built "
         "`target/release/biomarker-node`):", "", "```", command, "```", ""]
    by = {r["set"]: r for r in results}
    rows, targets = [], []
    liv = by.get("liver-ircad07")
    if liv and "per_slice" in liv:
        m, v = liv["per_slice"], liv["volume"]
        ml = liv["per_slice_liver_mask"]
        ok_r, ok_mae, ok_d = m["r"] >= TARGETS["liver_r"], m["mae"] <= TARGETS["liver_mae_cm2"], \
            (m["dice"] or 0) >= TARGETS["liver_dice"]
        ok_v = abs(v["rel_err"]) <= TARGETS["liver_volume_rel"]
        rows += [
            f"| liver-ircad07 (labelled) | liver | per-slice tumour area r, {m['n']} slices showing the liver "
            f"(files {liv['slices']['shows_liver']}) | {_f(m['r'])} | >= {TARGETS['liver_r']} | {_met(ok_r)} |",
            f"| | | per-slice MAE (cm2; mean truth {_f(m['truth_mean'], 1)}, predicted {_f(m['pred_mean'], 1)}) | "
            f"{_f(m['mae'], 2)} | <= {TARGETS['liver_mae_cm2']} | {_met(ok_mae)} |",
            f"| | | Dice@{DICE_THRESHOLD} in candidates, mean over the {m['dice_n']} slices with truth or prediction "
            f"(pooled over the slices: {_f(m['dice_pooled'])}) | {_f(m['dice'])} | >= {TARGETS['liver_dice']} | "
            f"{_met(ok_d)} |",
            f"| | | tumour volume, all {v['n_slices']} slices (mL; manual "
            f"{_f(v['truth_ml'], 1)}, predicted {_f(v['pred_ml'], 1)}, spacing {_f(v['spacing_mm'], 2)} mm) | "
            f"{100 * v['rel_err']:+.1f}% | within 15% | {_met(ok_v)} |",
        ]
        targets += [("liver per-slice r", ok_r), ("liver per-slice MAE", ok_mae), ("liver Dice", ok_d),
                    ("liver tumour volume", ok_v)]
        lg = liv["largest"]
        rows.append(f"| | | largest cross-section (cm2): predicted {_f(lg['pred_cm2'], 1)} on {lg['pred_file']}; "
                    f"manual {_f(lg['truth_cm2'], 1)} on {lg['truth_file']} (predicted there "
                    f"{_f(lg['pred_at_truth_cm2'], 1)}) | {_f(lg['pred_cm2'] - lg['truth_cm2'], 1)} | (supplementary) | |")
        rows.append(f"| | | liver-mask slices only (files {liv['slices']['liver_mask']}, {ml['n']}): r / MAE / Dice | "
                    f"{_f(ml['r'])} / {_f(ml['mae'], 2)} / {_f(ml['dice'])} | (supplementary) | |")
    lidc = by.get("chest-lidc0001")
    if lidc and "chosen" in lidc:
        for t, c in lidc["chosen"].items():
            ok = c["distance_mm"] is not None and c["distance_mm"] <= CHEST_TOLERANCE_MM
            targets.append((f"chest-lidc0001 slice ({t})", ok))
            rows.append(f"| chest-lidc0001 (no labels) | {t} | chosen slice z (mm) vs reference "
                        f"{_f(lidc['reference_z_mm'], 1)} ({lidc['chosen_file']}) | {_f(c['z_mm'], 1)} "
                        f"(distance {_f(c['distance_mm'], 1)} mm) | within {CHEST_TOLERANCE_MM:g} mm | {_met(ok)} |")
        for t, val in lidc.get("values", {}).items():
            rows.append(f"| | {t} | value on the chosen slice (cm2; node / Python) | "
                        f"{_f(lidc['parity'][t]['node'], 2)} / {_f(val, 2)} | no label | shown only |")
    elif lidc:
        rows.append(f"| chest-lidc0001 | pma/sfa | chosen slice | {lidc.get('error', 'n/a')} | within 15 mm | MISSED |")
        targets.append(("chest-lidc0001 slice", False))
    for name in ("chest-lungmask", "chest-slice"):
        r = by.get(name)
        if r and "slices" in r:
            for f, sr in r["slices"].items():
                vals = ", ".join(f"{t} {_f(v, 2)}" for t, v in sr["values"].items())
                dup = f" (pixel data identical to `{sr['identical_to']}`)" if sr.get("identical_to") else ""
                rows.append(f"| {name} (no labels) | {'/'.join(sr['values'])} | value on `{f}`{dup} (cm2) | {vals} | "
                            f"no label | shown only |")
    ab = by.get("abdomen-siemens-j2k")
    if ab and "values_cm2" in ab:
        rows.append(f"| abdomen-siemens-j2k (no labels) | liver | tumour map area, {ab['n']} slices (cm2): max "
                    f"(slice {ab['max_slice']}) / mean | {_f(max(ab['values_cm2']), 2)} / "
                    f"{_f(float(np.mean(ab['values_cm2'])), 2)} | no label | shown only |")
    for r in results:
        if "error" in r and r["set"] != "chest-lidc0001":
            rows.append(f"| {r['set']} | | not evaluated | {r['error']} | | |")
    L += ["| set | task | measure | value | target | |", "|---|---|---|---|---|---|"] + rows + [""]
    if targets:
        L += ["Targets (issue 11, real CT): " + "; ".join(f"{n}: {_met(ok)}" for n, ok in targets) + ".", ""]
    notes = []
    if liv and "per_slice" in liv:
        v = liv["volume"]
        notes.append(
            f"- liver-ircad07 (3D-IRCADb-01 patient 7, contrast CT, EVALUATION ONLY: no model was trained or tuned "
            f"on it): {liv['model']}. Truth: the IRCAD manual tumour mask (`masks.npz`, `labels.csv`). Slices "
            f"\"showing the liver\" = liver mask or tumour mask non-empty: the tumour mask lies beside the liver "
            f"mask (the liver mask excludes it) and in this patient the tumour reaches files "
            f"{liv['slices']['tumour']} while the liver mask covers files {liv['slices']['liver_mask']}; the row "
            f"\"liver-mask slices only\" restricts to the latter. Each slice is its own case, as the node measures "
            f"a single slice (area = sum(map * candidates) * pixel area). Dice: map >= {DICE_THRESHOLD} "
            f"(native, nearest) AND candidates (HU [-20, 200]) vs the tumour mask, as in the phantom table.")
        notes.append(
            f"- Tumour volume = sum over slices of area x the slab each slice stands for (half-way to each "
            f"neighbouring slice position, the node's rule in src/biomarkers/burden.rs; here every slab is the "
            f"{_f(v['spacing_mm'], 2)} mm spacing, so it is area sum x spacing). Predicted over all {v['n_slices']} slices, as the node sees the volume "
            f"({_f(v['pred_ml'], 1)} mL; over the slices showing the liver only: "
            f"{_f(v['pred_ml_liver_slices'], 1)} mL); manual {_f(v['truth_ml'], 1)} mL. "
            + ("The node's own `liver_tumour_volume` line on this volume (default liver route, `match` widened "
               f"to any CT: the IRCAD headers name no body part): {_f(v['node_ml'], 1)} mL." if v.get("node_ml")
               is not None else
               "The node built for this table had no `liver_tumour_volume` line; the Python sum is the same "
               "definition."))
        p = liv.get("parity")
        if p and p["node"] is not None:
            notes.append(f"- Node parity: `biomarker-node analyze` on {p['file']} alone gives "
                         f"{_f(p['node'], 4)} cm2, the Python mirror {_f(p['python'], 4)} cm2.")
        elif p:
            notes.append(f"- Node parity: `biomarker-node analyze` on {p['file']} alone gave no value (exit "
                         f"{p['node_rc']}: {' / '.join(p['node_stderr'])}); the Python mirror gives "
                         f"{_f(p['python'], 4)} cm2.")
        notes.append(f"- liver-ircad07 overlays (one PNG per slice showing the liver; map wash, magenta = map >= "
                     f"{DICE_THRESHOLD} in candidates, green = manual tumour outline) are NOT in the repository: "
                     f"the IRCAD licence (CC BY-NC-ND 4.0) allows no shared modified copies. They are written to "
                     f"`{liv['overlays_private']}` on the machine that ran the evaluation.")
    if lidc and "chosen" in lidc:
        notes.append(
            f"- chest-lidc0001 (LIDC-IDRI-0001, 133 slices of 2.5 mm): the node's default PMA/SFA routes pick the "
            f"slice just above the aortic arch (trachea -> carina -> top of the arch, src/volume/landmark.rs). "
            f"Reference level {_f(lidc['reference_z_mm'], 1)} mm (the slice just above the top of the arch, read by "
            f"eye; `LIDC0001_ABOVE_ARCH_Z_MM` in landmark.rs). Resampled from it, as other reconstructions would "
            f"give the scan: 1.0-1.25 mm slices choose -77.5 to -78.5 mm, 5 mm slabs (pairs of slices averaged) "
            f"-76.25 and -78.75 mm (`landmark::tests::finds_the_level_at_1_to_5_mm_slices`, "
            f"`test_chest_volume.py`). It is the only real chest volume here, and the "
            f"landmark method was developed while looking at it (landmark.rs quotes its box fills), so the distance "
            f"shows the method works on it, not that it generalises; the other chest sets are single slices (no "
            f"selection). No PMA/SFA labels exist for it: values are shown, not scored.")
    notes.append("- chest-lungmask and chest-slice values are the models run directly on those slices (the Python "
                 "mirror, no guard). The node itself refuses them for PMA and SFA (job state `refused`, check "
                 "`level`; src/inference/guard.rs): the lungmask slices are at the heart (no trachea, lungs 131 mm "
                 "apart) and the chest slice is at the larynx (no lungs). They are shown as pictures of what the "
                 "models do far from their level, not as results the node would send.")
    notes.append("- Overlays: soft-tissue window (W 400, L 40); red-yellow wash = map inside candidates (opacity = "
                 "map), magenta = map >= 0.5 in candidates, green = truth outline where a mask exists.")
    L += ["Notes:", ""] + notes + [""]
    pics = []
    if lidc and "overlays" in lidc:
        pics += [_img(lidc["overlays"]["levels"], report_dir, "chest-lidc0001 chosen level (coronal)")]
        pics += [_img(lidc["overlays"][t], report_dir, f"chest-lidc0001 {t}") for t in lidc.get("values", {})]
    for name in ("chest-lungmask", "chest-slice"):
        r = by.get(name)
        if r and "slices" in r:
            for sr in r["slices"].values():
                pics += [_img(p, report_dir, f"{name} {t}") for t, p in sr["overlays"].items()]
    if ab and "overlay" in ab:
        pics.append(_img(ab["overlay"], report_dir, "abdomen-siemens liver"))
    if pics:
        L += ["Committed overlays (licences allow it; attribution below):", ""] + pics + [""]
        L += ["Attribution. chest-lidc0001 overlays are derived from LIDC-IDRI-0001 (map, outlines and lines "
              "added), CC BY 3.0: Armato III SG, McLennan G, Bidaut L, McNitt-Gray MF, Meyer CR, Reeves AP, et al. "
              "(2015). Data From LIDC-IDRI. The Cancer Imaging Archive. http://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX; "
              "Armato SG III et al., The Lung Image Database Consortium (LIDC) and Image Database Resource "
              "Initiative (IDRI): A completed reference database of lung nodules on CT scans, Medical Physics 38: "
              "915-931, 2011; Clark K et al., The Cancer Imaging Archive (TCIA): Maintaining and Operating a Public "
              "Information Repository, J Digit Imaging 26(6): 1045-1057, 2013. chest-lungmask: test data of "
              "github JoHof/lungmask, Apache-2.0. chest-slice: test image of cornerstonejs/cornerstone3D, MIT. "
              "abdomen-siemens: example DICOM of wasserth/TotalSegmentator, Apache-2.0 (data CC BY).", ""]
    L.append(SECTION_END)
    return "\n".join(L) + "\n"


def rewrite_section(md: str, section: str) -> str:
    """Replace the text between the markers; without markers, insert the section after the phantom table's
    "## Targets" list (before the next "## " heading), or append it. Nothing else changes."""
    if SECTION_BEGIN in md and SECTION_END in md:
        a = md.index(SECTION_BEGIN)
        b = md.index(SECTION_END) + len(SECTION_END)
        rest = md[b:]
        if rest.startswith("\n"):
            rest = rest[1:]
        return md[:a] + section + rest
    t = md.find("\n## Targets")
    if t >= 0:
        nxt = md.find("\n## ", t + 1)
        if nxt >= 0:
            return md[:nxt + 1] + section + "\n" + md[nxt + 1:]
    return md.rstrip("\n") + "\n\n" + section
