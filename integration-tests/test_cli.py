"""The command line around `serve`: config checking and failure modes a user hits first."""

from __future__ import annotations

import json
import subprocess

from nodeharness import Node, node_binary


def _run(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(node_binary()), *map(str, args)], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_check_config_accepts_the_test_config(tmp_path, binary, realct):
    n = Node(tmp_path / "n")
    r = _run("check-config", "--config", n.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout


def test_check_config_names_the_bad_key(tmp_path, binary, realct):
    n = Node(tmp_path / "n", {"node": {"colour": "blue"}})
    r = _run("check-config", "--config", n.config_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "colour" in r.stderr


def test_check_config_range_errors_are_positioned(tmp_path, binary, realct):
    n = Node(tmp_path / "n", {"node": {"max_pdu": 100}})
    r = _run("check-config", "--config", n.config_path)
    assert r.returncode == 2
    assert "node.max_pdu" in r.stderr


def test_serve_with_a_bad_config_exits_at_once(tmp_path, binary, realct):
    n = Node(tmp_path / "n", {"node": {"ae_title": "THIS_AE_TITLE_IS_TOO_LONG"}})
    r = _run("serve", "--config", n.config_path, timeout=20)
    assert r.returncode != 0
    assert "ae_title" in r.stderr


def test_serve_refuses_a_port_in_use(node, tmp_path):
    other = Node(tmp_path / "other")
    other.config["node"]["port"] = node.port
    other.write_config()
    r = _run("serve", "--config", other.config_path, timeout=20)
    assert r.returncode != 0, "a second node started on a port already in use"


def test_series_json_is_valid_json_lines(node, tmp_path):
    import instances
    from nodeharness import storescu

    s = instances.write_series(tmp_path / "in", 2)
    assert storescu(node, s.paths).returncode == 0
    r = _run("series", "--config", node.config_path, "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [row["series_instance_uid"] for row in rows] == [s.series]
    r = _run("series", "--config", node.config_path)
    assert r.returncode == 0 and s.series in r.stdout


def test_default_config_passes_check_config(binary):
    """README's first command serves config/node.yaml: in a fresh clone it must pass
    the same check `serve` runs at start-up (model cards present, routes valid)."""
    from nodeharness import REPO_ROOT

    r = _run("check-config", "--config", REPO_ROOT / "config" / "node.yaml")
    assert r.returncode == 0, f"config/node.yaml fails check-config; `serve` would refuse it:\n{r.stderr}"


def test_sighup_reloads_instead_of_killing(node, tmp_path):
    """SIGHUP re-reads the config (README); it must not end the process, valid config or not."""
    import signal
    import time

    from nodeharness import assert_serving

    node.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert_serving(node)
    node.config_path.write_text("node: [this is not a config\n")
    node.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert_serving(node)
