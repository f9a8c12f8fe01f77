"""ARTIM, read and idle timeouts (PS3.8 9.1.5, node.timeouts.*)."""

from __future__ import annotations

import time

import pytest

import rawdul as ul
from nodeharness import assert_serving

FAST = {"node": {"timeouts": {"association_request_s": 1, "read_s": 2, "idle_s": 2}}}


@pytest.fixture
def fast_node(node_factory):
    return node_factory(FAST)


def _time_until_closed(a: ul.RawAssociation, limit: float) -> tuple[str, float]:
    t0 = time.monotonic()
    how = a.wait_closed_or_abort(timeout=limit)
    return how, time.monotonic() - t0


def test_silent_connection_closed_after_association_request_timeout(fast_node):
    with ul.RawAssociation("127.0.0.1", fast_node.port) as a:
        how, took = _time_until_closed(a, limit=10)
    # ARTIM expiry in Sta2 closes the transport (an A-ABORT first is also fine).
    assert how in ("closed", "abort")
    assert 0.5 <= took <= 5, f"closed after {took:.1f}s, association_request_s=1"
    assert_serving(fast_node)


def test_partial_assoc_rq_closed_by_timeout(fast_node):
    rq = ul.associate_rq("BIOMARKER", "RAWSCU", [(1, ul.VERIFICATION, [ul.IMPLICIT_LE])])
    with ul.RawAssociation("127.0.0.1", fast_node.port) as a:
        a.send(rq[:20])
        how, took = _time_until_closed(a, limit=10)
    assert how in ("closed", "abort")
    assert took <= 6, f"a stalled A-ASSOCIATE-RQ held the connection {took:.1f}s"
    assert_serving(fast_node)


def test_idle_association_is_ended(fast_node):
    with ul.RawAssociation("127.0.0.1", fast_node.port) as a:
        a.associate()
        assert a.c_echo().status == 0
        how, took = _time_until_closed(a, limit=15)
    assert how in ("abort", "closed")
    assert 1.5 <= took <= 7, f"idle association ended after {took:.1f}s, idle_s=2"
    assert_serving(fast_node)


def test_activity_keeps_association_alive(fast_node):
    """Echoes every 0.5 s for 5 s (past idle_s=2): the idle timer restarts on each PDU."""
    with ul.RawAssociation("127.0.0.1", fast_node.port) as a:
        a.associate()
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end:
            assert a.c_echo().status == 0
            time.sleep(0.5)
        a.release()


def test_stalled_pdu_is_ended_by_read_timeout(node_factory):
    n = node_factory({"node": {"timeouts": {"association_request_s": 5, "read_s": 1, "idle_s": 60}}})
    with ul.RawAssociation("127.0.0.1", n.port) as a:
        a.associate(contexts=[(1, ul.VERIFICATION, [ul.IMPLICIT_LE])])
        full = ul.p_data(1, ul.c_echo_rq(1), command=True, last=True)
        a.send(full[:8])  # header and two bytes, then nothing
        how, took = _time_until_closed(a, limit=15)
    assert how in ("abort", "closed")
    assert took <= 6, f"stalled PDU held the association {took:.1f}s with read_s=1 (idle_s=60)"
    assert_serving(n)
