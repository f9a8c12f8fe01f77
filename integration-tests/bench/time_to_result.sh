#!/usr/bin/env bash
# Time to result: last C-STORE acknowledged by the node -> the TID 1500 SR
# stored in the PACS (Orthanc), on CPU.
#
#   bash integration-tests/bench/time_to_result.sh
#   RUNS=5 bash integration-tests/bench/time_to_result.sh
#
# Prints numbers; it is not a test and CI does not run it. Needs a release
# build (cargo build --release) and scripts/install-deps.sh's packages.
#
# Set-up: one node and one Orthanc (throw-away storage, SQLite index) on free
# loopback ports. The node has series.quiet_seconds = 30, so only early
# completion (association released + geometrically whole) can complete a
# series within the measurement; a run that takes longer than that says so.
# Its routes are config/node.yaml's pma-single-slice and cac-non-contrast,
# both sending to Orthanc. Models: models/<task>.yaml when it exists (trained),
# else the fixture src/inference/testdata/sigmoid_map.yaml (map = sigmoid,
# 8x8: plumbing cost only); the table says which.
#
# One run: a fresh phantom (its own seed, so its own UIDs) is sent with DCMTK
# storescu in one association; t0 = `date +%s.%N` right after storescu exits
# (every C-STORE-RSP received, association released). Then Orthanc's REST
# API is polled every 20 ms (by a poller started before the send, so its
# start-up is not measured) until a series with Modality SR appears in the
# phantom's study: t_pacs. The breakdown columns come from the node's JSON
# log (same clock): series complete, job done, SR C-STORE-RSP received.
set -euo pipefail

RUNS="${RUNS:-3}"
# phantom: the 48-slice phantoms (pma, cac); volumes: real-size studies built
# from ../shared/realct-labelled (bench/volumes.py): a 300-slice chest through
# the PMA, SFA and CAC routes (chest300: CAC refuses its contrast; chest300nc:
# the same with the contrast taken out, so CAC runs to its SR), the chest as
# scanned, and a 150-slice liver volume; queue: 20 chest studies sent back to
# back (studies/hour; not in the default CASES: about 5 minutes). QUEUE_N and
# QUEUE_KIND (chest300, chest300nc, chest133, liver150) set them.
CASES="${CASES:-phantom volumes}"
# JOBS_WORKERS=N and VOLUME_CACHE_MB=M set jobs.workers and jobs.volume_cache_mb (unset: the node's defaults).
QUEUE_N="${QUEUE_N:-20}"
QUEUE_KIND="${QUEUE_KIND:-chest300}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${BIOMARKER_NODE_BIN:-$root/target/release/biomarker-node}"
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}" # not the pynetdicom console scripts of the same name
STORESCU="$DCMTK_BIN/storescu"
ORTHANC="${ORTHANC:-$(command -v Orthanc || echo /usr/sbin/Orthanc)}"
FIXTURE="$root/src/inference/testdata/sigmoid_map.yaml"
export TCP_NODELAY=1
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
    ORT_DYLIB_PATH="$(python3 -c 'import onnxruntime,os,glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__),"capi","libonnxruntime.so*")),key=len)[-1])')"
    export ORT_DYLIB_PATH
fi

for tool in "$BIN" "$STORESCU" "$ORTHANC" curl; do
    [ -x "$tool" ] || command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

work="$(mktemp -d /tmp/ttr-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port, pid
    for _ in $(seq 1 600); do
        kill -0 "$2" 2>/dev/null || { echo "peer exited during start-up" >&2; return 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 not listening" >&2
    return 1
}

card_for() { # task -> card path
    if [ -f "$root/models/$1.yaml" ]; then echo "$root/models/$1.yaml"; else echo "$FIXTURE"; fi
}
model_label() { # task
    if [ -f "$root/models/$1.yaml" ]; then echo "trained"; else echo "fixture"; fi
}

