"""Ingest throughput: embedded node vs cluster receivers on NATS JetStream (issue 17).

    python3 integration-tests/bench/cluster.py             # N=300 instances, 4 senders
    N=500 SENDERS=8 python3 integration-tests/bench/cluster.py

Prints numbers; not a test. Same data and same senders (DCMTK storescu, one
association per sender, `+sd`) against:
- embedded: `serve` (fsync'd spool on local disk, SQLite index);
- 1 receiver: `serve --role receiver` on a fresh `nats-server -js` (file storage);
- 2 receivers: two receiver processes on that server, half of the senders each
  (what a TCP load balancer in front of them would do);
- after the 1-receiver run, `serve --role worker` taking the series' job and
  materialising it (every instance copied from the object store into its
  spool, fsync'd, indexed; 8 objects in flight);
- time to result on the real 133-slice chest CT (LIDC-IDRI-0001; PMA and SFA
  routes, shipped models, CPU): last C-STORE response → both jobs done, for
  the embedded node and for 1 receiver + 1 worker (`TTR=0` skips it).
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
from test_cluster import CHEST, NatsServer, _role, log  # noqa: E402

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
                # A worker takes the series' job (the sweep completes it after 1 s) and materialises it.
                w = Node(work / "worker", {"series": {"quiet_seconds": 1}, "log": {"level": "info"},
                                           "cluster": {"nats_url": nats.url}, "routes": []})
                w.serve_args = ["--role", "worker"]
                w.port = w.http_port  # no DICOM listener: wait for HTTP
                w.start()
                t0 = time.perf_counter()
                while "series materialised" not in log(w) and time.perf_counter() - t0 < 600:
                    time.sleep(0.05)
                took = _between(log(w), "job taken", "series materialised")
                got = len(w.spool_files())
                w.stop()
                print(f"1 worker materialises the series: {got / took:6.0f} inst/s  "
                      f"{size * got / N / took / 1e6:5.0f} MB/s ({got}/{N})")
        finally:
            for n in nodes:
                n.stop()
            nats.stop()


def _between(text: str, a: str, b: str) -> float:
    """Seconds between the first log lines containing `a` and `b` (their RFC 3339 timestamps)."""
    from datetime import datetime
    def at(m: str) -> datetime:
        line = next(l for l in text.splitlines() if m in l)
        return datetime.fromisoformat(line.split()[0].rstrip("Z"))
    return (at(b) - at(a)).total_seconds()


def _ttr(work: Path) -> None:
    """Last C-STORE response → every job done, on the real chest volume, embedded vs cluster."""
    files = sorted(CHEST.glob("*.dcm"))
    if len(files) != 133:
        print(f"time to result: skipped, {CHEST} not found")
        return
    from nodeharness import storescu

    def run(targets: list[Node], watch: Node) -> float:
        r = storescu(targets[0], files)
        t_sent = time.perf_counter()
        assert r.stdout.count("Received Store Response (Success)") + r.stderr.count(
            "Received Store Response (Success)") == 133, r.stdout[-2000:]
        while True:
            js = [j for j in watch.http_json("/api/jobs?limit=50")]
            if len(js) == 2 and all(j["state"] in ("done", "refused", "failed") for j in js):
                return time.perf_counter() - t_sent
            if time.perf_counter() - t_sent > 300:
                raise TimeoutError(log(watch)[-3000:])
            time.sleep(0.05)

    def routes_only_chest(n: Node) -> Node:
        n.config["routes"] = [r for r in n.config["routes"] if r["name"] in ("pma-single-slice", "sfa-single-slice")]
        for r in n.config["routes"]:
            r["send_to"] = []
        n.config.pop("destinations", None)
        n.write_config()
        return n

    nats = NatsServer(work / "nats-ttr")
    nats.store.parent.mkdir(parents=True, exist_ok=True)
    nats.start()
    try:
        e = routes_only_chest(_role(work / "ttr-embedded", nats.url, "all"))
        e.config.pop("cluster")
        e.serve_args = []
        e.write_config()
        e.start()
        try:
            t_embedded = run([e], e)
        finally:
            e.stop()
        r = _role(work / "ttr-r", nats.url, "receiver").start()
        w = routes_only_chest(_role(work / "ttr-w", nats.url, "worker")).start()
        try:
            t_cluster = run([r], w)
            mat = _between(log(w), "job taken", "series materialised")
        finally:
            w.stop()
            r.stop()
    finally:
        nats.stop()
    print(f"time to result, 133-slice chest CT, PMA + SFA, CPU: embedded {t_embedded:.2f} s; "
          f"1 receiver + 1 worker {t_cluster:.2f} s (of which materialising {mat:.2f} s); "
          f"ratio cluster/embedded {t_cluster / t_embedded:.2f}")


if __name__ == "__main__":
    main()
    if os.environ.get("TTR", "1") != "0":
        _ttr(Path(tempfile.mkdtemp(prefix="cluster-ttr.")))
