"""Eight concurrent DCMTK senders, 200+ instances each: all stored, none lost, counts match."""

from __future__ import annotations

import subprocess
import time

import pytest

import instances
from nodeharness import completed, dcmtk

SENDERS = 8
PER_SENDER = 210


@pytest.mark.slow
def test_eight_concurrent_storescu_associations(node_factory, tmp_path):
    node = node_factory({"series": {"quiet_seconds": 2}})
    series = [instances.write_series(tmp_path / f"s{i}", PER_SENDER) for i in range(SENDERS)]
    procs = []
    t0 = time.monotonic()
    for i, s in enumerate(series):
        log = open(tmp_path / f"storescu{i}.log", "w")
        # +sd: scan the directory; all of its files go in this one association.
        procs.append(
            (subprocess.Popen(
                [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "BIOMARKER", "+sd",
                 "127.0.0.1", str(node.port), str(tmp_path / f"s{i}")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ), log)
        )
    failures = []
    for i, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=400)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        text = (tmp_path / f"storescu{i}.log").read_text()
        ok = text.count("Received Store Response (Success)")
        assocs = text.count("Association Accepted")
        if rc != 0 or ok != PER_SENDER or assocs != 1:
            failures.append(f"sender {i}: rc={rc}, {ok}/{PER_SENDER} successes, {assocs} associations\n{text[-600:]}")
    took = time.monotonic() - t0
    assert not failures, "\n".join(failures)
    node.assert_alive()

    spooled = node.spool_files()
    want = {inst.sop for s in series for inst in s.instances}
    assert set(spooled) == want, f"{len(want - set(spooled))} lost, {len(set(spooled) - want)} unexpected"
    for s in series:
        e = node.wait_series(s.series, lambda e: e["instances"] == PER_SENDER and completed(e), timeout=20)
        assert e and e["instances"] == PER_SENDER and completed(e), e
    print(f"{SENDERS * PER_SENDER} instances over {SENDERS} associations in {took:.1f}s "
          f"({SENDERS * PER_SENDER / took:.0f}/s)")
