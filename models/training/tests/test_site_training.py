"""Issue 14 part 2, training a site model: device choice, progress output, checkpoint/--resume equivalence, the
validation split file, --baseline, and report.html with its PNGs (tiny synthetic phantoms, a few seconds each)."""

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch

from biomarker_training import export, report, synth, train

TINY = ["--task", "pma", "--epochs", "3", "--batch-size", "2", "--size", "32", "--widths", "4,8", "--seed", "0",
        "--val-fraction", "0.3", "--threads", "1"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph")
    csv_path = synth.generate("pma", 3, d / "pma", 10, n=32)
    # an export's dataset.json beside the labels: copied into the card's data summary
    (d / "pma" / "dataset.json").write_text(json.dumps({"format": "biomarker-node-export/1", "task": "pma",
                                                        "unit": "cm2", "cases": 10}))
    return csv_path


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


class TestDeviceAndProgress:
    def test_auto_device(self):
        want = "cuda" if torch.cuda.is_available() else "cpu"
        assert train.resolve_device("auto").type == want
        assert train.resolve_device("cpu").type == "cpu"

    def test_not_a_terminal_one_line_per_epoch(self):
        s = io.StringIO()
        p = train.Progress("[train] pma/localization", 2, 3, stream=s, tty=False)
        for ep in (1, 2):
            p.start(ep)
            for _ in range(3):
                p.step(0.5)
            p.end(f"epoch {ep} done", "MAE 1.0")
        assert s.getvalue() == "epoch 1 done\nepoch 2 done\n"

    @pytest.mark.parametrize("plain", [True, False])
    def test_terminal_bar_shows_loss_and_last_validation(self, plain):
        s = io.StringIO()
        p = train.Progress("[train] pma/localization", 2, 3, stream=s, tty=True, plain=plain)
        p.start(1)
        p.step(0.25)
        p.end("epoch 1 done", "MAE 1.5 cm2")
        p.start(2)
        p.step(0.125)
        p.end("epoch 2 done")
        out = s.getvalue()
        assert "\r" in out and "epoch 2/2" in out
        if plain:  # tqdm redraws at most every 0.1 s, so only the own bar shows each step for sure
            assert "0.1250" in out and "MAE 1.5 cm2" in out
        assert out.rstrip().endswith("epoch 2 done")


class TestResume:
    def test_resumed_run_equals_uninterrupted(self, phantoms, tmp_path):
        a, b = tmp_path / "a", tmp_path / "b"
        common = TINY + ["--csv", str(phantoms), "--no-report", "--select", "best_val"]
        train.main(common + ["--out", str(a)])
        # interrupted after epoch 1 (nothing exported), then resumed to the end
        assert train.main(common + ["--out", str(b), "--stop-after-epoch", "1"]) is None
        assert not (b / "pma.onnx").exists() and (b / ".pma.ckpt.pt").exists()
        train.main(common + ["--out", str(b), "--resume"])
        sa, sb = _state(a / ".pma.pt"), _state(b / ".pma.pt")
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
        ha = json.loads((a / "pma.history.json").read_text())
        hb = json.loads((b / "pma.history.json").read_text())
        assert [(r["epoch"], r["loss"], r.get("val_mae")) for r in ha] == \
               [(r["epoch"], r["loss"], r.get("val_mae")) for r in hb]
        ca, cb = export.read_card(a / "pma.yaml"), export.read_card(b / "pma.yaml")
        assert ca["metrics"]["validation"] == cb["metrics"]["validation"]
        assert ca["training"]["chosen_epoch"] == cb["training"]["chosen_epoch"]

    def test_resume_refuses_other_options(self, phantoms, tmp_path):
        out = tmp_path / "c"
        train.main(TINY + ["--csv", str(phantoms), "--no-report", "--out", str(out), "--stop-after-epoch", "1"])
        with pytest.raises(SystemExit, match="--lr"):
            train.main(TINY + ["--csv", str(phantoms), "--no-report", "--out", str(out), "--resume",
                               "--lr", "1e-2"])


class TestSplitBaselineReport:
    def test_split_file_baseline_and_report(self, phantoms, tmp_path):
        out = tmp_path / "out"
        train.main(TINY + ["--csv", str(phantoms), "--out", str(out), "--baseline", "--baseline-epochs", "2"])
        card = export.read_card(out / "pma.yaml")
        # the fixed validation split: a file next to the model, the same list in the card, train.split's cases
        with open(out / "pma.validation.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        ids = [r["case"] for r in rows]
        assert ids == card["training"]["validation_split"]["cases"]
        assert card["training"]["validation_split"]["file"] == "pma.validation.csv"
        assert all(not Path(i).is_absolute() and i.startswith("pma-3-") for i in ids)
        assert all(Path(r["series_dir"]).is_dir() for r in rows)
        from biomarker_training import data as D
        _, val = train.split(D.read_csv(phantoms), 0.3, 0)
        assert [float(r["value"]) for r in rows] == [v for _, v in val]
        summ = card["training"]["data_summary"]
        assert summ["cases"] == 10 and summ["val_cases"] == len(ids) and summ["train_cases"] == 10 - len(ids)
        assert summ["dataset"]["format"] == "biomarker-node-export/1"
        assert summ["value_range"][0] <= summ["value_range"][1]
        assert card["training"]["device"] in ("cpu", "cuda")
        # --baseline: the direct net beside it, on the same split, with its own epochs
        bcard = export.read_card(out / "baseline" / "pma-direct.yaml")
        assert bcard["method"] == "direct" and bcard["training"]["epochs"] == 2
        assert bcard["training"]["validation_split"]["cases"] == ids
        assert bcard["sha256"] == export.sha256(out / "baseline" / "pma-direct.onnx")
        # report.html: every image it references exists, both methods in the table, the validation caveat
        page = (out / "report.html").read_text()
        imgs = re.findall(r"<img src='([^']+)'", page)
        assert {"report/pma-scatter.png", "report/pma-bland-altman.png", "report/pma-training.png"} <= set(imgs)
        assert any(i.startswith("report/pma-worst-") for i in imgs)
        for i in imgs:
            assert (out / i).stat().st_size > 1000, i
            assert (out / i).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "direct baseline" in page and "validation split" in page
        # the CLI regenerates it from the folder alone
        (out / "report.html").unlink()
        report.main(["--out", str(out), "--worst", "2"])
        page2 = (out / "report.html").read_text()
        assert len(re.findall(r"report/pma-worst-\d\.png", page2)) == 2


class TestLearningCurveOutputs:
    def test_table_and_plot(self, tmp_path):
        from biomarker_training import learning_curve as LC
        res = [{"task": t, "n_train": n, "epochs": 1, "steps": s, "budget": s, "heldout_n": 100,
                "mae": 10.0 / n ** 0.5, "r": 0.9, "seconds": 1.0}
               for t in ("pma", "sfa") for n, s in ((25, 500), (50, 500), (50, 1500))]
        md = LC.table(res, "CMD")
        assert md.count("\n| pma |") == 3 and "Reproduce: `CMD`" in md
        LC.plot(res, tmp_path / "lc.png", "note", 500)
        assert (tmp_path / "lc.png").read_bytes()[:4] == b"\x89PNG"
