# Sourced by run_all.sh and experiments/*.sh (needs DATA set), so that the training scripts list phantom cases the
# same way.
#
# phantom_rows PART SEED FROM TO: CSV rows (absolute folder, truth value) of liver phantom cases FROM..TO of
# DATA/train/PART, generated with seed SEED. Not every case of a folder: the folders are split by index into training
# and validation cases.
phantom_rows() {
  python -c "import json, sys
d, s, a, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for k in range(a, b + 1):
    print(f'{d}/liver-{s}-{k},{json.load(open(f\"{d}/liver-{s}-{k}/truth.json\"))[\"value\"]!r}')" "$DATA/train/$1" "$2" "$3" "$4"
}
