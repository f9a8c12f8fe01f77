"""Golden parity set for the Rust inference: models/golden/<task>/<case>/.

    python -m biomarker_training.golden --models models/ --out models/golden \
        --set pma=/work/data-phantoms/test/pma/labels.csv --set sfa=... --set cac=... --set liver=...

Per case: the DICOM files (copied), hu.npy (native HU [S,R,C], patient-sorted slices, int16 when
every HU is an integer else float32), input.npy (float32 [S,1,H,W], the ONNX input), candidates.npy
(uint8 [S,R,C] native), map.npy (float32 [S,1,H,W], ONNX Runtime output) and value.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from . import candidates as C
from . import data as D
from . import export as E


def make_case(task: str, series_dir, value_truth: float, models_dir, out_dir) -> dict:
    cpath = E.model_dir(models_dir, "localization") / E.card_name(task, "localization")
    card = E.read_card(cpath)
    spec = E.spec_from_card(card)
    sess = E.ort_session(Path(cpath).parent / card["onnx"])
    s = D.load_series(series_dir)
    x, wm, w, cand, lesions, labels = D.prepare_series(s, spec)
    out = sess.run(None, {"input": x[:, None]})[0]
    value = E.biomarker_from_output("localization", out, wm)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "dicom").mkdir(parents=True)
    for name in s.files:
        shutil.copy2(Path(series_dir) / name, out_dir / "dicom" / name)
    hu = s.hu
    np.save(out_dir / "hu.npy", hu.astype(np.int16) if np.all(hu == np.round(hu)) and np.abs(hu).max() < 32767 else hu)
    np.save(out_dir / "input.npy", x[:, None].astype(np.float32))
    np.save(out_dir / "candidates.npy", cand.astype(np.uint8))
    np.save(out_dir / "map.npy", out.astype(np.float32))
    doc = {"task": task, "model": card["onnx"], "sha256": card["sha256"], "value": value,
           "unit": spec.unit_ucum, "truth_value": value_truth,
           "pixel_spacing_mm": list(s.pixel_spacing), "slice_thickness_mm": s.thickness_mm,
           "pixel_area_mm2": s.pixel_area_mm2, "files_sorted": s.files,
           "n_candidates": int(cand.sum())}
    if spec.aggregation == "agatston":
        up = C.upsample_nearest(out[:, 0].astype(np.float64), s.hu.shape[1:])
        doc["value_soft_sum"] = value
        value = C.agatston_from_map(out[:, 0], lesions, labels, s.hu.shape[1:], "lesion_threshold")
        doc["value"] = value
        doc["lesion_threshold"] = C.LESION_THRESHOLD
        doc["risk_category"] = C.risk_category(value)
        doc["lesions"] = []
        for les in lesions:
            sel = labels[les.slice] == les.label
            mean_map = float(up[les.slice][sel].mean())
            ys, xs = np.nonzero(sel)
            doc["lesions"].append({"slice": les.slice, "n_pixels": les.n_pixels, "area_mm2": les.area_mm2,
                                   "peak_hu": les.peak_hu, "weight": les.weight, "score": les.score,
                                   "mean_map": mean_map, "counted": mean_map >= C.LESION_THRESHOLD,
                                   "contribution": les.score if mean_map >= C.LESION_THRESHOLD else 0.0,
                                   "first_pixel_rc": [int(ys[0]), int(xs[0])]})
    (out_dir / "value.json").write_text(json.dumps(doc, indent=1))
    return doc


def pick(rows, task: str, n: int):
    """Cases with a non-zero truth; for CAC prefer the fewest slices."""
    nz = [(d, v) for d, v in rows if v > 0] or list(rows)
    if task == "cac":
        nz.sort(key=lambda r: (len(list(Path(r[0]).glob("*.dcm"))), -r[1]))
    return nz[:n]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/")
    p.add_argument("--out", default="models/golden")
    p.add_argument("--set", action="append", required=True, help="task=labels.csv")
    p.add_argument("--per-task", type=int, default=1)
    a = p.parse_args(argv)
    for s in a.set:
        task, csv_path = s.split("=", 1)
        for d, v in pick(D.read_csv(csv_path), task, a.per_task):
            doc = make_case(task, d, v, a.models, Path(a.out) / task / Path(d).name)
            print(f"[golden] {task}/{Path(d).name}: value {doc['value']:.4f} (truth {v:.4f})")


if __name__ == "__main__":
    main()
