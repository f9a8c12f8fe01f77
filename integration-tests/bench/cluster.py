"""Ingest throughput: embedded node vs cluster receivers on NATS JetStream (issue 17).

    python3 integration-tests/bench/cluster.py             # N=300 instances, 4 senders
    N=500 SENDERS=8 python3 integration-tests/bench/cluster.py

Prints numbers; not a test. Same data and same senders (DCMTK storescu, one
association per sender, `+sd`) against:
- embedded: `serve` (fsync'd spool on local disk, SQLite index);
- 1 receiver: `serve --role receiver` on a fresh `nats-server -js` (file storage);
- 2 receivers: two receiver processes on that server, half of the senders each
  (what a TCP load balancer in front of them would do);
- after the 1-receiver run, `serve --role worker` catching up on the stream
  (every instance copied into its spool and indexed).
Data: N clones of the 530 kB real chest slice (explicit VR LE, new UIDs, one
series), split round-robin over SENDERS directories. On a 2-core machine the
senders, the node(s) and nats-server share the cores: 2 receivers cannot be
faster than 1 here; the run shows the cost of the cluster path, not scaling.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import instances  # noqa: E402
from nodeharness import Node, dcmtk  # noqa: E402
from test_cluster import NatsServer  # noqa: E402

N = int(os.environ.get("N", "300"))
SENDERS = int(os.environ.get("SENDERS", "4"))


def send(targets: list[Node], dirs: list[Path]) -> float:
    """Every directory in its own storescu, round-robin over the targets; seconds until all are done."""
    t0 = time.perf_counter()
    procs = []
    for i, d in enumerate(dirs):
        node = targets[i % len(targets)]
        procs.append(subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", node.ae_title, "+sd", "127.0.0.1", str(node.port),
             str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"}))
    ok = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        ok += out.count("Received Store Response (Success)")
    dt = time.perf_counter() - t0
    assert ok == N, f"{ok}/{N} stored"
    return dt


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cluster-bench."))
    s = instances.write_series(work / "all", N)
    dirs = [work / f"s{i}" for i in range(SENDERS)]
    for d in dirs:
        d.mkdir()
    for i, inst in enumerate(s.instances):
        inst.path.rename(dirs[i % SENDERS] / inst.path.name)
    size = sum(p.stat().st_size for p in work.rglob("*.dcm"))
    print(f"{N} instances, {size / 1e6:.0f} MB, {SENDERS} senders, {os.cpu_count()} CPUs")
    quiet = {"series": {"quiet_seconds": 30}, "log": {"level": "warn"}, "http": {"enabled": False}}

    node = Node(work / "embedded", quiet).start()
    try:
        dt = send([node], dirs)
    finally:
        node.stop()
    print(f"embedded          : {N / dt:6.0f} inst/s  {size / dt / 1e6:5.0f} MB/s")

    for receivers in (1, 2):
        nats = NatsServer(work / f"nats{receivers}")
        nats.store.parent.mkdir(parents=True, exist_ok=True)
        nats.start()
        nodes = []
        try:
            for r in range(receivers):
                n = Node(work / f"r{receivers}-{r}", {**quiet, "cluster": {"nats_url": nats.url}})
                n.serve_args = ["--role", "receiver"]
                nodes.append(n.start())
            dt = send(nodes, dirs)
            for n in nodes:
                n.stop()
            print(f"{receivers} receiver(s)     : {N / dt:6.0f} inst/s  {size / dt / 1e6:5.0f} MB/s")
            if receivers == 1:
                # The worker catching up on the whole stream afterwards: object get, spool write + fsync,
                # index, ack, one instance at a time.
                w = Node(work / "worker", {**quiet, "http": {"enabled": True}, "cluster": {"nats_url": nats.url}})
                w.serve_args = ["--role", "worker"]
                w.port = w.http_port  # no DICOM listener: wait for HTTP
                t0 = time.perf_counter()
                w.start()
                while len(w.spool_files()) < N and time.perf_counter() - t0 < 600:
                    time.sleep(0.05)
                dt = time.perf_counter() - t0
                got = len(w.spool_files())
                w.stop()
                print(f"1 worker catch-up : {got / dt:6.0f} inst/s  {size * got / N / dt / 1e6:5.0f} MB/s "
                      f"({got}/{N}, including its start)")
        finally:
            for n in nodes:
                n.stop()
            nats.stop()


if __name__ == "__main__":
    main()
