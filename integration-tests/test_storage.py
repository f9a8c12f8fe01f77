"""C-STORE: spool layout, Part-10 output, duplicates and DIMSE statuses (PS3.4 B.2.3, PS3.7 9.1.1)."""

from __future__ import annotations

import copy

import pydicom
import pytest

import instances
import rawdul as ul
from nodeharness import assert_serving, sha256, storescu

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def _clone(**changes) -> pydicom.Dataset:
    """A fresh single-slice instance; `changes` set (value) or delete (None) attributes."""
    study, series = instances.new_uid(), instances.new_uid()
    ds = instances.make_dataset(study, series, instances.new_uid(), 0.0, 1, instances.new_uid())
    for k, v in changes.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


def _store_assoc(node) -> ul.RawAssociation:
    # Generous timeout: these tests judge statuses; test_hostile judges speed and memory.
    a = ul.RawAssociation("127.0.0.1", node.port, timeout=30)
    a.associate(
        contexts=[
            (1, ul.VERIFICATION, [ul.IMPLICIT_LE]),
            (3, ul.CT_IMAGE_STORAGE, [ul.EXPLICIT_LE]),
            (5, ul.MR_IMAGE_STORAGE, [ul.EXPLICIT_LE]),
        ]
    )
    assert a.accepted.contexts[3][0] == ul.PC_ACCEPTANCE
    return a


class TestSpool:
    def test_storescu_instances_land_in_spool_layout(self, node, tmp_path):
        s = instances.write_series(tmp_path / "in", 3)
        r = storescu(node, s.paths)
        assert r.returncode == 0, r.stdout + r.stderr
        for inst in s.instances:
            p = node.spool_path(inst.study, inst.series, inst.sop)
            assert p.is_file(), f"{p} missing; spool has {list(node.spool_files())}"
        assert set(node.spool_files()) == {i.sop for i in s.instances}

    def test_spooled_file_is_part10_with_received_bytes(self, node):
        ds = _clone()
        body = instances.dataset_bytes(ds)
        with _store_assoc(node) as a:
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID, body)
            assert rsp.status == SUCCESS
            a.release()
        p = node.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        raw = p.read_bytes()
        assert raw[:128] == bytes(128) or len(raw) > 132, "no preamble"
        assert raw[128:132] == b"DICM"
        ts, stored_body = ul.split_part10(p)
        assert ts == ul.EXPLICIT_LE
        assert stored_body == body, "dataset bytes differ from what was sent"
        meta = pydicom.dcmread(p).file_meta
        assert meta.MediaStorageSOPClassUID == ul.CT_IMAGE_STORAGE
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == ul.EXPLICIT_LE
        assert "ImplementationClassUID" in meta

    def test_index_exists(self, node, tmp_path):
        s = instances.write_series(tmp_path / "in", 1)
        assert storescu(node, s.paths).returncode == 0
        assert node.index_path.is_file()

    def test_nothing_left_in_tmp_after_clean_transfer(self, node, tmp_path):
        s = instances.write_series(tmp_path / "in", 4)
        assert storescu(node, s.paths).returncode == 0
        leftovers = [p for p in node.tmp_dir.rglob("*") if p.is_file()] if node.tmp_dir.exists() else []
        assert leftovers == []


