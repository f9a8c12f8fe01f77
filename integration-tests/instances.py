"""Test instances cloned from the real chest slice.

The template is the explicit-LE encoding of the GE chest slice in
`shared/realct/chest-slice-encodings`. Each clone gets fresh Study, Series,
SOP Instance and Frame of Reference UIDs and an ImagePositionPatient z step,
so a generated series is geometrically a plain stack of axial slices.

The template's file meta holds SourceApplicationEntityTitle as an over-long
AE that dicom-rs refuses; clones are written without it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nodeharness import REALCT

CHEST_DIR = REALCT / "chest-slice-encodings"
CHEST_EXPLICIT = CHEST_DIR / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
# A UID root for test-made objects (the pydicom prefix + a fixed arc).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

_template: Dataset | None = None


def template() -> Dataset:
    global _template
    if _template is None:
        ds = pydicom.dcmread(CHEST_EXPLICIT)
        if "SourceApplicationEntityTitle" in ds.file_meta:
            del ds.file_meta.SourceApplicationEntityTitle
        _template = ds
    return _template


@dataclass
class Instance:
    path: Path
    study: str
    series: str
    sop: str
    z: float


@dataclass
class Series:
    study: str
    series: str
    instances: list[Instance]

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.instances]


def new_uid() -> str:
    return generate_uid(prefix=UID_PREFIX)


def make_dataset(study: str, series: str, sop: str, z: float, number: int, frame_of_ref: str) -> Dataset:
    """A clone of the template as an in-memory dataset with its file meta."""
    # Deep copy: pydicom assigns into existing DataElement objects, so a
    # shallow copy would rewrite the template. PixelData bytes are shared.
    ds = copy.deepcopy(template())
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    ds.FrameOfReferenceUID = frame_of_ref
    x, y, _ = (float(v) for v in template().ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z]
    ds.SliceLocation = z
    ds.InstanceNumber = number
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_series(
    out_dir: Path,
    count: int,
    *,
    dz: float | None = None,
    skip: tuple[int, ...] = (),
    study: str | None = None,
) -> Series:
    """`count` contiguous slices (indices in `skip` left out) written as Part-10 files."""
    tpl = template()
    dz = float(tpl.SliceThickness) if dz is None else dz
    study = study or new_uid()
    series = new_uid()
    frame = new_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    instances = []
    z0 = float(tpl.ImagePositionPatient[2])
    for i in range(count):
        if i in skip:
            continue
        sop = new_uid()
        z = round(z0 + i * dz, 4)
        ds = make_dataset(study, series, sop, z, i + 1, frame)
        path = out_dir / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(Instance(path, study, series, sop, z))
    return Series(study, series, instances)


def dataset_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    """The dataset (no file meta) encoded little endian, as it goes on the wire."""
    from pynetdicom.dsutils import encode

    raw = encode(ds, implicit, True)
    assert raw is not None, "pydicom could not encode the dataset"
    return raw
