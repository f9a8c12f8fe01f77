"""Candidate heuristic, Agatston rules, resampling index maps and the aggregation (NumPy reference)."""

import numpy as np
import pytest

from biomarker_training import candidates as C
from biomarker_training.tasks import get


class TestAgatstonWeights:
    @pytest.mark.parametrize("hu,w", [(129.9, 0), (130, 1), (199.9, 1), (200, 2), (299, 2), (300, 3),
                                      (399.5, 3), (400, 4), (1500, 4)])
    def test_edges(self, hu, w):
        assert C.agatston_weight(hu) == w


class TestRiskCategory:
    @pytest.mark.parametrize("score,cat", [(0, "0"), (0.01, "1-10"), (10, "1-10"), (10.01, "11-100"),
                                           (100, "11-100"), (100.5, "101-400"), (400, "101-400"),
                                           (400.01, ">400")])
    def test_edges(self, score, cat):
        assert C.risk_category(score) == cat
        assert C.RISK_CATEGORIES[C.risk_index(score)] == cat


class TestAreaCandidates:
    def test_inclusive_ranges(self):
        spec = get("pma")
        hu = np.array([[[-30, -29, 0, 150, 151]]], dtype=np.float32)
        assert C.candidate_mask(hu, spec, 1.0).tolist() == [[[False, True, True, True, False]]]

    def test_sfa_and_liver_ranges(self):
        hu = np.array([[[-191, -190, -30, -29, -20, 200, 201]]], dtype=np.float32)
        assert C.candidate_mask(hu, get("sfa"), 1.0).tolist() == [[[False, True, True, False, False, False, False]]]
        assert C.candidate_mask(hu, get("liver"), 1.0).tolist() == [[[False, False, False, False, True, True, False]]]


class TestCacLesions:
    def _vol(self):
        hu = np.zeros((2, 10, 10), dtype=np.float32)
        hu[0, 1, 1] = 500  # 1 pixel
        hu[0, 5:7, 5:7] = [[150, 250], [350, 180]]  # 4 pixels, peak 350
        hu[1, 2, 2] = hu[1, 3, 3] = 450  # diagonal neighbours: one 8-connected lesion of 2 px
        return hu

    def test_one_mm2_rule(self):
        spec = get("cac")
        hu = self._vol()
        # pixel area 0.5 mm^2: 1 px = 0.5 < 1 dropped; 2 px = 1.0 >= 1 kept (inclusive)
        cand = C.candidate_mask(hu, spec, 0.5)
        assert not cand[0, 1, 1]
        assert cand[0, 5:7, 5:7].all()
        assert cand[1, 2, 2] and cand[1, 3, 3]
        # pixel area 1.0: the single pixel counts
        assert C.candidate_mask(hu, spec, 1.0)[0, 1, 1]

    def test_eight_connectivity_and_peak_weight(self):
        lesions, labels = C.cac_lesions(self._vol(), get("cac"), 0.5, 3.0)
        assert len(lesions) == 2
        l0 = [l for l in lesions if l.slice == 0][0]
        assert (l0.n_pixels, l0.peak_hu, l0.weight) == (4, 350, 3)
        assert l0.score == pytest.approx(4 * 0.5 * 3)
        l1 = [l for l in lesions if l.slice == 1][0]
        assert (l1.n_pixels, l1.weight) == (2, 4)
        assert labels[1, 2, 2] == labels[1, 3, 3] == l1.label

    def test_thickness_scaling(self):
        spec = get("cac")
        hu = self._vol()
        s3 = sum(l.score for l in C.cac_lesions(hu, spec, 0.5, 3.0)[0])
        s15 = sum(l.score for l in C.cac_lesions(hu, spec, 0.5, 1.5)[0])
        assert s15 == pytest.approx(s3 / 2)
        assert s3 == pytest.approx(4 * 0.5 * 3 + 2 * 0.5 * 4)


