"""A long life for the pipeline: a poison series does not hold the router, a
job past its deadline does not hold the worker, and retention empties the
spool of series that have no work left.

Every test starts its own node (real process, real DCMTK storescu/storescp
peers) with the fixture model src/inference/testdata/sigmoid_map.yaml, so
these tests check the plumbing, not the models. Faults are made for real:
a spooled file that is no longer DICOM, an index row that no longer parses,
a spooled file that is a FIFO nobody writes to (a read that never returns,
like a hung network mount).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pydicom
import pytest

from nodeharness import Node, dcmtk, free_port, storescu
from test_results_orthanc import (FIXTURE_CARD, _listening, cli_json, nodes, ort_dylib, pma_phantom, procs,  # noqa: F401
                                  wait_for)


def new_uid() -> str:
    # Fixed length (2.25. + 39 digits), so spooled files of the same phantom
    # have the same size.
    return "2.25." + str(uuid.uuid4().int).rjust(39, "1")


def variant(phantom: Path, out: Path, slices: int, description: str = "PHANTOM") -> tuple[str, list[Path]]:
    """A new series of `slices` copies of the phantom slice, 2.5 mm apart,
    with ImagesInAcquisition = slices (so it is whole exactly when all
    arrived). Returns (SeriesInstanceUID, files in InstanceNumber order)."""
    series = new_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(slices):
        ds = pydicom.dcmread(phantom / "CT0001.dcm")
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = f"{series}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 2.5 * i]
        ds.ImagesInAcquisition = slices
        ds.SeriesDescription = description
        p = out / f"{series}-{i + 1}.dcm"
        ds.save_as(p)
        files.append(p)
    return series, files


def overrides(routes: list[dict] | None = None, **sections) -> dict:
    over = {
        "onnxruntime": {"library": ort_dylib()},
        "models": {"pma": {"card": str(FIXTURE_CARD)}},
        "routes": routes or [{"name": "any-ct", "model": "pma", "match": {"derived": "modality", "equals": "CT"}}],
        "log": {"format": "text", "level": "info,ort=warn"},
    }
    over.update(sections)
    return over


def store(node: Node, files: list[Path]) -> None:
    r = storescu(node, files)
    assert r.returncode == 0, f"storescu failed:\n{r.stdout}{r.stderr}\n{node.log_tail()}"


def metric(node: Node, name: str) -> float:
    status, _, body = node.http("/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------ poison series


def test_poison_series_are_set_aside_and_later_series_are_analyzed(tmp_path, nodes, pma_phantom):
    """Two series whose routing fails for good: one whose index row no longer
    parses (before the fix this retried the queue head every 2 s forever),
    one whose spooled first instance is no longer DICOM. Both end
    `unroutable` with their reason; a series sent after them is analysed."""
    n = nodes(overrides(series={"quiet_seconds": 3600, "early_completion": False}))
    bad_row, bad_row_files = variant(pma_phantom, tmp_path / "p1", 1)
    bad_file, bad_file_files = variant(pma_phantom, tmp_path / "p2", 1)
    store(n, bad_row_files + bad_file_files)
    wait_for(lambda: {bad_row, bad_file} <= set(n.series_by_uid()), 30, "both series indexed")
    # Faults are made while the node is down, so the series complete only
    # after they are in place (the restart gives them a fresh quiet period).
    assert n.stop() == 0
    with sqlite3.connect(n.index_path) as db:
        assert db.execute("UPDATE instances SET header_json = '{' WHERE series_instance_uid = ?",
                          (bad_row,)).rowcount == 1
    study = pydicom.dcmread(bad_file_files[0]).StudyInstanceUID
    n.spool_path(study, bad_file, f"{bad_file}.1").write_bytes(b"not DICOM any more" * 10)
    n.reconfigure({"series": {"quiet_seconds": 0.5, "early_completion": True}})
    n.start()

    def unroutable(uid):
        return lambda: (n.series_by_uid().get(uid) or {}).get("state") == "unroutable"
    wait_for(unroutable(bad_row), 60, "bad-row series unroutable", n.log_tail)
    wait_for(unroutable(bad_file), 60, "bad-file series unroutable", n.log_tail)

    good, good_files = variant(pma_phantom, tmp_path / "good", 1)
    store(n, good_files)
    wait_for(lambda: (n.series_by_uid().get(good) or {}).get("state") == "analyzed", 60,
             "the series after the poison ones is analysed", n.log_tail)

    rows = n.series_by_uid()
    assert "corrupt index row" in rows[bad_row]["state_reason"], rows[bad_row]
    assert "not a DICOM file" in rows[bad_file]["state_reason"], rows[bad_file]
    assert rows[good]["state_reason"] is None
    # Existing fields unchanged.
    for key in ("series_instance_uid", "study_instance_uid", "state", "instances", "completion_reason", "generation"):
        assert key in rows[bad_row]
    api = {s["series_instance_uid"]: s for s in n.http_json("/api/series")}
    assert api[bad_file]["state"] == "unroutable" and "not a DICOM file" in api[bad_file]["state_reason"]
    assert metric(n, "biomarker_node_series_unroutable_total") == 2
    assert 'biomarker_node_series{state="unroutable"} 2' in n.http("/metrics")[2].decode()
    jobs = cli_json(n, "jobs")
    assert [j["series_instance_uid"] for j in jobs] == [good], jobs
    assert jobs[0]["state"] == "done"
    log = n.log_text()
    assert log.count("series set aside as unroutable") == 2, log[-3000:]
    assert "will retry" not in log


# ------------------------------------------------------------------ job deadline


def test_job_past_its_deadline_fails_and_the_next_job_runs(tmp_path, nodes, pma_phantom):
    """The slow job reads a spooled file that is a FIFO nobody writes to: its
    read never returns, like a hung mount. At jobs.timeout_s it is failed with
    the reason and the next series' job runs. When the read finally returns,
    the abandoned computation's result is discarded: nothing written. One
    worker, so the next job can only run once the slow one is given up."""
    n = nodes(overrides(series={"quiet_seconds": 3600, "early_completion": True}, jobs={"timeout_s": 3, "workers": 1}))
    slow, slow_files = variant(pma_phantom, tmp_path / "slow", 2)
    # The second slice alone is not whole (ImagesInAcquisition 2): receiving.
    store(n, [slow_files[1]])
    wait_for(lambda: (n.series_by_uid().get(slow) or {}).get("instances") == 1, 30, "slow series indexed")
    study = pydicom.dcmread(slow_files[0]).StudyInstanceUID
    fifo = n.spool_path(study, slow, f"{slow}.2")
    real_bytes = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    # The first slice makes it whole: it completes on release and is routed
    # on instance 1's header; the job then reads instance 2 and hangs.
    store(n, [slow_files[0]])
    good, good_files = variant(pma_phantom, tmp_path / "good", 2)
    store(n, good_files)

    wait_for(lambda: (n.series_by_uid().get(good) or {}).get("state") == "analyzed", 60,
             "the job after the slow one ran", n.log_tail)
    jobs = {j["series_instance_uid"]: j for j in cli_json(n, "jobs")}
    assert jobs[slow]["state"] == "failed", jobs[slow]
    assert jobs[slow]["error"] == "deadline of 3 s exceeded"
    assert jobs[good]["state"] == "done"
    assert n.series_by_uid()[slow]["state"] == "failed"
    assert metric(n, "biomarker_node_jobs_deadline_exceeded_total") == 1

    # Unblock the abandoned read with the real slice: its computation now
    # succeeds, late, and must change nothing.
    # The reader may open the file more than once (a length check, then the
    # parse), so every open gets the whole slice until the computation ends.
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader has it open yet
                time.sleep(0.05)
                continue
            os.set_blocking(fd, True)
            try:
                view = memoryview(real_bytes)
                while view:
                    view = view[os.write(fd, view):]
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    wait_for(lambda: "abandoned job computation ended" in n.log_text(), 60,
             "the abandoned computation ended", n.log_tail)
    stop.set()
    writer.join(10)
    after = {j["series_instance_uid"]: j for j in cli_json(n, "jobs")}[slow]
    assert (after["state"], after["error"], after["result"]) == ("failed", "deadline of 3 s exceeded", None)
    assert not (n.data_dir / "results" / slow).exists(), "an abandoned job wrote results"
    assert (n.data_dir / "results" / good).is_dir()
    assert n.series_by_uid()[slow]["state"] == "failed"
    # The node stops cleanly although a job was abandoned.
    assert n.stop() == 0


# ------------------------------------------------------------------ retention


def pacs(tmp_path: Path, procs: list) -> int:
    """A DCMTK storescp that accepts everything: results get delivered."""
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    log = open(tmp_path / "storescp.log", "wb")
    p = subprocess.Popen([dcmtk("storescp"), "-aet", "PACS", "-od", str(out), str(port)], stdout=log,
                         stderr=subprocess.STDOUT)
    procs.append(p)
    wait_for(lambda: _listening(port) or p.poll() is not None, 10, "storescp listening")
    assert p.poll() is None, (tmp_path / "storescp.log").read_text()
    return port


def retention_overrides(pacs_port: int, retention: dict) -> dict:
    # UP* series are delivered to storescp; DOWN* series go to a port nobody
    # listens on, so their reports stay pending (retrying) for the whole test.
    routes = [
        {"name": "up", "model": "pma", "send_to": ["pacs"],
         "match": {"keyword": "SeriesDescription", "regex": "^UP"}},
        {"name": "down", "model": "pma", "send_to": ["down"],
         "match": {"keyword": "SeriesDescription", "regex": "^DOWN"}},
    ]
    return overrides(
        routes,
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
            "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
        },
        outbox={"retry_base_s": 0.5, "retry_cap_s": 1.0, "max_attempts": 1000, "connect_timeout_s": 2.0},
        retention=retention,
    )


def delivered(n: Node, series: str) -> bool:
    jobs = [j for j in cli_json(n, "jobs") if j["series_instance_uid"] == series]
    if not jobs or jobs[0]["state"] != "done":
        return False
    sops = {r["sop_instance_uid"] for r in jobs[0]["result"]["reports"]}
    items = [i for i in cli_json(n, "outbox") if i["sop_instance_uid"] in sops]
    return bool(items) and all(i["state"] == "delivered" for i in items)


def spooled(n: Node, series: str) -> list[Path]:
    return list(n.spool_dir.glob(f"*/{series}/*.dcm"))


def test_retention_by_age_deletes_done_series_and_keeps_pending_ones(tmp_path, nodes, procs, pma_phantom):
    # 0.00004 days = 3.5 s after the last activity; swept every 0.5 s.
    n = nodes(retention_overrides(pacs(tmp_path, procs), {"after_days": 0.00004, "interval_s": 0.5}))
    pending, pending_files = variant(pma_phantom, tmp_path / "b", 1, "DOWN pending")
    store(n, pending_files)
    wait_for(lambda: any(i["state"] == "pending" and i["attempts"] >= 1 for i in cli_json(n, "outbox")), 60,
             "the DOWN series' report is pending", n.log_tail)
    done, done_files = variant(pma_phantom, tmp_path / "a", 1, "UP done")
    store(n, done_files)
    wait_for(lambda: delivered(n, done), 60, "the UP series' reports are delivered", n.log_tail)

    row = wait_for(lambda: (lambda r: r if r and r["purged_at"] else None)(n.series_by_uid().get(done)), 60,
                   "the delivered series is purged", n.log_tail)
    assert spooled(n, done) == []
    assert (row["state"], row["instances"], row["purged_instances"]) == ("analyzed", 1, 1)
    # The older series with a report still pending was never touched.
    keep = n.series_by_uid()[pending]
    assert keep["purged_at"] is None and keep["purged_instances"] == 0
    assert len(spooled(n, pending)) == 1
    # Results stay: a dead letter's retry needs them.
    assert (n.data_dir / "results" / done).is_dir()
    assert metric(n, "biomarker_node_retention_purged_series_total") == 1
    assert 'biomarker_node_retention_purged_series_total{policy="age"} 1' in n.http("/metrics")[2].decode()
    assert metric(n, "biomarker_node_retention_purged_instances_total") == 1
    lines = [l for l in n.log_text().splitlines() if "retention deleted spooled instances" in l]
    assert len(lines) == 1 and done in lines[0] and "age" in lines[0], lines
    # Sent again, the instance is stored and analysed as new (generation 2).
    store(n, done_files)
    wait_for(lambda: (n.series_by_uid().get(done) or {}).get("generation") == 2, 30, "re-sent series re-opened")
    assert n.series_by_uid()[done]["instances"] == 1


def test_retention_size_cap_deletes_oldest_done_series_first(tmp_path, nodes, procs, pma_phantom):
    pacs_port = pacs(tmp_path, procs)
    n = nodes(retention_overrides(pacs_port, {}))
    # Measure one spooled file, then restart with a cap of 2.5 files.
    probe, probe_files = variant(pma_phantom, tmp_path / "probe", 1, "UP probe")
    store(n, probe_files)
    wait_for(lambda: delivered(n, probe), 60, "probe delivered", n.log_tail)
    size = spooled(n, probe)[0].stat().st_size
    n.stop()
    n.reconfigure({"retention": {"max_spool_gb": 3.5 * size / 1e9, "interval_s": 0.5}})
    n.start()
    # probe + pending + a1 + a2 + a3 = 5 files; the cap holds 3. The pending
    # series is the oldest after probe but has work: probe and a1 go.
    pending, pending_files = variant(pma_phantom, tmp_path / "b", 1, "DOWN pending")
    store(n, pending_files)
    order = []
    for name in ("a1", "a2", "a3"):
        uid, files = variant(pma_phantom, tmp_path / name, 1, f"UP {name}")
        store(n, files)
        wait_for(lambda: delivered(n, uid), 60, f"{name} delivered", n.log_tail)
        order.append(uid)
    a1, a2, a3 = order
    wait_for(lambda: n.series_by_uid()[a1]["purged_at"], 30, "a1 purged", n.log_tail)
    rows = n.series_by_uid()
    assert rows[probe]["purged_at"] and rows[a1]["purged_at"]
    for keep in (pending, a2, a3):
        assert rows[keep]["purged_at"] is None, (keep, rows[keep])
        assert len(spooled(n, keep)) == 1
    assert spooled(n, probe) == [] and spooled(n, a1) == []
    assert sum(p.stat().st_size for p in n.spool_dir.rglob("*.dcm")) <= 3.5 * size
    assert 'biomarker_node_retention_purged_series_total{policy="size"} 2' in n.http("/metrics")[2].decode()
    log = n.log_text()
    assert len(re.findall(r"retention deleted spooled instances", log)) == 2
