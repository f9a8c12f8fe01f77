"""UIDs that are not UIDs (PS3.5 9.1) never become paths (issue 12, item 1).

The spool layout is spool/<Study>/<Series>/<SOP>.dcm. Before the fix a
C-STORE whose StudyInstanceUID and SeriesInstanceUID were both `..` was
acknowledged 0x0000 and written next to data_dir. Each value below must get
0xC000 (cannot understand), one log line naming the calling AE and the
field, and leave nothing behind: not in spool/, not in tmp/, not anywhere
around data_dir. The node serves on and a valid store still lands where it
should.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import instances
import rawdul as ul
from nodeharness import assert_serving, storescu

CONTEXTS = [(1, ul.VERIFICATION, [ul.IMPLICIT_LE]), (3, ul.CT_IMAGE_STORAGE, [ul.EXPLICIT_LE])]

BAD_UIDS = {
    "dotdot": "..",
    "dot": ".",
    "double-dot": "1..2",
    "leading-dot": ".1",
    "trailing-dot": "1.",
    "leading-zero": "01.2",
    "65-chars": "1." + "2" * 63,
}

# Attribute to set -> the word the log line must name.
FIELDS = {
    "StudyInstanceUID": "StudyInstanceUID",
    "SeriesInstanceUID": "SeriesInstanceUID",
    # The command's Affected SOP Instance UID carries the same value, as a
    # real peer's would; it is refused before any byte is written.
    "SOPInstanceUID": "SOPInstanceUID",
}


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _store(a: ul.RawAssociation, study: str, series: str, sop: str) -> int:
    # pydicom warns about the over-long UID; sending it is the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = instances.make_dataset(study, series, sop, 0.0, 1, instances.new_uid())
        body = instances.dataset_bytes(ds)
    return a.c_store(3, ul.CT_IMAGE_STORAGE, sop, body).status


def _assert_nothing_written(node, around: Path, before: set[Path], valid_uids: list[str]) -> None:
    assert node.spool_entries() == [], node.spool_entries()
    assert list(node.tmp_dir.iterdir()) == [], list(node.tmp_dir.iterdir())
    new = _tree(around) - before
    # The node's own bookkeeping (log, sqlite journals) may appear; a DICOM
    # file, a directory or anything named after the test's UIDs may not.
    stray = [
        p for p in new
        if p.suffix == ".dcm" or p.is_dir() or any(u in p.name for u in valid_uids)
    ]
    assert stray == [], f"written outside the spool: {stray}"
    assert not any(p.suffix == ".dcm" for p in _tree(around)), "a .dcm file exists around data_dir"


@pytest.mark.parametrize("field", list(FIELDS))
def test_invalid_uid_is_refused_with_0xC000_and_writes_nothing(node, tmp_path, field):
    # tmp_path holds the node's workdir, which holds data_dir: watch both
    # levels above data_dir, where `..` used to land.
    around = node.data_dir.parent.parent
    before = _tree(around)
    log_before = len(node.log_text().splitlines())
    used: list[str] = []
    with ul.RawAssociation("127.0.0.1", node.port, timeout=30) as a:
        a.associate(contexts=CONTEXTS)
        for name, bad in BAD_UIDS.items():
            uids = {"StudyInstanceUID": instances.new_uid(), "SeriesInstanceUID": instances.new_uid(),
                    "SOPInstanceUID": instances.new_uid()}
            used += list(uids.values())
            uids[field] = bad
            status = _store(a, uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
            assert status == 0xC000, f"{field}={bad!r} ({name}): status 0x{status:04X}"
        # The association is still good after every refusal.
        assert a.c_echo(1).status == 0
        a.release()
    _assert_nothing_written(node, around, before, used)

    lines = [
        l for l in node.log_text().splitlines()[log_before:]
        if "C-STORE failed" in l and "RAWSCU" in l and FIELDS[field] in l and "0xC000" in l
    ]
    assert len(lines) == len(BAD_UIDS), "\n".join(node.log_text().splitlines()[log_before:])

    # A valid store afterwards lands exactly where the layout says.
    s = instances.write_series(tmp_path / "valid", 1)
    r = storescu(node, s.paths)
    assert r.returncode == 0, r.stdout + r.stderr
    i = s.instances[0]
    assert node.spool_entries() == [node.spool_path(i.study, i.series, i.sop)]
    assert_serving(node)


def test_study_and_series_both_dotdot_do_not_escape_data_dir(node):
    """The case measured on main: written to the parent of data_dir, acknowledged 0x0000."""
    around = node.data_dir.parent.parent
    before = _tree(around)
    sop = instances.new_uid()
    with ul.RawAssociation("127.0.0.1", node.port, timeout=30) as a:
        a.associate(contexts=CONTEXTS)
        assert _store(a, "..", "..", sop) == 0xC000
        a.release()
    _assert_nothing_written(node, around, before, [sop])
    assert_serving(node)


def test_analyze_out_paths_cannot_escape_with_a_dotdot_series_uid(tmp_path, binary):
    """`analyze --out OUT`: results go to OUT/<series>/<route>/. A file whose
    SeriesInstanceUID is `..` used to put them in OUT's parent; now it is not a
    usable series at all and nothing is written outside OUT."""
    import pydicom
    from nodeharness import Node, free_port, node_binary, run_tool
    from test_results_orthanc import node_overrides, routes_named

    r = run_tool([str(node_binary()), "phantom", "--task", "pma", "--seed", "7", "--out", str(tmp_path / "ph"),
                  "--count", "1"])
    assert r.returncode == 0, r.stderr
    src = tmp_path / "ph" / "pma-7-0" / "CT0001.dcm"
    cfg = Node(tmp_path / "cfg", node_overrides(free_port(), routes_named("pma-single-slice")))  # config only

    def run(dataset_path: Path, out: Path):
        return run_tool([str(node_binary()), "analyze", "--config", str(cfg.config_path), "--out", str(out),
                         str(dataset_path)], timeout=300)

    # Control: the valid file is analysed and lands under OUT.
    good_out = tmp_path / "good" / "out"
    r = run(src, good_out)
    assert r.returncode == 0, r.stdout + r.stderr
    series = pydicom.dcmread(src).SeriesInstanceUID
    assert (good_out / series / "pma-single-slice" / "sr.dcm").is_file(), list(good_out.rglob("*"))

    ds = pydicom.dcmread(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: '..' is not a UI value; that is the point
        ds.SeriesInstanceUID = ".."
    bad_dir = tmp_path / "bad-in"
    bad_dir.mkdir()
    ds.save_as(bad_dir / "CT0001.dcm")
    box = tmp_path / "bad"
    out = box / "out"
    out.mkdir(parents=True)
    r = run(bad_dir, out)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "SeriesInstanceUID" in r.stderr, r.stderr
    assert sorted(p.name for p in box.iterdir()) == ["out"], list(box.rglob("*"))
    assert list(out.rglob("*")) == []
