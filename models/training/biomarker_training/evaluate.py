"""Held-out evaluation of the shipped ONNX models (both methods) -> models/EVALUATION.md.

    python -m biomarker_training.evaluate --models models/ \
        --set pma=/work/data-phantoms/test/pma/labels.csv --set sfa=... --set cac=... --set liver=...

Everything runs through ONNX Runtime (the artefact Rust ships), not PyTorch. Masks (mask.npy) are
read only here, for Dice: map upsampled to native (nearest), thresholded at 0.5, AND candidates.
Held-out metrics are also written into each model card under metrics.heldout.

Real CT (realct.py): `--realct ../shared/realct-labelled` adds the "Real CT" section; with `--realct-only` (or no
`--set`) only that section of the report is rewritten and the phantom table stays as it is:

    python -m biomarker_training.evaluate --models models/ --realct ../shared/realct-labelled --realct-only

`--tasks liver` restricts to some tasks (`--models` may then hold only liver.yaml/liver.onnx).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from . import candidates as C
from . import data as D
from . import export as E
from . import realct as R

DICE_THRESHOLD = 0.5
SOFT = "localization, soft sum"  # CAC only: the trained soft aggregation, reported beside the shipped one
TARGETS = {"pma": 0.98, "sfa": 0.99, "cac": 0.95, "liver": 0.95}


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = a.sum() + b.sum()
    if s == 0:
        return None  # both empty: undefined, excluded from the mean
    return float(2.0 * np.logical_and(a, b).sum() / s)


def weighted_kappa(a, b, k: int) -> float:
    """Linearly weighted Cohen's kappa between integer ratings a, b in [0, k)."""
    a, b = np.asarray(a), np.asarray(b)
    o = np.zeros((k, k))
    for i, j in zip(a, b):
        o[i, j] += 1
    o /= o.sum()
    e = np.outer(o.sum(1), o.sum(0))
    w = np.abs(np.subtract.outer(np.arange(k), np.arange(k))) / (k - 1)
    den = (w * e).sum()
    return float(1.0 - (w * o).sum() / den) if den > 0 else 1.0


def summarise(y, p) -> dict:
    y, p = np.asarray(y, float), np.asarray(p, float)
    d = p - y
    r = float(np.corrcoef(y, p)[0, 1]) if np.std(y) > 0 and np.std(p) > 0 else float("nan")
    pos = y > 0
    return {"n": int(len(y)), "r": r, "mae": float(np.mean(np.abs(d))),
            "rel_err": float(np.mean(np.abs(d[pos]) / y[pos])) if pos.any() else float("nan"),
            "ba_bias": float(np.mean(d)), "ba_loa": [float(np.mean(d) - 1.96 * np.std(d, ddof=1)),
                                                      float(np.mean(d) + 1.96 * np.std(d, ddof=1))]}


