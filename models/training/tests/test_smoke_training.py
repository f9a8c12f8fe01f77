"""CI smoke: tiny phantoms -> a few training steps -> ONNX export -> ORT biomarker == PyTorch's.

Uses the Rust generator when BIOMARKER_NODE_BIN points at a biomarker-node binary, otherwise the
pydicom synthetic phantoms from synth.py. Whole module must stay well under 3 minutes on 2 cores.
"""

import os
import subprocess

import numpy as np
import pytest

from biomarker_training import evaluate, export, golden, nets, synth, train
from biomarker_training.tasks import get, with_size


def _phantoms(task, tmp_path, count):
    binary = os.environ.get("BIOMARKER_NODE_BIN")
    out = tmp_path / task
    if binary and os.path.exists(binary):
        subprocess.run([binary, "phantom", "--task", task, "--seed", "5", "--out", str(out),
                        "--count", str(count)], check=True)
        return out / "labels.csv"
    return synth.generate(task, 5, out, count, n=32, slices=4)


@pytest.mark.parametrize("task", ["pma", "cac"])
class TestSmokeTraining:
    @pytest.mark.parametrize("method", ["localization", "direct"])
    def test_train_export_parity(self, task, method, tmp_path):
        csv_path = _phantoms(task, tmp_path, 6)
        out = tmp_path / "models"
        train.main(["--task", task, "--csv", str(csv_path), "--method", method, "--epochs", "1",
                    "--max-steps", "3", "--batch-size", "4", "--size", "32", "--seed", "0",
                    "--out", str(out), "--val-fraction", "0.5", "--no-report"])
        d = export.model_dir(out, method)
        card = export.read_card(d / export.card_name(task, method))
        assert card["sha256"] == export.sha256(d / card["onnx"])
        assert card["opset"] == 17 and card["input"]["layout"] == "NCHW"
        for key in ("name", "version", "task", "onnx", "input", "candidates", "aggregation", "biomarker",
                    "training", "metrics"):
            assert key in card
        res = evaluate.evaluate_task(task, csv_path, out)
        assert res["methods"][method]["n"] == 6
        if method == "localization":
            doc = golden.make_case(task, *golden.pick(export_rows(csv_path), task, 1)[0], out, tmp_path / "g")
            assert (tmp_path / "g" / "map.npy").exists() and "value" in doc


def export_rows(csv_path):
    from biomarker_training.data import read_csv
    return read_csv(csv_path)


class TestNets:
    def test_unet_map_range_and_shape(self):
        import torch
        net = nets.UNet((4, 8, 16)).eval()
        m = net(torch.randn(3, 1, 32, 32))
        assert m.shape == (3, 1, 32, 32) and float(m.detach().min()) >= 0 and float(m.detach().max()) <= 1

    def test_direct_cac_pools_over_slices(self):
        import torch
        net = nets.build("direct", with_size(get("cac"), 16), (4, 8)).eval()
        assert net(torch.randn(5, 1, 16, 16)).shape == (1, 1)

    def test_parity_check_detects_mismatch(self):
        import torch

        class Fake:
            def run(self, *_a, **_k):
                return [np.zeros((1, 1, 8, 8), np.float32)]

        case = type("Case", (), {"x": np.ones((1, 8, 8), np.float32), "w": np.ones((1, 8, 8))})()
        with pytest.raises(AssertionError):
            export.parity_check(lambda t: torch.ones_like(t), "localization", Fake(), [case])


class TestContrastChannels:
    def test_liver_with_contrast_channels_exports_and_matches_ort(self, tmp_path):
        # the contrast channels are AveragePool nodes inside the graph: ORT must agree with torch (parity is
        # asserted inside export_and_card) and the card must say how they are computed
        csv_path = _phantoms("liver", tmp_path, 6)
        out = tmp_path / "models"
        train.main(["--task", "liver", "--csv", str(csv_path), "--method", "localization", "--epochs", "1",
                    "--max-steps", "2", "--batch-size", "4", "--size", "32", "--seed", "0", "--loss", "mse",
                    "--contrast", "5,9", "--out", str(out), "--val-fraction", "0.5", "--no-report"])
        card = export.read_card(export.model_dir(out, "localization") / export.card_name("liver", "localization"))
        assert card["architecture"]["contrast_channels"]["box_sizes"] == [5, 9]
        assert "--contrast 5,9" in card["training"]["command"]

    def test_contrast_channel_is_zero_on_a_flat_image_and_odd_sizes_only(self):
        import torch
        enc = nets.Encoder((4,), size=(16, 16), contrast=(5,))
        seen = {}
        enc.blocks[0].register_forward_pre_hook(lambda _m, inp: seen.setdefault("x", inp[0]))
        enc(torch.full((1, 1, 16, 16), 0.3))
        assert seen["x"].shape[1] == 4  # raw, y, x, contrast
        assert float(seen["x"][:, 3].abs().max()) < 1e-6
        with pytest.raises(ValueError):
            nets.Encoder((4,), size=(16, 16), contrast=(4,))
