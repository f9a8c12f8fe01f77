"""ONNX export (opset 17, dynamic batch), ONNX Runtime parity check, and the model card.

Localization graph: input "input" float32 [N,1,H,W] -> "map" float32 [N,1,H,W] in [0,1].
Direct graph:       input "input" float32 [N,1,H,W] -> "value" float32 [N,1] (CAC: [1,1], the
                    batch axis is the slices of one volume).
Candidates, upsampling and aggregation stay outside the graph (Rust implements them from the card).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from . import candidates as C
from .tasks import TaskSpec, get, with_size

OPSET = 17
PARITY_RTOL = 1e-3


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_name(task: str, method: str) -> str:
    return f"{task}.onnx" if method == "localization" else f"{task}-direct.onnx"


def card_name(task: str, method: str) -> str:
    return f"{task}.yaml" if method == "localization" else f"{task}-direct.yaml"


def model_dir(out, method: str) -> Path:
    """Shipped localization models live in models/, baselines in models/baseline/."""
    return Path(out) if method == "localization" else Path(out) / "baseline"


def export_onnx(net, method: str, spec: TaskSpec, path) -> None:
    net = net.eval().cpu()
    out_name = "map" if method == "localization" else "value"
    dummy = torch.zeros(2, 1, *spec.size)
    torch.onnx.export(net, dummy, str(path), opset_version=OPSET, dynamo=False,
                      input_names=["input"], output_names=[out_name],
                      dynamic_axes={"input": {0: "batch"}, out_name: {0: "batch"}})


def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def biomarker_from_output(method: str, out: np.ndarray, w_model: np.ndarray) -> float:
    if method == "localization":
        return C.aggregate(out[:, 0], w_model)
    return float(np.asarray(out).reshape(-1)[0])


def parity_check(net, method: str, sess, cases, n: int = 4, spec=None) -> list[dict]:
    """Biomarker from ONNX Runtime == from PyTorch within PARITY_RTOL (relative) on up to n cases."""
    rows = []
    for c in cases[:n]:
        x = c.x[:, None].astype(np.float32)
        with torch.no_grad():
            t = net(torch.from_numpy(x)).numpy()
        o = sess.run(None, {"input": x})[0]
        vt = biomarker_from_output(method, t, c.w)
        vo = biomarker_from_output(method, o, c.w)
        if method == "localization" and spec is not None and spec.aggregation == "agatston" and c.source:
            # the shipped CAC value is per-lesion thresholded (candidates.agatston_from_map). The soft sum is
            # dominated by bone candidates times near-zero map values, where float32 conv differences between
            # runtimes reach ~1e-3 relative, so it is not the parity quantity.
            from . import data as D
            s = D.load_series(c.source)
            _, _, _, _, lesions, labels = D.prepare_series(s, spec)
            vt = C.agatston_from_map(t[:, 0], lesions, labels, s.hu.shape[1:], "lesion_threshold")
            vo = C.agatston_from_map(o[:, 0], lesions, labels, s.hu.shape[1:], "lesion_threshold")
        tol = PARITY_RTOL * max(abs(vt), 1e-2)
        rows.append({"torch": vt, "ort": vo, "ok": abs(vt - vo) <= tol})
        if abs(vt - vo) > tol:
            raise AssertionError(f"ONNX Runtime biomarker {vo} != PyTorch {vt} (rtol {PARITY_RTOL})")
    return rows


def card_dict(spec: TaskSpec, method: str, onnx_file: str, digest: str, widths, training: dict,
              metrics: dict, version: str, contrast=()) -> dict:
    agg = {
        "kind": spec.aggregation if method == "localization" else "direct",
        "unit_scale": spec.unit_scale,
        "upsample": "nearest: native index i reads model index (i * model_n) // native_n, per axis",
        "formula": ("value = sum(up(map) * cand) * pixel_area_mm2 * unit_scale" if spec.aggregation == "area"
                    else "value = sum over lesions L of [mean(up(map) over L) >= lesion_threshold] * area_mm2(L) "
                         "* weight(L) * slice_thickness_mm / 3"),
        "map_threshold": None,
    }
    if spec.aggregation == "agatston":
        agg.update({
            "lesion_aggregation": "lesion_threshold",
            "lesion_threshold": C.LESION_THRESHOLD,
            "lesion_aggregation_note": ("shipped value = sum over lesions of score(L) * [mean(up(map) over L) >= "
                                        "lesion_threshold], score(L) = area_mm2 * weight * thickness/3. Training "
                                        "used the soft sum, sum_L mean_map(L) * score(L) (linear in the map, equal "
                                        "to the pixel sum); evaluation reports both. Thresholding per lesion makes "
                                        "a zero score exactly zero and the risk category insensitive to soft maps."),
            "weights": {"130": 1, "200": 2, "300": 3, "400": 4},
            "thickness_scaling": "slice_thickness_mm / 3",
            "risk_categories": {"0": "score == 0", "1-10": "(0,10]", "11-100": "(10,100]",
                                "101-400": "(100,400]", ">400": "> 400"},
        })
    if method == "direct":
        agg = {"kind": "direct", "unit_scale": 1.0,
               "formula": "value = ONNX output 'value' (no candidates, no map)"}
    card = {
        "name": f"biomarker-{spec.name}-{method}",
        "version": version,
        "task": spec.name,
        "method": method,
        "onnx": onnx_file,
        "sha256": digest,
        "opset": OPSET,
        "architecture": {"kind": "unet2d" if method == "localization" else "encoder_gap_linear",
                         "widths": list(widths),
                         "coord_channels": "2 constant channels (y, x) linspace(-1,1) appended inside the graph",
                         **({"contrast_channels": {
                             "box_sizes": list(contrast),
                             "formula": "4 * (x - mean of x over a k x k box, padding not counted), per box size k, "
                                        "appended inside the graph after the coordinate channels"}}
                            if contrast else {})},
        "input": {
            "layout": "NCHW", "size": list(spec.size), "dtype": "float32",
            "input_name": "input", "output_name": "map" if method == "localization" else "value",
            "resample": "area",
            "resample_detail": ("box average over bins [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)) per axis "
                                "(torch adaptive_avg_pool2d), in float64"),
            "order": "hu -> clip(hu_clip) -> area resample -> (x - subtract) / divide",
            "hu_clip": list(spec.hu_clip),
            "scale": {"subtract": spec.scale_subtract, "divide": spec.scale_divide},
            "slices": spec.slices,
            "batch": ("slices of one volume (dynamic)" if spec.slices == "all" else "dynamic"),
            "padding_value_hu": -1024,
        },
        "candidates": {"hu_min": spec.hu_min, "hu_max": spec.hu_max, "min_area_mm2": spec.min_area_mm2,
                       "connectivity": 8, "per_slice": True, "inclusive": True},
        "aggregation": agg,
        "biomarker": {
            "concept": spec.concept.as_dict(),
            "unit": {"ucum": spec.unit_ucum, "meaning": spec.unit_meaning},
            "finding_site": spec.finding_site.as_dict(),
        },
        **({"validated_input": spec.validated_input} if spec.validated_input else {}),
        **({"validated_output": spec.validated_output} if spec.validated_output else {}),
        **({"segmentation": spec.segmentation} if spec.segmentation else {}),
        "training": training,
        "metrics": metrics,
        "notes": list(spec.notes),
    }
    return card


def export_and_card(net, method: str, spec: TaskSpec, out, val_cases, widths, training: dict,
                    val_metrics: dict, version: str, contrast=()):
    d = model_dir(out, method)
    d.mkdir(parents=True, exist_ok=True)
    onnx_path = d / onnx_name(spec.name, method)
    export_onnx(net, method, spec, onnx_path)
    sess = ort_session(onnx_path)
    torch.save(net.state_dict(), d / f".{onnx_path.stem}.pt")  # kept out of git; survives a failed check
    rows = parity_check(net, method, sess, val_cases, spec=spec)
    print(f"[export] ONNX Runtime parity ok on {len(rows)} cases: "
          + ", ".join(f"{r['torch']:.4f}/{r['ort']:.4f}" for r in rows), flush=True)
    metrics = {"validation": val_metrics, "heldout": None}
    card_path = d / card_name(spec.name, method)
    if card_path.exists():  # keep held-out metrics from a previous evaluate if present
        old = yaml.safe_load(card_path.read_text()) or {}
        metrics["heldout"] = None if old.get("sha256") != sha256(onnx_path) else old.get("metrics", {}).get("heldout")
    card = card_dict(spec, method, onnx_path.name, sha256(onnx_path), widths, training, metrics, version,
                     contrast)
    write_card(card_path, card)
    return onnx_path, card_path


def write_card(path, card: dict) -> None:
    Path(path).write_text("# Model card read by biomarker-node's Rust inference. Generated by "
                          "models/training (biomarker_training); do not edit numbers by hand.\n"
                          + yaml.safe_dump(card, sort_keys=False, width=110))


def read_card(path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def spec_from_card(card: dict) -> TaskSpec:
    spec = get(card["task"])
    size = tuple(card["input"]["size"])
    return with_size(spec, size[0]) if size != spec.size else spec
