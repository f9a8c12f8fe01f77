#!/usr/bin/env bash
# Issue 15's GPU check, part 1 of 2: run HERE (the development machine) when
# `status` says a GPU machine is lent. It builds what the GPU machine cannot
# (it has no Rust toolchain) and packs it under ignored folders, then prints
# the `run` calls to make, in order. Part 2 is run.sh, on the GPU machine.
#
# What it writes (both git-ignored through .git/info/exclude):
#   .ortcuda/  ONNX Runtime GPU 1.31.1 (CUDA 13, cuDNN 9), cut into parts
#              that fit one device call each (../shared/gpu/pack-ort-cuda.sh)
#   .gpu/      the node and the library's unit-test binary, stripped (~21 MB
#              each), and the checkout path the tests were built in (they
#              find models/ through it)
# Usage: bash integration-tests/bench/gpu/prepare.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$root"
bash ../shared/gpu/pack-ort-cuda.sh
cargo build --release
exe="$(cargo test --release --lib --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable") \
            and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')"
[ -x "$exe" ] || { echo "prepare: no unit-test binary found" >&2; exit 1; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu
strip -o .gpu/biomarker-node target/release/biomarker-node
strip -o .gpu/unit-tests "$exe"
echo "$root" > .gpu/manifest_dir
du -sh .gpu .ortcuda/*
cat <<CALLS

Now, back to back (the machine keeps /tmp only while warm, ~30 s after a call):
  run carry [".ortcuda/part0"]  command: mkdir -p /tmp/ortcuda && mv .ortcuda/part0 /tmp/ortcuda/
  run carry [".ortcuda/part1"]  command: mkdir -p /tmp/ortcuda && mv .ortcuda/part1 /tmp/ortcuda/
  run carry [".ortcuda/part2"]  command: mkdir -p /tmp/ortcuda && mv .ortcuda/part2 /tmp/ortcuda/
  run carry [".ortcuda/rest", ".gpu"]  timeout_s 420  command: bash integration-tests/bench/gpu/run.sh
then give_back.
CALLS
