"""JetStream micro-bench: object-store puts and stream publishes on loopback.

    python3 integration-tests/bench/nats_store.py                 # starts its own nats-server -js
    N=300 SIZE=530000 CONCURRENCY=8 python3 integration-tests/bench/nats_store.py

Prints numbers; not a test. It starts `nats-server -js -sd <tmp>` (file
storage) on a free port and measures, with the nats-py client:
- object-store puts of SIZE-byte objects (the real chest slice is ~530 kB),
  sequential (latency) and CONCURRENCY at a time (throughput), chunk 512 KiB
  as the node's receiver uses;
- stream publishes of ~600-byte JSON messages (the size of the node's
  instance metadata), each awaited (latency), and pipelined (rate).
The client is Python: the rates are a LOWER bound of what the server takes
(the node's Rust client spends less per message). Disk: JetStream 2.9 writes
to its block files without an fsync per message (the OS flushes; the server
syncs periodically), so an ack means "in the server's files", which
survives a kill -9 of nats-server, not a power cut of a single server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import nats
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType, StreamConfig

N = int(os.environ.get("N", "300"))
SIZE = int(os.environ.get("SIZE", "530000"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "8"))
MSGS = int(os.environ.get("MSGS", "20000"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def bench(url: str) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=0)
    js = nc.jetstream()
    obs = await js.create_object_store("bench", config=ObjectStoreConfig(storage=StorageType.FILE))
    payload = os.urandom(SIZE)
    meta = lambda i: ObjectMeta(name=f"o{i}", options=ObjectMetaOptions(max_chunk_size=512 * 1024))

    lat = []
    t0 = time.perf_counter()
    for i in range(N):
        t = time.perf_counter()
        await obs.put(f"o{i}", payload, meta=meta(i))
        lat.append(time.perf_counter() - t)
    seq = time.perf_counter() - t0
    print(f"object put, sequential: {N} x {SIZE} B in {seq:.2f} s = {N / seq:.0f} obj/s, "
          f"{N * SIZE / seq / 1e6:.0f} MB/s; latency p50 {statistics.median(lat) * 1e3:.1f} ms, "
          f"p99 {pct(lat, 99) * 1e3:.1f} ms")

    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i):
        async with sem:
            await obs.put(f"o{N + i}", payload, meta=meta(N + i))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(N)))
    par = time.perf_counter() - t0
    print(f"object put, {CONCURRENCY} concurrent: {N / par:.0f} obj/s, {N * SIZE / par / 1e6:.0f} MB/s")

    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE))
    body = b'{"header":{"sop_instance_uid":"' + b"1.2.3" * 12 + b'"}' + b" " * 520 + b"}"
    lat = []
    n_seq = min(MSGS, 2000)
    t0 = time.perf_counter()
    for i in range(n_seq):
        t = time.perf_counter()
        await js.publish(f"bench.s{i % 64}", body, headers={"Nats-Msg-Id": f"a{i}"})
        lat.append(time.perf_counter() - t)
    seq = time.perf_counter() - t0
    print(f"stream publish, each awaited: {n_seq / seq:.0f} msg/s; ack latency p50 "
          f"{statistics.median(lat) * 1e3:.2f} ms, p99 {pct(lat, 99) * 1e3:.2f} ms ({len(body)} B)")

    t0 = time.perf_counter()
    window = 256
    pending = []
    for i in range(MSGS):
        pending.append(asyncio.ensure_future(js.publish(f"bench.s{i % 64}", body, headers={"Nats-Msg-Id": f"b{i}"})))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    par = time.perf_counter() - t0
    print(f"stream publish, {window} in flight: {MSGS / par:.0f} msg/s")
    await nc.close()


def main() -> None:
    server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    work = tempfile.mkdtemp(prefix="nats-bench.")
    port = free_port()
    proc = subprocess.Popen([server, "-js", "-sd", work, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"nats-server {subprocess.run([server, '--version'], capture_output=True, text=True).stdout.strip()}, "
              f"file storage in {work}, {os.cpu_count()} CPUs")
        asyncio.run(bench(f"nats://127.0.0.1:{port}"))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
