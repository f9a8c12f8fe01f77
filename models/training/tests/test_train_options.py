"""Training options added for the current generator: class-balanced sampling, sparsity normalisation,
explicit map bias, best-validation epoch selection and the validation-split CSV."""

import numpy as np
import torch

from biomarker_training import data as D
from biomarker_training import nets, synth, train, valsplit
from biomarker_training.tasks import get, with_size


def _cases(values):
    return [D.Case(np.zeros((1, 4, 4), np.float32), np.ones((1, 4, 4), np.float32), v) for v in values]


class TestBalancedSampling:
    def test_default_is_a_permutation(self):
        b = train.Batcher(_cases([0, 1, 2, 0]), get("liver"), 2, "cpu", True)
        assert sorted(b.order(np.random.default_rng(0)).tolist()) == [0, 1, 2, 3]

    def test_positive_fraction(self):
        cases = _cases([0.0] * 90 + [3.0] * 10)
        b = train.Batcher(cases, get("liver"), 4, "cpu", True, positive_fraction=0.8)
        rng = np.random.default_rng(0)
        draws = np.concatenate([b.order(rng) for _ in range(20)])
        frac = np.mean([cases[i].value > 0 for i in draws])
        assert len(draws) == 2000 and 0.75 < frac < 0.85

    def test_value_weighted(self):
        cases = _cases([0.0] * 50 + [10.0] * 50)  # mean 5: weights 5 and 15 -> 25 % / 75 %
        b = train.Batcher(cases, get("liver"), 4, "cpu", True, value_weighted=True)
        rng = np.random.default_rng(0)
        draws = np.concatenate([b.order(rng) for _ in range(40)])
        frac = np.mean([cases[i].value > 0 for i in draws])
        assert len(draws) == 4000 and 0.72 < frac < 0.78

    def test_all_positive_falls_back_to_permutation(self):
        b = train.Batcher(_cases([1, 2, 3]), get("liver"), 2, "cpu", True, positive_fraction=0.9)
        assert sorted(b.order(np.random.default_rng(0)).tolist()) == [0, 1, 2]


class TestSparsity:
    def test_all_is_mean_map(self):
        m = torch.full((2, 1, 4, 4), 0.25)
        w = torch.zeros_like(m)
        assert float(train.sparsity_term(m, w, get("pma"), "all", 2)) == 0.25

    def test_value_is_map_l1_inside_candidates_in_loss_units(self):
        spec = get("pma")  # value_scale 20
        m = torch.full((2, 1, 4, 4), 0.5)
        w = torch.zeros_like(m)
        w[:, :, :2] = 1.0  # 8 candidate cells per case
        assert abs(float(train.sparsity_term(m, w, spec, "value", 2)) - (2 * 8 * 0.5) / (20 * 2)) < 1e-6


class TestMapBias:
    def test_head_bias(self):
        spec = with_size(get("liver"), 16)
        net = nets.build("localization", spec, (4, 8))
        train.init_bias(net, "localization", spec, _cases([1.0]), map_bias=-2.0)
        assert float(net.head.bias) == -2.0


class TestSelectAndValsplit:
    def test_best_val_and_valsplit(self, tmp_path):
        csv_path = synth.generate("pma", 7, tmp_path / "ph", 6, n=32)
        out = tmp_path / "models"
        train.main(["--task", "pma", "--csv", str(csv_path), "--epochs", "2", "--batch-size", "2", "--size", "32",
                    "--seed", "0", "--out", str(out), "--val-fraction", "0.5", "--select", "best_val", "--no-report",
                    "--widths", "4,8", "--sparsity-norm", "value", "--map-bias", "-1"])
        from biomarker_training import export
        card = export.read_card(out / "pma.yaml")
        assert card["training"]["select"] == "best_val" and card["training"]["chosen_epoch"] in (1, 2)
        assert card["training"]["map_bias"] == -1.0 and card["training"]["sparsity_norm"] == "value"
        valsplit.main(["--csv", str(csv_path), "--out", str(tmp_path / "val.csv"), "--seed", "0",
                       "--val-fraction", "0.5"])
        rows = D.read_csv(tmp_path / "val.csv")
        _, val = train.split(D.read_csv(csv_path), 0.5, 0)
        assert [v for _, v in rows] == [v for _, v in val]
