"""bench_eager.py times the shipped architectures: the eager net it builds from each card must be the ONNX graph's
network (the same convolution kernels, and the same output shape), or the comparison with ORT is void."""

from pathlib import Path

import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from biomarker_training.bench_eager import NAMES, median_ms, net_of

MODELS = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", NAMES)
def test_eager_net_is_the_shipped_architecture(name):
    card = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    net = net_of(card).eval()
    graph = onnx.load(str(MODELS / card["onnx"])).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    onnx_kernels = [tuple(inits[n.input[1]].shape) for n in graph.node
                    if n.op_type in ("Conv", "ConvTranspose") and n.input[1] in inits]
    torch_kernels = [tuple(m.weight.shape) for m in net.modules()
                     if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    # Module order (all upsamplings, then all decoder blocks) is not the graph's execution order.
    assert sorted(onnx_kernels) == sorted(torch_kernels)
    assert len(torch_kernels) > 10
    h, w = card["input"]["size"]
    with torch.inference_mode():
        assert tuple(net(torch.zeros(2, 1, h, w)).shape) == (2, 1, h, w)


def test_median_ms_times_a_forward_pass():
    card = yaml.safe_load((MODELS / "cac.yaml").read_text())
    ms = median_ms(net_of(card).eval(), torch.zeros(1, 1, *card["input"]["size"]), torch.device("cpu"), 1, 3)
    assert 0 < ms < 60_000
