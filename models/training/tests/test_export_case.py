"""The case folders of `biomarker-node dataset export` (volume.npy + meta.json) load as DICOM series do."""

import json

import numpy as np
import pytest

from biomarker_training import data as D
from biomarker_training.synth import generate
from biomarker_training.tasks import get, with_size


def write_case(d, s: D.Series, z=None):
    """The layout the node writes (src/dataset/mod.rs): HU float32 [S, R, C] and the geometry."""
    d.mkdir(parents=True)
    np.save(d / "volume.npy", s.hu.astype(np.float32))
    np.save(d / "candidates.npy", np.zeros(s.hu.shape, np.uint8))
    meta = {"pixel_spacing_mm": list(s.pixel_spacing), "slice_thickness_mm": s.thickness_mm,
            "z_mm": z if z is not None else [0.0] * s.hu.shape[0], "rows": s.hu.shape[1], "cols": s.hu.shape[2],
            "route": "pma-single-slice", "model_version": "0.2.0"}
    (d / "meta.json").write_text(json.dumps(meta))


def test_an_export_case_is_the_series_it_was_made_of(tmp_path):
    csv_path = generate("pma", 5, tmp_path / "ph", 2, n=32)
    rows = D.read_csv(csv_path)
    out = tmp_path / "export"
    lines = ["series_dir,value"]
    for i, (d, v) in enumerate(rows):
        s = D.load_series(d)
        write_case(out / "cases" / f"c{i + 1:04d}", s)
        lines.append(f"cases/c{i + 1:04d},{v}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")

    for i, (d, _) in enumerate(rows):
        case = out / "cases" / f"c{i + 1:04d}"
        assert D.is_export_case(case) and not D.is_export_case(d)
        a, b = D.load_series(d), D.load_series(case)
        assert np.array_equal(a.hu, b.hu) and b.hu.dtype == np.float32
        assert b.pixel_spacing == a.pixel_spacing and b.thickness_mm == a.thickness_mm
        assert b.files == ["volume.npy"] and b.file_rank.tolist() == [0]

    spec = with_size(get("pma"), 16)
    from_export = D.load_cases(out / "labels.csv", spec)
    from_dicom = D.load_cases(csv_path, spec)
    assert [c.value for c in from_export] == [v for _, v in rows]
    for a, b in zip(from_dicom, from_export):
        assert np.allclose(a.x, b.x) and np.allclose(a.w, b.w)


def test_a_case_whose_files_disagree_is_refused(tmp_path):
    s = D.Series(np.zeros((2, 4, 4), np.float32), (0.5, 0.5), 3.0, [], np.arange(2))
    write_case(tmp_path / "c1", s, z=[0.0])
    with pytest.raises(ValueError, match="2 slices in volume.npy, 1 in meta.json"):
        D.load_series(tmp_path / "c1")
    write_case(tmp_path / "c2", s)
    meta = json.loads((tmp_path / "c2" / "meta.json").read_text())
    meta["rows"] = 5
    (tmp_path / "c2" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json says 5x4"):
        D.load_series(tmp_path / "c2")
