"""Per-task constants: candidate heuristic, input normalisation, aggregation and coded concepts.

Everything the Rust inference must reproduce is declared here once and copied verbatim into the
model card (`models/<task>.yaml`) by `card.py`. Change a number here and the card, the golden set
and the ONNX all change together.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    # The card's `validated_input:` and `validated_output:` sections (biomarker-node's out-of-distribution
    # guard, src/inference/guard.rs): what the model was validated on and what a plausible output is.
    validated_input: dict = field(default_factory=dict)
    validated_output: dict = field(default_factory=dict)
    # The card's `segmentation:` section (biomarker-node report/seg.rs: the DICOM SEG of the localization);
    # codes checked against pydicom 3.0.2's codedict (PS3.16).
    segmentation: dict = field(default_factory=dict)


_AREA = Code("SCT", "42798000", "Area")

# The input every model was validated on. Ranges: what the phantom generator draws (src/phantom: pixel spacing
# 0.6-0.9 mm chest / 0.65-0.9 mm abdomen at 512 and 0.7-1.0 mm for CAC at 256; slices 1.25/2.5 mm chest, 2.5/5 mm
# abdomen, 2.5/3 mm CAC; 100 or 120 kVp) widened to what the node accepts for real CT (0.5-1.0 mm pixels, 0.5-5 mm
# slices, 80-140 kVp). HU calibration: the air and fat peaks of the HU histogram of the slices the model sees.
# Measured modes (25 HU running sum over 5 HU bins): air -1012..-967 HU, fat -127..-67 HU on phantoms and the real
# chest/abdomen CT in shared/realct and shared/realct-labelled/chest-*; share of the window in the densest 25 HU
# >= 0.22 there, ~0.13 for uniform noise.
_HU_CALIBRATION = {
    "air": {"expected_hu": -1000.0, "window_hu": [-1100.0, -900.0], "tolerance_hu": 50.0},
    "fat": {"expected_hu": -100.0, "window_hu": [-200.0, -20.0], "tolerance_hu": 40.0},
    "min_voxels": 500,
    "min_peak_fraction": 0.18,
}
_CHEST_PARTS = ["CHEST", "THORAX", "CHESTABDOMEN", "CHESTABDPELVIS", "WHOLEBODY", "PARTIALBODY"]
_CHEST_SLICE_INPUT = {
    "pixel_spacing_mm": [0.5, 1.0],
    "slice_thickness_mm": [0.5, 5.0],
    "kvp": [80.0, 140.0],
    "contrast": "any",
    "body_part_examined": _CHEST_PARTS,
    "orientation": "axial",
    "level": "above_aortic_arch",
    "hu_calibration": _HU_CALIBRATION,
}

TASKS = {
    "pma": TaskSpec(
        name="pma", hu_min=-29.0, hu_max=150.0, min_area_mm2=0.0, aggregation="area",
        unit_ucum="cm2", unit_meaning="square centimeter", unit_scale=0.01,
        hu_clip=(-250.0, 250.0), scale_subtract=0.0, scale_divide=250.0,
        size=(128, 128), slices="single",
        concept=_AREA,
        finding_site=Code("SCT", "78904004", "Pectoralis major muscle"),
        value_scale=20.0,
        validated_input=_CHEST_SLICE_INPUT,
        # Map >= 0.5 outside the candidates: 58-98.1% on 140 chest phantoms (seed 901), 92% on the real chest
        # volume above the arch, 99.7-99.9% on real slices at the heart and the neck (the map lights up everywhere
        # but the muscle). A loose bound: the level check is what refuses those slices first.
        validated_output={"value": [0.0, 150.0], "max_map_mass_outside_candidates": 0.99, "min_map_mass_mm2": 100.0},
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
        validated_input=_CHEST_SLICE_INPUT,
        # Map >= 0.5 outside the candidates: 17-86% on 140 chest phantoms (seed 901), 27-40% on real chest slices.
        validated_output={"value": [0.0, 1000.0], "max_map_mass_outside_candidates": 0.95, "min_map_mass_mm2": 100.0},
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
        validated_input={
            "pixel_spacing_mm": [0.5, 1.0], "slice_thickness_mm": [0.5, 5.0], "kvp": [80.0, 140.0],
            # Phantoms are drawn non-contrast, arterial and portal venous; a series that states no agent is unknown.
            "contrast": "any",
            "body_part_examined": ["ABDOMEN", "ABDOMENPELVIS", "LIVER", "CHESTABDOMEN", "CHESTABDPELVIS",
                                   "WHOLEBODY", "PARTIALBODY"],
            "orientation": "axial", "hu_calibration": _HU_CALIBRATION},
        # No map-mass bound: on phantoms 82-100% of the map >= 0.5 is outside the candidates for a correct value.
        validated_output={"value": [0.0, 400.0]},
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
        validated_input={
            # Agatston is defined at 120 kVp and 3 mm: thicker slices miss small lesions, low kVp raises calcium
            # HU; thin slices are scored on 3 mm slabs (the thickness checked is the series' own).
            "pixel_spacing_mm": [0.5, 1.0], "slice_thickness_mm": [0.5, 3.0], "kvp": [100.0, 140.0],
            "contrast": "non_contrast",
            "body_part_examined": ["CHEST", "THORAX", "HEART", "CHESTABDOMEN", "CHESTABDPELVIS", "WHOLEBODY",
                                   "PARTIALBODY"],
            "orientation": "axial",
            # No air peak: a heart-centred calcium-scoring field of view (the phantoms: 180-256 mm) holds no air
            # outside the body, only lung (its "air" mode sits at the window's edge, -912 HU).
            "hu_calibration": {k: v for k, v in _HU_CALIBRATION.items() if k != "air"}},
        # No map-mass bound: on phantoms 97-100% of the map >= 0.5 is outside the (calcium) candidates.
        validated_output={"value": [0.0, 10000.0]},
    ),
}


def get(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}") from None


def with_size(spec: TaskSpec, n: int) -> TaskSpec:
    """The same task with a square model input of n x n."""
    return replace(spec, size=(n, n))


# The shipped cards' `segmentation:` sections, by task (export writes them; tests/test_validated_sections.py checks
# that the shipped cards carry exactly these).
_SEGMENTATION = {'pma': {'type': 'BINARY', 'threshold': 0.5, 'label': 'Pectoralis major muscle', 'category': {'scheme': 'SCT', 'value': '91723000', 'meaning': 'Anatomical Structure'}, 'property_type': {'scheme': 'SCT', 'value': '60005003', 'meaning': 'Pectoralis major muscle'}, 'anatomic_region': {'scheme': 'SCT', 'value': '816094009', 'meaning': 'Chest'}}, 'sfa': {'type': 'BINARY', 'threshold': 0.5, 'label': 'Subcutaneous fat', 'category': {'scheme': 'SCT', 'value': '85756007', 'meaning': 'Tissue'}, 'property_type': {'scheme': 'SCT', 'value': '55603005', 'meaning': 'Fat'}, 'anatomic_region': {'scheme': 'SCT', 'value': '71966008', 'meaning': 'Subcutaneous tissue'}}, 'liver': {'type': 'FRACTIONAL', 'label': 'Liver tumour', 'category': {'scheme': 'SCT', 'value': '49755003', 'meaning': 'Morphologically Abnormal Structure'}, 'property_type': {'scheme': 'SCT', 'value': '108369006', 'meaning': 'Neoplasm'}, 'anatomic_region': {'scheme': 'SCT', 'value': '10200004', 'meaning': 'Liver'}}, 'cac': {'type': 'BINARY', 'label': 'Coronary artery calcium', 'category': {'scheme': 'SCT', 'value': '49755003', 'meaning': 'Morphologically Abnormal Structure'}, 'property_type': {'scheme': 'SCT', 'value': '29483008', 'meaning': 'Calcified atheromatous plaque'}, 'anatomic_region': {'scheme': 'SCT', 'value': '41801008', 'meaning': 'Coronary artery'}}}
for _name, _seg in _SEGMENTATION.items():
    TASKS[_name] = replace(TASKS[_name], segmentation=_seg)