class TestResampling:
    def test_area_integer_ratio_is_block_mean(self):
        img = np.arange(64, dtype=np.float64).reshape(8, 8)
        out = C.area_resample(img, (2, 2))
        assert out[0, 0] == pytest.approx(img[:4, :4].mean())
        assert out[1, 1] == pytest.approx(img[4:, 4:].mean())

    def test_area_matches_torch_adaptive_pool(self):
        torch = pytest.importorskip("torch")
        img = np.random.default_rng(0).normal(size=(2, 37, 29))
        ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(img), (16, 12)).numpy()
        assert np.allclose(C.area_resample(img, (16, 12)), ref)

    def test_pool_is_adjoint_of_upsample(self):
        rng = np.random.default_rng(1)
        for native, model in [((12, 12), (4, 4)), ((13, 9), (5, 4)), ((4, 4), (8, 8))]:
            m = rng.random((2,) + model)
            w = rng.random((2,) + native)
            lhs = np.sum(C.upsample_nearest(m, native) * w)
            rhs = np.sum(m * C.pool_to_model(w, model))
            assert lhs == pytest.approx(rhs)


class TestAggregation:
    def test_area_value_with_full_map_is_candidate_area(self):
        spec = get("pma")
        hu = np.full((1, 8, 8), -100.0)
        hu[0, 2:5, 2:6] = 40.0  # 12 candidate pixels
        w, cand, _, _ = C.weight_image(hu, spec, 0.25, 1.0)
        wm = C.pool_to_model(w, (4, 4))
        assert C.aggregate(np.ones((1, 4, 4)), wm) == pytest.approx(12 * 0.25 * 0.01)
        assert C.aggregate(np.zeros((1, 4, 4)), wm) == 0.0

    def test_agatston_value_and_lesion_mean_equivalence(self):
        spec = get("cac")
        hu = np.zeros((1, 8, 8))
        hu[0, 0:2, 0:2] = 250  # weight 2, 4 px
        hu[0, 5:8, 5:8] = 420  # weight 4, 9 px
        area, thick = 0.5, 2.5
        w, cand, lesions, labels = C.weight_image(hu, spec, area, thick)
        m = np.random.default_rng(0).random((1, 8, 8))
        pixel_sum = C.aggregate(m, w)
        lesion_sum = sum(m[0][labels[0] == l.label].mean() * l.score for l in lesions)
        assert pixel_sum == pytest.approx(lesion_sum)
        assert C.aggregate(np.ones((1, 8, 8)), w) == pytest.approx((4 * 2 + 9 * 4) * area * thick / 3)

    def test_normalise_order(self):
        spec = get("pma")
        hu = np.full((1, 256, 256), -1000.0)
        x = C.normalise(hu, spec)
        assert x.shape == (1,) + spec.size and x.dtype == np.float32
        assert np.allclose(x, -1.0)  # clipped to -250 then / 250


class TestLesionAggregation:
    def test_soft_and_threshold(self):
        spec = get("cac")
        hu = np.zeros((1, 8, 8))
        hu[0, 0:2, 0:2] = 250  # weight 2, 4 px -> score 4 * 1 * 2 * 3/3 = 8
        hu[0, 4:8, 4:8] = 420  # weight 4, 16 px -> score 64
        lesions, labels = C.cac_lesions(hu, spec, 1.0, 3.0)
        m = np.zeros((1, 4, 4))  # model map at half resolution
        m[0, 0, 0] = 0.6
        m[0, 2:4, 2:4] = 0.4
        soft = C.agatston_from_map(m, lesions, labels, (8, 8), "soft")
        hard = C.agatston_from_map(m, lesions, labels, (8, 8), "lesion_threshold")
        assert soft == pytest.approx(0.6 * 8 + 0.4 * 64)
        assert hard == pytest.approx(8.0)
        assert C.agatston_from_map(m, [], labels, (8, 8), "lesion_threshold") == 0.0
