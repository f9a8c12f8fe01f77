"""Every object under shared/realct against the node, sent the way real peers send it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.tag import Tag

import rawdul as ul
from nodeharness import REALCT, assert_serving, sha256, storescu_exact

# What the node accepts (src/dicom/mod.rs ACCEPTED_TRANSFER_SYNTAXES) and what
# it must refuse at negotiation because it cannot decode it.
ACCEPTED_TS = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
}
REFUSED_TS = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


class Source:
    """One file under realct and what the tests need to know about it."""

    def __init__(self, path: Path):
        self.path = path
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.ts = str(ds.file_meta.TransferSyntaxUID)
        self.media_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        self.sop_class = str(ds.get("SOPClassUID", "") or "")
        self.sop = str(ds.get("SOPInstanceUID", "") or "")
        self.series = str(ds.get("SeriesInstanceUID", "") or "")
        self.study = str(ds.get("StudyInstanceUID", "") or "")

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(REALCT))

    @property
    def has_identifiers(self) -> bool:
        return bool(self.sop_class and self.sop and self.series and self.study)

    def __repr__(self) -> str:
        return self.rel


def _sources() -> list[Source]:
    if not REALCT.is_dir():
        return []
    out = []
    # Chest encodings first: the implicit-LE original is then the first copy of its SOP instance.
    dirs = sorted(p for p in REALCT.iterdir() if p.is_dir())
    dirs.sort(key=lambda d: d.name != "chest-slice-encodings")
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix != ".md":
                out.append(Source(p))
    return out


SOURCES = _sources()


def storage_sources() -> list[Source]:
    return [s for s in SOURCES if s.media_class != DICOMDIR_CLASS and s.has_identifiers]


def _comparable(ds: pydicom.Dataset) -> dict:
    """Element -> (VR, value), without group lengths and dataset trailing padding."""
    out = {}
    for elem in ds:
        if elem.tag.element == 0x0000 or elem.tag == Tag(0xFFFC, 0xFFFC):
            continue
        out[elem.tag] = elem
    return out


def _same_element(x, y) -> bool:
    if x == y:
        return True
    # Encapsulated PixelData is OB by definition (PS3.5 A.4); some sources
    # (the .91 chest slice) label it OW and DCMTK corrects the VR on the way
    # out. The value must still be identical.
    return x.tag == y.tag and {x.VR, y.VR} <= {"OB", "OW"} and x.value == y.value


def assert_same_dataset(stored: Path, source: Path) -> None:
    a = _comparable(pydicom.dcmread(stored))
    b = _comparable(pydicom.dcmread(source))
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    assert not only_a and not only_b, f"{source}: stored has extra {only_a}, lacks {only_b}"
    diffs = [t for t in b if not _same_element(a[t], b[t])]
    assert not diffs, f"{source}: {len(diffs)} elements differ, first: stored {a[diffs[0]]!r} vs source {b[diffs[0]]!r}"


@pytest.fixture
def realct_node(node_factory, realct):
    return node_factory()


@pytest.mark.slow
def test_storescu_every_storage_object(realct_node, realct, tmp_path):
    """Each file in its own association and its own transfer syntax (storescu -xf profile).

    Accepted syntaxes: stored, and the stored dataset equals the source. A SOP
    instance sent again (the chest encodings share one) is acknowledged and
    the first stored copy stays byte-identical. Refused syntaxes (.53 .55):
    storescu finds no presentation context; the node serves on.
    """
    node = realct_node
    sources = storage_sources()
    assert len(sources) > 80, f"only {len(sources)} storage objects found under {realct}"
    first_copy: dict[str, Source] = {}
    digest_after_first: dict[str, str] = {}
    failures = []
    for src in sources:
        r = storescu_exact(node, src.path, src.media_class, src.ts, tmp_path)
        out = r.stdout + r.stderr
        if src.ts in REFUSED_TS:
            if r.returncode == 0 and "Success" in out:
                failures.append(f"{src.rel}: {src.ts} should be refused at negotiation but was stored")
            elif "presentation context" not in out.lower():
                failures.append(f"{src.rel}: expected a presentation-context failure, got rc={r.returncode}:\n{out[-800:]}")
            continue
        assert src.ts in ACCEPTED_TS, f"{src.rel}: unexpected transfer syntax {src.ts} in test data"
        if r.returncode != 0 or "Received Store Response (Success)" not in out:
            failures.append(f"{src.rel} ({src.ts}): storescu rc={r.returncode}:\n{out[-800:]}")
            continue
        stored = node.spool_path(src.study, src.series, src.sop)
        if not stored.is_file():
            failures.append(f"{src.rel}: acknowledged but {stored} missing")
            continue
        if src.sop not in first_copy:
            first_copy[src.sop] = src
            digest_after_first[src.sop] = sha256(stored)
        elif sha256(stored) != digest_after_first[src.sop]:
            failures.append(f"{src.rel}: duplicate of {first_copy[src.sop].rel} changed the stored file")
    assert_serving(node)
    assert not failures, "\n".join(failures)

    # Every kept copy carries the first sender's dataset, element for element.
    for sop, src in first_copy.items():
        assert_same_dataset(node.spool_path(src.study, src.series, sop), src.path)
    assert set(node.spool_files()) == set(first_copy)
    # The chest group: ten encodings of one instance, stored once, as the first one sent.
    chest = [s for s in sources if s.path.parent.name == "chest-slice-encodings"]
    shared = {s.sop for s in chest if s.ts in ACCEPTED_TS}
    assert len(shared) < len([s for s in chest if s.ts in ACCEPTED_TS]), "chest encodings no longer share a SOP UID?"


@pytest.mark.slow
def test_raw_dataset_bytes_are_stored_exactly(realct_node):
    """The node stores the dataset bytes as received, in the negotiated syntax.

    The raw client proposes exactly each file's transfer syntax and sends the
    file's own dataset bytes, so the spooled file after its meta group must be
    byte-identical to the source after its meta group.
    """
    node = realct_node
    sources = [s for s in storage_sources() if s.ts in ACCEPTED_TS]
    pairs = sorted({(s.sop_class, s.ts) for s in sources})
    contexts = [(1 + 2 * i, cls, [ts]) for i, (cls, ts) in enumerate(pairs)]
    pcid_of = {(cls, ts): pcid for pcid, cls, (ts,) in contexts}
    first: dict[str, Source] = {}
    with ul.RawAssociation("127.0.0.1", node.port, timeout=30) as a:
        ac = a.associate(contexts=contexts)
        for pcid, cls, (ts,) in contexts:
            assert ac.contexts[pcid] == (ul.PC_ACCEPTANCE, ts), f"{cls} {ts}: {ac.contexts[pcid]}"
        for src in sources:
            ts, body = ul.split_part10(src.path)
            rsp = a.c_store(pcid_of[(src.sop_class, ts)], src.sop_class, src.sop, body)
            assert rsp.status == 0x0000, f"{src.rel}: status 0x{rsp.status:04X}"
            first.setdefault(src.sop, src)
        a.release()
    for sop, src in first.items():
        stored = node.spool_path(src.study, src.series, sop)
        ts, stored_body = ul.split_part10(stored)
        src_ts, src_body = ul.split_part10(src.path)
        assert ts == src_ts, f"{src.rel}: stored as {ts}, received as {src_ts}"
        assert stored_body == src_body, f"{src.rel}: stored dataset bytes differ from those received"


def test_dicomdir_is_refused_at_negotiation(realct_node, realct):
    """DIRFILE is a Media Storage Directory, not a storage object (pynetdicom as the peer)."""
    from pynetdicom import AE

    node = realct_node
    dirfiles = sorted(realct.glob("head-philips/*/DIRFILE"))
    assert dirfiles, "no DIRFILE in realct/head-philips"
    ds = pydicom.dcmread(dirfiles[0])
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ul.VERIFICATION)
    ae.add_requested_context(DICOMDIR_CLASS, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BIOMARKER")
    try:
        assert assoc.is_established, "association with Verification + DICOMDIR contexts refused outright"
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert DICOMDIR_CLASS not in accepted
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert rejected.get(DICOMDIR_CLASS) == ul.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, rejected
        # pynetdicom refuses locally (no accepted context; DIRFILE has no SOP
        # class/instance of its own), so nothing goes on the wire.
        with pytest.raises((ValueError, RuntimeError, AttributeError)):
            assoc.send_c_store(dirfiles[0])
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert node.spool_files() == {}
    assert_serving(node)


def test_refused_transfer_syntaxes_with_storescu(realct_node, realct, tmp_path):
    """.53/.55: storescu gets no presentation context; nothing stored; the node serves on."""
    node = realct_node
    refused = [s for s in SOURCES if s.ts in REFUSED_TS]
    assert len(refused) >= 2  # the chest encodings .53 and .55
    for src in refused:
        r = storescu_exact(node, src.path, src.media_class, src.ts, tmp_path)
        out = (r.stdout + r.stderr).lower()
        assert "presentation context" in out, f"{src.rel}: rc={r.returncode}\n{out[-600:]}"
        assert "received store response (success)" not in out
    assert node.spool_files() == {}
    assert_serving(node)


def test_objects_with_empty_identifiers_fail_clearly(realct_node, realct):
    """abdomen-siemens-j2k: SOPClassUID, SOPInstanceUID and SeriesInstanceUID are empty.

    Sent as-is under a CT Image Storage context (the peer's command carries a
    class and an instance UID; the dataset does not), each gets a failure
    status, nothing is stored and the association and node carry on.
    """
    node = realct_node
    files = sorted((realct / "abdomen-siemens-j2k").glob("*.dcm"))
    assert len(files) == 20
    ts = ul.split_part10(files[0])[0]
    with ul.RawAssociation("127.0.0.1", node.port, timeout=30) as a:
        a.associate(contexts=[(1, ul.VERIFICATION, [ul.IMPLICIT_LE]), (3, ul.CT_IMAGE_STORAGE, [ts])])
        from instances import new_uid

        for f in files:
            _, body = ul.split_part10(f)
            rsp = a.c_store(3, ul.CT_IMAGE_STORAGE, new_uid(), body)
            assert rsp.status in (0xC000, 0xA900), f"{f.name}: status 0x{rsp.status:04X}"
        assert a.c_echo(1).status == 0
        a.release()
    assert node.spool_entries() == []
    assert_serving(node)
