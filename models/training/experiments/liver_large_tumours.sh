#!/usr/bin/env bash
# The liver candidates of stop 31 (EVALUATION_NOTES.md, "Liver: large and confluent synthetic tumours"): data with
# --large/--confluent real-background tumours, four trainings, and their comparison with the shipped liver model on
# the fixed validation sets. None shipped. Run from the repository root with a release build of biomarker-node
# (its phantom generator) and ../shared beside the repository. About 90 min on 2 cores.
#
#   DATA=/work/data-v5 bash models/training/experiments/liver_large_tumours.sh
set -euo pipefail
DATA=${DATA:-/work/data-v5}
BIN=${BIOMARKER_NODE_BIN:-target/release/biomarker-node}
export PYTHONPATH="$(pwd)/models/training${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$DATA/train" "$DATA/val" "$DATA/test"
gen() { [ -f "$DATA/$2/labels.csv" ] || "$BIN" phantom --task liver --seed "$1" --out "$DATA/$2" --count "$3" >/dev/null; }
gen 1 train/liver 600
gen 2 train/liver-s2 1700        # cases 0-1499 train, 1500-1699 validation (as for liver 0.4.0)
gen 3 train/liver-s3 1500        # candidate D only
gen 901 test/liver 100           # the held-out set of models/EVALUATION.md
rb() { [ -f "$DATA/$1/labels.csv" ] || python -m biomarker_training.realbg --out "$DATA/$1" "${@:2}"; }
rb train/realbg5 --backgrounds lidc,ge --count 1200 --seed 13 --large 0.25 --confluent 0.3
rb train/realbg5b --backgrounds lidc,ge --count 1200 --seed 15 --large 0.25 --confluent 0.3
rb val/realbg-siemens --backgrounds siemens --count 200 --seed 12
rb val/realbg-siemens-noflip --backgrounds siemens --count 200 --seed 12 --flip 0
rb val/realbg-siemens-large --backgrounds siemens --count 200 --seed 14 --flip 0 --large 0.25 --confluent 0.3
rows() { tail -n +2 "$DATA/$1/labels.csv" | sed "s#^#$DATA/$1/#"; }
source "$(dirname "${BASH_SOURCE[0]}")/../rows.sh"
s2() { phantom_rows liver-s2 2 "$1" "$2"; }
mkdir -p "$DATA/train/liver-rb5" "$DATA/train/liver-rb5x" "$DATA/train/liver-rb5p" "$DATA/val/liver-val5"
{ echo "series_dir,value"; rows train/liver; s2 0 1499; rows train/realbg5; } > "$DATA/train/liver-rb5/labels.csv"
{ cat "$DATA/train/liver-rb5/labels.csv"; rows train/realbg5b; } > "$DATA/train/liver-rb5x/labels.csv"
{ cat "$DATA/train/liver-rb5/labels.csv"; rows train/liver-s3; } > "$DATA/train/liver-rb5p/labels.csv"
{ echo "series_dir,value"; s2 1500 1699; } > "$DATA/val/liver-val-phantom.csv"
for v in realbg-siemens realbg-siemens-noflip realbg-siemens-large; do { echo "series_dir,value"; rows "val/$v"; } > "$DATA/val/$v.csv"; done
{ cat "$DATA/val/liver-val-phantom.csv"; tail -n +2 "$DATA/val/realbg-siemens.csv"; tail -n +2 "$DATA/val/realbg-siemens-large.csv"; } \
  > "$DATA/val/liver-val5/labels.csv"
train() {  # OUT CSV EPOCHS LR [extra...]
  [ -f "$DATA/$1/liver.onnx" ] || python -m biomarker_training.train --task liver --csv "$DATA/train/$2/labels.csv" \
    --method localization --device cpu --seed 1 --epochs "$3" --size 128 --batch-size 8 --loss l1 --widths 8,16,32,64 \
    --contrast 9,21 --select best_val --no-report --map-bias -2 --lr "$4" --val-csv "$DATA/val/liver-val5/labels.csv" \
    --version 0.5.0 --threads 2 --out "$DATA/$1/" "${@:5}"
}
train out5 liver-rb5 3 1e-3 --init-onnx models/liver.onnx   # A: liver 0.4.0 fine-tuned (run with 0.4.0 shipped)
train outC liver-rb5x 16 3e-3                                 # C: from scratch, 2100 phantoms + 2400 real
train outB2 liver-rb5 16 3e-3                                 # B2: from scratch, 2100 phantoms + 1200 real
train outD liver-rb5p 16 3e-3                                 # D: from scratch, 3600 phantoms + 1200 real
python models/training/experiments/liver_compare.py models,"$DATA/out5","$DATA/outC","$DATA/outB2","$DATA/outD" \
  phantom="$DATA/val/liver-val-phantom.csv" siemens="$DATA/val/realbg-siemens.csv" \
  noflip="$DATA/val/realbg-siemens-noflip.csv" large="$DATA/val/realbg-siemens-large.csv"
