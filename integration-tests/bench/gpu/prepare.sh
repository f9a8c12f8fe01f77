#!/usr/bin/env bash
# Issue 15's GPU check, part 1 of 2: run HERE (the development machine) when
# `status` says a GPU machine is lent. It builds what the GPU machine cannot
# (it has no Rust toolchain), packs it with ONNX Runtime's CUDA libraries into
# one stream, and cuts the stream into parts that each fit one device call
# beside the working tree. Part 2 is run.sh, on the GPU machine.
#
# Why parts: a call carries at most 64 MiB, the working tree included (about
# 27 MiB, most of it models/golden), and the stream is about 200 MiB (the CUDA
# provider alone is 284 MB, 179 MB compressed).
#
# Writes .gpustage/ (git-ignored through .git/info/exclude): p0 .. pN, one
# chunk each. Every part but the last is moved to /tmp/gpustage there by its
# own call; run.sh takes the last one from the checkout and unpacks them all.
# Usage: bash integration-tests/bench/gpu/prepare.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$root"
tree=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
limit=$((64 * 1024 * 1024))
chunk=$(((limit - tree) - 3 * 1024 * 1024))  # 3 MiB to spare: run.sh edits, directory entries
[ "$chunk" -gt $((8 * 1024 * 1024)) ] || { echo "prepare: the working tree ($tree B) leaves no room to carry parts" >&2; exit 1; }
[ -f .ortcuda/rest/unpack.sh ] || bash ../shared/gpu/pack-ort-cuda.sh
cargo build --release
exe="$(cargo test --release --lib --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable") \
            and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')"
[ -x "$exe" ] || { echo "prepare: no unit-test binary found" >&2; exit 1; }
grep -qx '/.gpustage/' .git/info/exclude 2>/dev/null || echo '/.gpustage/' >> .git/info/exclude
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/p/gpu" "$work/p/ort"
strip -o "$work/gpu-node" target/release/biomarker-node
strip -o "$work/gpu-tests" "$exe"
zstd -q -19 -T0 "$work/gpu-node" -o "$work/p/gpu/biomarker-node.zst"
zstd -q -19 -T0 "$work/gpu-tests" -o "$work/p/gpu/unit-tests.zst"
echo "$root" > "$work/p/gpu/manifest_dir"
cat .ortcuda/part0/chunk0 .ortcuda/part1/chunk1 .ortcuda/part2/chunk2 > "$work/p/ort/libonnxruntime_providers_cuda.so.zst"
cp .ortcuda/rest/libonnxruntime.so.*.zst .ortcuda/rest/libonnxruntime_providers_shared.so "$work/p/ort/"
cp .ortcuda/rest/zstd "$work/p/zstd"
# A real-size chest for step 6: LIDC-IDRI-0001 (CC BY 3.0, see its
# ATTRIBUTION.txt) as scanned; run.sh resamples it there with volumes.py, which
# needs pydicom, and sends it to `serve` with ttr.py, which needs pynetdicom
# (neither is on that machine). Deleted there when the step ends.
lidc=../shared/realct-labelled/chest-lidc0001
if [ -d "$lidc" ] && [ "${WITH_CHEST:-1}" = 1 ]; then
    mkdir -p "$work/p/chest"
    tar -C "$(dirname "$lidc")" -cf - chest-lidc0001 | zstd -q -19 -T0 -o "$work/p/chest/lidc.tar.zst"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/p/chest" pydicom==3.0.2 pynetdicom==3.0.4
fi
tar -C "$work/p" -cf "$work/stream.tar" .
rm -rf .gpustage && mkdir -p .gpustage
split -b "$chunk" -d -a 2 "$work/stream.tar" "$work/x"
n=0
for f in "$work"/x*; do mkdir -p ".gpustage/p$n" && mv "$f" ".gpustage/p$n/"; n=$((n + 1)); done
last=$((n - 1))
echo "tree $tree B, chunk $chunk B, $n parts"; du -sh .gpustage/*
echo
echo "Now, back to back (the machine keeps /tmp only while warm, ~30 s after a call):"
for i in $(seq 0 $((last - 1))); do
    echo "  run carry [\".gpustage/p$i\"]  command: mkdir -p /tmp/gpustage && mv .gpustage/p$i/* /tmp/gpustage/ && ls /tmp/gpustage"
done
echo "  run carry [\".gpustage/p$last\"]  timeout_s 480  command: bash integration-tests/bench/gpu/run.sh"
echo "then give_back."
