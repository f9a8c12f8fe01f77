#!/usr/bin/env bash
# Ingest throughput: biomarker-node vs DCMTK storescp vs Orthanc, same data, same sender.
#
#   bash integration-tests/bench/ingest.sh            # 500 instances, 1 and 8 senders
#   N=200 SENDERS=4 bash integration-tests/bench/ingest.sh
#   PEERS="node storescp" bash integration-tests/bench/ingest.sh   # the target ratio only
#   BENCH_TMP=/dev/shm bash integration-tests/bench/ingest.sh      # on tmpfs: no disk flushes,
#                                                                  # the protocol and CPU path alone
#   BASE_BIN=/tmp/node-before PEERS="node base storescp" ROUNDS=3 bash integration-tests/bench/ingest.sh
#       # a change against the build before it, interleaved, medians of 3 rounds
#
# Prints numbers; it is not a test and CI does not run it. Needs a release
# build (cargo build --release) and scripts/install-deps.sh's packages.
#
# Data: N clones of the 530 kB real chest slice (explicit VR LE, new UIDs, one
# series), split round-robin into SENDERS directories. Every sender is one DCMTK
# storescu process sending its whole directory in ONE association (+sd).
# Each (peer, sender count) run starts its peer on empty storage, so no run
# sees the previous run's instances as duplicates.
#
# Peers:
#   node      target/release/biomarker-node serve, under /usr/bin/time -v for peak RSS
#   storescp  DCMTK storescp +B (bit-preserving, like the node: bytes as received);
#             --fork when there is more than one sender. It does not fsync.
#   orthanc   Orthanc with a throw-away config and storage (SQLite index, fsync on)
#   base      another biomarker-node binary ($BASE_BIN), run exactly as `node`
# ROUNDS (default 1) runs every peer that many times, interleaved (peer after
# peer within a round), and reports medians: this machine's speed drifts by
# tens of percent over minutes, so only interleaved runs compare.
# TCP_NODELAY=1 is exported for the DCMTK peers (DCMTK reads it from the environment).
set -euo pipefail

N="${N:-500}"
SENDERS="${SENDERS:-8}"
PEERS="${PEERS:-node storescp orthanc}"
ROUNDS="${ROUNDS:-1}"
BASE_BIN="${BASE_BIN:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${BIOMARKER_NODE_BIN:-$root/target/release/biomarker-node}"
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}" # not the pynetdicom console scripts of the same name
STORESCU="$DCMTK_BIN/storescu"
STORESCP="$DCMTK_BIN/storescp"
ORTHANC="${ORTHANC:-$(command -v Orthanc || echo /usr/sbin/Orthanc)}"
export TCP_NODELAY=1

for tool in "$BIN" "$STORESCU" "$STORESCP" "$ORTHANC" /usr/bin/time curl; do
    [ -x "$tool" ] || command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

