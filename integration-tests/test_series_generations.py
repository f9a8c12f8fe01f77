"""A series split over two associations gives exactly one SR per generation in Orthanc.

The first association stores the first slices of a series and is released:
the series is geometrically whole, so it completes early
(`association_released`, generation 1) and its job sends an SR. A second
association then stores more slices of the same series: the series re-opens
and completes again as generation 2, whose job sends a second SR. Orthanc
must receive exactly two SRs, one per generation, each once (counted on
what it received, not on what it kept), and nothing else is made again.
The quiet timer is set far beyond the test so only early completion can
complete the series.
"""

from __future__ import annotations

import io

import pydicom

import instances
from e2e import jobs_of, orthanc_sr_uids, report_sops
from nodeharness import free_port, storescu
from test_results_orthanc import (FAST_OUTBOX, all_delivered, nodes, node_overrides, orthancs,  # noqa: F401
                                  outbox, referenced_uids, wait_for)

FIRST, SECOND = 4, 2  # slices in the first and the second association


def test_split_series_one_sr_per_generation(tmp_path, nodes, orthancs):
    dicom_port = free_port()
    route = {"name": "split", "model": "pma", "send_to": ["pacs"], "slices": {"mode": "middle"},
             "match": {"derived": "modality", "equals": "CT"}}
    over = node_overrides(dicom_port, [route], outbox=FAST_OUTBOX)
    over["series"] = {"quiet_seconds": 600, "early_completion": True}
    o = orthancs(dicom_port=dicom_port).start()
    node = nodes(over)
    s = instances.write_series(tmp_path / "in", FIRST + SECOND)
    first, second = s.instances[:FIRST], s.instances[FIRST:]

    def done_jobs(n):
        js = jobs_of(node, s.series)
        return js if len(js) == n and all(j["state"] == "done" for j in js) else None

    r = storescu(node, [i.path for i in first])
    assert r.returncode == 0, r.stdout + r.stderr
    e = node.wait_series(s.series, lambda e: e["generation"] == 1 and e["state"] == "analyzed", timeout=60)
    assert e and e["state"] == "analyzed", f"{e}\n{node.log_tail(30)}"
    assert e["completion_reason"] == "association_released" and e["instances"] == FIRST, e
    (job1,) = wait_for(lambda: done_jobs(1), 30, "generation 1's job done", diag=lambda: node.log_tail(30))
    sr1 = report_sops(job1)[0]
    wait_for(lambda: sr1 in orthanc_sr_uids(o), 60, "generation 1's SR in Orthanc",
             diag=lambda: f"{outbox(node)}\n{node.log_tail(20)}")

    r = storescu(node, [i.path for i in second])
    assert r.returncode == 0, r.stdout + r.stderr
    e = node.wait_series(s.series, lambda e: e["generation"] == 2 and e["state"] == "analyzed", timeout=60)
    assert e and e["generation"] == 2 and e["state"] == "analyzed", f"{e}\n{node.log_tail(30)}"
    assert e["completion_reason"] == "association_released" and e["instances"] == FIRST + SECOND, e
    jobs = wait_for(lambda: done_jobs(2), 30, "generation 2's job done", diag=lambda: node.log_tail(30))
    assert sorted(j["generation"] for j in jobs) == [1, 2], jobs
    job2 = next(j for j in jobs if j["generation"] == 2)
    sr2 = report_sops(job2)[0]
    assert sr2 != sr1, "generation 2 reused generation 1's SR UID"
    items = wait_for(lambda: (lambda it: it if all_delivered(it, len(it)) and sr2 in orthanc_sr_uids(o)
                              else None)(outbox(node)), 60, "generation 2's results delivered",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(20)}")

    # Exactly one SR per generation: what Orthanc received from the node, and what it keeps.
    srs = orthanc_sr_uids(o)
    assert sorted(srs) == sorted([sr1, sr2]), srs
    got = o.received_sops(from_aet=node.ae_title)
    assert sorted(got) == sorted(i["sop_instance_uid"] for i in items), (got, items)
    assert got.count(sr1) == 1 and got.count(sr2) == 1, got
    # Each SR is of this series: generation 2's reads the 6-slice series, 1's the 4-slice one.
    by_uid = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in o.find_instances(Modality="SR")}
    refs = {}
    for gen, uid in ((1, sr1), (2, sr2)):
        ds = pydicom.dcmread(io.BytesIO(o.instance_file(by_uid[uid])))
        assert ds.StudyInstanceUID == s.study
        refs[gen] = referenced_uids(ds) & {i.sop for i in s.instances}
        assert refs[gen], f"generation {gen}'s SR references none of the series' instances"
    assert refs[1] <= {i.sop for i in first}, "generation 1's SR references slices it never had"
