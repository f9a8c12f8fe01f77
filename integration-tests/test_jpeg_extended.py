"""JPEG Extended (1.2.840.10008.1.2.4.51, 12-bit lossy DCT) from DCMTK's storescu.

The two .51 objects under shared/realct (the chest slice's .51 encoding and
WG04 CT0012, an Enhanced CT in fragmented JPEG without offset table) are sent
by /usr/bin/storescu with its 12-bit JPEG proposal (`-xx`: .51 plus the
uncompressed syntaxes). The node must acknowledge them with 0x0000, store
them as sent (still .51: storescu did not fall back to decompressing), and
the stored files must be readable by `route` and analysable by `analyze`,
with the chest slice's PMA/SFA values close to those of its uncompressed
encoding (the pixel-level comparison with dcmdjpeg is the Rust test
volume::tests::jpeg_extended_12bit_matches_dcmtk_dcmdjpeg).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pydicom
import yaml

from cards import without_guard
from nodeharness import REPO_ROOT, assert_serving, node_binary, run_tool, storescu

CONFIG = REPO_ROOT / "config" / "node.yaml"

JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
CHEST_51 = "chest-slice-encodings/CTImage.dcm_JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51.dcm"
CHEST_IMPLICIT = "chest-slice-encodings/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm"
CT0012 = "wg04-single-slices/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"


def _analysis_config(tmp_path: Path) -> Path:
    """config/node.yaml (models, ONNX Runtime) with paths made absolute and
    routes for PMA and SFA on any single CT slice, whatever its description
    or ImageType (both chest encodings are DERIVED: lossy)."""
    cfg = yaml.safe_load(CONFIG.read_text())
    base = CONFIG.parent
    cfg["onnxruntime"]["library"] = str((base / cfg["onnxruntime"]["library"]).resolve())
    # Cards without the input guard: the chest slice is at the larynx and CT0012 is a brain perfusion map, which
    # the shipped cards refuse (test_input_guard.py); this test is about decoding.
    for name, m in cfg["models"].items():
        m["card"] = str(without_guard(name, tmp_path / "cards"))
    cfg["node"]["data_dir"] = str(tmp_path / "analyze-data")
    single_ct = {"all": [
        {"derived": "sop_class", "one_of": ["CT Image Storage"]},
        {"derived": "slice_count", "range": {"min": 1, "max": 1}},
    ]}
    cfg["routes"] = [
        {"name": f"{m}-any-slice", "model": m, "send_to": ["pacs"], "slices": {"mode": "single"}, "match": single_ct}
        for m in ("pma", "sfa")
    ]
    # CT0012 is a 2-frame Enhanced CT: the model runs on its middle frame.
    cfg["routes"].append({"name": "pma-enhanced", "model": "pma", "send_to": ["pacs"],
                          "match": {"derived": "sop_class", "one_of": ["Enhanced CT Image Storage"]}})
    path = tmp_path / "analyze.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _analyze(config: Path, out: Path, files: list[Path]) -> dict[str, dict]:
    """`biomarker-node analyze`: route -> JSON line (it exits non-zero when a job fails)."""
    r = run_tool([str(node_binary()), "analyze", "--config", str(config), "--out", str(out),
                  *[str(f) for f in files]], timeout=600)
    assert r.returncode == 0, f"analyze exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    lines = {}
    for line in r.stdout.splitlines():
        if line.strip().startswith("{"):
            j = json.loads(line)
            lines[j["route"]] = j
    return lines


def test_storescu_sends_jpeg_extended_and_the_series_is_analyzable(node_factory, realct, tmp_path):
    node = node_factory()
    sources = [realct / CHEST_51, realct / CT0012]
    for src in sources:
        assert pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG_EXTENDED, src

    r = storescu(node, sources, extra=["-xx"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"storescu rc={r.returncode}:\n{out[-2000:]}"
    assert out.count("Received Store Response (Success)") == len(sources), out[-2000:]

    stored = []
    for src in sources:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        path = node.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert path.is_file(), f"{src.name}: acknowledged but not stored at {path}"
        got = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert got == JPEG_EXTENDED, f"{src.name}: stored as {got}: storescu did not send .51"
        stored.append((ds, path))
    assert_serving(node)

    # route reads both stored objects (headers) and groups them into their series.
    r = run_tool([str(node_binary()), "route", "--config", str(node.config_path), *[str(p) for _, p in stored]])
    assert r.returncode == 0, f"route exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    for ds, _ in stored:
        assert ds.SeriesInstanceUID in r.stdout, f"route did not list {ds.SeriesInstanceUID}:\n{r.stdout}"

    # analyze decodes the stored chest slice (.51) and measures it like the uncompressed original.
    config = _analysis_config(tmp_path)
    chest = _analyze(config, tmp_path / "out-51", [stored[0][1]])
    reference = _analyze(config, tmp_path / "out-ref", [realct / CHEST_IMPLICIT])
    assert set(reference) == {"pma-any-slice", "sfa-any-slice"}, reference
    assert set(chest) == set(reference), f".51: {chest}\nuncompressed: {reference}"
    for route, ref in reference.items():
        got = chest[route]
        rel = abs(got["value"] - ref["value"]) / max(abs(ref["value"]), 1e-9)
        print(f"{route}: .51 {got['value']:.4f} vs uncompressed {ref['value']:.4f} (rel diff {rel:.2e})")
        assert rel <= 0.02, f"{route}: .51 gives {got['value']}, uncompressed {ref['value']}"

    # The Enhanced CT (2 frames in 11 fragments, no offset table) is decoded and measured too.
    enhanced = _analyze(config, tmp_path / "out-ct0012", [stored[1][1]])
    assert set(enhanced) == {"pma-enhanced"}, enhanced
    line = enhanced["pma-enhanced"]
    assert line["slices"] == 1 and math.isfinite(line["value"]), line
    print(f"CT0012 pma-enhanced: {line['value']:.4f} {line['unit']}")

    assert_serving(node)