work="$(mktemp -d "${BENCH_TMP:-/tmp}/ingest-bench.XXXXXX")"
peer_pid=""
cleanup() {
    if [ -n "$peer_pid" ] && kill -0 "$peer_pid" 2>/dev/null; then
        kill "$peer_pid" 2>/dev/null || true
        wait "$peer_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port, pid
    for _ in $(seq 1 300); do
        if ! kill -0 "$2" 2>/dev/null; then
            echo "peer exited during start-up" >&2
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

echo "== generating $N instances in $SENDERS directories under $work/src"
PYTHONPATH="$root/integration-tests" python3 - "$work/src" "$N" "$SENDERS" <<'EOF'
import sys
from pathlib import Path
import instances

out, n, senders = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = instances.write_series(out / "all", n)
for i, inst in enumerate(s.instances):
    d = out / f"s{i % senders}"
    d.mkdir(parents=True, exist_ok=True)
    inst.path.rename(d / inst.path.name)
(out / "all").rmdir()
print(f"{n} instances, {sum(p.stat().st_size for p in out.rglob('*.dcm')) / 1e6:.0f} MB")
EOF

# send <port> <called AE> <senders> -> prints elapsed seconds; fails if any storescu failed
send() {
    local port="$1" aec="$2" senders="$3"
    local pids=() logs=() t0 t1 i
    t0=$(date +%s.%N)
    if [ "$senders" -eq 1 ]; then
        "$STORESCU" -v -aet STORESCU -aec "$aec" +sd +r 127.0.0.1 "$port" "$work/src" \
            >"$work/send0.log" 2>&1 &
        pids+=($!)
        logs+=("$work/send0.log")
    else
        for i in $(seq 0 $((senders - 1))); do
            "$STORESCU" -v -aet STORESCU -aec "$aec" +sd 127.0.0.1 "$port" "$work/src/s$i" \
                >"$work/send$i.log" 2>&1 &
            pids+=($!)
            logs+=("$work/send$i.log")
        done
    fi
    local failed=0
    for p in "${pids[@]}"; do
        wait "$p" || failed=1
    done
    t1=$(date +%s.%N)
    local ok assocs
    ok=$(cat "${logs[@]}" | grep -c "Received Store Response (Success)" || true)
    assocs=$(cat "${logs[@]}" | grep -c "Association Accepted" || true)
    if [ "$failed" -ne 0 ] || [ "$ok" -ne "$N" ] || [ "$assocs" -ne "$senders" ]; then
        echo "send failed: $ok/$N successes over $assocs associations" >&2
        tail -n 5 "${logs[@]}" >&2
        return 1
    fi
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}

stop_peer() {
    if [ -n "$peer_pid" ]; then
        kill -TERM "$peer_pid" 2>/dev/null || true
        wait "$peer_pid" 2>/dev/null || true
        peer_pid=""
    fi
}

# A run's instances go once they are counted, so that every run writes into a
# page cache of the same size. Kept, each run's 266 MB grew it, and on a
# virtual machine the host backs a guest page only when it is first touched:
# the run that happened to grow the cache into memory never used before paid
# for it (seen: the node's system time x4 in one round, 71 % of it in the copy
# into new page-cache pages), whichever peer it was.
drop_storage() {
    rm -rf "$1"
}

declare -A RATE RSS COUNT CPU
# 1, and SENDERS once: a second run of the same count would find its peer's
# storage full of the first run's instances and time duplicates.
SENDER_COUNTS="$(printf '%s\n' 1 "$SENDERS" | sort -nu | tr '\n' ' ')"

# The pid of the peer that /usr/bin/time ($1) started: signals go to it, not
# to time, so that time still reports. Empty if it never appeared.
child_of() {
    local pid=""
    for _ in $(seq 1 50); do
        pid=$(pgrep -P "$1" || true)
        [ -n "$pid" ] && break
        sleep 0.1
    done
    echo "$pid"
}

run_base() { # senders round
    [ -x "$BASE_BIN" ] || { echo "peer base needs BASE_BIN, an executable" >&2; exit 1; }
    run_node "$1" "$2" base "$BASE_BIN"
}

run_node() { # senders round [label binary]
    local senders="$1" label="${3:-node}" bin="${4:-$BIN}" port
    local d="$work/$label-$senders-$2"
    port=$(free_port)
    mkdir -p "$d"
    cat >"$d/node.yaml" <<EOF
node:
  ae_title: BIOMARKER
  bind: 127.0.0.1
  port: $port
  data_dir: $d/data
  max_pdu: 262144
  max_associations: 16
  min_free_disk_mb: 64
  allowed_callers: []
series:
  quiet_seconds: 30
log:
  format: text
  level: warn
http:
  enabled: false
EOF
    /usr/bin/time -v -o "$d/time.txt" "$bin" serve --config "$d/node.yaml" >"$d/node.log" 2>&1 &
    local time_pid=$!
    local node_pid
    node_pid=$(child_of "$time_pid")
    peer_pid="$node_pid"
    wait_port "$port" "$node_pid"
    local secs
    secs=$(send "$port" BIOMARKER "$senders")
    COUNT[$label,$senders]=$(find "$d/data/spool" -name '*.dcm' | wc -l)
    kill -TERM "$node_pid"
    wait "$time_pid" || true
    peer_pid=""
    record "$label" "$senders" "$secs"
    drop_storage "$d/data"
    RSS[$label,$senders]+="$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$d/time.txt") "
    CPU[$label,$senders]+="$(cpu_ms_per_instance "$d/time.txt") "
}

record() { # peer senders seconds: one round's rate, appended
    RATE[$1,$2]+="$(python3 -c "print(f'{$N / $3:.1f}')") "
}

# user + system CPU of a peer (and the children it reaped: storescp --fork),
# from /usr/bin/time -v, in ms per instance. Less noisy than a rate on a
# shared disk, and it says how much of the machine each peer needs.
cpu_ms_per_instance() {
    awk -F: -v n="$N" '/User time \(seconds\)|System time \(seconds\)/ {t += $2} END {printf "%.2f", 1000 * t / n}' "$1"
}

