"""Liver models side by side on CSV sets through ONNX Runtime (evaluate.evaluate_task on a copy of each model, so
no shipped card is touched): n, r, MAE, Bland-Altman bias and Dice per (model, set).

    PYTHONPATH=models/training python models/training/experiments/liver_compare.py DIR1,DIR2 name=labels.csv ...

Each DIR holds liver.yaml and liver.onnx.
"""
import shutil
import sys
import tempfile
from pathlib import Path

from biomarker_training import evaluate as EV

models = sys.argv[1].split(",")
for m in models:
    tmp = Path(tempfile.mkdtemp())
    for f in ("liver.yaml", "liver.onnx"):
        shutil.copy(Path(m) / f, tmp / f)
    for s in sys.argv[2:]:
        name, csv = s.split("=", 1)
        r = EV.evaluate_task("liver", csv, tmp)["methods"]["localization"]
        dice = "-" if r["dice"] is None else f"{r['dice']:.3f}"
        print(f"{m:32s} {name:10s} n={r['n']} r={r['r']:.3f} MAE={r['mae']:.2f} bias={r['ba_bias']:+.2f} Dice={dice}",
              flush=True)
    shutil.rmtree(tmp)
