"""Helpers for tests that run a series through the whole node (ingest,
routing, job, report, delivery) into a real Orthanc.

The node/Orthanc fixtures and the config builders live in
test_results_orthanc.py; tests import them from there so there is one
definition of each.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

import instances
from test_results_orthanc import FIXTURE_CARD, SR_STORAGE_CLASSES, cli_json, wait_for  # noqa: F401


def clone(src: Path, dst: Path, study: str | None = None, **attrs) -> pydicom.Dataset:
    """`src` with a new Series and SOP Instance UID (and a new study unless
    given), the keyword attributes in `attrs` set, written to `dst`."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study or instances.new_uid()
    ds.SeriesInstanceUID = instances.new_uid()
    ds.SOPInstanceUID = instances.new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def jobs_of(node, series_uid: str) -> list[dict]:
    return [j for j in cli_json(node, "jobs") if j["series_instance_uid"] == series_uid]


def report_sops(job: dict) -> list[str]:
    """SOP Instance UIDs of the objects a finished job made (SR first, then SC)."""
    return [r["sop_instance_uid"] for r in (job.get("result") or {}).get("reports", [])]


def sr_sops_of_job(node, job: dict) -> list[str]:
    """The job's reports that the outbox holds as SR (by SOP class)."""
    mine = set(report_sops(job))
    return [i["sop_instance_uid"] for i in cli_json(node, "outbox")
            if i["sop_instance_uid"] in mine and i["sop_class_uid"] in SR_STORAGE_CLASSES]


def orthanc_sr_uids(o) -> list[str]:
    """SOP Instance UIDs of every SR Orthanc stores."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in o.find_instances(Modality="SR")]


def fixture_card() -> dict:
    import yaml

    return yaml.safe_load(Path(FIXTURE_CARD).read_text())
