"""realbg.py (synthetic tumours in real backgrounds) on synthetic arrays, and train.py --init-onnx
(fine-tuning a shipped model: the folded ONNX weights must load exactly)."""

import numpy as np
import torch

from biomarker_training import export, nets, realbg, train
from biomarker_training.tasks import get, with_size


def _ellipse(n, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:n, 0:n]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _abdomen(n=256, rng=None):
    """Body of fat, a 'liver' at 60 HU on the image left (the patient's right), a 'spleen' of the same HU on the
    right, noise 8 HU."""
    rng = rng or np.random.default_rng(0)
    hu = np.full((n, n), -1000.0, np.float32)
    hu[_ellipse(n, n / 2, n / 2, n * 0.4, n * 0.46)] = -100
    hu[_ellipse(n, n / 2, n / 2, n * 0.36, n * 0.42)] = -60
    liver = _ellipse(n, n * 0.45, n * 0.32, n * 0.2, n * 0.14)
    spleen = _ellipse(n, n * 0.5, n * 0.72, n * 0.08, n * 0.06)
    hu[liver] = 60
    hu[spleen] = 60
    return (hu + rng.normal(0, 8, hu.shape)).astype(np.float32), liver, spleen


def test_liver_region_picks_the_patients_right():
    hu, liver, spleen = _abdomen()
    reg = realbg.liver_region(hu, spacing=1.5)
    assert reg.sum() > 0.7 * liver.sum()
    assert (reg & spleen).sum() == 0
    assert (reg & ~liver).sum() < 0.1 * reg.sum()
    # row direction -x (mirrored image): the patient's right is on the image right
    reg2 = realbg.liver_region(hu, spacing=1.5, right_is_low_column=False)
    assert (reg2 & liver).sum() == 0


def test_inserted_tumours_are_hypodense_inside_the_region_and_the_label_is_their_area():
    hu, liver, _ = _abdomen()
    rng = np.random.default_rng(3)
    out, mask, recs = realbg.insert_tumours(hu, liver, 1.5, rng, 3)
    assert recs and mask.any()
    assert not (mask & ~liver).any()
    assert out[mask].mean() < hu[liver & ~mask].mean() - 10
    assert np.array_equal(out[~liver], hu[~liver])  # clipped: nothing outside the region changes
    assert all(15 <= r["delta_hu"] <= 90 and 5 <= r["diameter_mm"] <= 80 for r in recs)
    none, m0, r0 = realbg.insert_tumours(hu, liver, 1.5, rng, 0)
    assert not m0.any() and r0 == [] and np.array_equal(none, hu)


def test_large_and_confluent_tumours():
    """--large draws 80-150 mm tumours, --confluent lobulated masses of several nodules; both off draw no random
    number, so the data of liver 0.4.0 (made before the options) is reproduced case for case."""
    n = 400
    hu = np.full((n, n), 60.0, np.float32)
    reg = np.ones((n, n), bool)
    out, mask, recs = realbg.insert_tumours(hu, reg, 0.8, np.random.default_rng(1), 4, large_p=1.0, confluent_p=1.0)
    assert len(recs) == 4 and all(80 <= r["diameter_mm"] <= 150 and 2 <= r["nodules"] <= 5 for r in recs)
    # the four masses cover more than one 80 mm disc, and more than four tumours drawn without the options
    assert mask.sum() * 0.8 * 0.8 / 100 > np.pi * 4.0 ** 2
    small = realbg.insert_tumours(hu, reg, 0.8, np.random.default_rng(1), 4)
    assert all(5 <= r["diameter_mm"] <= 80 and r["nodules"] == 1 for r in small[2])
    assert mask.sum() > small[1].sum()
    hu2, liver, _ = _abdomen()
    bg = ("synthetic", 0, hu2, 1.5, liver)
    a = realbg.make_case(bg, np.random.default_rng([11, 7]))
    b = realbg.make_case(bg, np.random.default_rng([11, 7]), 0.25, 0.0, 0.0)
    assert np.array_equal(a[0], b[0]) and a[3] == b[3]


def test_cases_are_reproducible():
    hu, liver, _ = _abdomen()
    bg = ("synthetic", 0, hu, 1.5, liver)
    a = realbg.make_case(bg, np.random.default_rng([11, 5]))
    b = realbg.make_case(bg, np.random.default_rng([11, 5]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[3] == b[3]
    assert abs(a[3]["value"] - a[1].sum() * 1.5 * 1.5 / 100) < 1e-9


def test_init_from_onnx_is_exact(tmp_path):
    torch.manual_seed(0)
    spec = with_size(get("liver"), 32)
    net = nets.build("localization", spec, (4, 8), (3,))
    for m in net.modules():  # non-trivial batch norm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "m.onnx"
    export.export_onnx(net, "localization", spec, path)
    fresh = nets.build("localization", spec, (4, 8), (3,))
    train.init_from_onnx(fresh, path)
    fresh.train()
    train.freeze_bn(fresh)  # as in training: batch norm on its (identity) running statistics
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh(x), net.eval()(x), atol=1e-5)
