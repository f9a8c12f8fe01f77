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
from nodeharness import _ANSI, REALCT, REPO_ROOT, Node, free_port, node_binary, storescu

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
            assert m["subject"] == f"{SUBJECT}.{series.study.replace('.', '_')}.{series.series.replace('.', '_')}"
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


def _cluster_counts(node: Node) -> dict:
    c = node.http_json("/api/cluster")
    return {k: c[k] for k in ("series", "jobs", "outbox")}


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


# ---------------------------------------------------------------------------------------------------------------
# Receivers, workers and Orthanc: the series state in KV, jobs on the work queue, exactly one SR per route.
# The data is a real chest CT volume (LIDC-IDRI-0001, 133 slices, `../shared/realct-labelled`), scored by the
# shipped models on the default routes: the PMA and SFA routes find the slice above the aortic arch themselves.

from orthanc import Orthanc, orthanc_available  # noqa: E402
from test_results_orthanc import FAST_OUTBOX, SR_STORAGE_CLASSES, default_routes, ort_dylib  # noqa: E402

CHEST = REALCT.parent / "realct-labelled" / "chest-lidc0001" / "ct"
SERIES_BUCKET = "bn-series"


def _chest() -> list[Path]:
    from ci_no_skip import require_dir
    files = sorted(require_dir(CHEST, "real chest CT").glob("*.dcm"))
    assert len(files) == 133
    return files


@pytest.fixture
def orthanc(tmp_path):
    if not orthanc_available():
        if in_ci():
            pytest.fail("Orthanc not installed (scripts/install-deps.sh installs it)")
        pytest.skip("Orthanc not installed")
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


def _role(workdir: Path, url: str, role: str, orthanc: Orthanc | None = None, quiet_s: float = 30.0,
          cluster: dict | None = None, jobs: dict | None = None) -> Node:
    over = {**_cluster(url), "series": {"quiet_seconds": quiet_s, "early_completion": True}}
    over["cluster"].update(cluster or {})
    if role in ("worker", "all"):
        over.update({
            "onnxruntime": {"library": ort_dylib()},
            "models": {m: {"card": str(REPO_ROOT / "models" / f"{m}.yaml")} for m in ("pma", "sfa", "liver", "cac")},
            "routes": default_routes(),
            "outbox": FAST_OUTBOX,
            "log": {"format": "text", "level": "info,ort=warn"},
        })
        if jobs:
            over["jobs"] = jobs
        if orthanc is not None:
            over["destinations"] = {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}
    n = Node(workdir, over)
    n.serve_args = ["--role", role]
    if role == "worker":
        n.port = n.http_port  # no DICOM listener: wait for the HTTP port
    return n


async def _kv_get(url: str, bucket: str, key: str) -> dict | None:
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        kv = await nc.jetstream().key_value(bucket)
        try:
            e = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(e.value)
    finally:
        await nc.close()


async def _stream(url: str, name: str) -> tuple[int, int, list[dict]]:
    """(messages now, last sequence, every message still held as JSON)."""
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        info = await js.stream_info(name)
        msgs = []
        if info.state.messages:
            for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
                try:
                    msgs.append(json.loads((await js.get_msg(name, seq)).data))
                except nats.js.errors.NotFoundError:
                    pass
        return info.state.messages, info.state.last_seq, msgs
    finally:
        await nc.close()


def series_record(url: str, series: str) -> dict | None:
    return asyncio.run(_kv_get(url, SERIES_BUCKET, series))


def stream(url: str, name: str) -> tuple[int, int, list[dict]]:
    return asyncio.run(_stream(url, name))


def log(n: Node) -> str:
    return _ANSI.sub("", n.log_text())


