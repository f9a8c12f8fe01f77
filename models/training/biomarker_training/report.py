"""Evaluation report of a trained out folder: OUT/report.html plus its PNGs in OUT/report/.

    PYTHONPATH=models/training python -m biomarker_training.report --out OUT [--worst 6]

Input: what `train.py` wrote in OUT: `<task>.yaml` + `<task>.onnx`, the validation split `<task>.validation.csv`
(`case,series_dir,value`), optionally `<task>.history.json` and the baseline `baseline/<task>-direct.{yaml,onnx}`.
Every value is recomputed here through ONNX Runtime, the runtime the node uses (not PyTorch), from the series
folders the split names (DICOM phantoms or an export's `cases/<id>/`), so the report also checks the exported files.
Output: a self-contained HTML page (relative links to the PNGs; no scripts, no network) with, per task, the
training data summary, a metrics table (localization, baseline and the candidates alone side by side), a scatter
plot, a Bland-Altman plot, the training curve, and the worst validation cases with the map drawn on the slice.
The metrics are on the validation split only: a site export has no separate test set, and the page says so.
Failure modes: a missing series folder or a card/ONNX mismatch raises; nothing half-written is left as
report.html (the page is written last, after every PNG).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
from pathlib import Path

import numpy as np

from . import candidates as C
from . import data as D
from . import export as E

LOC, BASE, CAND = "#0072B2", "#D55E00", "#7f7f7f"  # Okabe-Ito blue / vermillion, grey: the same in every plot
WINDOWS = {"pma": (40.0, 400.0), "sfa": (-50.0, 500.0), "liver": (60.0, 300.0), "cac": (200.0, 1200.0)}


def unit_label(spec) -> str:
    return {"cm2": "cm²", "{Agatston}": "Agatston"}.get(spec.unit_ucum, spec.unit_ucum)


def read_split(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"case": r["case"], "dir": r["series_dir"], "value": float(r["value"])} for r in csv.DictReader(f)]


class OnnxModel:
    def __init__(self, d: Path, task: str, method: str):
        self.card = E.read_card(d / E.card_name(task, method))
        onnx_path = d / self.card["onnx"]
        if E.sha256(onnx_path) != self.card["sha256"]:
            raise ValueError(f"{onnx_path}: sha256 differs from its card")
        self.method, self.spec = method, E.spec_from_card(self.card)
        self.sess = E.ort_session(onnx_path)

    def run(self, s: D.Series):
        """(value, map at model resolution [S,H,W] or None, x, candidate bool [S,R,C])."""
        x, wm, w, cand, lesions, labels = D.prepare_series(s, self.spec)
        out = self.sess.run(None, {"input": x[:, None].astype(np.float32)})[0]
        if self.method == "localization" and self.spec.aggregation == "agatston":
            v = C.agatston_from_map(out[:, 0], lesions, labels, s.hu.shape[1:], "lesion_threshold")
        else:
            v = E.biomarker_from_output(self.method, out, wm)
        return v, (out[:, 0] if self.method == "localization" else None), float(w.sum()), cand, w


def stats(y, p) -> dict:
    y, p = np.asarray(y, float), np.asarray(p, float)
    d = p - y
    n = len(y)
    sd = float(np.std(d, ddof=1)) if n > 1 else float("nan")
    r = float(np.corrcoef(y, p)[0, 1]) if n > 2 and np.std(y) > 0 and np.std(p) > 0 else float("nan")
    return {"n": n, "r": r, "mae": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d ** 2))),
            "bias": float(np.mean(d)), "loa": [float(np.mean(d) - 1.96 * sd), float(np.mean(d) + 1.96 * sd)],
            "median_abs": float(np.median(np.abs(d)))}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 11,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def scatter_png(path: Path, y, preds: dict, unit: str, task: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.8))
    allv = np.concatenate([np.asarray(y, float)] + [np.asarray(p, float) for p, _ in preds.values()])
    lo, hi = float(min(0.0, allv.min())), float(allv.max()) * 1.05 + 1e-9
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=1, ls="--", label="identity (y = x)", zorder=1)
    for name, (p, col) in preds.items():
        s = stats(y, p)
        ax.scatter(y, p, s=36, color=col, alpha=0.75, edgecolor="white", lw=0.5, zorder=2,
                   label=f"{name}: r = {s['r']:.3f}, MAE = {s['mae']:.2f} {unit}")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference value ({unit})")
    ax.set_ylabel(f"predicted value ({unit})")
    ax.set_title(f"{task}: predicted vs reference (validation, n = {len(y)})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bland_altman_png(path: Path, y, preds: dict, unit: str, task: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(preds), figsize=(6.0 * len(preds), 5.0), sharey=True, squeeze=False)
    y = np.asarray(y, float)
    for ax, (name, (p, col)) in zip(axes[0], preds.items()):
        p = np.asarray(p, float)
        s = stats(y, p)
        mean, diff = (p + y) / 2, p - y
        ax.scatter(mean, diff, s=36, color=col, alpha=0.75, edgecolor="white", lw=0.5)
        ax.axhline(0, color="0.3", lw=1, ls=":")
        ax.axhline(s["bias"], color=col, lw=2, label=f"bias {s['bias']:+.2f} {unit}")
        for v in s["loa"]:
            ax.axhline(v, color=col, lw=1.2, ls="--")
        ax.plot([], [], color=col, lw=1.2, ls="--",
                label=f"95% limits of agreement\n[{s['loa'][0]:+.2f}, {s['loa'][1]:+.2f}] {unit}")
        ax.set_xlabel(f"mean of predicted and reference ({unit})")
        ax.set_title(f"{task} {name}: Bland-Altman (n = {len(y)})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", frameon=True, framealpha=0.85)
    axes[0][0].set_ylabel(f"predicted − reference ({unit})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def history_png(path: Path, histories: dict, unit: str, task: str) -> bool:
    if not histories:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.0))
    for name, (h, col) in histories.items():
        ep = [r["epoch"] for r in h if r.get("loss") is not None]
        a1.plot(ep, [r["loss"] for r in h if r.get("loss") is not None], "o-", color=col, ms=4, label=name)
        ev = [r for r in h if r.get("val_mae") is not None]
        a2.plot([r["epoch"] for r in ev], [r["val_mae"] for r in ev], "o-", color=col, ms=4, label=name)
    a1.set_title(f"{task}: training loss per epoch")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss (method's own scale)")
    a2.set_title(f"{task}: validation MAE per epoch")
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"MAE ({unit})")
    from matplotlib.ticker import MaxNLocator
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def overlay_png(path: Path, s: D.Series, m_model, cand, w, truth, title: str, task: str, unit: str) -> None:
    """The slice that contributes most to the value, windowed, with the map inside the candidates drawn over it
    (colour = map value, transparent where the map is ~0) and the phantom's truth mask outlined, if there is one."""
    plt = _plt()
    up = C.upsample_nearest(np.asarray(m_model, np.float64), s.hu.shape[1:]) * cand
    k = int(np.argmax((up * w).reshape(up.shape[0], -1).sum(1))) if up.shape[0] > 1 else 0
    level, width = WINDOWS.get(task, (40.0, 400.0))
    # crop to the body (HU > -500) with a margin: the air around it is half of a CT slice
    body = np.argwhere(s.hu[k] > -500)
    if body.size:
        (r0, c0), (r1, c1) = body.min(0), body.max(0) + 1
        pad = max(4, (r1 - r0) // 20)
        r0, c0 = max(0, r0 - pad), max(0, c0 - pad)
        r1, c1 = min(s.hu.shape[1], r1 + pad), min(s.hu.shape[2], c1 + pad)
    else:
        r0, c0, r1, c1 = 0, 0, s.hu.shape[1], s.hu.shape[2]
    crop = (slice(r0, r1), slice(c0, c1))
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * (r1 - r0) / max(c1 - c0, 1) + 0.9))
    ax.imshow(s.hu[k][crop], cmap="gray", vmin=level - width / 2, vmax=level + width / 2, interpolation="nearest")
    show = np.ma.masked_where(up[k][crop] < 0.05, up[k][crop])
    im = ax.imshow(show, cmap="plasma", vmin=0, vmax=1, alpha=0.65, interpolation="nearest")
    if truth is not None and truth[k].any():
        ax.contour(truth[k][crop].astype(float), levels=[0.5], colors=["#00e676"], linewidths=1.2)
        ax.plot([], [], color="#00e676", lw=1.5, label="reference mask (phantom)")
        ax.legend(loc="lower right", fontsize=9, framealpha=0.8)
    ax.set_title(title, fontsize=11)
    ax.set_axis_off()
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label("map value inside candidates (counted share of each pixel)", fontsize=9)
    fig.text(0.02, 0.01, f"slice {k + 1}/{s.hu.shape[0]}, window L{level:g} W{width:g} HU", fontsize=9,
             color="0.35")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(v, nd=2):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}"


