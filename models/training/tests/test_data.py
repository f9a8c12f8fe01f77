"""CSV + DICOM loading: slice sorting, HU rescale, pixel padding, mask reordering."""

import numpy as np
import pytest
from pydicom.uid import generate_uid

from biomarker_training import data as D
from biomarker_training.synth import generate, write_slice


class TestLoadSeries:
    def test_sorts_along_normal_not_by_name(self, tmp_path):
        study, series = generate_uid(), generate_uid()
        # file names in reverse z order
        for i, z in enumerate([20.0, 10.0, 0.0]):
            write_slice(tmp_path / f"CT{i + 1:04d}.dcm", np.full((4, 4), 100.0 * i), 0.5, z, 3.0, study, series, i + 1)
        s = D.load_series(tmp_path)
        assert s.files == ["CT0003.dcm", "CT0002.dcm", "CT0001.dcm"]
        assert s.hu[:, 0, 0].tolist() == [200.0, 100.0, 0.0]
        assert s.thickness_mm == 3.0 and s.pixel_area_mm2 == 0.25
        mask = np.stack([np.full((4, 4), k, np.uint8) for k in range(3)])  # file order
        np.save(tmp_path / "mask.npy", mask)
        m = D.load_mask(tmp_path, s)
        assert m[0].all() and not m[2].any()  # sorted slice 0 is file 2 (value 2 -> True)

    def test_rescale_and_padding(self, tmp_path):
        hu = np.array([[-1024.0, -100.0], [0.0, 40.0]])
        write_slice(tmp_path / "CT0001.dcm", hu, 0.7, 0.0, 1.0, generate_uid(), generate_uid(), 1, padding=True)
        s = D.load_series(tmp_path)
        assert s.hu[0].tolist() == [[-1024.0, -100.0], [0.0, 40.0]]  # raw 0 is padding -> -1024


class TestCsv:
    def test_relative_and_prepared_cases(self, tmp_path):
        from biomarker_training.tasks import with_size, get
        csv_path = generate("pma", 3, tmp_path / "ph", 3, n=32)
        rows = D.read_csv(csv_path)
        assert len(rows) == 3 and all(d.is_dir() for d, _ in rows)
        spec = with_size(get("pma"), 16)
        cases = D.load_cases(csv_path, spec)
        assert cases[0].x.shape == (1, 16, 16) and cases[0].w.shape == (1, 16, 16)
        # full map over pooled weights reproduces the candidate area; truth <= candidate area
        for c, (_, v) in zip(cases, rows):
            assert c.w.sum() >= v - 1e-6
        again = D.load_cases(csv_path, spec)  # from the cache
        assert np.allclose(again[1].w, cases[1].w)
