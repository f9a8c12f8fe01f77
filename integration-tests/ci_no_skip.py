"""Under CI a skip is a failure: a pytest plugin (conftest.py imports its hooks).

CI lays out everything the suite needs (../shared/realct, the models, DCMTK,
Orthanc, ONNX Runtime, a browser). A test that skips there has not run, and
a suite that is green because its tests skipped proves nothing, so every
skip (pytest.skip, skip/skipif markers, importorskip, a module-level skip)
is reported as a failure with its reason when CI is set (to anything but
empty, as the fixtures' own CI checks read it). Expected failures (xfail)
are left as they are. Off CI a skip stays a skip.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def require_dir(path, what: str):
    """`path` if it is a directory. Missing data is a failure in CI, a skip elsewhere."""
    if not path.is_dir():
        msg = f"{what} not found at {path}"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _reason(longrepr) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail(rep) -> None:
    rep.outcome = "failed"
    rep.longrepr = f"skipped under CI (CI={os.environ.get('CI')!r}), which is a failure: {_reason(rep.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and in_ci() and not hasattr(rep, "wasxfail"):
        _fail(rep)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and in_ci():
        _fail(rep)
