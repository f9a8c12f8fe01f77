"""Series completion as seen through `biomarker-node series --json`."""

from __future__ import annotations

import time

import instances
from nodeharness import completed, storescu


def _release_and_time(node, files) -> float:
    r = storescu(node, files)
    assert r.returncode == 0, r.stdout + r.stderr
    return time.monotonic()  # storescu has exited: the association is released


class TestSeriesJson:
    def test_fields_and_counts(self, node, tmp_path):
        s = instances.write_series(tmp_path / "a", 4)
        _release_and_time(node, s.paths)
        entry = node.wait_series(s.series, completed, timeout=10)
        assert entry is not None, f"series missing from series --json: {node.series()}"
        for key in ("series_instance_uid", "state", "instances", "completion_reason"):
            assert key in entry, f"{key} missing from {entry}"
        assert entry["instances"] == 4
        assert completed(entry)

    def test_empty_node_lists_nothing(self, node):
        assert node.series() == []

    def test_works_while_serving_and_after_stop(self, node, tmp_path):
        s = instances.write_series(tmp_path / "a", 2)
        _release_and_time(node, s.paths)
        assert s.series in node.series_by_uid()
        node.stop()
        assert s.series in node.series_by_uid()

    def test_several_series_in_one_association(self, node, tmp_path):
        a = instances.write_series(tmp_path / "a", 3)
        b = instances.write_series(tmp_path / "b", 5, study=a.study)
        _release_and_time(node, a.paths + b.paths)
        for s, n in ((a, 3), (b, 5)):
            e = node.wait_series(s.series, completed, timeout=10)
            assert e and e["instances"] == n and completed(e), e


class TestCompletion:
    def test_whole_series_completes_on_release(self, node_factory, tmp_path):
        # A long quiet timer, so only early completion can finish it in time.
        node = node_factory({"series": {"quiet_seconds": 30, "early_completion": True}})
        s = instances.write_series(tmp_path / "a", 6)
        released = _release_and_time(node, s.paths)
        e = node.wait_series(s.series, completed, timeout=1.0, poll=0.05)
        took = time.monotonic() - released
        assert e is not None and completed(e), f"not complete {took:.2f}s after release: {e}"
        assert e["completion_reason"] == "association_released"
        assert e["instances"] == 6

    def test_series_with_gap_waits_for_quiet_timer(self, node_factory, tmp_path):
        node = node_factory({"series": {"quiet_seconds": 3, "early_completion": True}})
        s = instances.write_series(tmp_path / "a", 7, skip=(3,))
        released = _release_and_time(node, s.paths)
        time.sleep(1.0)
        e = node.series_by_uid().get(s.series)
        assert e is not None
        assert e["state"] == "receiving", f"a series with a missing slice completed early: {e}"
        assert e["completion_reason"] is None
        e = node.wait_series(s.series, completed, timeout=8)
        took = time.monotonic() - released
        assert completed(e), f"still {e['state']} {took:.1f}s after release"
        assert e["completion_reason"] == "quiet_timer"
        assert took >= 2.5, f"completed after {took:.1f}s, before quiet_seconds=3"
        assert e["instances"] == 6

    def test_early_completion_off_waits_for_quiet_timer(self, node_factory, tmp_path):
        node = node_factory({"series": {"quiet_seconds": 2, "early_completion": False}})
        s = instances.write_series(tmp_path / "a", 4)
        _release_and_time(node, s.paths)
        e = node.series_by_uid()[s.series]
        assert e["state"] == "receiving", e
        e = node.wait_series(s.series, completed, timeout=8)
        assert completed(e) and e["completion_reason"] == "quiet_timer", e

    def test_single_slice_series_completes_by_quiet_timer(self, node, tmp_path):
        # quiet_seconds is 0.5 in the default test config.
        s = instances.write_series(tmp_path / "a", 1)
        _release_and_time(node, s.paths)
        e = node.wait_series(s.series, completed, timeout=5)
        assert e and completed(e), e
        assert e["completion_reason"] in ("quiet_timer", "association_released")
