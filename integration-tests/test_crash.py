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
def test_kill_9_mid_transfer_keeps_every_acknowledged_instance(node_factory, tmp_path):
    node = node_factory({"series": {"quiet_seconds": 2}})
    s = instances.write_series(tmp_path / "in", 300)
    acked: list[int] = []
    stop = threading.Event()
    t = threading.Thread(target=_send_recording, args=(node.port, s.paths, acked, stop), daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 60 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acked) >= 60, f"only {len(acked)} acknowledged before the kill:\n{node.log_tail()}"
    node.kill()
    t.join(timeout=30)
    stop.set()
    assert len(acked) < len(s.instances), "the whole series went through before the kill; nothing was cut off"
    acked_sops = {s.instances[i].sop for i in acked}

    # On disk straight after the crash, before the node runs again.
    spooled = node.spool_files()
    missing = acked_sops - set(spooled)
    assert not missing, f"{len(missing)} acknowledged instances lost by kill -9, e.g. {sorted(missing)[:3]}"
    stray = [p for p in node.spool_entries() if p.suffix != ".dcm"]
    assert not stray, f"non-instance files under spool/: {stray[:5]}"
    for sop, p in spooled.items():
        # Every file under spool/ is whole: pixels and all (acknowledged or not).
        ds = pydicom.dcmread(p)
        assert ds.SOPInstanceUID == sop
        assert len(ds.PixelData) == 512 * 512 * 2, f"{p} is truncated"

    node.start()
    after = node.spool_files()
    assert acked_sops <= set(after)
    e = node.wait_series(s.series, completed, timeout=15)
    assert e is not None, f"series not in the index after restart: {node.series()}"
    assert e["instances"] == len(after), f"index says {e['instances']}, spool has {len(after)}"
    assert e["instances"] >= len(acked_sops)
    assert completed(e), f"series did not complete after restart: {e}"
    assert e["completion_reason"] == "quiet_timer"
    # Partial files (if any remain in tmp/) never surface in spool/.
    assert set(after) <= {i.sop for i in s.instances}
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
