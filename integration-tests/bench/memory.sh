#!/usr/bin/env bash
# Peak memory of the node per dataset (issue 12, item 2): one 1 GiB
# multi-frame dataset (accepted) and one deflate bomb (refused), then proof
# that the node still serves.
#
#   bash integration-tests/bench/memory.sh
#   FRAMES=64 BOMB_GIB=1 MAX_DATASET_MB=256 bash integration-tests/bench/memory.sh  # quick
#
# Prints figures; it is not a test and CI does not run it. Needs a release
# build (cargo build --release), DCMTK and pydicom.
#
# Data, made here in a temp dir and deleted at the end:
#   big.dcm   the real chest slice (512x512, 16 bit, explicit VR LE) as one
#             CT instance of FRAMES frames (default 2048: 1 GiB of pixel data),
#             written frame by frame so the generator never holds it either.
#   bomb      a Deflated Explicit VR LE dataset: a valid header, then
#             BOMB_GIB GiB (default 4.25) of zeros in honest 256 MiB private OB
#             elements, so only inflating finds the size out. Deflate cannot
#             pack more than ~1032:1, so 4 GiB needs ~4 MB of compressed data
#             (a "1 MiB" bomb inflates to 1 GiB at most). Built from repeated
#             full-flush segments, so making it costs seconds.
# The node runs with no models and no routes (nothing else to measure), with
# node.max_dataset_mb at its default (2048), under /usr/bin/time -v. VmHWM from
# /proc after each step shows which step set the peak.
set -euo pipefail

FRAMES="${FRAMES:-2048}"
BOMB_GIB="${BOMB_GIB:-4.25}"
MAX_DATASET_MB="${MAX_DATASET_MB:-2048}" # the node's default
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${BIOMARKER_NODE_BIN:-$root/target/release/biomarker-node}"
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}" # not the pynetdicom console scripts of the same name
for tool in "$BIN" "$DCMTK_BIN/storescu" "$DCMTK_BIN/echoscu" /usr/bin/time; do
    [ -x "$tool" ] || { echo "missing: $tool" >&2; exit 1; }
done

work="$(mktemp -d /tmp/memory-bench.XXXXXX)"
time_pid=""
node_pid=""
cleanup() {
    if [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
        kill "$node_pid" 2>/dev/null || true
        wait "$time_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
hwm() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$node_pid/status"; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

echo "== data under $work"
PYTHONPATH="$root/integration-tests" python3 - "$work" "$FRAMES" "$BOMB_GIB" <<'EOF'
import struct, sys, zlib
from pathlib import Path

import instances
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

work, frames, bomb_gib = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

# 1 GiB multi-frame: header by pydicom, pixel data streamed frame by frame.
sop = instances.new_uid()
ds = instances.make_dataset(instances.new_uid(), instances.new_uid(), sop, 0.0, 1, instances.new_uid())
frame = bytes(ds.PixelData)
del ds.PixelData
ds.NumberOfFrames = frames
header = instances.dataset_bytes(ds)
meta = DicomBytesIO()
meta.is_little_endian, meta.is_implicit_VR = True, False
write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
with open(work / "big.dcm", "wb") as f:
    f.write(b"\0" * 128 + b"DICM" + meta.getvalue() + header)
    f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(frame) * frames))
    for _ in range(frames):
        f.write(frame)
print(f"big.dcm: {frames} frames, {(work / 'big.dcm').stat().st_size / 2**30:.3f} GiB")

# The bomb: header, then private OB elements of zeros, 256 MiB each.
bsop = instances.new_uid()
b = instances.make_dataset(instances.new_uid(), instances.new_uid(), bsop, 0.0, 1, instances.new_uid())
del b.PixelData
b.add_new(0x00090010, "LO", "BOMB")
head = instances.dataset_bytes(b)
chunk = bytes(64 << 20)
c = zlib.compressobj(9, zlib.DEFLATED, -15)
out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
seg = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
# After a full flush nothing refers back: one 64 MiB segment stands for all.
# (Both segments made here are left out of the stream; that is allowed.)
assert seg == c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
inflated = len(head)
for i in range(int(bomb_gib * 4 + 0.999)):
    out.append(c.compress(struct.pack("<HH2sHI", 0x0009, 0x1000 + i, b"OB", 0, 4 * len(chunk))) + c.flush(zlib.Z_FULL_FLUSH))
    out += [seg] * 4
    inflated += 12 + 4 * len(chunk)
out.append(c.flush())
bomb = b"".join(out)
# Check that it inflates to what is claimed (in bounded memory).
d = zlib.decompressobj(-15)
total, rest = 0, bomb
while not d.eof:
    out_part = d.decompress(rest, 64 << 20)
    rest = d.unconsumed_tail
    total += len(out_part)
    if not out_part and not rest:
        break
assert d.eof and total == inflated, (total, inflated)
(work / "bomb").write_bytes(bomb)
(work / "bomb.sop").write_text(bsop)
print(f"bomb: {len(bomb) / 2**20:.2f} MiB deflated, inflates to {total / 2**30:.2f} GiB")
EOF

