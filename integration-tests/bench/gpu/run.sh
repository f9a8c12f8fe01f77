#!/usr/bin/env bash
# Issue 15's GPU check, part 2 of 2: run ON THE GPU MACHINE, in one device
# call, after prepare.sh's calls have put the CUDA provider parts in
# /tmp/ortcuda. Each step prints its figures; the table at the end collects
# the `timing` lines. Steps:
#   1. the machine-aware provider test with BIOMARKER_TEST_CUDA=1: the CUDA
#      provider runs the PMA UNet, every Conv on CUDA in ORT's profile, and
#      its map within 1e-4 of the CPU map;
#   2. ORT CPU vs ORT CUDA, every shipped model, batch 1 and 110
#      (inference::tests::provider_timings);
#   3. PyTorch eager fp32 on the same architectures and shapes
#      (biomarker_training.bench_eager), on CUDA;
#   4. `analyze` of a CAC phantom (40 slices of 3 mm) with every model on the
#      CPU, then on CUDA: the job's elapsed_ms and the provider it names.
# A failed step is reported and the others still run; the exit status is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
# CUDA_EXPECTED=0 and no .ortcuda: a dry run of the script on a CPU machine,
# with the ORT_DYLIB_PATH already set there.
cuda="${CUDA_EXPECTED:-1}"
if [ -f .ortcuda/rest/unpack.sh ]; then
    eval "$(bash .ortcuda/rest/unpack.sh)"
    export ORT_DYLIB_PATH LD_LIBRARY_PATH
fi
# The unit tests read models/ through the checkout path they were built in.
built="$(cat .gpu/manifest_dir)"
if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then
    mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
failed=0
step() { echo; echo "== $1"; }

step "1. provider test (CUDA forced)"
BIOMARKER_TEST_CUDA=$cuda .gpu/unit-tests inference::tests::cuda_provider_matches_the_machine --exact --nocapture \
    2>&1 | tail -n 15 | tee "$out/provider.log"
grep -q "test result: ok. 1 passed" "$out/provider.log" || { echo "STEP 1 FAILED"; failed=$((failed + 1)); }

step "2. ORT CPU vs ORT CUDA"
BIOMARKER_TEST_CUDA=$cuda .gpu/unit-tests inference::tests::provider_timings --exact --ignored --nocapture \
    >"$out/ort.log" 2>&1
grep '^timing' "$out/ort.log" || { tail -n 20 "$out/ort.log"; echo "STEP 2 FAILED"; failed=$((failed + 1)); }

step "3. PyTorch eager fp32"
(cd models/training && python3 -m biomarker_training.bench_eager --models ../../models \
    --device "$([ "$cuda" = 1 ] && echo cuda || echo cpu)") \
    >"$out/torch.log" 2>&1
grep '^timing' "$out/torch.log" || { tail -n 20 "$out/torch.log"; echo "STEP 3 FAILED"; failed=$((failed + 1)); }

step "4. analyze a CAC phantom, CPU then CUDA"
rm -rf "$out/ph" && .gpu/biomarker-node phantom --task cac --out "$out/ph" --count 1 >/dev/null
sed 's|{ card: \(\.\./models/[a-z]*\.yaml\) }|{ card: \1, execution_provider: cuda }|' config/node.yaml \
    >config/node-cuda.yaml
cat >"$out/line.py" <<'PY'
import json, sys
cfg, run = sys.argv[1:3]
for line in sys.stdin:
    d = json.loads(line)
    print(f"analyze {cfg} run {run}: {d['model']} {d['value']:.1f} {d['unit']} on {d['execution_provider']}, "
          f"{d['slices']} slices, job {d['elapsed_ms']:.0f} ms")
PY
for cfg in node node-cuda; do
    for run in 1 2 3; do
        /usr/bin/time -f "wall %e s" .gpu/biomarker-node analyze --config "config/$cfg.yaml" \
            --out "$out/analyze-$cfg-$run" "$out/ph/cac-0-0" 2>"$out/analyze-$cfg.err" | python3 "$out/line.py" "$cfg" "$run"
        tail -n 1 "$out/analyze-$cfg.err"
    done
done
rm -f config/node-cuda.yaml
if [ "$cuda" = 1 ]; then
    grep -q '"execution_provider": *"cuda"' "$out"/analyze-node-cuda-1/*/*/result.json 2>/dev/null \
        || { echo "STEP 4 FAILED: the CUDA run did not name the CUDA provider"; failed=$((failed + 1)); }
fi

step "table (median ms)"
cat "$out/ort.log" "$out/torch.log" 2>/dev/null | grep '^timing' | sort -k3,3 -k5,5n
echo "failed steps: $failed"
exit "$failed"
