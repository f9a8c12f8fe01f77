"""Per-task constants: candidate heuristic, input normalisation, aggregation and coded concepts.

Everything the Rust inference must reproduce is declared here once and copied verbatim into the
model card (`models/<task>.yaml`) by `card.py`. Change a number here and the card, the golden set
and the ONNX all change together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # Candidate heuristic (Cano-Espinosa et al. 2020, Sec. III): HU range, inclusive both ends.
    hu_min: float
    hu_max: Optional[float]
    # Minimum 2D 8-connected component area in mm^2 (0 = no component filter).
    min_area_mm2: float
    # "area" (value = sum(map*cand) * pixel_area * unit_scale) or "agatston".
    aggregation: str
    unit_ucum: str
    unit_meaning: str
    unit_scale: float  # mm^2 -> output unit (0.01 for cm^2); 1.0 for Agatston
    hu_clip: tuple
    scale_subtract: float
    scale_divide: float
    size: tuple  # model input (H, W)
    slices: str  # "single" | "all"
    concept: Code
    finding_site: Code
    # Typical magnitude of the value, used only to normalise the training loss.
    value_scale: float
    notes: list = field(default_factory=list)


_AREA = Code("SCT", "42798000", "Area")

TASKS = {
    "pma": TaskSpec(
        name="pma", hu_min=-29.0, hu_max=150.0, min_area_mm2=0.0, aggregation="area",
        unit_ucum="cm2", unit_meaning="square centimeter", unit_scale=0.01,
        hu_clip=(-250.0, 250.0), scale_subtract=0.0, scale_divide=250.0,
        size=(128, 128), slices="single",
        concept=_AREA,
        finding_site=Code("SCT", "78904004", "Pectoralis major muscle"),
        value_scale=20.0,
    ),
    "sfa": TaskSpec(
        name="sfa", hu_min=-190.0, hu_max=-30.0, min_area_mm2=0.0, aggregation="area",
        unit_ucum="cm2", unit_meaning="square centimeter", unit_scale=0.01,
        hu_clip=(-250.0, 250.0), scale_subtract=0.0, scale_divide=250.0,
        size=(128, 128), slices="single",
        concept=_AREA,
        # Not confidently verified offline: SNOMED CT "Subcutaneous tissue structure"; see card notes.
        finding_site=Code("SCT", "67769002", "Subcutaneous tissue"),
        value_scale=100.0,
        notes=["finding_site SCT 67769002 taken from the brief ('subcutaneous tissue'); not verified "
               "against a SNOMED CT release in this session."],
    ),
    "liver": TaskSpec(
        name="liver", hu_min=-20.0, hu_max=200.0, min_area_mm2=0.0, aggregation="area",
        unit_ucum="cm2", unit_meaning="square centimeter", unit_scale=0.01,
        hu_clip=(-250.0, 250.0), scale_subtract=0.0, scale_divide=250.0,
        size=(128, 128), slices="single",
        concept=_AREA,
        # The measured region is the tumour; the site is the liver.
        finding_site=Code("SCT", "10200004", "Liver"),
        value_scale=10.0,
    ),
    "cac": TaskSpec(
        name="cac", hu_min=130.0, hu_max=None, min_area_mm2=1.0, aggregation="agatston",
        unit_ucum="{Agatston}", unit_meaning="Agatston score", unit_scale=1.0,
        hu_clip=(-300.0, 1000.0), scale_subtract=350.0, scale_divide=650.0,
        size=(128, 128), slices="all",
        # PS3.16 CID 6142 "Calculated Value"; the SR adds Measurement Method
        # (112055, DCM, "Agatston scoring method") from CID 6140.
        concept=Code("SCT", "450360000", "Coronary artery calcium score"),
        finding_site=Code("SCT", "41801008", "Coronary artery"),
        value_scale=100.0,
        notes=["concept is (450360000, SCT, \"Coronary artery calcium score\"), PS3.16 CID 6142; the SR adds "
               "Measurement Method (112055, DCM, \"Agatston scoring method\"), CID 6140 "
               "(docs/CONFORMANCE.md, \"CAC codes\")."],
    ),
}


def get(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}") from None


def with_size(spec: TaskSpec, n: int) -> TaskSpec:
    """The same task with a square model input of n x n."""
    from dataclasses import replace
    return replace(spec, size=(n, n))
