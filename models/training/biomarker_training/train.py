"""Train one biomarker model (localization U-Net or direct baseline), export ONNX, check parity.

    python -m biomarker_training.train --task pma --csv DIR/labels.csv --method localization \
        --device cpu --seed 1 --epochs 8 --out models/

Localization loss (Cano-Espinosa et al. 2020): value error only + lambda * mean(map); no mask
is ever read here. The value is sum(map * W) with W the pooled candidate weights (candidates.py).
area tasks: L1 on value / value_scale. agatston: smooth-L1 on log1p(value) (scores span 0..>1000).

A run (docs/SITE-TRAINING.md): the device is CUDA when PyTorch sees one (`--device auto`); a progress bar on a
terminal, one line per epoch otherwise; a checkpoint after every epoch (`OUT/.<task>.ckpt.pt`) that `--resume`
continues from, giving the same model as an uninterrupted run; the validation split written beside the model
(`<task>.validation.csv`, and its case list in the card); `--baseline` trains the direct net on the same split;
`report.py` then writes OUT/report.html.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import nets, tasks


def _seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def value_loss(pred: torch.Tensor, y: torch.Tensor, spec, kind: str = "l1") -> torch.Tensor:
    """l1: |pred - y| / value_scale. smooth_l1: Huber (beta 1) on value / value_scale, whose gradient grows
    with the error, so large under-estimates dominate early training; used for the liver, where L1's sign
    gradients from empty and non-empty cases cancelled and the map collapsed to a constant."""
    if spec.aggregation == "agatston":
        return torch.nn.functional.smooth_l1_loss(torch.log1p(pred.clamp(min=0)), torch.log1p(y), beta=0.1)
    if kind == "smooth_l1":
        return torch.nn.functional.smooth_l1_loss(pred / spec.value_scale, y / spec.value_scale, beta=1.0)
    if kind == "mse":
        # squared error: the largest misses (big tumours, the visible ones) lead early training
        return torch.mean(((pred - y) / spec.value_scale) ** 2)
    if kind == "log1p":
        # the agatston loss applied to an area (cm2): scale-free, each case weighted by its relative error
        return torch.nn.functional.smooth_l1_loss(torch.log1p(pred.clamp(min=0)), torch.log1p(y), beta=0.1)
    return torch.mean(torch.abs(pred - y)) / spec.value_scale


class Batcher:
    """Yields (x [N,1,H,W], w [N,1,H,W] or None, seg [N] case index within batch, y [B])."""

    def __init__(self, cases, spec, batch_size: int, device, skip_empty_slices: bool, positive_fraction: float = 0.0,
                 value_weighted: bool = False):
        self.cases, self.spec, self.bs, self.device = cases, spec, batch_size, device
        self.skip = skip_empty_slices
        self.positive_fraction = positive_fraction
        self.value_weighted = value_weighted

    def order(self, rng: np.random.Generator) -> np.ndarray:
        """Case order for one epoch (len(cases) draws). positive_fraction > 0: class-balanced sampling, each
        draw is a value > 0 case with that probability (with replacement), else a value == 0 case."""
        n = len(self.cases)
        if self.value_weighted:
            # draw cases with probability proportional to value + mean value (with replacement): cases where the
            # target is a larger share of the candidates come more often. A map that localizes is unbiased
            # whatever the sampling, because the value is computed from the map, not regressed.
            v = np.array([max(c.value, 0.0) for c in self.cases])
            p = v + v.mean() if v.mean() > 0 else np.ones(n)
            return rng.choice(n, n, p=p / p.sum())
        if self.positive_fraction <= 0:
            return rng.permutation(n)
        pos = np.array([i for i, c in enumerate(self.cases) if c.value > 0])
        neg = np.array([i for i, c in enumerate(self.cases) if c.value <= 0])
        if pos.size == 0 or neg.size == 0:
            return rng.permutation(n)
        take_pos = rng.random(n) < self.positive_fraction
        return np.where(take_pos, rng.choice(pos, n), rng.choice(neg, n))

    def epoch(self, rng: np.random.Generator):
        order = self.order(rng)
        for i in range(0, len(order), self.bs):
            idx = order[i:i + self.bs]
            xs, ws, seg = [], [], []
            for b, k in enumerate(idx):
                c = self.cases[k]
                keep = np.arange(c.x.shape[0])
                if self.skip and c.x.shape[0] > 1:
                    # slices without candidates add nothing to the value; skip them for speed
                    keep = np.flatnonzero(c.w.reshape(c.w.shape[0], -1).sum(1) > 0)
                    if keep.size == 0:
                        keep = np.array([c.x.shape[0] // 2])
                xs.append(c.x[keep]); ws.append(c.w[keep]); seg.append(np.full(keep.size, b))
            x = torch.from_numpy(np.concatenate(xs)[:, None]).float().to(self.device)
            w = torch.from_numpy(np.concatenate(ws)[:, None]).float().to(self.device)
            seg = torch.from_numpy(np.concatenate(seg)).to(self.device)
            y = torch.tensor([self.cases[k].value for k in idx], dtype=torch.float32, device=self.device)
            yield x, w, seg, y


def forward_values(net, method, spec, x, w, seg, n):
    """Predicted values [n] for a batch, plus the map (None for direct)."""
    if method == "localization":
        m = net(x)
        per_slice = (m * w).sum(dim=(1, 2, 3))
        return torch.zeros(n, device=x.device).index_add(0, seg, per_slice), m
    if spec.slices == "all":
        # direct CAC: one volume per forward (the batch axis is the slice axis)
        outs = [net.raw(x[seg == b]).reshape(()) for b in range(n)]
        return torch.stack(outs), None
    return net.raw(x).reshape(-1), None


def direct_loss(z, y, spec, kind: str = "l1"):
    if spec.aggregation == "agatston":
        return torch.nn.functional.smooth_l1_loss(z, torch.log1p(y), beta=0.1)
    if kind == "smooth_l1":
        return torch.nn.functional.smooth_l1_loss(z, y / spec.value_scale, beta=1.0)
    if kind == "mse":
        return torch.mean((z - y / spec.value_scale) ** 2)
    return torch.mean(torch.abs(z - y / spec.value_scale))


def init_bias(net, method: str, spec, train, map_bias: float = 0.0) -> None:
    """Localization: map head bias `map_bias` (0 -> map 0.5). Direct: output bias = mean normalised target."""
    y = np.array([c.value for c in train], dtype=np.float64)
    with torch.no_grad():
        if method == "localization":
            # default: map starts at 0.5. A data-driven start (logit(mean truth / mean candidate value)) was tried
            # on the old generator and made pma/sfa plateau and the liver map collapse: the sigmoid's steep range
            # matters. --map-bias sets it explicitly (recorded in the card).
            net.head.bias.fill_(float(map_bias))
        elif spec.aggregation == "agatston":
            net.fc.bias.fill_(float(np.log1p(y).mean()))
        else:
            net.fc.bias.fill_(float(y.mean() / spec.value_scale))


def init_from_onnx(net, path) -> None:
    """Load a shipped localization model's weights (ONNX, batch norm folded into the convolutions by the export)
    into `net`: each conv gets the folded weight, its batch norm becomes the identity plus the folded bias
    (gamma 1, beta = bias, running mean 0, running var 1 - eps). Exact as long as batch norm runs in eval mode,
    which `--init-onnx` keeps during training (`freeze_bn`). Fine-tuning a shipped model instead of training from
    scratch: the same architecture, a fraction of the steps."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    pairs = []
    for blk in list(net.encoder.blocks) + list(net.decs):
        mods = list(blk)
        pairs += [(mods[i], mods[i + 1]) for i in range(len(mods) - 1)
                  if isinstance(mods[i], torch.nn.Conv2d) and isinstance(mods[i + 1], torch.nn.BatchNorm2d)]
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n.input[1] != "head.weight"]
    if len(convs) != len(pairs):
        raise ValueError(f"{path}: {len(convs)} folded convolutions, the net has {len(pairs)}")
    sd = net.state_dict()
    with torch.no_grad():
        for (conv, bn), node in zip(pairs, convs):
            w, b = init[node.input[1]].copy(), init[node.input[2]].copy()
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{path}: shape {w.shape} vs {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        for name in ("ups.0.weight", "ups.0.bias", "ups.1.weight", "ups.1.bias", "ups.2.weight", "ups.2.bias",
                     "head.weight", "head.bias", "encoder.coords"):
            if name in init and name in sd:
                sd[name].copy_(torch.from_numpy(init[name].copy()))


def _sha(path) -> str:
    from .export import sha256
    return sha256(path)


def freeze_bn(net) -> None:
    """Batch norm in eval mode (running statistics) while the rest trains: used with --init-onnx."""
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def split(cases, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed + 1000)
    idx = rng.permutation(len(cases))
    nv = max(1, int(round(len(cases) * val_fraction))) if len(cases) > 1 else 0
    return [cases[i] for i in idx[nv:]], [cases[i] for i in idx[:nv]]


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when PyTorch sees a GPU, else the CPU. An explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    return torch.device(name)


class Progress:
    """Training progress. On a terminal: a bar per epoch (tqdm when installed, else a plain one) with the step,
    the running loss and the last validation error, and one line kept per epoch. Not on a terminal (a log file,
    CI, nohup): only the one line per epoch, so logs do not fill with carriage-return frames."""

    def __init__(self, label: str, epochs: int, steps_per_epoch: int, stream=None, tty=None, plain=False):
        self.plain = plain  # the own bar even when tqdm is installed (tests)
        self.label, self.epochs, self.spe = label, epochs, max(1, steps_per_epoch)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar = None
        self.k = 0
        self.last_val = ""

    def start(self, ep: int) -> None:
        self.k = 0
        if not self.tty:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if self.plain:
            tqdm = None
        if tqdm is not None:
            self.bar = tqdm(total=self.spe, desc=f"{self.label} epoch {ep}/{self.epochs}", file=self.stream,
                            leave=False, dynamic_ncols=True, unit="step")
        self.ep = ep

    def step(self, loss: float) -> None:
        self.k += 1
        if not self.tty:
            return
        post = f"loss {loss:.4f}" + (f" | val {self.last_val}" if self.last_val else "")
        if self.bar is not None:
            self.bar.set_postfix_str(post, refresh=False)  # drawn by the update, at tqdm's rate
            self.bar.update(1)
        else:
            n = 30
            fill = int(n * min(self.k, self.spe) / self.spe)
            self.stream.write(f"\r{self.label} epoch {self.ep}/{self.epochs} [{'#' * fill}{'.' * (n - fill)}] "
                              f"{self.k}/{self.spe} {post}   ")
            self.stream.flush()

    def end(self, line: str, val_text: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.tty:
            self.stream.write("\r\033[K")
        self.last_val = val_text or self.last_val
        print(line, file=self.stream, flush=True)


def case_id(source: str, csv_path) -> str:
    """A case as its CSV names it: the series folder relative to the CSV's folder (`cases/c0001` in an export),
    or the path itself when it lies elsewhere."""
    rel = os.path.relpath(os.path.abspath(source), os.path.abspath(Path(csv_path).parent))
    return source if rel.startswith("..") else rel


def write_split(path, val, csv_path) -> list[str]:
    """The validation cases as a CSV next to the model (`case,series_dir,value`; series_dir absolute, so
    `data.read_csv` and `report.py` read it from anywhere). Returns the case ids."""
    ids = []
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case", "series_dir", "value"])
        for c in val:
            cid = case_id(c.source, csv_path)
            ids.append(cid)
            wr.writerow([cid, os.path.abspath(c.source), repr(c.value)])
    return ids


def data_summary(cases, train, val, spec, csv_path) -> dict:
    """What the model was trained on, for the card: counts, value range, and the export's dataset.json."""
    v = np.array([c.value for c in cases], dtype=np.float64)
    out = {"cases": len(cases), "train_cases": len(train), "val_cases": len(val),
           "unit": spec.unit_ucum,
           "value_range": [round(float(v.min()), 4), round(float(v.max()), 4)] if v.size else None,
           "value_mean": round(float(v.mean()), 4) if v.size else None,
           "value_median": round(float(np.median(v)), 4) if v.size else None,
           "zero_value_cases": int(np.sum(v <= 0))}
    ds = Path(csv_path).parent / "dataset.json"
    if ds.exists():
        try:
            out["dataset"] = json.loads(ds.read_text())
        except ValueError as e:
            out["dataset"] = f"unreadable: {e}"
    return out


# arguments that change what a run computes: a resumed run must have the same ones
RESUME_KEYS = ("task", "csv", "seed", "epochs", "max_steps", "max_cases", "batch_size", "lr", "loss", "sparsity",
               "sparsity_norm", "map_bias", "positive_fraction", "value_weighted", "select", "widths", "contrast",
               "size", "val_fraction", "val_csv", "init_onnx", "val_every")


def checkpoint_path(out, task: str, method: str) -> Path:
    """Hidden beside the model (`.pma.ckpt.pt`, `baseline/.pma-direct.ckpt.pt`): models/.gitignore keeps it out."""
    from .export import model_dir, onnx_name
    return model_dir(out, method) / f".{Path(onnx_name(task, method)).stem}.ckpt.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file and renamed, so an interruption never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, want: dict, method: str, val_ids: list[str]) -> dict:
    """The checkpoint at `path`, if it was written by a run with the same `want` arguments and validation split."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    diff = [f"--{k.replace('_', '-')}: checkpoint {ck['args'].get(k)!r}, now {want[k]!r}"
            for k in RESUME_KEYS if ck["args"].get(k) != want[k]]
    if diff or ck["method"] != method:
        sys.exit(f"--resume: {path} was written by a different run ({'; '.join(diff) or ck['method']}); "
                 "use the same options or a new --out")
    if ck["val_cases"] != val_ids:
        sys.exit(f"--resume: the validation split differs from the checkpoint's ({path}): the CSV changed")
    return ck


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(tasks.TASKS))
    p.add_argument("--csv", required=True)
    p.add_argument("--method", default="localization", choices=["localization", "direct"])
    p.add_argument("--baseline", action="store_true",
                   help="also train the direct-regression baseline (--method direct) on the same split, into "
                        "OUT/baseline/, and put it beside the localization model in report.html")
    p.add_argument("--baseline-epochs", type=int, default=0, help="epochs of the baseline (0 = --epochs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): CUDA when PyTorch sees a GPU, else CPU")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    p.add_argument("--max-cases", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss", default="l1", choices=["l1", "smooth_l1", "mse", "log1p"],
                   help="value loss (area tasks); log1p = smooth-L1 (beta 0.1) on log1p(cm2), as for agatston")
    p.add_argument("--sparsity", type=float, default=1e-2, help="lambda of the L1 map penalty")
    p.add_argument("--sparsity-norm", default="all", choices=["all", "value"],
                   help="all: lambda * mean(map) over every pixel (default); value: lambda * sum(map * W) / "
                        "value_scale, the L1 of the map inside candidates in the loss's units")
    p.add_argument("--map-bias", type=float, default=0.0, help="initial bias of the map head (logit)")
    p.add_argument("--positive-fraction", type=float, default=0.0,
                   help="> 0: class-balanced sampling, this fraction of draws from value > 0 cases")
    p.add_argument("--value-weighted", action="store_true",
                   help="sample cases with probability proportional to value + mean value")
    p.add_argument("--select", default="last", choices=["last", "best_val"],
                   help="best_val: keep the epoch with the lowest validation MAE (validation split only)")
    p.add_argument("--widths", default="8,16,32", help="encoder widths, comma separated")
    p.add_argument("--contrast", default="",
                   help="local-contrast input channels: odd box sizes, comma separated (e.g. 9,21); both methods")
    p.add_argument("--size", type=int, default=0, help="override the model input size (square)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-csv", default="",
                   help="a fixed validation set (its own labels CSV, e.g. held-out real backgrounds) instead of the "
                        "random --val-fraction split of --csv; every case of --csv is then a training case")
    p.add_argument("--val-every", type=int, default=1,
                   help="validate every N epochs (and after the last); the progress shows the latest")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="models/")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (written after every epoch); the result equals an "
                        "uninterrupted run with the same options")
    p.add_argument("--stop-after-epoch", type=int, default=0,
                   help="end this run after epoch N, checkpoint kept and nothing exported (continue with --resume)")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report.html")
    p.add_argument("--stop-file", default="",
                   help="if this file appears, stop after the current step, validate, keep the best epoch, export")
    p.add_argument("--init-onnx", default="",
                   help="start from a shipped localization model (ONNX) and fine-tune it, batch norm frozen")
    p.add_argument("--data-note", default="", help="free text for the card's training.data")
    a = p.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])

    torch.set_num_threads(a.threads)
    spec = tasks.get(a.task)
    if a.size:
        spec = tasks.with_size(spec, a.size)
    device = resolve_device(a.device)

    t0 = time.time()
    cases = D.load_cases(a.csv, spec, a.cache_dir)
    if a.max_cases:
        cases = cases[:a.max_cases]
    if a.val_csv:
        train, val = cases, D.load_cases(a.val_csv, spec, a.cache_dir)
    else:
        train, val = split(cases, a.val_fraction, a.seed)
    print(f"[train] {a.task}: {len(train)} train, {len(val)} val cases on {device} "
          f"(prepared in {time.time() - t0:.0f}s)", flush=True)

    methods = [a.method] + (["direct"] if a.baseline and a.method != "direct" else [])
    net = None
    for method in methods:
        res = run(a, method, spec, device, cases, train, val)
        if res is None:  # --stop-after-epoch
            return None
        net = net or res
    if not a.no_report and val and a.method == "localization":  # the report is about the localization model
        from . import report
        path = report.write_report(Path(a.out))
        print(f"[train] wrote {path}", flush=True)
    return net


def run(a, method: str, spec, device, cases, train, val):
    """Train one method (resuming from its checkpoint with --resume), export ONNX + card + split file.
    Returns the trained net, or None when --stop-after-epoch ended the run early."""
    from . import export
    epochs = (a.baseline_epochs or a.epochs) if method == "direct" and a.method != "direct" else a.epochs
    out = Path(a.out)
    d = export.model_dir(out, method)
    d.mkdir(parents=True, exist_ok=True)
    stem = Path(export.onnx_name(a.task, method)).stem
    val_csv_for_ids = a.val_csv or a.csv
    split_path = d / f"{stem}.validation.csv"
    val_ids = write_split(split_path, val, val_csv_for_ids)
    ckpt = checkpoint_path(out, a.task, method)
    widths = tuple(int(v) for v in a.widths.split(","))
    contrast = tuple(int(v) for v in a.contrast.split(",") if v.strip())
    t0 = time.time()

    _seed(a.seed)  # per method: a baseline does not depend on whether the localization model trained first
    net = nets.build(method, spec, widths, contrast).to(device)
    init_bias(net, method, spec, train, a.map_bias)
    if a.init_onnx:
        init_from_onnx(net, a.init_onnx)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    bs = max(1, a.batch_size // 8) if spec.slices == "all" else a.batch_size
    batcher = Batcher(train, spec, bs, device, skip_empty_slices=True, positive_fraction=a.positive_fraction,
                      value_weighted=a.value_weighted)
    steps_per_epoch = (len(train) + bs - 1) // bs
    total = epochs * steps_per_epoch
    if a.max_steps:
        total = min(total, a.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=max(total, 1), pct_start=0.15)
    rng = np.random.default_rng(a.seed)
    step = 0
    best = None  # (val mae, epoch, state) with --select best_val
    history = []
    start_ep = 0
    args = {k: getattr(a, k) for k in RESUME_KEYS}
    args["epochs"] = epochs
    if a.resume and ckpt.exists():
        ck = load_checkpoint(ckpt, args, method, val_ids)
        if ck.get("done"):
            print(f"[train] {method}: {ckpt} says this run finished and was exported; nothing to resume", flush=True)
            net.load_state_dict(ck["net"])
            return net.eval().cpu()
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"])
        random.setstate(ck["py_random"])
        np.random.set_state(ck["np_random"])
        step, best, history, start_ep = ck["step"], ck["best"], ck["history"], ck["epoch"]
        t0 -= ck.get("seconds", 0.0)
        print(f"[train] {method}: resumed from {ckpt} after epoch {start_ep} (step {step})", flush=True)
    elif a.resume:
        print(f"[train] {method}: no checkpoint at {ckpt}; starting from epoch 1", flush=True)

    def checkpoint(ep_done: int, done: bool = False):
        save_checkpoint(ckpt, {
            "format": "biomarker-training-checkpoint/1", "task": a.task, "method": method, "args": args,
            "epoch": ep_done, "step": step, "net": net.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "py_random": random.getstate(), "np_random": np.random.get_state(), "best": best,
            "history": history, "val_cases": val_ids, "seconds": time.time() - t0, "done": done})

    label = f"[train] {a.task}/{method}"
    prog = Progress(label, epochs, min(steps_per_epoch, max(total, 1)))
    net.train()
    if a.init_onnx:
        freeze_bn(net)
    ep = start_ep - 1
    try:
        for ep in range(start_ep, epochs):
            if step >= total:
                break
            losses = []
            prog.start(ep + 1)
            for x, w, seg, y in batcher.epoch(rng):
                if a.stop_file and os.path.exists(a.stop_file):
                    # out of time: end here; this partial epoch is validated like a full one, then export
                    print(f"[train] {a.stop_file} exists: stopping at step {step}", flush=True)
                    total = step
                if step >= total:
                    break
                if method == "localization":
                    pred, m = forward_values(net, method, spec, x, w, seg, len(y))
                    loss = value_loss(pred, y, spec, a.loss) + a.sparsity * sparsity_term(m, w, spec,
                                                                                           a.sparsity_norm, len(y))
                else:
                    z, _ = forward_values(net, method, spec, x, w, seg, len(y))
                    loss = direct_loss(z, y, spec, a.loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                prog.step(float(np.mean(losses)))
            last = ep + 1 == epochs or step >= total
            rec = {"epoch": ep + 1, "step": step, "loss": round(float(np.mean(losses)), 6) if losses else None}
            msg = f"{label} epoch {ep + 1}/{epochs} step {step} loss {rec['loss'] if losses else float('nan'):.4f}"
            val_text = ""
            if val and (last or (a.val_every > 0 and (ep + 1) % a.val_every == 0)):
                net.eval()
                vm = quick_val(net, method, spec, val, device)
                net.train()
                if a.init_onnx:
                    freeze_bn(net)
                rec.update(val_mae=vm["mae"], val_r=vm["r"])
                val_text = f"MAE {vm['mae']} {spec.unit_ucum}, r {vm['r']}"
                msg += f" | val {val_text}"
                if a.select == "best_val" and (best is None or vm["mae"] < best[0]):
                    best = (vm["mae"], ep + 1, {k: v.detach().clone().cpu() for k, v in net.state_dict().items()})
            rec["seconds"] = round(time.time() - t0, 1)
            history.append(rec)
            prog.end(msg + f" ({time.time() - t0:.0f}s)", val_text)
            checkpoint(ep + 1)
            if a.stop_after_epoch and ep + 1 >= a.stop_after_epoch and not last:
                print(f"[train] stopped after epoch {ep + 1} (--stop-after-epoch); continue with --resume", flush=True)
                return None
    except KeyboardInterrupt:
        print(f"\n[train] interrupted; the checkpoint after epoch {ep} is {ckpt}: rerun with --resume", flush=True)
        raise SystemExit(130)

    chosen_epoch = history[-1]["epoch"] if history else 0
    if best is not None:
        net.load_state_dict(best[2])
        chosen_epoch = best[1]
        print(f"[train] kept epoch {chosen_epoch} (lowest validation MAE {best[0]})", flush=True)
    net.eval().cpu()
    val_metrics = quick_val(net, method, spec, val)
    print(f"[train] {method} val: {json.dumps(val_metrics)}", flush=True)
    (d / f"{stem}.history.json").write_text(json.dumps(history, indent=1) + "\n")

    onnx_path, card_path = export.export_and_card(
        net, method, spec, out, val, widths=widths,
        training={
            "command": "python -m biomarker_training.train " + " ".join(shlex.quote(s) for s in a.argv),
            "data": a.data_note or str(a.csv),
            "data_summary": data_summary(cases if not a.val_csv else list(cases) + list(val), train, val, spec,
                                         a.csv),
            "validation_split": {
                "file": split_path.name,
                "how": (f"fixed set {a.val_csv}" if a.val_csv else
                        f"{a.val_fraction:g} of the cases, drawn with seed {a.seed} (train.split)"),
                "cases": val_ids},
            "device": str(device),
            "seed": a.seed, "epochs": epochs, "steps": step, "train_cases": len(train),
            "val_cases": len(val), "lr": a.lr,
            "loss": "smooth_l1(log1p(value), beta 0.1)" if spec.aggregation == "agatston" or (a.loss == "log1p" and method == "localization") else a.loss, "sparsity_lambda": a.sparsity, "batch_size": a.batch_size,
            "sparsity_norm": a.sparsity_norm, "map_bias": a.map_bias, "positive_fraction": a.positive_fraction,
            "value_weighted_sampling": a.value_weighted,
            "select": a.select, "chosen_epoch": chosen_epoch,
            "git_commit": git_commit(), "seconds": round(time.time() - t0, 1),
            **({"init_onnx": f"{a.init_onnx} (sha256 {_sha(a.init_onnx)}), batch norm frozen"} if a.init_onnx else {}),
        },
        val_metrics=val_metrics, version=a.version, contrast=contrast)
    print(f"[train] wrote {onnx_path} and {card_path}", flush=True)
    checkpoint(history[-1]["epoch"] if history else 0, done=True)
    return net


def sparsity_term(m, w, spec, norm: str, n: int):
    """L1 penalty on the (non-negative) map. all: mean over every pixel of the batch. value: the map's L1
    inside the candidates weighted like the value, sum(map * W) / value_scale per case (for agatston the
    log1p scale has no value_scale, so it is divided by 100 there)."""
    if norm == "all":
        return m.mean()
    return (m * w).sum() / (spec.value_scale * n)


@torch.no_grad()
def quick_val(net, method, spec, val, device=None):
    if not val:
        return {}
    preds = []
    for c in val:
        x = torch.from_numpy(c.x[:, None]).float()
        if device is not None:
            x = x.to(device)
        if method == "localization":
            m = net(x).double().cpu().numpy()[:, 0]
            preds.append(float((m * c.w).sum()))
        else:
            preds.append(float(net(x).reshape(-1)[0]))
    y = np.array([c.value for c in val])
    pr = np.array(preds)
    r = float(np.corrcoef(pr, y)[0, 1]) if len(y) > 2 and np.std(y) > 0 and np.std(pr) > 0 else float("nan")
    return {"n": len(y), "r": round(r, 4), "mae": round(float(np.mean(np.abs(pr - y))), 4)}


if __name__ == "__main__":
    main()