def wait_for(fn, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def received_srs(o: Orthanc) -> list[str]:
    """SOP Instance UIDs of the SRs Orthanc *received* (one per C-STORE, repeats included)."""
    srs = set()
    for iid in o.instances():
        tags = o.instance_tags(iid)
        if tags["SOPClassUID"] in SR_STORAGE_CLASSES:
            srs.add(tags["SOPInstanceUID"])
    return [s for s in o.received_sops() if s in srs]


def jobs_of(nodes: list[Node], series: str) -> list[dict]:
    out = []
    for n in nodes:
        if n.running():
            out += [dict(j, worker=n.workdir.name) for j in n.http_json("/api/jobs?limit=500")
                    if j["series_instance_uid"] == series]
    return out


def _send_parallel(targets: list[tuple[Node, list[Path]]]) -> list[subprocess.CompletedProcess]:
    import threading
    results: list = [None] * len(targets)

    def go(i, node, paths):
        results[i] = storescu(node, paths)

    ts = [threading.Thread(target=go, args=(i, n, p)) for i, (n, p) in enumerate(targets)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results


def test_a_study_over_two_receivers_completes_once_and_each_route_sends_one_sr(tmp_path, binary, nats_server, orthanc):
    """Two receivers, two workers, separate processes. The chest volume goes half through each receiver on
    overlapping associations: the series completes once, early (at the second release, the quiet timer is
    30 s), one worker takes the job, and each route that matched gives exactly one SR in Orthanc."""
    files = _chest()
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    url = nats_server.url
    receivers = [_role(tmp_path / f"r{i}", url, "receiver").start() for i in (1, 2)]
    workers = [_role(tmp_path / f"w{i}", url, "worker", orthanc).start() for i in (1, 2)]
    try:
        t0 = time.monotonic()
        rs = _send_parallel([(receivers[0], files[0::2]), (receivers[1], files[1::2])])
        for r in rs:
            assert r.returncode == 0 and _successes(r) in (66, 67), r.stdout[-2000:] + r.stderr[-2000:]
        rec = wait_for(lambda: (lambda r: r if r and r["state"] == "complete" else None)(series_record(url, series_uid)),
                       20, "the series to complete")
        took = time.monotonic() - t0
        assert rec["generation"] == 1 and rec["instances"] == 133 and rec["open"] == [], rec
        assert rec["reason"] == "association_released", rec
        assert took < 25, f"completion took {took:.1f} s: the quiet timer (30 s), not early completion"

        # Two SRs (PMA and SFA on the slice above the arch); wait for the workers to finish, then look again.
        wait_for(lambda: len(set(received_srs(orthanc))) >= 2, 120, "two SRs in Orthanc")
        done = wait_for(lambda: (lambda js: js if js and all(j["state"] in ("done", "refused", "failed") for j in js)
                                 else None)(jobs_of(workers, series_uid)), 60, "the jobs to end")
        time.sleep(2)
        got = received_srs(orthanc)
        sent = [j for j in done if j["state"] == "done"]
        assert {j["route"] for j in sent} == {"pma-single-slice", "sfa-single-slice"}, done
        assert len(got) == len(set(got)) == len(sent), f"SRs received {got} for jobs {done}"
        # One worker ran the series: one job per route across the cluster, one generation.
        routes = [j["route"] for j in done]
        assert len(routes) == len(set(routes)), done
        assert len({j["worker"] for j in done}) == 1, done
        assert {j["generation"] for j in done} == {1}
        # The work queue held one job, and it is acked (gone); nothing dead-lettered.
        held, last, _ = stream(url, "BN_JOBS")
        assert (held, last) == (0, 1), (held, last)
        assert stream(url, "BN_DEAD")[1] == 0
        for n in receivers + workers:
            n.assert_alive()
    finally:
        for n in receivers + workers:
            n.stop()


def _one_receiver_two_workers(tmp_path: Path, url: str, orthanc: Orthanc | None, jobs: dict | None = None,
                              **worker_cluster):
    r = _role(tmp_path / "r", url, "receiver").start()
    ws = [_role(tmp_path / f"w{i}", url, "worker", orthanc, cluster=worker_cluster, jobs=jobs).start()
          for i in (1, 2)]
    return r, ws


@pytest.mark.parametrize("kill_at", ["job taken delivered=1", "outbox: delivered"],
                         ids=["while-materialising", "after-its-first-delivery"])
def test_a_worker_killed_mid_job_leaves_it_to_the_other_and_one_sr_per_route_arrives(
        tmp_path, binary, nats_server, orthanc, kill_at):
    """kill -9 of the worker that took the job: while it copies the series from the object store, or after
    the first of its reports reached Orthanc (the other route still running, the job not acked). The
    other worker gets the job after ack_wait and runs every route again: the same job keys, so the same SOP
    Instance UIDs, and the outbox claims in KV keep what was delivered from being sent again. One job at a
    time per worker and no shared volume, so the second route decodes the series again (a few hundred ms)
    and the first route's delivery falls before the job ends: with the volume and the arch level shared,
    the second route takes ~30 ms and the job is acked before anything is delivered."""
    files = _chest()
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    url = nats_server.url
    r, ws = _one_receiver_two_workers(tmp_path, url, orthanc, jobs={"workers": 1, "volume_cache_mb": 0}, ack_wait_s=4)
    try:
        res = storescu(r, files)
        assert res.returncode == 0 and _successes(res) == 133, res.stdout[-2000:] + r.log_tail()
        taker = wait_for(lambda: next((w for w in ws if kill_at in log(w)), None), 60,
                         f"a worker to log {kill_at!r}", poll=0.01)
        taker.kill()
        other = next(w for w in ws if w is not taker)
        assert "job done and acked" not in log(taker), "the job ended before the kill: not mid-job"
        before = received_srs(orthanc)
        assert len(before) <= 1, before

        # After ack_wait (4 s) the job goes to the other worker, which sends one SR per route.
        wait_for(lambda: len(set(received_srs(orthanc))) >= 2, 120, "two SRs in Orthanc")
        done = wait_for(lambda: (lambda js: js if len(js) == 2 and all(j["state"] == "done" for j in js) else None)(
            jobs_of([other], series_uid)), 60, "the other worker's jobs")
        assert "job taken delivered=2" in log(other), other.log_tail()
        assert {j["route"] for j in done} == {"pma-single-slice", "sfa-single-slice"}
        wait_for(lambda: stream(url, "BN_JOBS")[0] == 0, 10, "the job to be acked")

        # The killed worker comes back on its own data: whatever it had queued or half-run locally runs
        # again, and the outbox claims keep it from sending any SOP Instance a second time.
        taker.start()
        time.sleep(8)
        got = received_srs(orthanc)
        assert len(got) == len(set(got)) == 2, f"an SR was delivered twice: {got}"
        every = orthanc.received_sops()
        assert len(every) == len(set(every)), "an instance (SR, SC or SEG) reached Orthanc twice"
        assert stream(url, "BN_JOBS")[:2] == (0, 1)
        assert stream(url, "BN_DEAD")[1] == 0
        for n in [r, *ws]:
            n.assert_alive()
    finally:
        for n in [r, *ws]:
            n.stop()


def _acked_files(storescu_output: str) -> list[str]:
    """The files storescu -v was told were stored: each 'Sending file: F' followed by a Success response."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_a_receiver_killed_mid_association_loses_nothing_it_acknowledged(tmp_path, binary, nats_server):
    series = instances.write_series(tmp_path / "src", 80)
    by_path = {str(i.path): i for i in series.instances}
    url = nats_server.url
    r = _role(tmp_path / "r", url, "receiver").start()
    w = _role(tmp_path / "w", url, "worker", quiet_s=2.0)
    w.config["routes"] = []
    w.write_config()
    w.start()
    out = tmp_path / "storescu.out"
    try:
        with open(out, "w") as f:
            p = subprocess.Popen(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", r.ae_title, "127.0.0.1",
                                  str(r.port), *map(str, series.paths)], stdout=f, stderr=subprocess.STDOUT)
        wait_for(lambda: out.read_text().count("Received Store Response (Success)") >= 20, 60,
                 "20 acknowledged instances", poll=0.01)
        r.kill()
        p.wait(60)
        acked = [by_path[f] for f in _acked_files(out.read_text())]
        assert 20 <= len(acked) < 80, f"{len(acked)} acknowledged: the kill was not mid-association"

        # Every acknowledged instance is in the object store, and in its series: the series record exists,
        # the quiet timer (the worker's sweep; the dead receiver's association never ends) completes the
        # series, and the worker materialises every acknowledged instance into it.
        objects, _ = read_back(url)
        for i in acked:
            assert f"{i.study}/{i.series}/{i.sop}.dcm" in objects
        rec = wait_for(lambda: (lambda x: x if x and x["state"] == "complete" else None)(
            series_record(url, series.series)), 30, "the quiet timer to complete the series")
        # (The record's count may be short of what a killed receiver stored: it writes the record at most
        # every refresh period per association and adds the rest at the association's end.)
        assert rec["reason"] == "quiet_timer" and rec["instances"] >= 1, rec
        wait_for(lambda: stream(url, "BN_JOBS")[0] == 0 and stream(url, "BN_JOBS")[1] == 1, 30, "the job to be done")
        files = w.spool_files()
        missing = [i.sop for i in acked if i.sop not in files]
        assert not missing, f"acknowledged but not in the worker's series: {missing}"
        entry = w.series_by_uid()[series.series]
        assert entry["instances"] >= len(acked), entry
        w.assert_alive()
    finally:
        w.stop()
        r.stop()


def _phantoms(tmp_path: Path, count: int, seed: int) -> list[Path]:
    out = tmp_path / f"phantoms-{seed}"
    res = subprocess.run([str(node_binary()), "phantom", "--task", "pma", "--seed", str(seed), "--out", str(out),
                          "--count", str(count)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == count, files
    return files


def test_nats_killed_and_restarted_loses_nothing_and_the_work_continues(tmp_path, binary, nats_server, orthanc):
    first = _phantoms(tmp_path, 3, seed=21)
    later = _phantoms(tmp_path, 1, seed=22)
    url = nats_server.url
    r = _role(tmp_path / "r", url, "receiver", quiet_s=3.0).start()
    w = _role(tmp_path / "w", url, "worker", orthanc, quiet_s=3.0).start()
    try:
        res = storescu(r, first)
        assert res.returncode == 0 and _successes(res) == 3, res.stdout + r.log_tail()
        # Three acknowledged series, their jobs queued or running: NATS dies hard, and comes back on its store.
        nats_server.kill9()
        time.sleep(2)
        nats_server.start()
        # Each PMA phantom matches the PMA and the SFA route: two SRs per series.
        wait_for(lambda: len(set(received_srs(orthanc))) == 6, 120, "the six SRs after the restart")
        # The work continues: a series sent after the restart is scored too.
        wait_for(lambda: _successes(storescu(r, later)) == 1, 30, "the receiver to store again")
        wait_for(lambda: len(set(received_srs(orthanc))) == 8, 60, "the fourth series' SRs")
        time.sleep(2)
        got = received_srs(orthanc)
        assert len(got) == len(set(got)) == 8, got
        assert stream(url, "BN_JOBS")[0] == 0
        for n in (r, w):
            n.assert_alive()
    finally:
        w.stop()
        r.stop()


async def _delete_object(url: str, name: str) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        await (await nc.jetstream().object_store(BUCKET)).delete(name)
    finally:
        await nc.close()


def test_a_job_that_keeps_failing_goes_to_the_dead_letters_with_its_reason(tmp_path, binary, nats_server):
    series = instances.write_series(tmp_path / "src", 4)
    url = nats_server.url
    r = _role(tmp_path / "r", url, "receiver").start()
    try:
        res = storescu(r, series.paths)
        assert _successes(res) == 4, res.stdout + r.log_tail()
        lost = series.instances[2]
        asyncio.run(_delete_object(url, f"{lost.study}/{lost.series}/{lost.sop}.dcm"))
        # The job cannot be materialised: each delivery fails, is handed back, and after max_deliver (2)
        # the job goes to the dead letters with the last error, once, and leaves the work queue.
        w = _role(tmp_path / "w", url, "worker", quiet_s=1.0, cluster={"max_deliver": 2})
        w.config["routes"] = []
        w.write_config()
        w.start()
        try:
            dead = wait_for(lambda: stream(url, "BN_DEAD")[2], 60, "a dead letter")
            assert len(dead) == 1, dead
            d = dead[0]
            assert d["job"]["series_instance_uid"] == series.series and d["deliveries"] == 2, d
            assert lost.sop in d["reason"] and "get object" in d["reason"], d
            time.sleep(1)
            assert stream(url, "BN_JOBS")[0] == 0
            assert "job dead-lettered" in log(w)
            w.assert_alive()
        finally:
            w.stop()
    finally:
        r.stop()


def test_role_all_receives_and_works_in_one_process_beside_a_receiver(tmp_path, binary, nats_server, orthanc):
    """`--role all`: the listeners on the cluster's spool and a worker, in one process. A series stored into a
    separate receiver is scored by it too: the work comes from the shared queue, not from its own ingest."""
    url = nats_server.url
    both = _role(tmp_path / "all", url, "all", orthanc).start()
    r = _role(tmp_path / "r", url, "receiver").start()
    try:
        for node, seed in ((both, 31), (r, 32)):
            res = storescu(node, _phantoms(tmp_path, 1, seed=seed))
            assert _successes(res) == 1, res.stdout + node.log_tail()
        wait_for(lambda: len(set(received_srs(orthanc))) == 4, 60, "two SRs for each of the two series")
        time.sleep(1)
        got = received_srs(orthanc)
        assert len(got) == len(set(got)) == 4, got
        # Nothing of the instances is kept by the `all` process' ingest: its spool holds only what its worker
        # materialised, the same layout as an embedded node's.
        assert len(both.spool_files()) == 2
        both.assert_alive()
    finally:
        r.stop()
        both.stop()


def _cluster_counts(node: Node) -> dict:
    c = node.http_json("/api/cluster")
    return {k: c[k] for k in ("series", "jobs", "outbox")}


def test_every_process_shows_the_same_cluster_wide_counts(tmp_path, binary, nats_server, orthanc):
    """`/api/cluster`, the `cluster_*` gauges and the Cluster page of a receiver (which runs no job store)
    and of a worker show the same cluster-wide series, jobs and outbox, after real work: one series
    scored and its reports delivered."""
    url = nats_server.url
    receiver = _role(tmp_path / "r", url, "receiver").start()
    worker = _role(tmp_path / "w", url, "worker", orthanc).start()
    try:
        res = storescu(receiver, _phantoms(tmp_path, 1, seed=41))
        assert _successes(res) == 1, res.stdout + receiver.log_tail()
        # PMA and SFA: two jobs of three reports each (SR, SC, SEG), all delivered.
        wait_for(lambda: len(orthanc.received_sops()) == 6, 60, "six reports in Orthanc")
        want = {"series": {"receiving": 0, "complete": 1}, "jobs": {"waiting": 0, "running": 0, "dead": 0}}
        for node, role in ((receiver, "receiver"), (worker, "worker")):
            c = wait_for(lambda: (lambda c: c if c["outbox"].get("delivered") == 6 and
                                  {k: c[k] for k in want} == want else None)(node.http_json("/api/cluster")),
                         15, f"the {role}'s cluster view to show the work")
            assert c["role"] == role and c["id"].endswith(f"-{node.proc.pid}"), c
            assert c["outbox"].get("sending", 0) == 0, c
            assert c["age_s"] < 10 and c["error"] is None, c
        assert _cluster_counts(receiver) == _cluster_counts(worker)
        status, _, metrics = receiver.http("/metrics")
        assert status == 200 and b'biomarker_node_cluster_outbox{state="delivered"} 6' in metrics, metrics[-3000:]
        assert b'biomarker_node_cluster_series{state="complete"} 1' in worker.http("/metrics")[2]
        status, _, page = receiver.http("/")
        assert status == 200 and b"/assets/cluster.js" in page
        assert receiver.http("/readyz")[0] == 200
        # The receiver has no job store: those endpoints are not there.
        assert receiver.http("/api/jobs")[0] == 404
    finally:
        receiver.stop()
        worker.stop()
