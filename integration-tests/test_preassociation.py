"""Connections before association cannot starve allowed peers (issue 12, item 3).

Measured on main: an association slot was taken at TCP accept, so 16 silent
connections held every slot for the whole ARTIM time. Now a connection takes
a slot only once its A-ASSOCIATE-RQ passed negotiation; until then it sits in
a separate budget (node.max_pending_connections, default 64) under a short
deadline (node.timeouts.association_request_s, default 5 s), and when that
budget is full the connection that has waited longest is closed.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

import instances
import rawdul as ul
from nodeharness import assert_serving, dcmtk, run_tool
from test_tls import pki  # noqa: F401  (fixture)


def _open_silent(node, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        socks.append(s)
    # Let the node accept them all before the real peer comes.
    time.sleep(0.5)
    return socks


def _closed_by_node(socks: list[socket.socket]) -> int:
    closed = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            if s.recv(1) == b"":
                closed += 1
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed += 1
    return closed


def _metric(node, name: str) -> float:
    text = node.http("/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def _storescu_quick(node, paths):
    # -ta 2: storescu itself gives up if the A-ASSOCIATE-AC takes over 2 s;
    # the subprocess timeout is only the safety limit.
    return run_tool(
        [dcmtk("storescu"), "-v", "-ta", "2", "-aet", "STORESCU", "-aec", node.ae_title,
         "127.0.0.1", str(node.port), *[str(p) for p in paths]],
        timeout=5,
    )


@pytest.mark.parametrize("silent", [64, 200])
def test_silent_connections_do_not_keep_storescu_out(node, tmp_path, silent):
    s = instances.write_series(tmp_path / "in", 1)
    socks = _open_silent(node, silent)
    try:
        r = _storescu_quick(node, s.paths)
        assert r.returncode == 0 and "Received Store Response (Success)" in r.stdout + r.stderr, (
            f"storescu rc={r.returncode} with {silent} silent connections open:\n{r.stdout}{r.stderr}\n"
            f"--- node log ---\n{node.log_tail()}"
        )
        i = s.instances[0]
        assert node.spool_path(i.study, i.series, i.sop).is_file()
        # Over budget, the oldest waiting connections were closed at once
        # (long before the 10 s ARTIM of the harness config), counted and logged.
        budget = 64
        evicted = silent + 1 - budget  # storescu's own connection pushed one more out
        assert _closed_by_node(socks) >= evicted
        assert _metric(node, "biomarker_node_pre_association_evicted_total") >= evicted
        if evicted > 0:
            assert "pre-association budget full" in node.log_text()
    finally:
        for x in socks:
            x.close()
    assert_serving(node)


def test_silent_connections_on_the_plain_port_do_not_keep_out_a_second_request(node):
    """The same with the raw client: the AC arrives while 64 connections sit silent."""
    socks = _open_silent(node, 64)
    try:
        with ul.RawAssociation("127.0.0.1", node.port, timeout=5) as a:
            a.associate()
            assert a.c_echo().status == 0
            a.release()
    finally:
        for x in socks:
            x.close()


def test_silent_connection_is_closed_after_the_default_pre_association_timeout(node_factory):
    n = node_factory(start=False)
    # The harness sets 10 s; this test is about the documented default.
    del n.config["node"]["timeouts"]["association_request_s"]
    n.write_config()
    n.start()
    t0 = time.monotonic()
    with ul.RawAssociation("127.0.0.1", n.port, timeout=5) as a:
        how = a.wait_closed_or_abort(timeout=30)
    took = time.monotonic() - t0
    assert how in ("closed", "abort")
    assert took < 30
    assert re.search(r"no A-ASSOCIATE-RQ within 5s", n.log_text()), n.log_tail()
    assert_serving(n)


def test_a_caller_that_is_not_allowed_never_takes_a_slot(node_factory):
    """With the only slot taken, an unknown caller is refused as unknown
    (permanent, reason 3), not as over the limit: the slot is never at stake
    before negotiation."""
    n = node_factory({"node": {"max_associations": 1}})
    held = None
    deadline = time.monotonic() + 10
    while held is None:
        a = ul.RawAssociation("127.0.0.1", n.port)
        if a.request().type == ul.A_ASSOCIATE_AC:
            held = a
        else:
            a.close()
            assert time.monotonic() < deadline, "no slot for the first association"
            time.sleep(0.1)
    try:
        with ul.RawAssociation("127.0.0.1", n.port) as b:
            reply = b.request(calling="INTRUDER")
            assert reply.type == ul.A_ASSOCIATE_RJ, reply
            rj = ul.parse_rj(reply.body)
            assert (rj.result, rj.source, rj.reason) == (1, 1, 3), rj
        with ul.RawAssociation("127.0.0.1", n.port) as c:
            reply = c.request()
            rj = ul.parse_rj(reply.body)
            assert (rj.result, rj.source, rj.reason) == (
                ul.RJ_TRANSIENT, ul.RJ_SOURCE_PRESENTATION, ul.RJ_PRES_LOCAL_LIMIT_EXCEEDED
            )
        held.release()
    finally:
        held.close()
    assert_serving(n)


def test_silent_connections_on_the_tls_port_do_not_keep_out_a_tls_store(node_factory, pki, tmp_path):
    """The TLS handshake is pre-association time: 64 connections that never
    send a ClientHello do not keep a TLS storescu out (the ports share one budget)."""
    from test_tls import client_tls, tls_node

    node = tls_node(node_factory, pki)
    s = instances.write_series(tmp_path / "in", 1)
    socks = []
    for _ in range(64):
        socks.append(socket.create_connection(("127.0.0.1", node.tls_port), timeout=10))
    time.sleep(0.5)
    try:
        r = run_tool(
            [dcmtk("storescu"), "-v", "-ta", "2", "-aet", "STORESCU", "-aec", node.ae_title, *client_tls(pki),
             "127.0.0.1", str(node.tls_port), *[str(p) for p in s.paths]],
            timeout=5,
        )
        assert r.returncode == 0 and "Received Store Response (Success)" in r.stdout + r.stderr, (
            f"rc={r.returncode}\n{r.stdout}{r.stderr}\n--- node log ---\n{node.log_tail()}"
        )
    finally:
        for x in socks:
            x.close()
    i = s.instances[0]
    assert node.spool_path(i.study, i.series, i.sop).is_file()
