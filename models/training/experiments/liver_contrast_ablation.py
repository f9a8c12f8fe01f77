"""The ablation behind liver 0.3.0 (EVALUATION_NOTES.md): the same U-Net, loss and data with and without the
local-contrast channels, validation split only. Built from the product pieces (nets.build with `contrast`,
train.value_loss, train.sparsity_term, train.Batcher); unlike train.py it exports nothing and also prints the
map's maximum, which shows whether a map is still constant.

    PYTHONPATH=models/training python models/training/experiments/liver_contrast_ablation.py \
        --csv DATA/train/liver/labels.csv --contrast 9,21 --tag with
    ... --contrast "" --tag without
"""
import argparse
import time

import numpy as np
import torch

from biomarker_training import data as D
from biomarker_training import nets, tasks
from biomarker_training import train as TR

p = argparse.ArgumentParser()
p.add_argument("--csv", required=True)
p.add_argument("--contrast", default="9,21", help="box sizes, comma separated; empty for none")
p.add_argument("--loss", default="mse", choices=["l1", "smooth_l1", "mse"])
p.add_argument("--map-bias", type=float, default=-2.0)
p.add_argument("--epochs", type=int, default=25)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--sparsity", type=float, default=0.01)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--tag", default="run")
a = p.parse_args()

torch.set_num_threads(a.threads)
TR._seed(1)
spec = tasks.get("liver")
train, val = TR.split(D.load_cases(a.csv, spec), 0.1, 1)
contrast = tuple(int(v) for v in a.contrast.split(",") if v.strip())
net = nets.build("localization", spec, (8, 16, 32, 64), contrast)
net.head.bias.data.fill_(a.map_bias)
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
batcher = TR.Batcher(train, spec, a.batch_size, torch.device("cpu"), True)
steps = a.epochs * ((len(train) + a.batch_size - 1) // a.batch_size)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.15)
rng = np.random.default_rng(1)
t0 = time.time()
for ep in range(a.epochs):
    losses = []
    for x, w, seg, y in batcher.epoch(rng):
        pred, m = TR.forward_values(net, "localization", spec, x, w, seg, len(y))
        loss = TR.value_loss(pred, y, spec, a.loss) + a.sparsity * TR.sparsity_term(m, w, spec, "all", len(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    vm = TR.quick_val(net, "localization", spec, val)
    with torch.no_grad():
        mx = max(float(net(torch.from_numpy(c.x[:, None]).float()).max()) for c in val[:10])
    net.train()
    print(f"{a.tag} epoch {ep + 1} loss {np.mean(losses):.4f} val r {vm['r']} mae {vm['mae']} map max {mx:.3f} "
          f"({time.time() - t0:.0f}s)", flush=True)
