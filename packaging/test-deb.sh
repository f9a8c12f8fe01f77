#!/usr/bin/env bash
# End-to-end test of the Debian package, as root on a Debian 12 machine
# (scripts/test.sh runs it after the integration tests; CI runs that as root).
#
#  1. builds the .deb (packaging/build-deb.sh --no-build: the binary of
#     `cargo build --release`; BUILD=1 builds it first)
#  2. dpkg -i, prints dpkg's output, the package's file list (dpkg -L) and
#     conffiles; checks the unit with systemd-analyze verify (and prints its
#     offline security exposure) when systemd-analyze is installed
#  3. starts the service on the installed default config:
#     - with systemd as PID 1: systemctl start biomarker-node;
#     - otherwise (containers, CI): runs the unit's own ExecStartPre= and
#       ExecStart= lines, read from the installed unit file, as an
#       unprivileged user in the DynamicUser range with the unit's
#       NoNewPrivileges, empty capability sets, UMask and (via the kernel's
#       PR_SET_MDWE, when the kernel has it) MemoryDenyWriteExecute, and
#       creates /var/lib/biomarker-node for it as StateDirectory= would
#  4. C-ECHO and C-STORE of one synthetic CT slice with DCMTK
#     (/usr/bin/echoscu, /usr/bin/storescu; DCMTK_BIN overrides), checks the
#     instance is in the installed data_dir's spool and that its pma job ran
#     the packaged model on the packaged ONNX Runtime
#  5. stops the node, dpkg -r and dpkg --purge, removes the data it made, so
#     the test can run again.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PKG=biomarker-node
BIN=/usr/bin/biomarker-node
CONF=/etc/biomarker-node/node.yaml
DATA=/var/lib/biomarker-node
PORT=11112
AET=BIOMARKER
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}"
# A uid/gid in systemd's DynamicUser range (61184-65519), no passwd entry.
SVC_UID="${SVC_UID:-61999}"
MARKER=/var/tmp/biomarker-node-test-deb.marker
PY="${PYTHON:-python3}"

say() { echo "test-deb: $*"; }
section() { echo; echo "---- $* ----"; }
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    fail "needs root (dpkg -i); CI runs as root. Run: sudo bash packaging/test-deb.sh"
fi
for t in dpkg dpkg-deb setpriv "$DCMTK_BIN/echoscu" "$DCMTK_BIN/storescu" "$DCMTK_BIN/dcmdump"; do
    command -v "$t" >/dev/null 2>&1 || fail "$t is missing (scripts/install-deps.sh installs dcmtk)"
done

work="$(mktemp -d /tmp/test-deb.XXXXXX)"
chmod 755 "$work"
node_pid=""
mode=""