class TestDuplicates:
    def test_duplicate_is_success_and_first_copy_kept(self, node):
        first = _clone(PatientName="FIRST^COPY")
        second = copy.deepcopy(first)
        second.PatientName = "SECOND^COPY"
        with _store_assoc(node) as a:
            assert a.c_store(3, ul.CT_IMAGE_STORAGE, first.SOPInstanceUID, instances.dataset_bytes(first)).status == SUCCESS
            p = node.spool_path(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
            before = sha256(p)
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, second.SOPInstanceUID, instances.dataset_bytes(second))
            assert rsp.status == SUCCESS
            a.release()
        assert sha256(p) == before
        assert str(pydicom.dcmread(p).PatientName) == "FIRST^COPY"
        assert list(node.spool_files()) == [first.SOPInstanceUID]

    def test_duplicate_uid_in_another_series_keeps_first_copy(self, node):
        """Same SOP Instance UID, different Study/Series: still the same instance (PS3.3 C.12.1.1.1)."""
        first = _clone(PatientName="FIRST^COPY")
        second = copy.deepcopy(first)
        second.StudyInstanceUID = instances.new_uid()
        second.SeriesInstanceUID = instances.new_uid()
        with _store_assoc(node) as a:
            assert a.c_store(3, ul.CT_IMAGE_STORAGE, first.SOPInstanceUID, instances.dataset_bytes(first)).status == SUCCESS
            digest = node.spool_digest()
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, second.SOPInstanceUID, instances.dataset_bytes(second))
            a.release()
        assert rsp.status == SUCCESS
        assert node.spool_digest() == digest, "a second copy of the instance appeared under another series"
        assert second.SeriesInstanceUID not in node.series_by_uid()

    def test_duplicate_across_associations_and_restart(self, node, tmp_path):
        s = instances.write_series(tmp_path / "in", 2)
        assert storescu(node, s.paths).returncode == 0
        digest = node.spool_digest()
        assert storescu(node, s.paths).returncode == 0
        node.restart()
        r = storescu(node, s.paths)
        assert r.returncode == 0, r.stdout + r.stderr
        assert node.spool_digest() == digest


class TestStatuses:
    def test_success_response_echoes_ids(self, node):
        ds = _clone()
        with _store_assoc(node) as a:
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID, instances.dataset_bytes(ds), msg_id=777)
            a.release()
        assert rsp.command_field == ul.C_STORE_RSP
        assert rsp.status == SUCCESS
        assert rsp.message_id_responded == 777
        assert rsp.affected_sop_class == ul.CT_IMAGE_STORAGE
        assert rsp.affected_sop_instance == ds.SOPInstanceUID

    @pytest.mark.parametrize(
        "case",
        [
            "sop_class_differs",
            "sop_instance_differs",
            "missing_sop_instance",
            "empty_sop_instance",
            "missing_series",
            "empty_series",
            "missing_study",
            "empty_study",
            "garbage_dataset",
            "truncated_dataset",
            "element_length_overruns",
            "huge_element_length",
        ],
    )
    def test_failure_status_nothing_stored_association_usable(self, node, case):
        ds = _clone()
        cmd_class, cmd_inst = ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID
        expect = {CANNOT_UNDERSTAND}
        if case == "sop_class_differs":
            ds.SOPClassUID = ul.MR_IMAGE_STORAGE
            expect = {SOP_CLASS_MISMATCH}
            body = instances.dataset_bytes(ds)
        elif case == "sop_instance_differs":
            cmd_inst = instances.new_uid()
            body = instances.dataset_bytes(ds)
        elif case.startswith(("missing_", "empty_")):
            kind, what = case.split("_", 1)
            attr = {"sop_instance": "SOPInstanceUID", "series": "SeriesInstanceUID", "study": "StudyInstanceUID"}[what]
            if kind == "missing":
                delattr(ds, attr)
            else:
                setattr(ds, attr, "")
            body = instances.dataset_bytes(ds)
        elif case == "garbage_dataset":
            body = bytes((i * 97 + 13) % 256 for i in range(4096))
        elif case == "truncated_dataset":
            # Complete PDVs (last fragment flagged), but the dataset stops
            # half-way through PixelData's value.
            full = instances.dataset_bytes(ds)
            body = full[: len(full) - 100_000]
        elif case == "element_length_overruns":
            # An element near the start claims more bytes than the whole dataset has.
            body = bytearray(instances.dataset_bytes(_clone_small(ds)))
            off = _find_element(body, 0x0008, 0x0060)  # Modality, explicit VR short form
            body[off + 6 : off + 8] = (0xFFF0).to_bytes(2, "little")
            body = bytes(body)
        else:  # huge_element_length: PixelData (OB) claiming ~4 GiB, 16 bytes present
            body = instances.dataset_bytes(_clone_small(ds)) + (
                b"\xe0\x7f\x10\x00" + b"OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + b"\x00" * 16
            )
        with _store_assoc(node) as a:
            rsp = a.c_store(3, cmd_class, cmd_inst, body, msg_id=31)
            assert rsp.status in expect, f"{case}: status 0x{rsp.status:04X}, wanted {[hex(e) for e in expect]}"
            assert rsp.message_id_responded == 31
            assert rsp.affected_sop_class == cmd_class
            assert rsp.affected_sop_instance == cmd_inst
            # The association survives a failed store ...
            assert a.c_echo(1).status == SUCCESS
            good = _clone()
            assert a.c_store(3, ul.CT_IMAGE_STORAGE, good.SOPInstanceUID, instances.dataset_bytes(good)).status == SUCCESS
            a.release()
        # ... and only the good instance reached the spool.
        assert set(node.spool_files()) == {good.SOPInstanceUID}
        assert_serving(node)


