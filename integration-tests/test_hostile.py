"""Hostile and broken peers on the wire. After each, a fresh echoscu must still succeed.

PS3.8 9.3.1 / Annex 9 state machine: an unrecognised or invalid PDU gets an
A-ABORT (AA-1/AA-8) and the transport is closed. Whether the node sends the
A-ABORT before closing is allowed to vary where noted; that it never stores
anything from a broken transfer, never hangs and never dies is not.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

import instances
import rawdul as ul
from nodeharness import assert_serving

CT_CONTEXTS = [(1, ul.VERIFICATION, [ul.IMPLICIT_LE]), (3, ul.CT_IMAGE_STORAGE, [ul.EXPLICIT_LE])]


def _ct_instance():
    ds = instances.make_dataset(
        instances.new_uid(), instances.new_uid(), instances.new_uid(), 0.0, 1, instances.new_uid()
    )
    return ds, instances.dataset_bytes(ds)


def _connect(node, timeout=10.0) -> ul.RawAssociation:
    return ul.RawAssociation("127.0.0.1", node.port, timeout=timeout)


class TestBeforeAssociation:
    @pytest.mark.parametrize(
        "payload",
        [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            os.urandom(4096),
            b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16,  # A-ASSOCIATE-RQ length 16: too short for its fields
            b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # unknown PDU type 0x09
            b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03",  # P-DATA before any association
            b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-RELEASE-RQ before any association
        ],
        ids=["http", "random", "short-assoc-rq", "unknown-type", "pdata-first", "release-first"],
    )
    def test_garbage_gets_abort_or_close(self, node, payload):
        with _connect(node) as a:
            a.send(payload)
            assert a.wait_closed_or_abort(timeout=15) in ("abort", "closed")
        assert_serving(node)

    def test_assoc_rq_with_bad_protocol_version_or_items(self, node):
        rq = bytearray(ul.associate_rq("BIOMARKER", "RAWSCU", CT_CONTEXTS))
        # Corrupt the first item's length so it runs past the PDU end.
        first_item = 6 + 68
        struct.pack_into(">H", rq, first_item + 2, 0xFFFF)
        with _connect(node) as a:
            a.send(bytes(rq))
            reply_or_close = _reply_or_close(a)
            assert reply_or_close in ("abort", "closed", "reject"), reply_or_close
        assert_serving(node)

    def test_truncated_pdu_then_close(self, node):
        rq = ul.associate_rq("BIOMARKER", "RAWSCU", CT_CONTEXTS)
        with _connect(node) as a:
            a.send(rq[: len(rq) // 2])
        time.sleep(0.3)
        assert_serving(node)


def _reply_or_close(a: ul.RawAssociation, timeout: float = 15) -> str:
    try:
        p = a.recv_pdu(timeout=timeout)
    except (ul.PeerClosed, ConnectionResetError):
        return "closed"
    return {ul.A_ABORT: "abort", ul.A_ASSOCIATE_RJ: "reject"}.get(p.type, str(p))


class TestDuringAssociation:
    def test_truncated_pdata_then_close_stores_nothing(self, node):
        ds, body = _ct_instance()
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(ul.p_data(3, ul.c_store_rq(1, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID), True, True))
            # A P-DATA-TF (within max_pdu) promising 200 kB of dataset; half of
            # it arrives, then the peer vanishes.
            whole = ul.p_data(3, body[:200_000], command=False, last=False)
            a.send(whole[: len(whole) // 2])
        time.sleep(1.0)
        assert ds.SOPInstanceUID not in node.spool_files()
        assert_serving(node)
        assert ds.SOPInstanceUID not in node.spool_files()

    def test_dataset_fragments_then_close_stores_nothing(self, node):
        """Complete PDUs, but the last-fragment flag never comes."""
        ds, body = _ct_instance()
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(ul.p_data(3, ul.c_store_rq(1, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID), True, True))
            half = len(body) // 2
            for off in range(0, half, 16000):
                a.send(ul.p_data(3, body[off : min(off + 16000, half)], command=False, last=False))
        time.sleep(1.0)
        assert_serving(node)
        assert node.spool_files() == {}

    def test_peer_abort_mid_dataset_stores_nothing(self, node):
        ds, body = _ct_instance()
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(ul.p_data(3, ul.c_store_rq(1, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID), True, True))
            a.send(ul.p_data(3, body[:100_000], command=False, last=False))
            a.abort()
        time.sleep(1.0)
        assert_serving(node)
        assert node.spool_files() == {}

    def test_pdu_longer_than_max_pdu_is_aborted(self, node):
        max_pdu = node.config["node"]["max_pdu"]
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            # Header announcing a P-DATA-TF 4x the advertised maximum; the
            # node must not wait for (or buffer) the body to refuse it.
            a.send(struct.pack(">BBI", ul.P_DATA_TF, 0, 4 * max_pdu) + b"\x00" * 64)
            assert a.wait_closed_or_abort(timeout=10) == "abort"
        assert_serving(node)

    def test_huge_length_field_is_aborted(self, node):
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(struct.pack(">BBI", ul.P_DATA_TF, 0, 0xFFFFFFFF) + b"\x00" * 64)
            assert a.wait_closed_or_abort(timeout=10) == "abort"
        assert_serving(node)

    def test_pdata_on_unknown_context_is_aborted(self, node):
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(ul.p_data(5, ul.c_echo_rq(1), command=True, last=True))  # pcid 5 was never proposed
            assert a.wait_closed_or_abort(timeout=10) == "abort"
        assert_serving(node)

    def test_pdata_on_refused_context_is_aborted(self, node):
        ds, body = _ct_instance()
        with _connect(node) as a:
            ac = a.associate(
                contexts=CT_CONTEXTS + [(5, ul.CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.4.53"])]
            )
            assert ac.contexts[5][0] == ul.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED
            a.send(ul.p_data(5, ul.c_store_rq(1, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID), True, True))
            a.send(ul.p_data(5, body[:10_000], command=False, last=True))
            assert a.wait_closed_or_abort(timeout=10) == "abort"
        assert_serving(node)
        assert node.spool_files() == {}

    def test_second_assoc_rq_on_established_association_is_aborted(self, node):
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(ul.associate_rq("BIOMARKER", "RAWSCU", CT_CONTEXTS))
            assert a.wait_closed_or_abort(timeout=10) == "abort"
        assert_serving(node)

    def test_pdv_item_length_inconsistent_with_pdu(self, node):
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            cmd = ul.c_echo_rq(1)
            # PDV item claims 1000 bytes more than its PDU holds.
            pdv = struct.pack(">IBB", len(cmd) + 2 + 1000, 1, 0x03) + cmd
            a.send(ul.pdu(ul.P_DATA_TF, pdv))
            assert a.wait_closed_or_abort(timeout=10) == "abort"
        assert_serving(node)

    def test_lying_element_length_is_refused_without_allocating_it(self, node):
        """20 bytes claiming a 4 GiB PixelData: 0xC000, promptly, without a 4 GiB buffer.

        Sixteen such peers at once must not be able to exhaust the machine.
        """
        ds, _ = _ct_instance()
        del ds.PixelData
        body = instances.dataset_bytes(ds) + (
            b"\xe0\x7f\x10\x00OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + b"\x00" * 16
        )
        before = node.peak_rss_mib()
        with ul.RawAssociation("127.0.0.1", node.port, timeout=60) as a:
            a.associate(contexts=CT_CONTEXTS)
            t0 = time.monotonic()
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID, body)
            took = time.monotonic() - t0
            a.release()
        assert rsp.status == 0xC000, f"status 0x{rsp.status:04X}"
        peak = node.peak_rss_mib()
        assert peak < before + 256, f"peak RSS rose from {before:.0f} to {peak:.0f} MiB for a 6 kB message"
        assert took < 3, f"{took:.1f}s to refuse a 6 kB message"
        assert_serving(node)

    def test_garbage_command_set(self, node):
        """A command PDV that is not a command set: abort, or a failure response. Never a crash."""
        with _connect(node) as a:
            a.associate(contexts=CT_CONTEXTS)
            a.send(ul.p_data(1, os.urandom(200), command=True, last=True))
            try:
                outcome = _reply_or_close(a, timeout=10)
            except socket.timeout:
                outcome = "silence"
            assert outcome in ("abort", "closed") or outcome.startswith("P-DATA"), outcome
        assert_serving(node)

    def test_many_abrupt_connections(self, node):
        """A burst of connect-and-drop at every stage of the handshake."""
        rq = ul.associate_rq("BIOMARKER", "RAWSCU", CT_CONTEXTS)
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
            if i % 3 == 1:
                s.sendall(rq[: (i * 7) % len(rq)])
            elif i % 3 == 2:
                s.sendall(rq)
            # RST instead of FIN on some of them.
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(0.5)
        assert_serving(node)


def test_store_after_hostile_traffic_still_works(node, tmp_path):
    """The hostile traffic above left nothing behind that breaks a normal transfer."""
    with _connect(node) as a:
        a.associate(contexts=CT_CONTEXTS)
        a.send(ul.p_data(7, b"\x00" * 10, command=True, last=True))
        a.wait_closed_or_abort(timeout=10)
    s = instances.write_series(tmp_path / "in", 3)
    from nodeharness import storescu

    r = storescu(node, s.paths)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(node.spool_files()) == {i.sop for i in s.instances}


def _rq_variant(kind: str) -> bytes:
    ctx = [(1, ul.VERIFICATION, [ul.IMPLICIT_LE])]
    if kind == "no-contexts":
        return ul.associate_rq("BIOMARKER", "RAWSCU", [])
    if kind == "even-context-id":
        return ul.associate_rq("BIOMARKER", "RAWSCU", [(2, ul.VERIFICATION, [ul.IMPLICIT_LE])])
    if kind == "200-contexts":
        return ul.associate_rq(
            "BIOMARKER", "RAWSCU", [(1 + 2 * (i % 128), ul.CT_IMAGE_STORAGE, [ul.EXPLICIT_LE]) for i in range(200)]
        )
    if kind == "3000-transfer-syntaxes":
        return ul.associate_rq(
            "BIOMARKER", "RAWSCU", [(1, ul.CT_IMAGE_STORAGE, [f"1.2.3.{i}" for i in range(3000)] + [ul.EXPLICIT_LE])]
        )
    if kind == "peer-max-pdu-0":
        return ul.associate_rq("BIOMARKER", "RAWSCU", ctx, max_pdu=0)
    if kind == "wrong-protocol-version":
        rq = bytearray(ul.associate_rq("BIOMARKER", "RAWSCU", ctx))
        rq[6:8] = b"\x00\x02"
        return bytes(rq)
    if kind == "non-ascii-calling-ae":
        rq = bytearray(ul.associate_rq("BIOMARKER", "RAWSCU", ctx))
        rq[6 + 20 : 6 + 36] = bytes(range(0x80, 0x90))
        return bytes(rq)
    if kind == "no-user-information":
        rq = ul.associate_rq("BIOMARKER", "RAWSCU", ctx)
        cut = rq.rfind(b"\x50\x00")
        body = rq[6:cut]
        return ul.pdu(ul.A_ASSOCIATE_RQ, body)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "no-contexts", "even-context-id", "200-contexts", "3000-transfer-syntaxes",
        "peer-max-pdu-0", "wrong-protocol-version", "non-ascii-calling-ae", "no-user-information",
    ],
)
def test_odd_association_requests_get_an_answer_not_a_crash(node, kind):
    """Each gets an AC, an RJ or an A-ABORT within a few seconds; then the node serves on."""
    with _connect(node) as a:
        a.send(_rq_variant(kind))
        try:
            p = a.recv_pdu(timeout=10)
            outcome = ul.PDU_NAMES.get(p.type, hex(p.type))
        except (ul.PeerClosed, ConnectionResetError):
            outcome = "closed"
        assert outcome in ("A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"), outcome
        if outcome == "A-ASSOCIATE-AC" and kind == "peer-max-pdu-0":
            # Unlimited peer max PDU (PS3.8 D.1): a C-ECHO still works.
            assert a.c_echo().status == 0
    assert_serving(node)
