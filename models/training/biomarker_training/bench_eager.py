"""PyTorch eager fp32 timings of the shipped models' architectures, for issue 15's comparison with ONNX Runtime.

The node's side is `inference::tests::provider_timings` (Rust, ORT CPU and CUDA through `Model::run`); this times
the same networks, built from each card's architecture (widths, input size, contrast boxes), at the same batch
sizes (1, and 110: the 3 mm slabs of a 300-slice chest), in eval mode under `torch.inference_mode()`, input on
the host and the map back on the host, as `Model::run` does. The weights are a seeded initialisation, not the
shipped ones: the time of a forward pass does not depend on the values. TF32 is off, as in ORT.

    python -m biomarker_training.bench_eager --models models [--device cuda]

Prints one line per (model, batch): `timing torch-<device> <model> batch <n> <h>x<w>: median <ms> ms`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from .nets import UNet

BATCHES = (1, 110)
NAMES = ("pma", "sfa", "cac", "liver")


def net_of(card: dict) -> UNet:
    arch = card["architecture"]
    contrast = tuple((arch.get("contrast_channels") or {}).get("box_sizes") or ())
    return UNet(tuple(arch["widths"]), tuple(card["input"]["size"]), contrast)


def median_ms(net: UNet, x: torch.Tensor, device: torch.device, warmup: int = 3, runs: int = 15) -> float:
    def once() -> None:
        y = net(x.to(device))
        y.cpu()  # waits for the device, as the node's copy of the map back does

    with torch.inference_mode():
        for _ in range(warmup):
            once()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            once()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    torch.manual_seed(0)
    for name in NAMES:
        card = yaml.safe_load((args.models / f"{name}.yaml").read_text())
        net = net_of(card).eval().to(device)
        h, w = card["input"]["size"]
        for batch in BATCHES:
            x = torch.rand(batch, 1, h, w) * 2 - 1
            print(f"timing torch-{device.type} {name} batch {batch} {h}x{w}: median {median_ms(net, x, device):.2f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
