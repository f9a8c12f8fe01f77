"""kill -9 mid-transfer: everything acknowledged survives, nothing partial appears."""

from __future__ import annotations

import threading
import time

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

import instances
from nodeharness import assert_serving, completed


def _send_recording(port: int, paths, acked: list, stop: threading.Event) -> None:
    """Sends every path in one association, appending (index) for each success status."""
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="BIOMARKER", max_pdu=262144)
    if not assoc.is_established:
        return
    try:
        for i, p in enumerate(paths):
            if stop.is_set() or not assoc.is_established:
                break
            try:
                status = assoc.send_c_store(p)
            except Exception:
                break
            if status and status.get("Status") == 0x0000:
                acked.append(i)
            elif not status:
                break  # no response: the node died under us
    finally:
        if assoc.is_established:
            assoc.abort()


@pytest.mark.slow
@pytest.mark.parametrize("how,senders", [("kill", 1), ("kill", 4), ("term", 2)], ids=["kill9-1sender", "kill9-4senders", "sigterm-2senders"])
def test_stop_mid_transfer_keeps_every_acknowledged_instance(node_factory, tmp_path, how, senders):
    """kill -9 (or SIGTERM) while peers are storing, then restart on the same data_dir.

    Every instance a peer saw acknowledged is under spool/ and indexed; every
    file under spool/ is whole; tmp/ is emptied at start-up; the interrupted
    series completes by the quiet timer after the restart.
    """
    node = node_factory({"series": {"quiet_seconds": 2}})
    per_sender = 300 // senders
    series = [instances.write_series(tmp_path / f"in{i}", per_sender) for i in range(senders)]
    acked: list[list[int]] = [[] for _ in range(senders)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=_send_recording, args=(node.port, s.paths, acked[i], stop), daemon=True)
        for i, s in enumerate(series)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(map(len, acked)) < 60 and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(map(len, acked)) >= 60, f"only {sum(map(len, acked))} acknowledged before the stop:\n{node.log_tail()}"
    if how == "kill":
        node.kill()
    else:
        t0 = time.monotonic()
        rc = node.stop(timeout=15)
        assert rc == 0, f"SIGTERM mid-transfer: exit status {rc}\n{node.log_tail()}"
        assert time.monotonic() - t0 < 10, "SIGTERM took over 10 s with peers connected"
    for t in threads:
        t.join(timeout=30)
    stop.set()
    every = {inst.sop for s in series for inst in s.instances}
    acked_sops = {series[k].instances[i].sop for k in range(senders) for i in acked[k]}
    assert len(acked_sops) < len(every), "every instance went through before the stop; nothing was cut off"

    # On disk straight after the stop, before the node runs again.
    spooled = node.spool_files()
    missing = acked_sops - set(spooled)
    assert not missing, f"{len(missing)} acknowledged instances lost, e.g. {sorted(missing)[:3]}"
    stray = [p for p in node.spool_entries() if p.suffix != ".dcm"]
    assert not stray, f"non-instance files under spool/: {stray[:5]}"
    assert set(spooled) <= every
    for sop, p in spooled.items():
        # Every file under spool/ is whole, acknowledged or not.
        ds = pydicom.dcmread(p)
        assert ds.SOPInstanceUID == sop
        assert len(ds.PixelData) == 512 * 512 * 2, f"{p} is truncated"

    node.start()
    leftovers = [p for p in node.tmp_dir.rglob("*") if p.is_file()] if node.tmp_dir.exists() else []
    assert leftovers == [], f"tmp/ not emptied at start-up: {leftovers[:3]}"
    after = node.spool_files()
    assert set(after) == set(spooled)
    for k, s in enumerate(series):
        on_disk = sum(1 for inst in s.instances if inst.sop in after)
        e = node.wait_series(s.series, completed, timeout=15)
        assert e is not None, f"series {k} not in the index after restart: {node.series()}"
        assert e["instances"] == on_disk, f"series {k}: index says {e['instances']}, spool has {on_disk}"
        assert completed(e), f"series {k} did not complete after restart: {e}"
        assert e["completion_reason"] == "quiet_timer"
    assert_serving(node)


def test_sigterm_is_graceful(node, tmp_path):
    """SIGTERM: the node exits 0 promptly and what it stored is intact afterwards."""
    from nodeharness import storescu

    s = instances.write_series(tmp_path / "in", 3)
    assert storescu(node, s.paths).returncode == 0
    rc = node.stop(timeout=15)
    assert rc == 0, f"exit status {rc} on SIGTERM:\n{node.log_tail()}"
    node.start()
    assert set(node.spool_files()) == {i.sop for i in s.instances}
    assert_serving(node)
