#!/usr/bin/env bash
# The long fuzz run recorded in fuzz/LONG_RUN.md: the already-built targets
# (scripts/fuzz.sh or `cargo fuzz build --sanitizer none`), one after the
# other, one process at a time, at low priority, each until its execution
# count or its time cap, whichever comes first.
# Usage: fuzz/long_run.sh OUT_DIR target:runs:seconds...
#   e.g. fuzz/long_run.sh /tmp/long npy:5000000:900 config:2000000:900
# OUT_DIR gets bin/ (a copy of the binaries, so a rebuild during the run
# changes nothing), corpus/<target> (seeds plus what the run found),
# <target>.log (libFuzzer's output) and summary.tsv.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1"
shift
bin="$root/fuzz/target/x86_64-unknown-linux-gnu/release"
mkdir -p "$out/bin" "$out/corpus" "$out/artifacts"
source "$root/fuzz/max_len.sh"
for spec in "$@"; do
    IFS=: read -r t runs secs <<<"$spec"
    cp "$bin/$t" "$out/bin/$t"
    mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
    cp -n "$root/fuzz/corpus/$t"/* "$out/corpus/$t/" 2>/dev/null || true
done
for spec in "$@"; do
    IFS=: read -r t runs secs <<<"$spec"
    start=$(date +%s)
    (cd "$root/fuzz" && nice -n 15 "$out/bin/$t" "$out/corpus/$t" -runs="$runs" -max_total_time="$secs" \
        -max_len="$(max_len "$t")" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/") >"$out/$t.log" 2>&1
    rc=$?
    end=$(date +%s)
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$' | tail -n 1)
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "${execs:-?}" "$((end - start))" "$rc" "$(date -u +%FT%TZ)" >>"$out/summary.tsv"
done
