"""Disk watermark (node.min_free_disk_mb): refuse new data, keep old data untouched."""

from __future__ import annotations

import os

import pytest

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

    # With the watermark lowered again, the same peer's data is taken.
    node.stop()
    node.reconfigure({"node": {"min_free_disk_mb": 64}})
    node.start()
    r = storescu(node, more.paths)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(node.spool_files()) == {i.sop for i in s.instances + more.instances}


def _free_mb(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def test_disk_filling_mid_association_gives_a700_then_recovers(node_factory, tmp_path):
    """The watermark is checked per C-STORE, not only at association time.

    The watermark is set 1 GiB below the current free space; after the
    association is up, a 3 GiB fallocate'd ballast file pushes free space
    below it. The margins absorb other processes writing meanwhile.
    """
    free = _free_mb(tmp_path)
    if free < 5000:
        pytest.skip(f"only {free} MiB free; the test needs ~5 GiB of headroom")
    node = node_factory({"node": {"min_free_disk_mb": free - 1024}})
    good = instances.write_series(tmp_path / "a", 1).instances[0]
    late = instances.write_series(tmp_path / "b", 1).instances[0]
    ballast = tmp_path / "ballast"
    with ul.RawAssociation("127.0.0.1", node.port, timeout=30) as a:
        a.associate(contexts=[(3, ul.CT_IMAGE_STORAGE, [ul.EXPLICIT_LE])])
        assert a.c_store(3, ul.CT_IMAGE_STORAGE, good.sop, ul.split_part10(good.path)[1]).status == 0
        digest = node.spool_digest()
        with open(ballast, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, 3 * 1024 * 1024 * 1024)
            except OSError as e:
                pytest.skip(f"fallocate not supported here: {e}")
        try:
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, late.sop, ul.split_part10(late.path)[1])
            assert rsp.status == 0xA700, f"status 0x{rsp.status:04X} with free space below the watermark"
            assert node.spool_digest() == digest
        finally:
            ballast.unlink()
        rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, late.sop, ul.split_part10(late.path)[1])
        assert rsp.status == 0, f"status 0x{rsp.status:04X} after space came back"
        a.release()
    assert set(node.spool_files()) == {good.sop, late.sop}
