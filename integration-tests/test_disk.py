"""Disk watermark (node.min_free_disk_mb): refuse new data, keep old data untouched."""

from __future__ import annotations

import instances
import rawdul as ul
from nodeharness import storescu

HUGE_MB = 1 << 40  # 1 EiB: more free space than any disk has


def test_below_watermark_refuses_and_keeps_spool(node, tmp_path):
    s = instances.write_series(tmp_path / "a", 3)
    assert storescu(node, s.paths).returncode == 0
    before = node.spool_digest()
    assert len(before) == 3

    node.stop()
    node.reconfigure({"node": {"min_free_disk_mb": HUGE_MB}})
    node.start()

    more = instances.write_series(tmp_path / "b", 2)
    ds_path = more.instances[0].path
    ts, body = ul.split_part10(ds_path)
    with ul.RawAssociation("127.0.0.1", node.port) as a:
        reply = a.request(contexts=[(1, ul.VERIFICATION, [ul.IMPLICIT_LE]), (3, ul.CT_IMAGE_STORAGE, [ts])])
        if reply.type == ul.A_ASSOCIATE_RJ:
            rj = ul.parse_rj(reply.body)
            assert rj.result == ul.RJ_TRANSIENT, rj
            assert rj.source == ul.RJ_SOURCE_PRESENTATION, rj
            assert rj.reason in (ul.RJ_PRES_TEMPORARY_CONGESTION, ul.RJ_PRES_LOCAL_LIMIT_EXCEEDED), rj
        else:
            assert reply.type == ul.A_ASSOCIATE_AC, str(reply)
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, more.instances[0].sop, body)
            assert rsp.status == 0xA700, f"status 0x{rsp.status:04X} with the disk below the watermark"
            a.release()

    r = storescu(node, more.paths)
    assert r.returncode != 0 or "Success" not in r.stdout + r.stderr
    assert node.spool_digest() == before, "stored data changed while below the watermark"
    node.assert_alive()

    # Back above the watermark: the node takes data again without a restart of the peer.
    node.stop()
    node.reconfigure({"node": {"min_free_disk_mb": 64}})
    node.start()
    r = storescu(node, more.paths)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(node.spool_files()) == {i.sop for i in s.instances + more.instances}
