#!/usr/bin/env bash
# Issue 15's GPU check, part 2 of 2: run ON THE GPU MACHINE, in one device
# call, after prepare.sh's calls have put all but the last part of its
# stream in /tmp/gpustage. Each step prints its figures; the table at the end collects
# the `timing` lines. Steps:
#   1. the machine-aware provider test with BIOMARKER_TEST_CUDA=1: the CUDA
#      provider runs the PMA UNet, every Conv on CUDA in ORT's profile, and
#      its map within 1e-4 of the CPU map;
#   2. ORT CPU vs ORT CUDA, every shipped model, batch 1 and 110
#      (inference::tests::provider_timings);
#   2b. the CUDA provider's options against ORT's defaults and NHWC
#      (inference::tests::cuda_option_variants);
#   3. PyTorch eager fp32 on the same architectures and shapes
#      (biomarker_training.bench_eager), on CUDA;
#   4. `analyze` of a CAC phantom (40 slices of 3 mm, 256x256) with every model on the
#      CPU, then on CUDA: the job's elapsed_ms and the provider it names;
#   5. `serve` with every model on CUDA: /readyz says which provider each
#      model runs on;
#   6. a real-size chest (LIDC-IDRI-0001 resampled to 300 slices of 1.1 mm,
#      volumes.py chest300nc) through `analyze`, PMA, SFA and CAC, on the CPU
#      and on CUDA: each job's elapsed_ms;
#   7. time to result through `serve` (ttr.py, pynetdicom as sender and PACS):
#      that chest sent by C-STORE until its three SRs arrive, CPU then CUDA.
# A failed step is reported and the others still run; the exit status is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
# Bulky outputs stay in $out; the logs are copied to $OUT (the device tool
# brings back at most 8 files) at the end.
out=/tmp/gpu-check
rm -rf "$out" && mkdir -p "$out"
stage="${GPU_STAGE_DIR:-/tmp/gpustage}"
# CUDA_EXPECTED=0 and no staged parts: a dry run of the script on a CPU machine,
# with the ORT_DYLIB_PATH already set there.
cuda="${CUDA_EXPECTED:-1}"
if [ -d .gpustage ] && [ -d "$stage" ]; then
    # prepare.sh's stream: the earlier calls left their parts in /tmp/gpustage.
    rm -rf /tmp/gpu && mkdir -p /tmp/gpu/lib .gpu
    mv .gpustage/p*/* "$stage"/
    cat $(ls "$stage"/x* | sort) | tar -x -C /tmp/gpu || { echo "unpack failed: $(ls "$stage")"; exit 99; }
    z=/tmp/gpu/zstd
    $z -d -q -f --long=30 /tmp/gpu/ort/libonnxruntime_providers_cuda.so.zst -o /tmp/gpu/lib/libonnxruntime_providers_cuda.so
    for f in /tmp/gpu/ort/libonnxruntime.so.*.zst; do $z -d -q -f "$f" -o "/tmp/gpu/lib/$(basename "$f" .zst)"; done
    cp /tmp/gpu/ort/libonnxruntime_providers_shared.so /tmp/gpu/lib/
    $z -d -q -f /tmp/gpu/gpu/biomarker-node.zst -o .gpu/biomarker-node
    $z -d -q -f /tmp/gpu/gpu/unit-tests.zst -o .gpu/unit-tests
    chmod +x .gpu/biomarker-node .gpu/unit-tests
    cp /tmp/gpu/gpu/manifest_dir .gpu/
    ORT_DYLIB_PATH=$(ls /tmp/gpu/lib/libonnxruntime.so.1.*)
    # Not /usr/lib/x86_64-linux-gnu (cuDNN there is found anyway): first in the
    # path, it hands a pyenv python the system libpython and its sys.path.
    LD_LIBRARY_PATH=/tmp/gpu/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
    export ORT_DYLIB_PATH LD_LIBRARY_PATH
fi
# The unit tests read models/ through the checkout path they were built in.
if [ -f .gpu/manifest_dir ]; then
    built="$(cat .gpu/manifest_dir)"
    if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"
    fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "$(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
failed=0
step() { echo; echo "== $1"; }

step "1. provider test (CUDA forced)"
BIOMARKER_TEST_CUDA=$cuda .gpu/unit-tests inference::tests::cuda_provider_matches_the_machine --exact --nocapture \
    2>&1 | tail -n 15 | tee "$out/provider.log"
grep -q "test result: ok. 1 passed" "$out/provider.log" || {
    echo "STEP 1 FAILED"; failed=$((failed + 1))
    # The usual cause: a CUDA or cuDNN library the provider links is missing.
    [ -f /tmp/gpu/lib/libonnxruntime_providers_cuda.so ] && ldd /tmp/gpu/lib/libonnxruntime_providers_cuda.so | grep -i "not found"
}

step "2. ORT CPU vs ORT CUDA"
BIOMARKER_TEST_CUDA=$cuda .gpu/unit-tests inference::tests::provider_timings --exact --ignored --nocapture \
    >"$out/ort.log" 2>&1
grep '^timing' "$out/ort.log" || { tail -n 20 "$out/ort.log"; echo "STEP 2 FAILED"; failed=$((failed + 1)); }

step "2b. CUDA provider options (heuristic/exhaustive search, NHWC, TF32)"
BIOMARKER_TEST_CUDA=$cuda .gpu/unit-tests inference::tests::cuda_option_variants --exact --ignored --nocapture \
    >"$out/variants.log" 2>&1
grep '^variant' "$out/variants.log" || { tail -n 5 "$out/variants.log"; [ "$cuda" = 1 ] && { echo "STEP 2b FAILED"; failed=$((failed + 1)); }; }

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
# analyze_runs NAME SERIES: `analyze` of SERIES three times on the CPU config,
# then three times on the CUDA one; lines to $out/NAME.log, outputs in
# $out/NAME-<config>-<run>.
analyze_runs() {
    for cfg in node node-cuda; do
        for run in 1 2 3; do
            /usr/bin/time -f "wall %e s" .gpu/biomarker-node analyze --config "config/$cfg.yaml" \
                --out "$out/$1-$cfg-$run" "$2" 2>"$out/$1-$cfg.err" | python3 "$out/line.py" "$cfg" "$run" \
                | tee -a "$out/$1.log"
            tail -n 1 "$out/$1-$cfg.err"
        done
    done
}
analyze_runs analyze "$out/ph/cac-0-0"

step "5. serve on CUDA: /readyz names each model's provider"
rm -rf data
.gpu/biomarker-node serve --config config/node-cuda.yaml >"$out/serve.log" 2>&1 &
serve=$!
python3 - >"$out/readyz.log" 2>&1 <<'PY'
import json, time, urllib.error, urllib.request
for _ in range(120):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=2).read()
    except urllib.error.HTTPError as e:  # 503 until listening; the body still names the providers
        body = e.read()
    except OSError:
        time.sleep(0.5)
        continue
    d = json.loads(body)
    if d.get("models") and all(m.get("execution_provider") for m in d["models"].values()):
        break
    time.sleep(0.5)
print(json.dumps(d.get("models"), sort_keys=True))
for name, m in sorted(d["models"].items()):
    print(f"readyz {name}: requested {m['requested']}, runs on {m['execution_provider']}")
PY
kill "$serve" 2>/dev/null; wait "$serve" 2>/dev/null
cat "$out/readyz.log"
grep "model loaded" "$out/serve.log" | sed 's/^.*model loaded/model loaded/' || tail -n 5 "$out/serve.log"
if [ "$cuda" = 1 ]; then
    [ "$(grep -c 'runs on cuda' "$out/readyz.log")" = 4 ] || { echo "STEP 5 FAILED: not every model runs on CUDA"; failed=$((failed + 1)); }
else
    [ "$(grep -c 'runs on cpu' "$out/readyz.log")" = 4 ] || { echo "STEP 5 FAILED: /readyz did not name the CPU fallback"; failed=$((failed + 1)); }
fi
rm -rf data

step "6. a real-size chest: LIDC-IDRI-0001 as volumes.py's chest300nc (300 slices), CPU then CUDA"
if [ -f /tmp/gpu/chest/lidc.tar.zst ]; then
    shared="$(cd .. && pwd)/shared/realct-labelled"
    mkdir -p "$shared" && /tmp/gpu/zstd -d -q -c /tmp/gpu/chest/lidc.tar.zst | tar -x -C "$shared"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/gpu/chest/*.whl >/dev/null 2>&1
    rm -rf /tmp/v && PYTHONPATH=/tmp/site python3 integration-tests/bench/volumes.py chest300nc /tmp/v/chest300nc 1
    analyze_runs chest /tmp/v/chest300nc
    # How much of the jobs' CPU work uses more than two cores.
    for run in 1 2; do
        taskset -c 0,1 .gpu/biomarker-node analyze --config config/node.yaml --out "$out/chest-2c-$run" /tmp/v/chest300nc \
            2>/dev/null | python3 "$out/line.py" "node-on-2-cores" "$run" | tee -a "$out/chest.log"
    done
    step "7. time to result through serve: the chest sent by C-STORE, its 3 SRs received, CPU then CUDA"
    for provider in cpu cuda; do
        PYTHONPATH=/tmp/site python3 integration-tests/bench/gpu/ttr.py .gpu/biomarker-node /tmp/v/chest300nc "$provider" 3 \
            2>&1 | tee -a "$out/ttr.log"
    done
    [ "$(grep -c "time to result [0-9.]* s" "$out/ttr.log")" = 6 ] \
        || { echo "STEP 7 FAILED: not 6 runs with their 3 SRs"; failed=$((failed + 1)); }
    rm -rf "$shared/chest-lidc0001" /tmp/v
    [ "$(grep -c "analyze node run 3: .* on cpu" "$out/chest.log")" = 3 ] \
        || { echo "STEP 6 FAILED: not three routes on the CPU"; failed=$((failed + 1)); }
    [ "$(grep -c "analyze node-cuda run 3: .* on cuda" "$out/chest.log")" = 3 ] || [ "$cuda" != 1 ] \
        || { echo "STEP 6 FAILED: not three routes on CUDA"; failed=$((failed + 1)); }
else
    echo "skipped: prepare.sh packed no chest"
fi
rm -f config/node-cuda.yaml
grep -q "analyze node run 3: cac .* on cpu" "$out/analyze.log" 2>/dev/null \
    || { echo "STEP 4 FAILED: no CAC result on the CPU"; failed=$((failed + 1)); }
if [ "$cuda" = 1 ]; then
    grep -q '"execution_provider": *"cuda"' "$out"/analyze-node-cuda-1/*/*/result.json 2>/dev/null \
        || { echo "STEP 4 FAILED: the CUDA run did not name the CUDA provider"; failed=$((failed + 1)); }
fi

step "table (median ms)"
cat "$out/ort.log" "$out/torch.log" 2>/dev/null | grep '^timing' | sort -k3,3 -k5,5n
echo "failed steps: $failed"
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp "$out"/provider.log "$out"/ort.log "$out"/torch.log "$out"/analyze.log "$out"/readyz.log "$out"/chest.log "$out"/variants.log "$out"/ttr.log "$OUT"/ 2>/dev/null
exit "$failed"