port=$(free_port)
cat >"$work/node.yaml" <<EOF
node:
  ae_title: BIOMARKER
  bind: 127.0.0.1
  port: $port
  data_dir: $work/data
  max_pdu: 262144
  min_free_disk_mb: 64
  max_dataset_mb: $MAX_DATASET_MB
  allowed_callers: []
series:
  quiet_seconds: 2
log:
  format: text
  level: info
http:
  listen: 127.0.0.1:$(free_port)
EOF
/usr/bin/time -v -o "$work/time.txt" "$BIN" serve --config "$work/node.yaml" >"$work/node.log" 2>&1 &
time_pid=$!
for _ in $(seq 1 100); do
    node_pid=$(pgrep -P "$time_pid" || true)
    [ -n "$node_pid" ] && break
    sleep 0.1
done
for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
echo "node up: VmHWM $(hwm) MiB"

echo "== $FRAMES-frame dataset (DCMTK storescu)"
t0=$(now)
"$DCMTK_BIN/storescu" -v -aet STORESCU -aec BIOMARKER 127.0.0.1 "$port" "$work/big.dcm" >"$work/big.log" 2>&1 || true
t1=$(now)
big_status=$(grep -o "Received Store Response ([^)]*)" "$work/big.log" | tail -1 || true)
big_hwm=$(hwm)
stored=$(find "$work/data/spool" -name '*.dcm' -printf '%s\n' | sort -n | tail -1 | awk '{printf "%.1f", $1 / 1048576}')
echo "   $big_status in $(secs "$t0" "$t1") s; spooled file: ${stored:-none} MiB; VmHWM $big_hwm MiB"
rm -f "$work/big.dcm" # the spool copy stays; the source is not needed again

echo "== deflate bomb (raw peer, Deflated Explicit VR LE)"
t0=$(now)
bomb_status=$(PYTHONPATH="$root/integration-tests" python3 - "$port" "$work/bomb" "$work/bomb.sop" <<'EOF'
import sys
import rawdul as ul
port, bomb, sop = int(sys.argv[1]), open(sys.argv[2], "rb").read(), open(sys.argv[3]).read()
with ul.RawAssociation("127.0.0.1", port, timeout=600) as a:
    a.associate(contexts=[(1, ul.CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1.99"])], max_pdu=262144)
    rsp = a.c_store(1, ul.CT_IMAGE_STORAGE, sop, bomb)
    a.release()
print(f"0x{rsp.status:04X} {rsp.raw.get(0x0902, b'').decode(errors='replace').strip()}")
EOF
)
t1=$(now)
bomb_hwm=$(hwm)
echo "   status $bomb_status in $(secs "$t0" "$t1") s; VmHWM $bomb_hwm MiB"
partials=$(find "$work/data/tmp" -type f | wc -l)

echo "== still serving"
"$DCMTK_BIN/echoscu" -aet ECHOSCU -aec BIOMARKER 127.0.0.1 "$port" && echo_ok=yes || echo_ok=no
PYTHONPATH="$root/integration-tests" python3 - "$work/small" <<'EOF'
import sys
from pathlib import Path
import instances
instances.write_series(Path(sys.argv[1]), 1)
EOF
"$DCMTK_BIN/storescu" -v -aet STORESCU -aec BIOMARKER 127.0.0.1 "$port" "$work"/small/*.dcm >"$work/small.log" 2>&1 || true
small_status=$(grep -o "Received Store Response ([^)]*)" "$work/small.log" | tail -1 || true)
echo "   C-ECHO: $echo_ok; C-STORE: $small_status"

kill -TERM "$node_pid"
wait "$time_pid" || true
node_pid=""
peak=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); printf "%.1f", $2 / 1024}' "$work/time.txt")

echo
echo "== memory.sh results"
printf '%-40s %s\n' "$FRAMES-frame C-STORE ($stored MiB spooled)" "$big_status"
printf '%-40s %s\n' "  VmHWM after it (MiB)" "$big_hwm"
printf '%-40s %s\n' "deflate bomb C-STORE" "$bomb_status"
printf '%-40s %s\n' "  VmHWM after it (MiB)" "$bomb_hwm"
printf '%-40s %s\n' "  partial files left in tmp/" "$partials"
printf '%-40s %s\n' "C-ECHO / C-STORE afterwards" "$echo_ok / $small_status"
printf '%-40s %s\n' "peak RSS, /usr/bin/time -v (MiB)" "$peak"
ok=yes
[[ "$big_status" == *Success* ]] || ok=no
[[ "$bomb_status" == 0xA700* ]] || ok=no
[[ "$small_status" == *Success* && "$echo_ok" == yes && "$partials" == 0 ]] || ok=no
python3 -c "import sys; sys.exit(0 if $peak <= 150 else 1)" || ok=no
echo "within 150 MB and serving: $ok"
[ "$ok" = yes ]
