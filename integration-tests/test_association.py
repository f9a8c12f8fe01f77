"""Association negotiation: C-ECHO, release, A-ASSOCIATE-RJ reasons, limits (PS3.8 7.1, 9.3)."""

from __future__ import annotations

import time

import rawdul as ul
from nodeharness import assert_serving, echoscu


class TestVerification:
    def test_echoscu_succeeds_and_releases(self, node):
        # echoscu exits 0 only after C-ECHO-RSP success and A-RELEASE-RP.
        r = echoscu(node)
        assert r.returncode == 0, r.stdout + r.stderr

    def test_raw_echo_response_echoes_message_id_and_class(self, node):
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            ac = a.associate(contexts=[(1, ul.VERIFICATION, [ul.IMPLICIT_LE])])
            assert ac.contexts[1] == (ul.PC_ACCEPTANCE, ul.IMPLICIT_LE)
            a.next_msg_id = 4242
            rsp = a.c_echo(1)
            assert rsp.command_field == ul.C_ECHO_RSP
            assert rsp.status == 0x0000
            assert rsp.message_id_responded == 4242
            assert rsp.affected_sop_class == ul.VERIFICATION
            a.release()

    def test_ac_advertises_configured_max_pdu(self, node):
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            ac = a.associate()
            assert ac.max_pdu == node.config["node"]["max_pdu"]
            a.release()

    def test_peer_abort_is_handled(self, node):
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            a.associate()
            a.abort()
        assert_serving(node)


class TestPresentationContexts:
    def test_accepted_and_refused_transfer_syntaxes(self, node):
        accepted = [
            "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
        ]
        refused = ["1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"]
        contexts = []
        pcid = 1
        for ts in accepted + refused:
            contexts.append((pcid, ul.CT_IMAGE_STORAGE, [ts]))
            pcid += 2
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            ac = a.associate(contexts=contexts)
            got = {}
            for pcid, _abstract, (ts,) in contexts:
                got[ts] = ac.contexts.get(pcid)
            a.release()
        for ts in accepted:
            assert got[ts] == (ul.PC_ACCEPTANCE, ts), f"{ts}: {got[ts]}"
        for ts in refused:
            assert got[ts] is not None and got[ts][0] == ul.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, f"{ts}: {got[ts]}"

    def test_non_storage_abstract_syntax_is_refused(self, node):
        dicomdir = "1.2.840.10008.1.3.10"
        storage_commitment = "1.2.840.10008.1.20.1"
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            ac = a.associate(
                contexts=[
                    (1, ul.VERIFICATION, [ul.IMPLICIT_LE]),
                    (3, dicomdir, [ul.EXPLICIT_LE]),
                    (5, storage_commitment, [ul.IMPLICIT_LE]),
                    (7, "1.2.3.4.5.6.7.8.9", [ul.IMPLICIT_LE]),
                ]
            )
            assert ac.contexts[1][0] == ul.PC_ACCEPTANCE
            for pcid in (3, 5, 7):
                assert ac.contexts[pcid][0] == ul.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, ac.contexts
            a.release()

    def test_several_storage_classes_accepted(self, node):
        classes = {
            "1.2.840.10008.5.1.4.1.1.2": "CT",
            "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
            "1.2.840.10008.5.1.4.1.1.4": "MR",
            "1.2.840.10008.5.1.4.1.1.7": "SC",
            "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
            "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
            "1.2.840.10008.5.1.4.1.1.11.1": "GSPS",
            "1.2.840.10008.5.1.4.1.1.128": "PET",
        }
        contexts = [(1 + 2 * i, uid, [ul.EXPLICIT_LE]) for i, uid in enumerate(classes)]
        with ul.RawAssociation("127.0.0.1", node.port) as a:
            ac = a.associate(contexts=contexts)
            for pcid, uid, _ in contexts:
                assert ac.contexts[pcid][0] == ul.PC_ACCEPTANCE, f"{classes[uid]}: {ac.contexts[pcid]}"
            a.release()