def evaluate_task(task: str, csv_path, models_dir, max_cases: int = 0) -> dict:
    models_dir = Path(models_dir)
    rows = D.read_csv(csv_path)
    if max_cases:
        rows = rows[:max_cases]
    res = {"task": task, "csv": str(csv_path), "methods": {}}
    sessions = {}
    for method in ("localization", "direct"):
        path = E.model_dir(models_dir, method) / E.onnx_name(task, method)
        cpath = E.model_dir(models_dir, method) / E.card_name(task, method)
        if path.exists() and cpath.exists():
            card = E.read_card(cpath)
            sessions[method] = (E.ort_session(path), E.spec_from_card(card), cpath)
    if not sessions:
        return res
    acc = {m: {"pred": [], "dice": [], "sec": []} for m in sessions}
    soft = SOFT if task == "cac" and "localization" in sessions else None
    if soft:
        acc[soft] = {"pred": [], "dice": [], "sec": []}
    ys, cand_only, cand_dice = [], [], []
    for d, y in rows:
        s = D.load_series(d)
        mask = D.load_mask(d, s)
        ys.append(y)
        for method, (sess, spec, _) in sessions.items():
            x, wm, w, cand, lesions, labels = D.prepare_series(s, spec)
            t0 = time.perf_counter()
            out = sess.run(None, {"input": x[:, None].astype(np.float32)})[0]
            acc[method]["sec"].append((time.perf_counter() - t0) / x.shape[0])
            if method == "localization" and spec.aggregation == "agatston":
                acc[method]["pred"].append(C.agatston_from_map(out[:, 0], lesions, labels, s.hu.shape[1:],
                                                               "lesion_threshold"))
                acc[soft]["pred"].append(E.biomarker_from_output(method, out, wm))
                acc[soft]["sec"].append(acc[method]["sec"][-1])
            else:
                acc[method]["pred"].append(E.biomarker_from_output(method, out, wm))
            if method == "localization":
                if mask is not None:
                    up = C.upsample_nearest(out[:, 0], s.hu.shape[1:]) >= DICE_THRESHOLD
                    acc[method]["dice"].append(dice(up & cand, mask))
                    soft_map = C.upsample_nearest(out[:, 0].astype(np.float64), s.hu.shape[1:]) * cand
                    den = soft_map.sum() + mask.sum()
                    acc[method].setdefault("soft_dice", []).append(
                        float(2 * (soft_map * mask).sum() / den) if den > 0 else None)
                cand_only.append(float(w.sum()))
                if mask is not None:
                    cand_dice.append(dice(cand, mask))
    for method, a in acc.items():
        m = summarise(ys, a["pred"])
        dl = [v for v in a["dice"] if v is not None]
        m["dice"] = float(np.mean(dl)) if dl else None
        m["dice_n"] = len(dl)
        sd = [v for v in a.get("soft_dice", []) if v is not None]
        m["soft_dice"] = float(np.mean(sd)) if sd else None
        if method == soft:
            for k in ("dice", "dice_n", "soft_dice"):
                m[k] = res["methods"]["localization"][k]
        m["dice_threshold"] = DICE_THRESHOLD if method in ("localization", soft) else None
        m["sec_per_slice_ort"] = float(np.median(a["sec"]))
        if task == "cac":
            ti = [C.risk_index(v) for v in ys]
            pi = [C.risk_index(v) for v in a["pred"]]
            m["category_acc"] = float(np.mean(np.array(ti) == np.array(pi)))
            m["kappa_linear"] = weighted_kappa(ti, pi, len(C.RISK_CATEGORIES))
        res["methods"][method] = m
    if cand_only:
        ref = summarise(ys, cand_only)
        cd = [v for v in cand_dice if v is not None]
        ref["dice"] = float(np.mean(cd)) if cd else None
        res["candidates_only"] = ref
    # write held-out metrics into the cards
    for method, (_, _, cpath) in sessions.items():
        card = E.read_card(cpath)
        card.setdefault("metrics", {})["heldout"] = _rounded(res["methods"][method])
        if method == "localization" and soft:
            card["metrics"]["heldout_soft_sum"] = _rounded(res["methods"][soft])
        card["metrics"]["heldout"]["csv"] = str(csv_path)
        E.write_card(cpath, card)
    return res


def _rounded(m: dict) -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, float):
            out[k] = round(v, 4) if np.isfinite(v) else None
        elif isinstance(v, list):
            out[k] = [round(x, 4) for x in v]
        else:
            out[k] = v
    return out