run_storescp() { # senders round
    local senders="$1" d="$work/storescp-$1-$2" port fork=()
    port=$(free_port)
    mkdir -p "$d/out"
    [ "$senders" -gt 1 ] && fork=(--fork)
    /usr/bin/time -v -o "$d/time.txt" "$STORESCP" +B "${fork[@]}" -aet STORESCP -od "$d/out" "$port" \
        >"$d/storescp.log" 2>&1 &
    local time_pid=$!
    peer_pid=$(child_of "$time_pid")
    wait_port "$port" "$peer_pid"
    local secs
    secs=$(send "$port" STORESCP "$senders")
    stop_peer
    wait "$time_pid" || true
    CPU[storescp,$senders]+="$(cpu_ms_per_instance "$d/time.txt") "
    COUNT[storescp,$senders]=$(find "$d/out" -type f | wc -l)
    record storescp "$senders" "$secs"
    drop_storage "$d/out"
}

run_orthanc() { # senders round
    local senders="$1" d="$work/orthanc-$1-$2" port http
    port=$(free_port)
    http=$(free_port)
    mkdir -p "$d"
    cat >"$d/orthanc.json" <<EOF
{
  "Name": "ingest-bench",
  "StorageDirectory": "$d/storage",
  "IndexDirectory": "$d/index",
  "DicomAet": "ORTHANC",
  "DicomPort": $port,
  "HttpPort": $http,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowStore": true,
  "DicomAlwaysAllowEcho": true,
  "DicomThreadsCount": $((senders > 4 ? senders : 4)),
  "StorageCompression": false,
  "Plugins": []
}
EOF
    "$ORTHANC" "$d/orthanc.json" >"$d/orthanc.log" 2>&1 &
    peer_pid=$!
    wait_port "$port" "$peer_pid"
    local secs
    secs=$(send "$port" ORTHANC "$senders")
    COUNT[orthanc,$senders]=$(curl -s "http://127.0.0.1:$http/statistics" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["CountInstances"])')
    stop_peer
    record orthanc "$senders" "$secs"
    drop_storage "$d/storage"
}

for senders in $SENDER_COUNTS; do
    for round in $(seq 1 "$ROUNDS"); do
        for peer in $PEERS; do
            echo "== $senders sender(s): $peer, round $round of $ROUNDS"
            # Every run starts with no dirty page cache: storescp does not
            # fsync, and the kernel would write its 266 MB back during the
            # next run, on that run's disk and cores.
            sync
            "run_$peer" "$senders" "$round"
        done
    done
done

echo
echo "Ingest of $N CT instances (530 kB, explicit VR LE), loopback, $(nproc) cores, median of $ROUNDS round(s)"
# Every list below holds one number per round, in round order.
for senders in $SENDER_COUNTS; do
    for peer in $PEERS; do
        printf '%s|%s|%s|%s|%s|%s\n' "$peer" "$senders" "${RATE[$peer,$senders]:-}" "${COUNT[$peer,$senders]:-}" \
            "${CPU[$peer,$senders]:-}" "${RSS[$peer,$senders]:-}"
    done
done >"$work/summary.txt"
python3 - "$work/summary.txt" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
def nums(v):
    return [float(x) for x in v.split()]
def med(v):
    return statistics.median(nums(v)) if v.strip() else None
print(f"{'peer':<10} {'senders':>8} {'inst/s':>10} {'stored':>8} {'CPU ms/inst':>12}")
rate = {}
for peer, s, r, count, cpu, rss in rows:
    rate[peer, s] = nums(r)
    c = med(cpu)
    print(f"{peer:<10} {s:>8} {med(r):>10.1f} {count:>8} {'-' if c is None else f'{c:.2f}':>12}")
print()
# The ratios of this run, side by side, round by round: node/storescp is the
# target (>= 1.0); node/base is a change against the build before it.
for peer, s, r, count, cpu, rss in rows:
    if peer != "node":
        continue
    parts = []
    for other in ("storescp", "orthanc", "base"):
        if (other, s) in rate:
            each = [a / b for a, b in zip(rate["node", s], rate[other, s])]
            spread = f" (rounds {min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
            parts.append(f"node/{other} = {statistics.median(each):.2f}{spread}")
    if rss.strip():
        parts.append(f"node peak RSS = {max(nums(rss)) / 1024:.1f} MiB")
    print(f"{s} sender(s): " + ", ".join(parts))
EOF
