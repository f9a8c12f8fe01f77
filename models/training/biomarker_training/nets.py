"""Networks: a small 2D U-Net emitting a sigmoid localization map, and the direct-regression baseline.

Both share `Encoder`, so the only difference between the two methods is the head: decoder +
sigmoid map (localization) vs. global average pooling + linear (direct), as in Cano-Espinosa et al.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """Conv blocks with max-pooling; with `size` set, two constant coordinate channels (y, x in [-1,1])
    are appended to the 1-channel input inside the graph, so the ONNX input stays [N,1,H,W] and the
    net knows where it is (pectoralis is anterior, the liver on the patient's right).

    `contrast` (box sizes, e.g. (9, 21)) appends local-contrast channels 4 * (x - box_mean_k(x)), also inside
    the graph (AveragePool, padding not counted). A liver tumour differs from the parenchyma around it by
    25-70 HU while the parenchyma itself ranges 50-120 HU with the contrast phase; without these channels no
    liver model left the constant map (EVALUATION_NOTES.md), with them the same loss learns to localise."""

    def __init__(self, widths=(8, 16, 32, 64), size=None, contrast=()):
        super().__init__()
        self.widths = tuple(widths)
        self.contrast = tuple(int(k) for k in contrast)
        if any(k % 2 == 0 for k in self.contrast):
            raise ValueError("contrast box sizes must be odd")
        if size is not None:
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
            self.register_buffer("coords", torch.stack([yy, xx])[None], persistent=True)
        else:
            self.coords = None
        chans = ((1 if size is None else 3) + len(self.contrast),) + self.widths
        self.blocks = nn.ModuleList(_block(chans[i], chans[i + 1]) for i in range(len(self.widths)))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        parts = [x]
        if self.coords is not None:
            parts.append(self.coords.expand(x.shape[0], -1, -1, -1))
        for k in self.contrast:
            parts.append(4.0 * (x - F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)))
        if len(parts) > 1:
            x = torch.cat(parts, 1)
        skips = []
        for i, b in enumerate(self.blocks):
            if i > 0:
                x = self.pool(x)
            x = b(x)
            skips.append(x)
        return skips  # finest first; the last one is the bottleneck


class UNet(nn.Module):
    """[N,1,H,W] (H, W divisible by 2**(levels-1)) -> sigmoid map [N,1,H,W]."""

    def __init__(self, widths=(8, 16, 32, 64), size=None, contrast=()):
        super().__init__()
        self.encoder = Encoder(widths, size, contrast)
        w = self.encoder.widths
        self.ups = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                                 for i in reversed(range(len(w) - 1)))
        self.decs = nn.ModuleList(_block(2 * w[i], w[i]) for i in reversed(range(len(w) - 1)))
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x):
        skips = self.encoder(x)
        y = skips[-1]
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips[:-1])):
            y = dec(torch.cat([up(y), skip], 1))
        return torch.sigmoid(self.head(y))


class Direct(nn.Module):
    """Direct regression baseline: Encoder -> global average pool -> linear -> value.

    `per_volume=True` (CAC) pools over the batch axis too: the batch is the slices of ONE volume
    and the output is [1,1]. Output is in the task's unit: area tasks z * value_scale; agatston
    expm1(relu(z)) (the net regresses log1p(score)).
    """

    def __init__(self, widths=(8, 16, 32, 64), kind: str = "area", value_scale: float = 1.0,
                 per_volume: bool = False, size=None, contrast=()):
        super().__init__()
        self.encoder = Encoder(widths, size, contrast)
        self.fc = nn.Linear(self.encoder.widths[-1], 1)
        self.kind = kind
        self.value_scale = float(value_scale)
        self.per_volume = per_volume

    def raw(self, x):
        f = self.encoder(x)[-1]
        f = f.mean(dim=(2, 3))
        if self.per_volume:
            f = f.mean(dim=0, keepdim=True)
        return self.fc(f)  # [N,1] or [1,1]

    def forward(self, x):
        z = self.raw(x)
        if self.kind == "agatston":
            return torch.exp(torch.relu(z)) - 1.0
        return z * self.value_scale


def build(method: str, spec, widths=(8, 16, 32, 64), contrast=()) -> nn.Module:
    """`contrast`: local-contrast box sizes, given to both methods so they keep one encoder."""
    if method == "localization":
        return UNet(widths, spec.size, contrast)
    if method == "direct":
        return Direct(widths, spec.aggregation, spec.value_scale, per_volume=spec.slices == "all", size=spec.size,
                      contrast=contrast)
    raise ValueError(f"unknown method {method!r}")
