"""Fixtures shared by the integration suite: real node processes and real data."""

from __future__ import annotations

import pytest

from nodeharness import REALCT, Node, node_binary

# Under CI every skip is a failure (ci_no_skip.py says why).
from ci_no_skip import pytest_make_collect_report, pytest_runtest_makereport, require_dir  # noqa: F401,E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (crash, concurrency, all real data)")


@pytest.fixture(scope="session")
def realct():
    """`../shared/realct` beside the checkout."""
    return require_dir(REALCT, "real CT data (set BIOMARKER_REALCT to override)")


@pytest.fixture(scope="session")
def binary():
    b = node_binary()
    if not b.exists():
        pytest.fail(f"{b} not found: run `cargo build --release` (scripts/test.sh does)")
    return b


@pytest.fixture
def node_factory(tmp_path, binary, realct):
    """make(overrides=None, start=True, name=...) -> Node; all are killed at teardown.

    A node that exited on its own during the test fails the test at teardown:
    every test here doubles as a 'the node stays up' test.
    """
    nodes: list[Node] = []

    def make(overrides: dict | None = None, start: bool = True, name: str | None = None) -> Node:
        n = Node(tmp_path / (name or f"node{len(nodes)}"), overrides)
        nodes.append(n)
        if start:
            n.start()
        return n

    yield make

    died = [n for n in nodes if n.died_unexpectedly()]
    for n in nodes:
        n.kill()
    for n in nodes:
        print(f"--- {n.log_path} (last lines) ---\n{n.log_tail(40)}")
    if died:
        n = died[0]
        pytest.fail(
            f"node exited on its own with status {n.proc.returncode}:\n{n.log_tail(80)}",
            pytrace=False,
        )


@pytest.fixture
def node(node_factory) -> Node:
    """A running node with the suite's default config."""
    return node_factory()
