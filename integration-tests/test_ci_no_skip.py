"""The CI rule of ci_no_skip.py, checked on a throw-away suite run by a real pytest:
under CI every kind of skip fails with its reason; off CI it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITE = '''
import pytest

def test_runtime_skip():
    pytest.skip("no shared data here")

@pytest.mark.skipif(True, reason="marker says no")
def test_marker_skip():
    pass

def test_importorskip():
    pytest.importorskip("no_such_module_for_ci_no_skip")

@pytest.fixture
def data():
    pytest.skip("fixture says no")

def test_fixture_skip(data):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    assert False

def test_passes():
    pass
'''
MODULE_SKIP = '''
import pytest
pytest.skip("whole module", allow_module_level=True)
'''
CONFTEST = "from ci_no_skip import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"


def _run(tmp_path: Path, ci: str | None, files: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    return r


def test_skips_fail_under_ci(tmp_path):
    r = _run(tmp_path, "true", {"test_suite.py": SUITE})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    # A skip during setup (marker, fixture) is reported as an error, one in the call as a failure.
    assert "2 failed, 1 passed, 1 xfailed, 2 errors" in out, out
    for reason in ("no shared data here", "marker says no", "no_such_module_for_ci_no_skip", "fixture says no"):
        assert reason in out, f"{reason!r} not reported:\n{out}"
    assert "skipped under CI" in out


def test_module_level_skip_is_an_error_under_ci(tmp_path):
    r = _run(tmp_path, "true", {"test_module_skip.py": MODULE_SKIP})
    out = r.stdout + r.stderr
    assert r.returncode not in (0, 5), out
    assert "whole module" in out and "skipped under CI" in out, out


def test_skips_stay_skips_off_ci(tmp_path):
    r = _run(tmp_path, None, {"test_suite.py": SUITE, "test_module_skip.py": MODULE_SKIP})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "5 skipped" in out and "1 passed" in out and "1 xfailed" in out, out
