"""The SR's Contributing Equipment Sequence (0018,A001) names the node and the
algorithm, as src/report/mod.rs (put_sop_common, put_equipment) writes them.

The SR and the Secondary Capture are taken from Orthanc after a real
delivery and read with pydicom and highdicom. What the code writes:
- General Equipment: Manufacturer "biomarker-node", Manufacturer's Model
  Name "biomarker-node", Software Versions = the node's version
  (Cargo.toml), Device Serial Number = the node's AE title;
- Contributing Equipment, one item: Purpose of Reference (109102, DCM,
  "Processing Equipment"), Manufacturer "biomarker-node", Manufacturer's
  Model Name and Software Versions = the model card's name and version,
  Contribution DateTime = Instance Creation Date + Time, Contribution
  Description "Biomarker model <name> version <version>";
- the same name and version as the TID 1500 Algorithm Name / Version
  (111001 / 111003, DCM) of the measurement.
"""

from __future__ import annotations

import io
import re
import tomllib

import highdicom as hd
import pydicom

from e2e import clone, fixture_card, jobs_of, report_sops
from nodeharness import REPO_ROOT, free_port, storescu
from test_results_orthanc import (FAST_OUTBOX, SC_CLASS, SEG_CLASS, all_delivered, nodes, node_overrides,  # noqa: F401
                                  orthancs, outbox, pma_phantom, routes_named, wait_for)

NODE_VERSION = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["package"]["version"]


def _content_texts(ds, code: str) -> list[str]:
    """TextValue / ConceptCodeSequence meanings of every content item named (code, DCM)."""
    out = []

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in it else None
            if name is not None and name.CodeValue == code and name.CodingSchemeDesignator == "DCM":
                out.append(str(it.get("TextValue", "")))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_contributing_equipment_names_node_and_algorithm(tmp_path, nodes, orthancs, pma_phantom):
    dicom_port = free_port()
    over = node_overrides(dicom_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX)
    o = orthancs(dicom_port=dicom_port).start()
    node = nodes(over)
    card = fixture_card()
    src = clone(pma_phantom / "CT0001.dcm", tmp_path / "in" / "ct.dcm")
    r = storescu(node, [tmp_path / "in" / "ct.dcm"])
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = wait_for(lambda: (lambda js: js if js and all(j["state"] == "done" for j in js) else None)(
        jobs_of(node, src.SeriesInstanceUID)), 60, "the job done", diag=lambda: node.log_tail(30))
    made = report_sops(job)
    wait_for(lambda: (lambda it: it if all_delivered(it, len(made)) else None)(outbox(node)), 60,
             "SR and SC delivered", diag=lambda: f"{outbox(node)}\n{node.log_tail(20)}")
    by_uid = {}
    for iid in o.instances():
        ds = pydicom.dcmread(io.BytesIO(o.instance_file(iid)))
        by_uid[ds.SOPInstanceUID] = ds
    assert set(made) == set(by_uid), (made, list(by_uid))
    sr = by_uid[made[0]]
    assert sr.Modality == "SR", sr.Modality
    others = [by_uid[u] for u in made[1:]]
    scs = [d for d in others if d.SOPClassUID == SC_CLASS]
    segs = [d for d in others if d.SOPClassUID == SEG_CLASS]
    assert scs and len(segs) == 1 and len(scs) + len(segs) == len(others), [d.SOPClassUID for d in others]

    for ds in [sr] + scs + segs:
        what = f"{ds.Modality} {ds.SOPInstanceUID}"
        # General Equipment: this node made the object.
        assert ds.Manufacturer == "biomarker-node", what
        assert ds.ManufacturerModelName == "biomarker-node", what
        assert str(ds.SoftwareVersions) == NODE_VERSION, (what, ds.SoftwareVersions)
        assert ds.DeviceSerialNumber == node.ae_title, what

        assert "ContributingEquipmentSequence" in ds, f"{what}: no (0018,A001)"
        seq = ds[0x0018, 0xA001].value
        assert len(seq) == 1, f"{what}: {len(seq)} contributing equipment items"
        eq = seq[0]
        (purpose,) = eq.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
            ("109102", "DCM", "Processing Equipment"), (what, purpose)
        assert eq.Manufacturer == "biomarker-node", what
        assert eq.ManufacturerModelName == card["name"], (what, eq.ManufacturerModelName)
        assert str(eq.SoftwareVersions) == str(card["version"]), (what, eq.SoftwareVersions)
        assert eq.ContributionDescription == f"Biomarker model {card['name']} version {card['version']}", what
        dt = str(eq.ContributionDateTime)
        assert re.fullmatch(r"\d{14}(\.\d{1,6})?([+-]\d{4})?", dt), (what, dt)
        assert dt.startswith(f"{ds.InstanceCreationDate}{str(ds.InstanceCreationTime)[:6]}"), \
            (what, dt, ds.InstanceCreationDate, ds.InstanceCreationTime)

    # The SR's own algorithm identification says the same, read through highdicom too.
    # (TID 4019 may sit both in the group and in the measurement: every one agrees.)
    names, versions = _content_texts(sr, "111001"), _content_texts(sr, "111003")
    assert names and set(names) == {card["name"]}, names
    assert versions and set(versions) == {str(card["version"])}, versions
    doc = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = list(doc.content.get_image_measurement_groups()) + \
        list(doc.content.get_planar_roi_measurement_groups()) + \
        list(doc.content.get_volumetric_roi_measurement_groups())
    assert groups, "highdicom finds no measurement group"
    assert doc.ContributingEquipmentSequence[0].ManufacturerModelName == card["name"]
