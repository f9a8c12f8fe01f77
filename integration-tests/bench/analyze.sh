#!/usr/bin/env bash
# Two builds of the job path side by side: `biomarker-node analyze` (default
# config: the series' routes, inference on the CPU, SR/SC/SEG and maps) on
# real-size volumes, the two binaries interleaved round by round so that the
# machine's other load hits both alike. Prints wall, user and system CPU and
# peak RSS per build, the ratios new/base, and whether the two builds wrote
# the same maps and candidates (maps.npz, map.npy, candidates.npy) and the
# same result JSON apart from timings: a change meant to be faster only must
# say "identical".
#
#   BASE=/tmp/biomarker-node-before bash integration-tests/bench/analyze.sh
#   BASE=... NEW=target/release/biomarker-node ROUNDS=5 KINDS="chest300nc liver150" bash integration-tests/bench/analyze.sh
#
# BASE is a copy of an earlier build (cp target/release/biomarker-node
# somewhere before rebuilding). KINDS are volumes.py's kinds, built once per
# run from ../shared/realct-labelled. Prints numbers; not a test, CI does not
# run it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE="${BASE:?BASE=path to the build to compare against}"
NEW="${NEW:-$root/target/release/biomarker-node}"
ROUNDS="${ROUNDS:-5}"
KINDS="${KINDS:-chest300nc liver150}"
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
    ORT_DYLIB_PATH="$(python3 -c 'import onnxruntime,os,glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__),"capi","libonnxruntime.so*")),key=len)[-1])')"
    export ORT_DYLIB_PATH
fi
for b in "$BASE" "$NEW"; do
    [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 1; }
done

work="$(mktemp -d /tmp/analyze-bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cd "$root"

for kind in $KINDS; do
    python3 integration-tests/bench/volumes.py "$kind" "$work/$kind" 1 >/dev/null
    : > "$work/$kind.times"
    for r in $(seq "$ROUNDS"); do
        for side in base new; do
            bin="$BASE"
            [ "$side" = new ] && bin="$NEW"
            out="$work/out-$kind-$side"
            rm -rf "$out"
            /usr/bin/time -f "$side %e %U %S %M" -a -o "$work/$kind.times" \
                "$bin" analyze --out "$out" "$work/$kind" >/dev/null 2>"$work/$kind-$side.log" ||
                { echo "$kind: $side failed (round $r)" >&2; tail -5 "$work/$kind-$side.log" >&2; exit 1; }
        done
    done
    same=identical
    while IFS= read -r f; do
        cmp -s "$work/out-$kind-base/$f" "$work/out-$kind-new/$f" || { same="DIFFERENT ($f)"; break; }
    done < <(cd "$work/out-$kind-base" && find . \( -name '*.npz' -o -name '*.npy' \) | sort)
    if [ "$same" = identical ]; then
        while IFS= read -r f; do
            python3 - "$work/out-$kind-base/$f" "$work/out-$kind-new/$f" <<'EOF' || { same="DIFFERENT ($f)"; break; }
import json, sys
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k != "elapsed_ms"}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v
a, b = (strip(json.load(open(p))) for p in sys.argv[1:3])
sys.exit(0 if a == b else 1)
EOF
        done < <(cd "$work/out-$kind-base" && find . -name result.json | sort)
    fi
    [ -n "$(cd "$work/out-$kind-base" && find . -name result.json)" ] || same="(no results written)"
    awk -v kind="$kind" -v same="$same" -v rounds="$ROUNDS" '
        { w[$1] += $2; u[$1] += $3; s[$1] += $4; m[$1] += $5 }
        END {
            printf "%-11s %-5s %8s %8s %8s %9s\n", kind, "build", "wall s", "user s", "sys s", "RSS MiB"
            for (i = 1; i <= 2; i++) {
                k = (i == 1) ? "base" : "new"
                printf "%-11s %-5s %8.3f %8.3f %8.3f %9.0f\n", "", k, w[k]/rounds, u[k]/rounds, s[k]/rounds, m[k]/rounds/1024
            }
            printf "%-11s new/base: wall %.3f, user %.3f, CPU %.3f, RSS %.3f (mean of %d interleaved rounds); outputs %s\n\n",
                "", w["new"]/w["base"], u["new"]/u["base"], (u["new"]+s["new"])/(u["base"]+s["base"]), m["new"]/m["base"], rounds, same
        }' "$work/$kind.times"
done