def _clone_small(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same header without pixels, so crafted lengths are easy to place."""
    small = ds.copy()
    for kw in ("PixelData",):
        if kw in small:
            delattr(small, kw)
    return small


def _find_element(buf: bytes | bytearray, group: int, elem: int) -> int:
    tag = group.to_bytes(2, "little") + elem.to_bytes(2, "little")
    off = bytes(buf).find(tag)
    assert off >= 0, f"({group:04x},{elem:04x}) not found"
    return off


class TestFraming:
    """Legal ways to cut a message into PDVs and PDUs that real peers use."""

    def test_several_pdvs_in_one_pdu_and_fragmented_command(self, node):
        ds = _clone()
        body = instances.dataset_bytes(ds)
        cmd = ul.c_store_rq(9, ul.CT_IMAGE_STORAGE, ds.SOPInstanceUID)

        def pdv(data, command, last):
            return len(data + b"xx").to_bytes(4, "big") + bytes([3, (1 if command else 0) | (2 if last else 0)]) + data

        with _store_assoc(node) as a:
            # PDU 1: the command in three fragments, then the first dataset fragment.
            third = len(cmd) // 3
            pdu1 = (
                pdv(cmd[:third], True, False)
                + pdv(cmd[third : 2 * third], True, False)
                + pdv(cmd[2 * third :], True, True)
                + pdv(body[:1000], False, False)
            )
            a.send(ul.pdu(ul.P_DATA_TF, pdu1))
            # PDU 2: many small dataset fragments; PDU 3: the rest, last flag set.
            a.send(ul.pdu(ul.P_DATA_TF, b"".join(pdv(body[o : o + 500], False, False) for o in range(1000, 11000, 500))))
            rest = body[11000:]
            step = a._max_data() - 6
            for off in range(0, len(rest), step):
                last = off + step >= len(rest)
                a.send(ul.pdu(ul.P_DATA_TF, pdv(rest[off : off + step], False, last)))
            rsp = a.recv_response()
            assert rsp.status == SUCCESS, f"0x{rsp.status:04X}"
            assert rsp.message_id_responded == 9
            a.release()
        stored = node.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert ul.split_part10(stored)[1] == body

    def test_pynetdicom_store_then_abort_keeps_what_was_acknowledged(self, node, tmp_path):
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        s = instances.write_series(tmp_path / "in", 3)
        ae = AE(ae_title="PYNETDICOM")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CTImageStorage, [ul.EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="BIOMARKER")
        assert assoc.is_established
        for inst in s.instances:
            assert assoc.send_c_store(inst.path).Status == SUCCESS
        assoc.abort()
        assert_serving(node)
        assert set(node.spool_files()) == {i.sop for i in s.instances}

    def test_unsupported_dimse_command_does_not_crash(self, node):
        """A C-FIND-RQ on a storage context: a failure response or an abort, never a crash."""
        cmd = ul.encode_command(
            [
                (0, 0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"),
                (0, 0x0100, ul.us(0x0020)),  # C-FIND-RQ
                (0, 0x0110, ul.us(5)),
                (0, 0x0700, ul.us(0)),
                (0, 0x0800, ul.us(0x0101)),
            ]
        )
        with _store_assoc(node) as a:
            a.send(ul.p_data(3, cmd, command=True, last=True))
            try:
                rsp = a.recv_response(timeout=10)
                assert rsp.status != SUCCESS, "a C-FIND on a storage context reported success"
                a.release()
            except (ul.UnexpectedPdu, ul.PeerClosed, ConnectionResetError):
                pass  # aborted: also acceptable
        assert_serving(node)
