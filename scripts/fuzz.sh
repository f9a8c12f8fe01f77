#!/usr/bin/env bash
# Bounded fuzz run of every parser that reads outside input (fuzz/fuzz_targets):
#   pdu_stream        PDU → negotiation → PDV assembly → DIMSE → dataset
#   dicom_file        a DICOM file as `analyze` and the route tester read it
#   config            the YAML config as check-config reads it
#   npy               the .npy reader
#   part10_roundtrip  SR/SC writer → our Part 10 reader and dicom-object
# cargo-fuzz drives libFuzzer, which needs nightly-only rustc flags; the
# machine's stable toolchain accepts them with RUSTC_BOOTSTRAP=1. No
# sanitizer: the code under test is safe Rust (the C/C++ codecs aside), so
# what we hunt is panics, hangs and runaway allocation, which libFuzzer
# reports by itself. cargo-fuzz builds in release mode with debug
# assertions and overflow checks on, so an arithmetic overflow is a crash.
# Every target runs even when an earlier one crashed; the script fails at
# the end if any did, naming them. libFuzzer prints the crashing input
# (Base64 for small ones) and cargo-fuzz keeps it in fuzz/artifacts/.
# The seed is fixed (FUZZ_SEED, default 1), so that a run on one commit
# explores what CI's run on that commit explores: a rehearsal of .ci/run
# predicts CI's verdict, and a finding is reproduced by rerunning. Wider
# exploration is fuzz/long_run.sh's job (FUZZ_SEED=0: libFuzzer picks one).
# Usage: scripts/fuzz.sh [seconds per target] [target...]
#        (default 30 s, every target: about 2.5 min of fuzzing plus the build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
secs="${1:-30}"
seed="${FUZZ_SEED:-1}"
shift || true
all=(pdu_stream dicom_file config npy part10_roundtrip)
targets=("${@:-${all[@]}}")
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
# Input size caps per target (max_len).
source "$root/fuzz/max_len.sh"
# One build of every target (they share the instrumented library).
RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none
# Fuzz findings go to a scratch copy so the checked-in corpus stays the seeds.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    cp -r "fuzz/corpus/$t" "$work/$t"
    # Memory limit: libFuzzer's default 2 GiB. The oom-* inputs in
    # corpus/pdu_stream once made dicom-rs allocate ~4 GiB (lying lengths,
    # and a binary value that is not a whole number of values, after which
    # dicom-rs parses out of step); src/dicom/scan.rs now refuses both
    # before dicom-rs runs.
    if RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$t" "$work/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -timeout=10 -seed="$seed" -print_final_stats=1 >"$work/$t.log" 2>&1; then
        grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units)' "$work/$t.log" | tail -n 2 || true
        echo "fuzz: $t ran ${secs}s (seed $seed) with no crash"
    else
        # The lines that name the fault (libFuzzer's ERROR, a panic) and the
        # last progress lines (RSS over time: one input or a slow leak?)
        # come before the final stats and the input dump.
        grep -E 'ERROR|panicked|out-of-memory|ALARM' "$work/$t.log" | tail -n 20 || true
        grep -E '^#[0-9]+' "$work/$t.log" | tail -n 3 || true
        tail -n 40 "$work/$t.log"
        echo "fuzz: $t FAILED (see above)"
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: crashed: ${failed[*]}"
    exit 1
fi