def _reject(node, called="BIOMARKER", calling="RAWSCU", bind=None) -> ul.Rejection:
    with ul.RawAssociation("127.0.0.1", node.port, bind=bind) as a:
        reply = a.request(called=called, calling=calling)
        assert reply.type == ul.A_ASSOCIATE_RJ, f"expected A-ASSOCIATE-RJ, got {reply}"
        return ul.parse_rj(reply.body)


class TestRejections:
    def test_wrong_called_ae(self, node):
        rj = _reject(node, called="NOT_BIOMARKER")
        assert (rj.result, rj.source, rj.reason) == (
            ul.RJ_PERMANENT, ul.RJ_SOURCE_USER, ul.RJ_USER_CALLED_AE_NOT_RECOGNIZED
        )
        assert_serving(node)

    def test_echoscu_wrong_called_ae_fails(self, node):
        r = echoscu(node, called="SOMEONE_ELSE")
        assert r.returncode != 0
        assert_serving(node)

    def test_unknown_calling_ae(self, node):
        rj = _reject(node, calling="INTRUDER")
        assert (rj.result, rj.source, rj.reason) == (
            ul.RJ_PERMANENT, ul.RJ_SOURCE_USER, ul.RJ_USER_CALLING_AE_NOT_RECOGNIZED
        )
        assert_serving(node)

    def test_host_bound_caller_from_its_host_is_accepted(self, node):
        with ul.RawAssociation("127.0.0.1", node.port, bind="127.0.0.1") as a:
            a.associate(calling="HOSTBOUND")
            assert a.c_echo().status == 0
            a.release()

    def test_host_bound_caller_from_another_host_is_rejected(self, node):
        # All of 127/8 is loopback on Linux: connecting from 127.0.0.2 is
        # "another host" for an allowed_callers entry bound to 127.0.0.1.
        rj = _reject(node, calling="HOSTBOUND", bind="127.0.0.2")
        assert (rj.result, rj.source, rj.reason) == (
            ul.RJ_PERMANENT, ul.RJ_SOURCE_USER, ul.RJ_USER_CALLING_AE_NOT_RECOGNIZED
        )

    def test_empty_allowed_callers_admits_anyone(self, node_factory):
        n = node_factory({"node": {"allowed_callers": []}})
        with ul.RawAssociation("127.0.0.1", n.port) as a:
            a.associate(calling="ANYBODY_AT_ALL")
            assert a.c_echo().status == 0
            a.release()
        r = echoscu(n, calling="WHOEVER")
        assert r.returncode == 0, r.stdout + r.stderr


def _associate_eventually(port: int, timeout: float = 5.0) -> ul.RawAssociation:
    """A slot is returned when the node has finished with the old association;
    allow it a moment rather than racing it."""
    deadline = time.monotonic() + timeout
    while True:
        a = ul.RawAssociation("127.0.0.1", port)
        reply = a.request()
        if reply.type == ul.A_ASSOCIATE_AC:
            return a
        a.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"no slot within {timeout}s: last reply {reply}")
        time.sleep(0.1)


class TestAssociationLimit:
    def test_over_limit_is_rejected_transient_then_recovers(self, node_factory):
        n = node_factory({"node": {"max_associations": 2}})
        # _associate_eventually: the harness's own port probe may hold a slot for a moment.
        held = [_associate_eventually(n.port) for _ in range(2)]
        try:
            rj = _reject(n)
            assert (rj.result, rj.source, rj.reason) == (
                ul.RJ_TRANSIENT, ul.RJ_SOURCE_PRESENTATION, ul.RJ_PRES_LOCAL_LIMIT_EXCEEDED
            )
            held[0].release()
            a = _associate_eventually(n.port)
            assert a.c_echo().status == 0
            a.release()
        finally:
            for a in held:
                a.close()
        assert_serving(n)

    def test_aborted_and_dropped_associations_free_their_slots(self, node_factory):
        n = node_factory({"node": {"max_associations": 1}})
        for i in range(6):
            a = _associate_eventually(n.port)
            if i % 2:
                a.abort()  # A-ABORT PDU
            else:
                a.close()  # TCP close without a word
        a = _associate_eventually(n.port)
        a.release()
        assert_serving(n)