def task_section(out: Path, task: str, worst: int, rdir: Path) -> str:
    loc = OnnxModel(out, task, "localization")
    base_dir = E.model_dir(out, "direct")
    base = OnnxModel(base_dir, task, "direct") if (base_dir / E.card_name(task, "direct")).exists() else None
    spec, unit = loc.spec, unit_label(loc.spec)
    rows = read_split(out / f"{task}.validation.csv")
    y, p_loc, p_base, p_cand = [], [], [], []
    for r in rows:
        s = D.load_series(r["dir"])
        v, _, cand_value, _, _ = loc.run(s)
        y.append(r["value"])
        p_loc.append(v)
        p_cand.append(cand_value)
        p_base.append(base.run(s)[0] if base else None)
    preds = {"localization": (p_loc, LOC)}
    if base:
        preds["direct baseline"] = (p_base, BASE)
    with open(rdir / f"{task}-predictions.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case", "reference", "localization", "direct_baseline", "candidates_only"])
        for r, a, b, c in zip(rows, p_loc, p_base, p_cand):
            wr.writerow([r["case"], r["value"], round(a, 4), "" if b is None else round(b, 4), round(c, 4)])
    scatter_png(rdir / f"{task}-scatter.png", y, preds, unit, task)
    bland_altman_png(rdir / f"{task}-bland-altman.png", y, preds, unit, task)
    hist = {}
    for name, d, method, col in (("localization", out, "localization", LOC),
                                 ("direct baseline", base_dir, "direct", BASE)):
        hp = d / f"{Path(E.onnx_name(task, method)).stem}.history.json"
        if hp.exists() and (method == "localization" or base):
            hist[name] = (json.loads(hp.read_text()), col)
    has_hist = history_png(rdir / f"{task}-training.png", hist, unit, task)

    # worst cases by the localization model's absolute error
    err = np.abs(np.array(p_loc) - np.array(y))
    order = np.argsort(-err, kind="stable")[:worst]
    worst_html = []
    for rank, i in enumerate(order, 1):
        r = rows[i]
        s = D.load_series(r["dir"])
        _, m, _, cand, w = loc.run(s)
        truth = D.load_mask(r["dir"], s)
        title = (f"{r['case']} (worst {rank})\nreference {y[i]:.2f}, localization {p_loc[i]:.2f}"
                 + (f", baseline {p_base[i]:.2f}" if base else "") + f" {unit}")
        name = f"{task}-worst-{rank}.png"
        overlay_png(rdir / name, s, m, cand, w, truth, title, task, unit)
        worst_html.append((r["case"], y[i], p_loc[i], p_base[i], name))

    st = {"localization": stats(y, p_loc)}
    if base:
        st["direct baseline"] = stats(y, p_base)
    st["candidates only (no model)"] = stats(y, p_cand)
    tr = loc.card.get("training", {})
    summ = tr.get("data_summary", {})
    split = tr.get("validation_split", {})
    e = html.escape
    h = [f"<h2>{e(task)} <small>{e(loc.card['name'])} {e(str(loc.card['version']))}</small></h2>",
         "<p class=note>All metrics below are on the <b>validation split</b>: "
         f"{len(rows)} cases held out of training ({e(split.get('how', ''))}; the list is "
         f"<code>{e(task)}.validation.csv</code> and the card's <code>training.validation_split</code>). "
         "A site export has no separate test set, so these numbers were also seen when choosing the epoch"
         f"{' (--select best_val)' if tr.get('select') == 'best_val' else ''}: expect slightly worse on new "
         "series. The shadow run on live traffic is the independent check.</p>",
         "<h3>Metrics</h3><table><tr><th></th>"
         + "".join(f"<th>{e(k)}</th>" for k in st) + "</tr>"]
    for key, label, nd in (("n", "cases", 0), ("r", "Pearson r", 3), ("mae", f"MAE ({unit})", 2),
                           ("median_abs", f"median |error| ({unit})", 2), ("rmse", f"RMSE ({unit})", 2),
                           ("bias", f"bias, predicted − reference ({unit})", 2)):
        h.append(f"<tr><td>{e(label)}</td>" + "".join(
            f"<td>{st[k][key] if nd == 0 else _f(st[k][key], nd)}</td>" for k in st) + "</tr>")
    h.append(f"<tr><td>95% limits of agreement ({e(unit)})</td>" + "".join(
        f"<td>{_f(st[k]['loa'][0])} … {_f(st[k]['loa'][1])}</td>" for k in st) + "</tr></table>")
    h.append("<p class=note><i>candidates only</i>: every candidate pixel counted (the map fixed at 1), what the HU "
             "heuristic gives without a model; the localization model should beat it clearly.</p>")
    h.append(f"<div class=row><figure><img src='report/{task}-scatter.png' alt='scatter plot'><figcaption>Predicted "
             "against reference; the dashed line is identity.</figcaption></figure>")
    h.append(f"<figure><img src='report/{task}-bland-altman.png' alt='Bland-Altman plot'><figcaption>Difference "
             "against mean: the solid line is the bias, dashed the 95% limits of agreement (bias ± 1.96 SD)."
             "</figcaption></figure></div>")
    if has_hist:
        h.append(f"<figure><img src='report/{task}-training.png' alt='training curve'><figcaption>Loss and "
                 "validation error per epoch.</figcaption></figure>")
    h.append(f"<h3>The {len(worst_html)} worst validation cases (largest |localization − reference|)</h3>"
             "<p class=note>Each image is the slice that contributes most to the value, with the model's map "
             "drawn inside the candidate pixels (the value is the map-weighted candidate area). Look for maps on "
             "the wrong structure, missed regions, or a series that should not be in the set at all.</p>"
             "<table><tr><th>case</th><th>reference</th><th>localization</th>"
             + ("<th>baseline</th>" if base else "") + "<th>error</th></tr>")
    for cid, yy, pl, pb, _ in worst_html:
        h.append(f"<tr><td>{e(cid)}</td><td>{_f(yy)}</td><td>{_f(pl)}</td>"
                 + (f"<td>{_f(pb)}</td>" if base else "") + f"<td>{_f(pl - yy)}</td></tr>")
    h.append("</table><div class=grid>" + "".join(
        f"<figure><img src='report/{n}' alt='overlay {e(c)}'><figcaption>{e(c)}</figcaption></figure>"
        for c, _, _, _, n in worst_html) + "</div>")
    h.append("<h3>Training data and run</h3><table class=kv>")
    info = [("cases (train / validation)", f"{summ.get('cases', '?')} ({summ.get('train_cases', '?')} / "
                                           f"{summ.get('val_cases', '?')})"),
            (f"value range ({unit})", " … ".join(_f(v) for v in summ.get("value_range") or [])),
            (f"mean / median ({unit})", f"{_f(summ.get('value_mean'))} / {_f(summ.get('value_median'))}"),
            ("cases with value 0", summ.get("zero_value_cases", "–")),
            ("data", tr.get("data", "")), ("seed", tr.get("seed")), ("device", tr.get("device", "?")),
            ("epochs (kept)", f"{tr.get('epochs')} ({tr.get('chosen_epoch')})"),
            ("training time", f"{tr.get('seconds')} s"), ("git commit", tr.get("git_commit")),
            ("command", tr.get("command", ""))]
    if base:
        info.append(("baseline command", base.card.get("training", {}).get("command", "")))
    for k, v in info:
        h.append(f"<tr><td>{e(str(k))}</td><td><code>{e(str(v))}</code></td></tr>")
    h.append("</table>")
    if isinstance(summ.get("dataset"), dict):
        h.append("<details><summary>dataset.json of the export</summary><pre>"
                 + e(json.dumps(summ["dataset"], indent=1)) + "</pre></details>")
    return "\n".join(h)


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1200px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}h1{margin-bottom:4px}h2{border-bottom:2px solid #0072B2;padding-bottom:4px;
margin-top:36px}h2 small{color:#666;font-weight:normal;font-size:60%}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f0f4f8}.note{color:#444;background:#fff8e1;border-left:4px solid #f2b705;padding:6px 10px}
.row{display:flex;flex-wrap:wrap;gap:12px}figure{margin:8px 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:90%;color:#555}.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
.grid img{width:100%}.kv td{text-align:left}code{font-size:90%;word-break:break-all}"""


def write_report(out, tasks=None, worst: int = 6) -> Path:
    out = Path(out)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    found = sorted(p.name[:-len(".validation.csv")] for p in out.glob("*.validation.csv")
                   if (out / f"{p.name[:-len('.validation.csv')]}.yaml").exists())
    found = [t for t in found if not tasks or t in tasks]
    if not found:
        raise SystemExit(f"{out}: no <task>.yaml with <task>.validation.csv (train.py writes both)")
    body = [task_section(out, t, worst, rdir) for t in found]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>biomarker-node training report</title>"
            f"<style>{CSS}</style></head><body><h1>Training report</h1><p>Folder <code>{html.escape(str(out))}"
            "</code>. Models: " + ", ".join(html.escape(t) for t in found)
            + ". Values are recomputed through ONNX Runtime, as the node runs the model. Register a model as a "
              "candidate and let it run in shadow before promoting it (docs/SITE-TRAINING.md).</p>"
            + "\n".join(body) + "</body></html>\n")
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder train.py wrote (its --out)")
    p.add_argument("--tasks", default="", help="comma separated (default: every trained task in OUT)")
    p.add_argument("--worst", type=int, default=6, help="how many worst cases to show with overlays")
    a = p.parse_args(argv)
    path = write_report(a.out, [t for t in a.tasks.split(",") if t], a.worst)
    print(f"[report] wrote {path}")


if __name__ == "__main__":
    main()