# ---------------------------------------------------------------- Orthanc
o_port=$(free_port)
o_http=$(free_port)
node_port=$(free_port)
mkdir -p "$work/orthanc"
cat >"$work/orthanc/orthanc.json" <<EOF
{
  "Name": "ttr-bench",
  "StorageDirectory": "$work/orthanc/storage",
  "IndexDirectory": "$work/orthanc/index",
  "DicomAet": "ORTHANC",
  "DicomPort": $o_port,
  "HttpPort": $o_http,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowStore": true,
  "StorageCompression": false,
  "Plugins": []
}
EOF
"$ORTHANC" "$work/orthanc/orthanc.json" >"$work/orthanc/orthanc.log" 2>&1 &
pids+=($!)
wait_port "$o_port" "${pids[-1]}"

# ---------------------------------------------------------------- node
# start_node DIR ROUTE...: a node whose routes are config/node.yaml's ROUTEs,
# sending to Orthanc; sets node_port and node_log.
start_node() {
    local dir="$1"
    shift
    node_port=$(free_port)
    python3 - "$root" "$dir" "$node_port" "$o_port" "$(card_for pma)" "$(card_for cac)" "$(card_for sfa)" "$(card_for liver)" "$*" <<'EOF'
import json, sys, yaml
root, work, port, o_port, pma, cac, sfa, liver, names = sys.argv[1:]
names = names.split()
routes = [r for r in yaml.safe_load(open(f"{root}/config/node.yaml"))["routes"] if r["name"] in names]
cfg = {
    "node": {"ae_title": "BIOMARKER", "bind": "127.0.0.1", "port": int(port),
             "data_dir": f"{work}/data", "min_free_disk_mb": 64},
    "series": {"quiet_seconds": 30, "early_completion": True},
    "log": {"format": "json", "level": "info,ort=warn"},
    "models": {"pma": {"card": pma}, "cac": {"card": cac}, "sfa": {"card": sfa}, "liver": {"card": liver}},
    "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": int(o_port)}},
    "routes": routes,
    "http": {"enabled": False},
}
import os
if os.environ.get("JOBS_WORKERS"):
    # jobs.workers to compare (default: the node's own, one per core)
    cfg.setdefault("jobs", {})["workers"] = int(os.environ["JOBS_WORKERS"])
if os.environ.get("VOLUME_CACHE_MB"):
    cfg.setdefault("jobs", {})["volume_cache_mb"] = int(os.environ["VOLUME_CACHE_MB"])
os.makedirs(work, exist_ok=True)
json.dump(cfg, open(f"{work}/node.yaml", "w"), indent=1)
EOF
    "$BIN" check-config --config "$dir/node.yaml" >/dev/null
    node_log="$dir/node.log"
    "$BIN" serve --config "$dir/node.yaml" 2>"$node_log" &
    pids+=($!)
    node_pid=${pids[-1]}
    wait_port "$node_port" "$node_pid"
}