cleanup() {
    local rc=$?
    section "stop and remove"
    if [ "$mode" = systemd ]; then
        systemctl stop "$PKG" && say "systemctl stop $PKG: ok"
    elif [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
        kill -TERM "$node_pid"
        for _ in $(seq 1 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$node_pid" 2>/dev/null; then
            say "node did not stop on SIGTERM within 10 s; SIGKILL"
            kill -KILL "$node_pid"
        else
            say "node (pid $node_pid) stopped on SIGTERM"
        fi
        wait "$node_pid" 2>/dev/null
    fi
    if [ -s "$work/node.log" ]; then
        echo "node log (last 25 lines):"
        tail -n 25 "$work/node.log" | sed 's/^/  | /'
    fi
    if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "installed"; then
        echo "\$ dpkg -r $PKG"
        dpkg -r "$PKG" 2>&1 | sed 's/^/  /'
    fi
    if dpkg-query -W "$PKG" >/dev/null 2>&1; then
        echo "\$ dpkg --purge $PKG"
        dpkg --purge "$PKG" 2>&1 | sed 's/^/  /'
    fi
    # The node's data from this test only (the marker says we made it).
    if [ -f "$MARKER" ]; then
        rm -rf "$DATA" /var/lib/private/biomarker-node
        rm -f "$MARKER"
    fi
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then say "PASS"; else say "FAILED (status $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT

# A package left behind by an interrupted run of this test is removed; a real
# installation (no marker) is not touched.
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "installed"; then
    [ -f "$MARKER" ] || { trap - EXIT; fail "$PKG is already installed on this machine (not by this test); not touching it"; }
    say "removing $PKG left by an earlier run"
    dpkg --purge "$PKG" >/dev/null 2>&1
fi
if [ -e "$DATA" ] && [ ! -f "$MARKER" ]; then
    trap - EXIT
    fail "$DATA exists (not made by this test); not touching it"
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    trap - EXIT
    fail "something already listens on port $PORT; the installed config uses it"
fi
touch "$MARKER"

section "build"
build_args=(--no-build)
[ "${BUILD:-0}" = 1 ] && build_args=()
bash packaging/build-deb.sh "${build_args[@]}" >"$work/build.out" 2>&1 || { cat "$work/build.out"; fail "build-deb.sh failed"; }
grep '^build-deb:' "$work/build.out"
deb="$(tail -n 1 "$work/build.out")"
[ -f "$deb" ] || fail "no .deb"
echo "\$ dpkg-deb --info $(basename "$deb")"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p' | sed 's/^/  /'

section "install"
echo "\$ dpkg -i $(basename "$deb")"
dpkg -i "$deb" >"$work/dpkg-i.out" 2>&1
rc=$?
sed 's/^/  /' "$work/dpkg-i.out"
[ "$rc" -eq 0 ] || fail "dpkg -i exited $rc"
echo "\$ dpkg -L $PKG"
dpkg -L "$PKG" | sed 's/^/  /'
echo "\$ dpkg-query -W -f='\${Conffiles}' $PKG"
conffiles="$(dpkg-query -W -f='${Conffiles}\n' "$PKG")"
echo "$conffiles" | sed 's/^/  /'
echo "$conffiles" | grep -q " $CONF " || fail "$CONF is not a conffile"

unit="$(dpkg -L "$PKG" | grep '/systemd/system/biomarker-node.service$' | head -n 1)"
[ -n "$unit" ] && [ -f "$unit" ] || fail "the package has no biomarker-node.service"
for f in "$BIN" "$CONF" /usr/lib/biomarker-node/libonnxruntime.so /usr/share/biomarker-node/models/pma.yaml /usr/share/biomarker-node/models/pma.onnx; do
    [ -f "$f" ] || fail "$f is not installed"
done
if [ -r /usr/share/biomarker-node/models/pma.yaml ]; then
    onnx="$(sed -n 's/^onnx: *//p' /usr/share/biomarker-node/models/pma.yaml)"
    [ -f "/usr/share/biomarker-node/models/$onnx" ] || fail "pma.yaml names $onnx, which is not next to it"
fi

section "systemd unit"
if command -v systemd-analyze >/dev/null 2>&1; then
    echo "\$ systemd-analyze verify $unit"
    out="$(systemd-analyze verify "$unit" 2>&1)"
    rc=$?
    [ -n "$out" ] && echo "$out" | sed 's/^/  /'
    [ "$rc" -eq 0 ] || fail "systemd-analyze verify exited $rc"
    # Lines about other units (the host's own) are not ours to fix.
    if echo "$out" | grep -i 'biomarker-node' | grep -qiv 'not found\|No such file'; then
        fail "systemd-analyze verify reported problems with the unit"
    fi
    say "systemd-analyze verify: ok"
    if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
        echo "\$ systemd-analyze security --offline=yes $unit | tail -n 1"
        systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n 1 | sed 's/^/  /'
    fi
else
    say "systemd-analyze not installed: unit not verified"
fi

section "config"
echo "\$ $BIN check-config --config $CONF"
"$BIN" check-config --config "$CONF" 2>&1 | sed 's/^/  /'
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "the installed config does not pass check-config"

section "start"
# Run as the service user (no systemd: the unit's uid; with systemd: root is fine for reading).
as_service() { setpriv --reuid="$SVC_UID" --regid="$SVC_UID" --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"; }
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    mode=systemd
    say "systemd is running: systemctl start $PKG"
    systemctl daemon-reload
    systemctl start "$PKG" || { systemctl status "$PKG" --no-pager; journalctl -u "$PKG" --no-pager | tail -n 30; fail "systemctl start failed"; }
    run_cli() { "$@"; }
else
    mode=direct
    say "systemd is not PID 1 ($(ps -p 1 -o comm= 2>/dev/null || echo unknown)): running the unit's ExecStartPre/ExecStart"
    say "  as uid/gid $SVC_UID (DynamicUser range), NoNewPrivileges, no capabilities, UMask 0027, StateDirectory $DATA"
    pre="$(sed -n 's/^ExecStartPre=//p' "$unit")"
    start="$(sed -n 's/^ExecStart=//p' "$unit")"
    [ -n "$start" ] || fail "no ExecStart= in $unit"
    read -r -a pre_argv <<<"$pre"
    read -r -a start_argv <<<"$start"
    install -d -m 0750 -o "$SVC_UID" -g "$SVC_UID" "$DATA"
    run_cli() { as_service "$@"; }
    if [ -n "$pre" ]; then
        echo "\$ ExecStartPre: ${pre_argv[*]}"
        (umask 0027; as_service "${pre_argv[@]}") 2>&1 | sed 's/^/  /'
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "ExecStartPre failed"
    fi
    # MemoryDenyWriteExecute=yes: PR_SET_MDWE (Linux >= 6.3) refuses any
    # writable+executable mapping for the process and what it execs, which
    # is what systemd enforces (with seccomp on older kernels).
    mdwe_wrapper=("$PY" -c '
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0 and libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) & 1:
    print("test-deb: MemoryDenyWriteExecute emulated with PR_SET_MDWE", file=sys.stderr)
else:
    print("test-deb: PR_SET_MDWE unavailable (kernel < 6.3?): MemoryDenyWriteExecute not emulated", file=sys.stderr)
os.execvp(sys.argv[1], sys.argv[1:])
' )
    # systemd starts services with a clean environment plus Environment=.
    read -r -a unit_env <<<"$(sed -n 's/^Environment=//p' "$unit" | tr '\n' ' ')"
    echo "\$ ExecStart: ${unit_env[*]} ${start_argv[*]}"
    (umask 0027; exec "${mdwe_wrapper[@]}" setpriv --reuid="$SVC_UID" --regid="$SVC_UID" --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${unit_env[@]}" "${start_argv[@]}") >"$work/node.log" 2>&1 &
    node_pid=$!
fi

up=0
for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
    if [ "$mode" = direct ] && ! kill -0 "$node_pid" 2>/dev/null; then break; fi
    sleep 0.1
done
[ -s "$work/node.log" ] && grep -m1 'MemoryDenyWriteExecute\|PR_SET_MDWE' "$work/node.log" | sed 's/^/  /'
[ "$up" = 1 ] || fail "the node does not listen on port $PORT"
say "listening on 127.0.0.1:$PORT"

section "DICOM"
echo "\$ $DCMTK_BIN/echoscu -aet TESTDEB -aec $AET 127.0.0.1 $PORT"
"$DCMTK_BIN/echoscu" -aet TESTDEB -aec "$AET" 127.0.0.1 "$PORT" 2>&1 | sed 's/^/  /'
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "C-ECHO failed"
say "C-ECHO: ok"

"$BIN" phantom --task pma --seed 7 --out "$work/phantom" --count 1 >/dev/null 2>"$work/phantom.err" || { cat "$work/phantom.err"; fail "phantom failed"; }
dcm="$(find "$work/phantom" -name '*.dcm' | sort | head -n 1)"
[ -n "$dcm" ] || fail "phantom wrote no .dcm"
sop="$("$DCMTK_BIN/dcmdump" +P 0008,0018 "$dcm" | sed -n 's/.*\[\(.*\)\].*/\1/p' | head -n 1)"
[ -n "$sop" ] || fail "no SOPInstanceUID in $dcm"
echo "\$ $DCMTK_BIN/storescu -aet TESTDEB -aec $AET 127.0.0.1 $PORT $(basename "$dcm")"
"$DCMTK_BIN/storescu" -aet TESTDEB -aec "$AET" 127.0.0.1 "$PORT" "$dcm" 2>&1 | sed 's/^/  /'
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "C-STORE failed"
say "C-STORE: ok (SOP Instance UID $sop)"

stored="$(find -L "$DATA/spool" -name "$sop.dcm" 2>/dev/null | head -n 1)"
[ -n "$stored" ] || fail "$sop.dcm is not under $DATA/spool"
say "in the installed data_dir: $stored ($(stat -L -c '%s bytes, owner %u:%g, mode %a' "$stored"))"
[ "$(head -c 132 "$stored" | tail -c 4)" = DICM ] || fail "$stored is not a Part-10 file"

section "analysis"
# The slice is a one-image chest series: the pma route runs the packaged
# model on the packaged ONNX Runtime. The PACS of the default config
# (127.0.0.1:4242) is not there; delivery waits in the outbox, which is fine.
state=""
for _ in $(seq 1 240); do
    run_cli "$BIN" jobs --config "$CONF" --json >"$work/jobs.json" 2>/dev/null || true
    if grep -q '"state":"failed"' "$work/jobs.json"; then state=failed; break; fi
    if grep -q '"route":"pma-single-slice"' "$work/jobs.json" && ! grep -q '"state":"\(pending\|running\)"' "$work/jobs.json"; then state=done; break; fi
    sleep 0.5
done
echo "\$ $BIN jobs --config $CONF"
run_cli "$BIN" jobs --config "$CONF" 2>&1 | sed 's/^/  /'
[ "$state" = done ] || fail "the pma job did not finish (state: ${state:-none within 120 s})"
say "pma job done: the packaged model and ONNX Runtime work under the unit's restrictions"

# The packaged config's HTTP interface (loopback): health, readiness and the
# job the phantom made, as an administrator would check them.
h="$(curl -fsS -m 5 http://127.0.0.1:8080/healthz)" || fail "GET /healthz: no answer"
say "GET /healthz: $h"
r="$(curl -fsS -m 5 http://127.0.0.1:8080/readyz)" || fail "GET /readyz: not ready: $r"
say "GET /readyz: $r"
curl -fsS -m 5 http://127.0.0.1:8080/api/jobs | grep -q '"state":"done"' || fail "GET /api/jobs: no done job"
say "GET /api/jobs: the phantom's jobs are done"
exit 0
