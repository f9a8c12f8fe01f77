"""The model cards' out-of-distribution guard sections (`validated_input:`, `validated_output:`) come from tasks.py:
export writes them, and the four shipped cards carry exactly them (biomarker-node's inference/guard.rs reads them)."""

from pathlib import Path

import yaml

from biomarker_training import export, tasks

MODELS = Path(__file__).resolve().parents[2]


def test_export_writes_the_sections_and_the_shipped_cards_match():
    for name in ("pma", "sfa", "liver", "cac"):
        spec = tasks.get(name)
        card = export.card_dict(spec, "localization", f"{name}.onnx", "0" * 64, [8], {}, {}, "0.0.0")
        assert card["validated_input"] == spec.validated_input
        assert card["validated_output"] == spec.validated_output
        shipped = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
        assert shipped["validated_input"] == spec.validated_input, name
        assert shipped["validated_output"] == spec.validated_output, name
        # and the SEG codes, so that a retrained card keeps them
        assert card["segmentation"] == spec.segmentation == shipped["segmentation"], name
        v = spec.validated_input
        for key in ("pixel_spacing_mm", "slice_thickness_mm", "kvp"):
            lo, hi = v[key]
            assert lo <= hi
        # The node accepts real chest CT: 0.5-1.0 mm pixels, 80/100-140 kVp.
        assert v["pixel_spacing_mm"] == [0.5, 1.0]
        if name != "cac":  # a heart-centred CAC field of view has no outside air: no air peak checked
            assert v["hu_calibration"]["air"]["expected_hu"] == -1000.0
        assert v["hu_calibration"]["fat"]["expected_hu"] == -100.0
    assert tasks.get("cac").validated_input["contrast"] == "non_contrast"
    assert tasks.get("pma").validated_input["level"] == "above_aortic_arch"