stop_node() {
    kill "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- runs
results="$work/results.tsv"
: >"$results"
run_one() { # task seed
    local task="$1" seed="$2" d="$work/phantoms/$1-$2" t0 t_send0 poller
    mkdir -p "$d"
    "$BIN" phantom --task "$task" --seed "$seed" --out "$d" --count 1 >/dev/null
    local dir="$d/$task-$seed-0"
    local files=("$dir"/*.dcm)
    python3 - "$o_http" "$dir/truth.json" "$d" "$node_log" "$task" "$(model_label "$task")" "${#files[@]}" >>"$results" <<'EOF' &
import json, os, sys, time, datetime, requests
http, truth, d, log, task, model, nfiles = sys.argv[1:]
tr = json.load(open(truth))
study, series = tr["study_instance_uid"], tr["series_instance_uid"]
url = f"http://127.0.0.1:{http}"
q = {"Level": "Series", "Query": {"StudyInstanceUID": study, "Modality": "SR"}}
s = requests.Session()
deadline = time.time() + 120
first = True
while True:
    r = s.post(url + "/tools/find", json=q, timeout=10).json()
    if r:
        t_pacs = time.time()
        break
    if first:
        open(os.path.join(d, "ready"), "w").close()
        first = False
    if time.time() > deadline:
        print(f"no SR for {task} study {study} within 120 s", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.02)
while not os.path.exists(os.path.join(d, "t0")):
    time.sleep(0.01)
t_send0, t0 = map(float, open(os.path.join(d, "t0")).read().split())
inst = s.get(f"{url}/series/{r[0]}/instances", timeout=10).json()
sr_uid = inst[0]["MainDicomTags"]["SOPInstanceUID"]


def ts(v):
    return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


t_complete = t_job = t_deliv = None
reason = "?"
time.sleep(0.1)  # let the node's log catch up
for line in open(log):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    f = j.get("fields", {})
    msg = f.get("message", "")
    span = json.dumps(j.get("spans", []))
    if msg == "series complete" and f.get("series") == series:
        t_complete, reason = ts(j["timestamp"]), f.get("reason", "?")
    elif msg == "job done" and series in span:
        t_job = ts(j["timestamp"]) if t_job is None else t_job
    elif msg == "outbox: delivered" and f.get("sop_instance_uid") == sr_uid:
        t_deliv = ts(j["timestamp"])
rel = lambda t: f"{t - t0:.3f}" if t is not None else "nan"
print("\t".join([task, model, nfiles, f"{t0 - t_send0:.3f}", rel(t_complete), rel(t_job), rel(t_deliv),
                 f"{t_pacs - t0:.3f}", reason]))
EOF
    poller=$!
    while [ ! -e "$d/ready" ]; do
        kill -0 "$poller" 2>/dev/null || { echo "poller died" >&2; exit 1; }
        sleep 0.01
    done
    t_send0=$(date +%s.%N)
    "$STORESCU" -aet BENCH -aec BIOMARKER 127.0.0.1 "$node_port" "${files[@]}"
    t0=$(date +%s.%N)
    echo "$t_send0 $t0" >"$d/t0.tmp" && mv "$d/t0.tmp" "$d/t0"
    wait "$poller"
}

seed=100
if [[ " $CASES " == *" phantom "* ]]; then
    start_node "$work/node" pma-single-slice cac-non-contrast
    for task in pma cac; do
        for _ in $(seq 1 "$RUNS"); do
            seed=$((seed + 1))
            run_one "$task" "$seed"
        done
    done
    stop_node
fi

# ---------------------------------------------------------------- volumes
# run_volume KIND SEED: one real-size study sent in one association; t0 =
# storescu exited. Waits for the node's "series routed" (how many jobs), for
# each of those jobs to end (done, refused, or failed for good), and for one
# SR per done job in Orthanc. Prints one JSON line. On the real chest the
# guards refuse PMA/SFA (no carina found: the arch level is not located) and
# CAC (contrast): the time then is the time to those verdicts (no SR).
vresults="$work/volumes.jsonl"
: >"$vresults"
run_volume() {
    local kind="$1" seed="$2" d="$work/volumes/$1-$2" t_send0 t0
    mkdir -p "$work/volumes"
    python3 "$root/integration-tests/bench/volumes.py" "$kind" "$d" "$seed" >"$d.json"
    # The input just written (150 MB for a 300-slice chest) would otherwise
    # be written back while the node works: a later run paid for the earlier
    # runs' files (jobs 1.7-2.8x slower, high system time in vmstat).
    sync
    t_send0=$(date +%s.%N)
    "$STORESCU" -aet BENCH -aec BIOMARKER +sd 127.0.0.1 "$node_port" "$d"
    t0=$(date +%s.%N)
    python3 - "$o_http" "$d.json" "$node_log" "$kind" "$t_send0" "$t0" >>"$vresults" <<'EOF'
import datetime, json, sys, time, requests
http, meta, log, kind, t_send0, t0 = sys.argv[1:]
t_send0, t0 = float(t_send0), float(t0)
m = json.load(open(meta))
study, series = m["study"], m["series"]
ts = lambda v: datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
deadline = time.time() + 600
jobs, ended, complete = None, [], None
s = requests.Session()
q = {"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SR"}}
sr_seen = {}  # SR count -> when Orthanc first had that many
while True:
    n_sr = len(s.post(f"http://127.0.0.1:{http}/tools/find", json=q, timeout=10).json())
    sr_seen.setdefault(n_sr, time.time())
    jobs, ended = None, []
    for line in open(log):
        try:
            j = json.loads(line)
        except ValueError:
            continue
        f = j.get("fields", {})
        msg = f.get("message", "")
        # "job refused" is logged outside the series span: this node receives
        # one study at a time, so the jobs that end after the send are its own
        if not (series in line or (msg.startswith("job ") and ts(j["timestamp"]) >= t_send0)):
            continue
        route = next((sp.get("route") for sp in j.get("spans", []) if sp.get("route")), f.get("route", "?"))
        if msg == "series complete":
            complete = ts(j["timestamp"])
        elif msg == "series routed":
            jobs = int(f.get("new_jobs", 0))
        elif msg in ("job done", "job refused") or (msg == "job failed" and f.get("fault") == "Permanent"):
            ended.append({"route": route, "outcome": msg.split()[1], "t": ts(j["timestamp"]),
                          "ms": f.get("ms"), "why": f.get("reason") or f.get("error")})
    if jobs is not None and len(ended) >= jobs:
        break
    if time.time() > deadline:
        print(f"{kind}: jobs did not end within 600 s ({jobs} routed, {len(ended)} ended)", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
done = sum(1 for e in ended if e["outcome"] == "done")
while True:
    n_sr = len(s.post(f"http://127.0.0.1:{http}/tools/find", json=q, timeout=10).json())
    sr_seen.setdefault(n_sr, time.time())
    if n_sr >= done:
        break
    if time.time() > deadline:
        print(f"{kind}: {done} SRs not in Orthanc within 600 s", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.02)
# the last SR's arrival (or, with none, the last verdict)
t_pacs = min(t for n, t in sr_seen.items() if n >= done) if done else max(e["t"] for e in ended)
print(json.dumps({"kind": kind, "slices": m["slices"], "send_s": round(t0 - t_send0, 3),
                  "complete_s": round(complete - t0, 3) if complete else None, "jobs": jobs,
                  "ended": [{**e, "t": round(e["t"] - t0, 3)} for e in ended], "srs": done,
                  "t_pacs_s": round(t_pacs - t0, 3),
                  "t_last_verdict_s": round(max(e["t"] for e in ended) - t0, 3) if ended else None}))
EOF
}

if [[ " $CASES " == *" volumes "* || " $CASES " == *" queue "* ]]; then
    start_node "$work/node-volumes" pma-single-slice sfa-single-slice cac-non-contrast liver-abdomen
    if [[ " $CASES " == *" volumes "* ]]; then
        for _ in $(seq 1 "$RUNS"); do
            seed=$((seed + 1))
            run_volume chest300 "$seed"
            run_volume chest300nc "$seed"
            run_volume chest133 "$seed"
            run_volume liver150 "$seed"
        done
    fi
    if [[ " $CASES " == *" queue "* ]]; then
        # QUEUE_N studies (QUEUE_KIND, default chest300) generated first,
        # then sent back to back, one association each; the clock stops when
        # every job of every study has ended (done, refused or failed for
        # good) and Orthanc holds one SR per done job.
        qdir="$work/queue"
        mkdir -p "$qdir"
        for i in $(seq 1 "$QUEUE_N"); do
            python3 "$root/integration-tests/bench/volumes.py" "$QUEUE_KIND" "$qdir/s$i" "q$i" >"$qdir/s$i.json"
        done
        sync  # as in run_volume: the inputs' writeback is not the node's work
        q0=$(date +%s.%N)
        for i in $(seq 1 "$QUEUE_N"); do
            "$STORESCU" -aet BENCH -aec BIOMARKER +sd 127.0.0.1 "$node_port" "$qdir/s$i"
        done
        t_sent=$(date +%s.%N)
        python3 - "$o_http" "$qdir" "$QUEUE_N" "$q0" "$node_pid" "$node_log" "$t_sent" "$QUEUE_KIND" <<'EOF'
import datetime, json, sys, time, requests
http, qdir, n, q0, pid, log, t_sent, kind = sys.argv[1:]
n, q0, t_sent = int(n), float(q0), float(t_sent)
series = {json.load(open(f"{qdir}/s{i}.json"))["series"] for i in range(1, n + 1)}
ts = lambda v: datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
s = requests.Session()
deadline = time.time() + 3600
while time.time() < deadline:
    routed, jobs, ended, done = set(), 0, 0, 0
    for line in open(log):
        try:
            j = json.loads(line)
        except ValueError:
            continue
        f = j.get("fields", {})
        msg = f.get("message", "")
        if msg == "series routed" and j.get("span", {}).get("uid") in series:
            routed.add(j["span"]["uid"])
            jobs += int(f.get("new_jobs", 0))
        elif ts(j["timestamp"]) >= q0 and (msg in ("job done", "job refused")
                                            or (msg == "job failed" and f.get("fault") == "Permanent")):
            ended += 1
            done += msg == "job done"
    if len(routed) == n and ended >= jobs:
        q = {"Level": "Instance", "Query": {"Modality": "SR"}}
        if len(s.post(f"http://127.0.0.1:{http}/tools/find", json=q, timeout=30).json()) >= done:
            break
    time.sleep(0.5)
el = time.time() - q0
rss = next(int(l.split()[1]) // 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
print(f"\nQueue: {n} {kind} studies sent back to back (sending took {t_sent - q0:.1f} s): {len(routed)} routed, "
      f"{ended}/{jobs} jobs ended ({done} done) after {el:.1f} s = {3600 * n / el:.0f} studies/hour; "
      f"node peak RSS {rss} MiB")
EOF
    fi
    stop_node
fi

if [ -s "$vresults" ]; then
    python3 - "$vresults" "$(nproc)" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"Time to result, real-size volumes; CPU, loopback, {sys.argv[2]} cores. t0 = storescu exited (s).")
print("complete: series complete (early completion); jobs: route outcome@end [job ms]; last SR in PACS: when Orthanc "
      "had every SR of the study (no SR: the last verdict); all jobs ended: incl. refusals")
for kind in dict.fromkeys(r["kind"] for r in rows):
    rs = [r for r in rows if r["kind"] == kind]
    for r in rs:
        jobs = ", ".join(f"{e['route']} {e['outcome']}@{e['t']:.2f}" + (f" [{e['ms']:.0f} ms]" if e.get("ms") else "")
                         + (f" ({e['why'][:60]})" if e["outcome"] != "done" and e.get("why") else "") for e in r["ended"])
        print(f"{kind:9} {r['slices']:4} slices  send {r['send_s']:6.2f}  complete {r['complete_s']}  "
              f"last SR in PACS {r['t_pacs_s']:6.2f} ({r['srs']} SR)  all jobs ended {r['t_last_verdict_s']:6.2f}  | {jobs}")
    print(f"{kind:9} median: last SR in PACS {statistics.median(r['t_pacs_s'] for r in rs):.2f} s, all jobs ended "
          f"{statistics.median(r['t_last_verdict_s'] for r in rs):.2f} s, over {len(rs)} run(s)")
EOF
fi

# ---------------------------------------------------------------- table
# (an if, not `&&`: with no phantom rows the script still exits 0)
if [ -s "$results" ]; then python3 - "$results" "$RUNS" "$(nproc)" <<'EOF'
import statistics, sys
path, runs, cores = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
print()
print(f"Time to result, last C-STORE-RSP -> SR in Orthanc (s); CPU, loopback, {cores} cores; {runs} run(s) each")
print("t0 = storescu exited. complete/job/delivered: node log, relative to t0 (median). "
      "reason: completion_reason of the series.")
hdr = f"{'task':5} {'model':8} {'slices':>6} {'send':>7} {'best':>7} {'median':>7}   {'complete':>8} {'job done':>8} {'SR acked':>8}  reason"
print(hdr)
print("-" * len(hdr))
for task in dict.fromkeys(r[0] for r in rows):
    rs = [r for r in rows if r[0] == task]
    col = lambda i: [float(r[i]) for r in rs]
    med = lambda i: statistics.median(col(i))
    reasons = ",".join(sorted({r[8] for r in rs}))
    print(f"{task:5} {rs[0][1]:8} {rs[0][2]:>6} {med(3):7.3f} {min(col(7)):7.3f} {med(7):7.3f}   "
          f"{med(4):8.3f} {med(5):8.3f} {med(6):8.3f}  {reasons}")
EOF
fi