def _f(v, nd=3):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Held-out evaluation", "",
             "Generated by `python -m biomarker_training.evaluate` (models/training); do not edit the table by hand.",
             "All numbers come from the exported ONNX models run in ONNX Runtime (CPU). Masks are used only here.",
             f"Dice: localization map upsampled to native resolution (nearest), thresholded at {DICE_THRESHOLD}, "
             "restricted to candidates, vs `mask.npy`; mean over cases where truth or prediction is non-empty.",
             "soft Dice: 2 sum(map * cand * mask) / (sum(map * cand) + sum(mask)), no threshold (supplementary).",
             "`candidates only` = map fixed to 1 (the HU heuristic alone), a floor for both methods.",
             "Relative error: mean |pred - truth| / truth over cases with truth > 0. Bland-Altman: pred - truth, "
             "bias and bias +/- 1.96 SD.", "",
             "Regenerate with:", "", "```", command, "```", "",
             "| task | method | n | r | MAE | rel. err | BA bias | BA 95% LoA | Dice@0.5 | soft Dice | cat. acc | kappa (lin.) | ORT s/slice |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        t = res["task"]
        items = list(res["methods"].items())
        if "candidates_only" in res:
            items.append(("candidates only", res["candidates_only"]))
        for method, m in items:
            lines.append(
                f"| {t} | {method} | {m['n']} | {_f(m['r'])} | {_f(m['mae'], 2)} | {_f(m['rel_err'])} | "
                f"{_f(m['ba_bias'], 2)} | [{_f(m['ba_loa'][0], 2)}, {_f(m['ba_loa'][1], 2)}] | {_f(m.get('dice'))} | "
                f"{_f(m.get('soft_dice'))} | "
                f"{_f(m.get('category_acc'))} | {_f(m.get('kappa_linear'))} | {_f(m.get('sec_per_slice_ort'), 4)} |")
    lines += ["", "## Targets", ""]
    for res in results:
        t = res["task"]
        loc, dr = res["methods"].get("localization"), res["methods"].get("direct")
        if not loc:
            lines.append(f"- {t}: no localization model evaluated.")
            continue
        checks = [f"r {_f(loc['r'])} (target >= {TARGETS[t]}): {'met' if loc['r'] >= TARGETS[t] else 'MISSED'}"]
        if loc.get("dice") is not None:
            checks.append(f"Dice {_f(loc['dice'])} (target >= 0.85): {'met' if loc['dice'] >= 0.85 else 'MISSED'}")
        if t == "cac":
            checks.append(f"category acc {_f(loc['category_acc'])} (target >= 0.90): "
                          f"{'met' if loc['category_acc'] >= 0.9 else 'MISSED'}")
        if dr:
            better = loc["mae"] < dr["mae"]
            checks.append(f"localization MAE {_f(loc['mae'], 2)} vs direct {_f(dr['mae'], 2)}: "
                          f"{'localization better' if better else 'direct better (MISSED)'}")
        lines.append(f"- {t}: " + "; ".join(checks))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/")
    p.add_argument("--set", action="append", default=[], help="task=path/to/labels.csv (repeatable)")
    p.add_argument("--max-cases", type=int, default=0)
    p.add_argument("--report", default=None, help="markdown output (default MODELS/EVALUATION.md)")
    p.add_argument("--notes", default=None, help="markdown file appended to the report")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks to evaluate (default: every task with a card in --models)")
    p.add_argument("--realct", default=None, help="real-CT test sets (../shared/realct-labelled)")
    p.add_argument("--realct-extra", default=None,
                   help="unlabelled real CT (default: the folder 'realct' beside --realct, if there)")
    p.add_argument("--realct-only", action="store_true",
                   help="rewrite only the Real CT section of the report (the phantom table stays)")
    p.add_argument("--node-bin", default=None,
                   help="biomarker-node binary (default $BIOMARKER_NODE_BIN or target/release/biomarker-node)")
    p.add_argument("--node-config", default=str(R.REPO / "config" / "node.yaml"),
                   help="node config whose routes choose the chest slice (model cards replaced by --models')")
    p.add_argument("--overlays", default=str(R.REPO / "docs" / "realct"),
                   help="overlays whose licences allow committing them (LIDC, lungmask, ...)")
    p.add_argument("--overlays-private", default=str(R.REPO.parent / "realct-overlays"),
                   help="overlays that must not be shared (IRCAD): keep this OUTSIDE the repository")
    a = p.parse_args(argv)
    if not a.set and not a.realct:
        p.error("nothing to evaluate: give --set and/or --realct")
    if a.realct_only and not a.realct:
        p.error("--realct-only needs --realct")
    tasks = set(a.tasks.split(",")) if a.tasks else {t for t in ("pma", "sfa", "liver", "cac")
                                                    if (Path(a.models) / f"{t}.yaml").is_file()}
    cmd = "python -m biomarker_training.evaluate " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    report = Path(a.report) if a.report else Path(a.models) / "EVALUATION.md"
    md = None
    if a.set and not a.realct_only:
        results = []
        for s in a.set:
            task, csv_path = s.split("=", 1)
            if task not in tasks:
                continue
            t0 = time.time()
            res = evaluate_task(task, csv_path, a.models, a.max_cases)
            print(f"[evaluate] {task} ({time.time() - t0:.0f}s): {json.dumps(res['methods'])}", flush=True)
            results.append(res)
        md = markdown(results, cmd)
        if a.notes and Path(a.notes).exists():
            md += "\n" + Path(a.notes).read_text()
        (report.parent / "evaluation.json").write_text(json.dumps(results, indent=1, default=float))
    if a.realct:
        labelled = Path(a.realct)
        extra = Path(a.realct_extra) if a.realct_extra else labelled.parent / "realct"
        private = Path(a.overlays_private).resolve()
        if private.is_relative_to(R.REPO.resolve()):
            p.error(f"--overlays-private {private} is inside the repository: IRCAD overlays must not be shared")
        t0 = time.time()
        rc = R.evaluate(labelled, extra if extra.is_dir() else None, a.models, tasks, Path(a.overlays), private,
                        a.node_bin, a.node_config)
        print(f"[evaluate] real CT ({time.time() - t0:.0f}s)", flush=True)
        section = R.markdown_section(rc, cmd, report.parent.resolve(), private)
        if md is None:
            md = report.read_text() if report.exists() else ""
        md = R.rewrite_section(md, section)
        report.parent.mkdir(parents=True, exist_ok=True)
        js = json.dumps(rc, indent=1, default=float).replace(str(R.REPO) + "/", "")  # repo paths relative
        (report.parent / "evaluation-realct.json").write_text(js)
        print(section)
    report.write_text(md)
    print(f"[evaluate] wrote {report}")


if __name__ == "__main__":
    main()
