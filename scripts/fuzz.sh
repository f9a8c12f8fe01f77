#!/usr/bin/env bash
# Bounded fuzz run of the PDU → command/dataset path (fuzz/fuzz_targets).
# cargo-fuzz drives libFuzzer, which needs nightly-only rustc flags; the
# machine's stable toolchain accepts them with RUSTC_BOOTSTRAP=1. No
# sanitizer: the code under test is safe Rust, so what we hunt is panics,
# hangs and runaway allocation, which libFuzzer reports by itself.
# Usage: scripts/fuzz.sh [seconds]   (default 60)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
secs="${1:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
# Fuzz findings go to a scratch copy so the checked-in corpus stays the seeds.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r fuzz/corpus/pdu_stream "$work/corpus"
# Memory limit: libFuzzer's default 2 GiB. The five oom-* inputs in the
# corpus once made dicom-rs allocate ~4 GiB (lying lengths, and a binary
# value that is not a whole number of values, after which dicom-rs parses
# out of step); src/dicom/scan.rs now refuses both before dicom-rs runs.
RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none pdu_stream "$work/corpus" -- \
    -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 2>&1 | tail -n 25
echo "fuzz: pdu_stream ran ${secs}s with no crash"
