"""How much data does a site need? Value error on a fixed held-out phantom set against the number of training cases.

    PYTHONPATH=models/training python -m biomarker_training.learning_curve --data /work/lc-data \
        --bin target/release/biomarker-node --tasks pma,sfa --sizes 25,50,100,200,400 --steps 500 --long 400:1500 \
        --work /work/lc-runs --plot docs/site-training/learning-curve.png --table docs/site-training/learning-curve.md

Data: DATA/train/<task> (phantoms seed 1, the first N cases train a model) and DATA/test/<task> (seed 901, 100
cases, never trained on: every model is measured on the same cases). Missing sets are generated with `--bin`
(`biomarker-node phantom`). Every run has the same budget of optimizer steps (`--steps`, batch 8), so a small set
is seen for more epochs: what is compared is the amount of data, not the amount of training. `--long N:STEPS`
adds runs with a larger budget (stars in the plot), to show how much of the error at large N is the budget. Each
run keeps its last epoch (no selection: the held-out set only measures). Finished runs are kept in WORK and
skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np

from . import export as E
from . import train as T
from .tasks import get

COLOURS = {"pma": "#0072B2", "sfa": "#D55E00", "liver": "#009E73", "cac": "#CC79A7"}


def ensure_phantoms(data: Path, task: str, binary: str | None, n_train: int, n_test: int) -> tuple[Path, Path]:
    sets = {"train": (1, n_train), "test": (901, n_test)}
    paths = []
    for part, (seed, count) in sets.items():
        d = data / part / task
        if not (d / "labels.csv").exists():
            if not binary:
                raise SystemExit(f"{d}/labels.csv missing: pass --bin (a biomarker-node binary) to generate it")
            subprocess.run([binary, "phantom", "--task", task, "--seed", str(seed), "--out", str(d),
                            "--count", str(count)], check=True, stdout=subprocess.DEVNULL)
        paths.append(d / "labels.csv")
    return paths[0], paths[1]


def run_one(task: str, n: int, train_csv: Path, test_csv: Path, a, work: Path, steps: int) -> dict:
    out = work / (f"{task}-{n}" if steps == a.steps else f"{task}-{n}-steps{steps}")
    res_path = out / "result.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    bs = 8
    epochs = max(1, math.ceil(steps / math.ceil(n / bs)))
    t0 = time.time()
    T.main(["--task", task, "--csv", str(train_csv), "--max-cases", str(n), "--val-csv", str(test_csv),
            "--epochs", str(epochs), "--max-steps", str(steps), "--batch-size", str(bs), "--size", str(a.size),
            "--widths", a.widths, "--loss", "l1", "--seed", str(a.seed), "--select", "last", "--val-every", "0",
            "--threads", str(a.threads), "--device", "cpu", "--no-report", "--cache-dir", str(work),
            "--out", str(out)])
    card = E.read_card(out / f"{task}.yaml")
    m = card["metrics"]["validation"]
    res = {"task": task, "n_train": n, "epochs": epochs, "steps": card["training"]["steps"], "budget": steps,
           "heldout_n": m["n"], "mae": m["mae"], "r": m["r"], "seconds": round(time.time() - t0, 1)}
    res_path.write_text(json.dumps(res) + "\n")
    return res


def plot(results: list[dict], path: Path, title_note: str, budget: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 12})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for task in sorted({r["task"] for r in results}):
        rs = sorted((r for r in results if r["task"] == task and r.get("budget", budget) == budget),
                    key=lambda r: r["n_train"])
        n = [r["n_train"] for r in rs]
        col = COLOURS.get(task, "k")
        for b in sorted({r["budget"] for r in results if r["task"] == task and r.get("budget", budget) != budget}):
            # the same data trained longer: how much of the error at large n is the training budget
            lr = sorted((r for r in results if r["task"] == task and r.get("budget") == b), key=lambda r: r["n_train"])
            for ax, key in ((ax1, "mae"), (ax2, "r")):
                ax.plot([r["n_train"] for r in lr], [r[key] for r in lr], "*--", color=col, ms=14, mfc="white",
                        mew=1.8, lw=1.2, label=f"{task}, {b} steps" if key == "mae" else None)
        site = get(task).finding_site.meaning.lower()
        ax1.plot(n, [r["mae"] for r in rs], "o-", color=col, lw=2, ms=7, label=f"{task} ({site} area), {budget} steps")
        ax2.plot(n, [r["r"] for r in rs], "o-", color=col, lw=2, ms=7, label=task)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ns = sorted({r["n_train"] for r in results})
        ax.set_xticks(ns)
        ax.set_xticklabels([str(v) for v in ns])
        ax.minorticks_off()
        ax.set_xlabel("training cases")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("mean absolute error on held-out set (cm²)")
    ax1.set_title("Value error vs training set size")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("Pearson r (predicted vs truth)")
    ax2.set_title("Correlation vs training set size")
    ax2.set_ylim(top=1.0)
    h, lab = ax1.get_legend_handles_labels()
    order = sorted(range(len(lab)), key=lambda i: ("steps" in lab[i].split(",")[0], lab[i]))  # main lines first
    ax1.legend([h[i] for i in order], [lab[i] for i in order], loc="upper right", frameon=True, framealpha=0.9,
               fontsize=10)
    fig.suptitle(title_note, fontsize=10, color="0.35", y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict], command: str) -> str:
    lines = ["| task | training cases | epochs | steps | held-out cases | MAE (cm²) | r | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["task"], r["n_train"], r["steps"])):
        lines.append(f"| {r['task']} | {r['n_train']} | {r['epochs']} | {r['steps']} | {r['heldout_n']} | "
                     f"{r['mae']:.2f} | {r['r']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + f"\n\nReproduce: `{command}`\n"


def main(argv=None):
    import shlex
    import sys
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="DATA/{train,test}/<task>/labels.csv (generated if missing)")
    p.add_argument("--bin", default=None, help="biomarker-node binary, to generate missing phantom sets")
    p.add_argument("--tasks", default="pma,sfa")
    p.add_argument("--sizes", default="25,50,100,200,400")
    p.add_argument("--test-count", type=int, default=100)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (batch 8), the same for all")
    p.add_argument("--long", default="",
                   help="N:STEPS, comma separated: extra runs of N cases with a larger step budget (stars in the plot)")
    p.add_argument("--size", type=int, default=64, help="model input size (the shipped area models use 128)")
    p.add_argument("--widths", default="8,16,32,64")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", required=True, help="runs and caches (outside the repository)")
    p.add_argument("--plot", required=True)
    p.add_argument("--table", required=True)
    a = p.parse_args(argv)
    sizes = [int(v) for v in a.sizes.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for task in a.tasks.split(","):
        train_csv, test_csv = ensure_phantoms(Path(a.data), task, a.bin, max(sizes), a.test_count)
        for n in sizes:
            r = run_one(task, n, train_csv, test_csv, a, work, a.steps)
            print(f"[learning-curve] {task} n={n}: held-out MAE {r['mae']} r {r['r']} ({r['seconds']}s)", flush=True)
            results.append(r)
        for spec in (v for v in a.long.split(",") if v.strip()):
            n, steps = (int(v) for v in spec.split(":"))
            r = run_one(task, n, train_csv, test_csv, a, work, steps)
            print(f"[learning-curve] {task} n={n} steps={steps}: held-out MAE {r['mae']} r {r['r']} "
                  f"({r['seconds']}s)", flush=True)
            results.append(r)
    (work / "learning-curve.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "PYTHONPATH=models/training python -m biomarker_training.learning_curve " + " ".join(
        shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    note = (f"phantoms; held-out: {a.test_count} cases of seed 901 per task; {a.steps} steps of batch 8 per run; "
            f"U-Net {a.widths} at {a.size}x{a.size}; CPU" + ("; stars: the same data, more steps" if a.long else ""))
    plot(results, Path(a.plot), note, a.steps)
    Path(a.table).write_text(table(results, command))
    print(f"[learning-curve] wrote {a.plot} and {a.table}")


if __name__ == "__main__":
    main()
