"""Cluster mode, first slice (issue 17): a receiver on a real NATS JetStream.

`serve --role receiver` stores every instance in a JetStream Object Store
bucket and publishes its metadata to a stream; a C-STORE succeeds only after
JetStream acknowledged both. Checked here against a real `nats-server -js`
(file storage, its own directory and port), reading back with the nats-py
client:
- what storescu was told is stored is in the bucket, byte for byte the
  dataset it sent, and on the stream once each (a resend is deduplicated);
- with NATS down a C-STORE fails (no success for what is not durable), the
  receiver stays up, and after NATS restarts on its store (kill -9 first)
  everything acknowledged before is still there and storing works again;
- every process (a receiver, a worker) shows the same cluster-wide counts at `/api/cluster`;
- the config checks of the `cluster:` section, and `--role` without it.

Needs nats-server (apt) and nats-py (pip): scripts/install-deps.sh installs
both; in CI a missing one is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

import instances
from ci_no_skip import in_ci
from nodeharness import Node, completed, free_port, node_binary, storescu

nats = pytest.importorskip("nats", reason="nats-py (pip install nats-py; scripts/install-deps.sh)")

BUCKET = "bn-test"
STREAM = "BN_TEST"
SUBJECT = "bntest.instances"


def _nats_server_binary() -> str:
    b = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
    if b is None:
        msg = "nats-server not installed (apt-get install nats-server; scripts/install-deps.sh)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return b


class NatsServer:
    """`nats-server -js` with file storage in its own directory, on a free port."""

    def __init__(self, workdir: Path):
        self.binary = _nats_server_binary()
        self.store = workdir / "jetstream"
        self.log = workdir / "nats.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsServer":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nats-server exited:\n{self.log.read_text()[-3000:]}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def nats_server(tmp_path):
    s = NatsServer(tmp_path).start()
    yield s
    s.stop()


def _cluster(url: str) -> dict:
    return {"cluster": {
        "nats_url": url, "instances_bucket": BUCKET, "instances_stream": STREAM, "instances_subject": SUBJECT,
        "ack_timeout_s": 3,
    }}


def _receiver(tmp_path: Path, url: str) -> Node:
    n = Node(tmp_path / "receiver", _cluster(url))
    n.serve_args = ["--role", "receiver"]
    return n


def _worker(tmp_path: Path, url: str) -> Node:
    n = Node(tmp_path, {**_cluster(url), "series": {"quiet_seconds": 1.0}})
    n.serve_args = ["--role", "worker"]
    # A worker has no DICOM listener: wait for its HTTP port instead.
    n.port = n.http_port
    return n


async def _read_back(url: str) -> tuple[dict[str, bytes], list[dict]]:
    """Every object in the bucket (name → bytes) and every metadata message on the stream."""
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        obs = await js.object_store(BUCKET)
        objects = {}
        try:
            listed = await obs.list()
        except nats.js.errors.NotFoundError:
            listed = []
        for info in listed:
            objects[info.name] = (await obs.get(info.name)).data
        info = await js.stream_info(STREAM)
        msgs = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(STREAM, seq)
            msgs.append({"subject": m.subject, **json.loads(m.data)})
        return objects, msgs
    finally:
        await nc.close()


async def _consumer_info(url: str, name: str):
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        return await nc.jetstream().consumer_info(STREAM, name)
    finally:
        await nc.close()


def read_back(url: str):
    return asyncio.run(_read_back(url))


def _dataset_bytes(part10: bytes) -> bytes:
    """The dataset after preamble and file meta (the receiver writes its own file meta)."""
    assert part10[128:132] == b"DICM"
    group_len = int.from_bytes(part10[140:144], "little")  # (0002,0000) UL, explicit VR LE
    return part10[144 + group_len:]


def _successes(r: subprocess.CompletedProcess) -> int:
    return (r.stdout + r.stderr).count("Received Store Response (Success)")


def test_receiver_acknowledges_only_what_is_in_the_object_store(tmp_path, binary, nats_server):
    series = instances.write_series(tmp_path / "src", 6)
    node = _receiver(tmp_path, nats_server.url).start()
    try:
        r = storescu(node, series.paths)
        assert r.returncode == 0 and _successes(r) == 6, r.stdout + r.stderr + node.log_tail()
        objects, msgs = read_back(nats_server.url)

        # Every acknowledged instance is in the bucket under <study>/<series>/<sop>.dcm, its dataset
        # exactly the bytes storescu sent (explicit VR LE both sides), and on the stream once.
        assert len(objects) == 6, sorted(objects)
        for inst in series.instances:
            name = f"{inst.study}/{inst.series}/{inst.sop}.dcm"
            assert name in objects, f"{name} not in the bucket: {sorted(objects)}"
            sent = _dataset_bytes(inst.path.read_bytes())
            assert _dataset_bytes(objects[name]) == sent, f"{name}: stored dataset differs from what was sent"
            ds = pydicom.dcmread(__import__("io").BytesIO(objects[name]))
            assert ds.SOPInstanceUID == inst.sop
            assert ds.file_meta.MediaStorageSOPInstanceUID == inst.sop
        assert sorted(m["header"]["sop_instance_uid"] for m in msgs) == sorted(i.sop for i in series.instances)
        for m in msgs:
            assert m["subject"] == f"{SUBJECT}.{series.study}"
            assert m["object"] == f"{m['header']['study_instance_uid']}/{m['header']['series_instance_uid']}/" \
                                  f"{m['header']['sop_instance_uid']}.dcm"
            assert m["header"]["series_instance_uid"] == series.series
            assert m["size_bytes"] == len(objects[m["object"]])
        # Nothing is kept on the receiver's disk: partials are removed, nothing goes under spool/.
        assert node.spool_entries() == []
        assert list(node.tmp_dir.iterdir()) == []

        # A resend, to this receiver and to a second one (which has never seen these UIDs, so its spool
        # finds the objects in the bucket): acknowledged again, no second object, no second message.
        other = _receiver(tmp_path / "other", nats_server.url).start()
        try:
            for target in (node, other):
                r = storescu(target, series.paths[:3])
                assert r.returncode == 0 and _successes(r) == 3, r.stdout + r.stderr + target.log_tail()
            other.assert_alive()
        finally:
            other.stop()
        objects2, msgs2 = read_back(nats_server.url)
        assert objects2 == objects
        assert len(msgs2) == 6
        node.assert_alive()
    finally:
        node.stop()


def test_no_success_while_nats_is_down_and_nothing_acknowledged_is_lost(tmp_path, binary, nats_server):
    first = instances.write_series(tmp_path / "first", 3)
    later = instances.write_series(tmp_path / "later", 2, study=first.study)
    node = _receiver(tmp_path, nats_server.url).start()
    try:
        r = storescu(node, first.paths)
        assert r.returncode == 0 and _successes(r) == 3, r.stdout + r.stderr + node.log_tail()

        # NATS dies hard: an instance sent now is not durable anywhere, so it must not succeed.
        nats_server.kill9()
        r = storescu(node, later.paths[:1], timeout=60)
        out = r.stdout + r.stderr
        assert _successes(r) == 0, f"a C-STORE succeeded with NATS down:\n{out}\n{node.log_tail()}"
        assert "Refused: OutOfResources" in out, out
        node.assert_alive()

        # NATS restarts on its store: everything acknowledged before is there, and storing works again.
        nats_server.start()
        deadline = time.monotonic() + 30
        while True:
            r = storescu(node, later.paths, timeout=60)
            if _successes(r) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the client reconnects on its own; give it a moment
        assert _successes(r) == 2, r.stdout + r.stderr + node.log_tail()
        objects, msgs = read_back(nats_server.url)
        want = {f"{i.study}/{i.series}/{i.sop}.dcm" for i in first.instances + later.instances}
        assert set(objects) == want
        assert sorted(m["header"]["sop_instance_uid"] for m in msgs) == sorted(
            i.sop for i in first.instances + later.instances)
    finally:
        node.stop()


def test_a_study_over_two_receivers_is_one_series_on_the_worker(tmp_path, binary, nats_server):
    """Half of a series through each receiver; the worker, started afterwards, catches up from the
    stream: one series, every instance once, each file the dataset that was sent."""
    series = instances.write_series(tmp_path / "src", 8)
    a = _receiver(tmp_path / "a", nats_server.url).start()
    b = _receiver(tmp_path / "b", nats_server.url).start()
    try:
        for node, paths in ((a, series.paths[:4]), (b, series.paths[4:])):
            r = storescu(node, paths)
            assert r.returncode == 0 and _successes(r) == 4, r.stdout + r.stderr + node.log_tail()
    finally:
        a.stop()
        b.stop()

    worker = _worker(tmp_path / "worker", nats_server.url).start()
    try:
        entry = worker.wait_series(series.series, completed, timeout=30)
        assert completed(entry), f"{entry}\n{worker.log_tail()}"
        assert [s["series_instance_uid"] for s in worker.series()] == [series.series]
        files = worker.spool_files()
        assert sorted(files) == sorted(i.sop for i in series.instances), worker.log_tail()
        for inst in series.instances:
            assert _dataset_bytes(files[inst.sop].read_bytes()) == _dataset_bytes(inst.path.read_bytes())
        # Every message was acked once its file and index row were durable: nothing pending on the
        # workers' durable consumer. Restarted, the worker gets nothing twice.
        info = asyncio.run(_consumer_info(nats_server.url, "bn-worker-series"))
        assert (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (0, 0, 8), info
        worker.stop()
        worker.start()
        time.sleep(2)
        assert [s["series_instance_uid"] for s in worker.series()] == [series.series]
        assert "cannot materialise" not in worker.log_text()
        worker.assert_alive()
    finally:
        worker.stop()


def _cluster_counts(node: Node) -> dict:
    c = node.http_json("/api/cluster")
    return {k: c[k] for k in ("series", "jobs", "outbox")}


def test_every_process_shows_the_same_cluster_wide_counts(tmp_path, binary, nats_server):
    """`/api/cluster`, the `cluster_*` gauges and the Cluster page of a receiver (which runs no job store)
    and of a worker show the same cluster-wide series, jobs and outbox."""
    series = instances.write_series(tmp_path / "src", 4)
    receiver = _receiver(tmp_path / "r", nats_server.url).start()
    worker = _worker(tmp_path / "worker", nats_server.url).start()
    try:
        r = storescu(receiver, series.paths)
        assert r.returncode == 0 and _successes(r) == 4, r.stdout + r.stderr + receiver.log_tail()
        entry = worker.wait_series(series.series, completed, timeout=30)
        assert completed(entry), f"{entry}\n{worker.log_tail()}"
        for node, role in ((receiver, "receiver"), (worker, "worker")):
            c = node.http_json("/api/cluster")
            assert c["role"] == role and c["id"].endswith(f"-{node.proc.pid}"), c
            assert set(c["series"]) >= {"receiving", "complete"}, c
            assert set(c["jobs"]) == {"waiting", "running", "dead"}, c
            assert set(c["outbox"]) >= {"sending", "delivered"}, c
            assert c["age_s"] < 10 and c["error"] is None, c
        deadline = time.monotonic() + 15
        while (a := _cluster_counts(receiver)) != (b := _cluster_counts(worker)):
            assert time.monotonic() < deadline, f"receiver {a} != worker {b}"
            time.sleep(0.5)
        status, _, metrics = receiver.http("/metrics")
        assert status == 200 and b"biomarker_node_cluster_jobs" in metrics, metrics[-2000:]
        assert b"biomarker_node_cluster_series" in worker.http("/metrics")[2]
        status, _, page = receiver.http("/")
        assert status == 200 and b"/assets/cluster.js" in page
        assert receiver.http("/readyz")[0] == 200
        # The receiver has no job store: those endpoints are not there.
        assert receiver.http("/api/jobs")[0] == 404
    finally:
        receiver.stop()
        worker.stop()


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(node_binary()), *map(str, args)], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_cluster_section_is_checked(tmp_path, binary):
    good = Node(tmp_path / "good", {"cluster": {"nats_url": "nats://127.0.0.1:4222"}})
    r = _run("check-config", "--config", good.config_path)
    assert r.returncode == 0, r.stdout + r.stderr

    bad = Node(tmp_path / "bad", {"cluster": {"nats_url": "http://x", "instances_bucket": "a.b", "replicas": 0}})
    r = _run("check-config", "--config", bad.config_path)
    assert r.returncode == 2, r.stdout + r.stderr
    for key in ("cluster.nats_url", "cluster.instances_bucket", "cluster.replicas"):
        assert key in r.stderr, f"{key} not reported:\n{r.stderr}"


def test_a_cluster_role_needs_the_cluster_section(tmp_path, binary):
    n = Node(tmp_path / "n")
    r = _run("serve", "--config", n.config_path, "--role", "receiver")
    assert r.returncode != 0
    assert "cluster:" in r.stderr, r.stderr
