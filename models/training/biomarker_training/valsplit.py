"""Write the validation split that train.py holds out (same seed, same fraction) as its own labels CSV.

    python -m biomarker_training.valsplit --csv DIR/labels.csv --out DIR/val.csv [--seed 1 --val-fraction 0.1]

Used to compare candidate models (e.g. a new run against the shipped one) on the validation split only,
with `evaluate.py --set task=DIR/val.csv --report /tmp/val.md` on a copy of the models folder.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from . import data as D
from .train import split


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    a = p.parse_args(argv)
    rows = D.read_csv(a.csv)
    _, val = split(rows, a.val_fraction, a.seed)
    with open(a.out, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["series_dir", "value"])
        for d, v in val:
            wr.writerow([str(Path(d).resolve()), repr(v)])
    print(f"[valsplit] {len(val)} of {len(rows)} cases -> {a.out}")


if __name__ == "__main__":
    main()
