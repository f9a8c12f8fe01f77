"""Start, stop, crash and inspect a real biomarker-node process.

A `Node` owns one temporary directory: its config file, its data_dir and its
log. It can be killed and restarted on the same data_dir, which is how the
crash tests work. Everything about the spool layout the tests rely on is in
this file, so a change of layout is a change here only:

    <data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <data_dir>/tmp/          partial transfers, never visible under spool/
    <data_dir>/index.sqlite
"""

from __future__ import annotations

import copy
import re
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _find_realct() -> Path:
    """`../shared/realct` beside the checkout (CI lays it there), or $BIOMARKER_REALCT."""
    env = os.environ.get("BIOMARKER_REALCT")
    if env:
        return Path(env).resolve()
    # The checkout may be reached through a symlink; try the path as given
    # and as resolved.
    for root in (Path(os.path.abspath(REPO_ROOT)), REPO_ROOT):
        cand = (root.parent / "shared" / "realct").resolve()
        if cand.is_dir():
            return cand
    return (REPO_ROOT.parent / "shared" / "realct").resolve()


REALCT = _find_realct()

# DCMTK's tools, by absolute path: pip's pynetdicom installs console scripts
# called storescu/echoscu/storescp that shadow DCMTK's on a pyenv PATH and
# take different options.
DCMTK_BIN = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))


def dcmtk(tool: str) -> str:
    return str(DCMTK_BIN / tool)


def node_binary() -> Path:
    env = os.environ.get("BIOMARKER_NODE_BIN")
    return Path(env) if env else REPO_ROOT / "target" / "release" / "biomarker-node"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Calling AE titles the suite uses. HOSTBOUND may only call from 127.0.0.1.
DEFAULT_CALLERS = [
    {"ae_title": "STORESCU"},
    {"ae_title": "ECHOSCU"},
    {"ae_title": "PYNETDICOM"},
    {"ae_title": "RAWSCU"},
    {"ae_title": "HOSTBOUND", "host": "127.0.0.1"},
]


def default_config(data_dir: Path, port: int, http_port: int) -> dict:
    return {
        # Every node gets its own HTTP port so tests can run side by side.
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "node": {
            "ae_title": "BIOMARKER",
            "bind": "127.0.0.1",
            "port": port,
            "data_dir": str(data_dir),
            "max_pdu": 262144,
            "max_associations": 16,
            # The tests write at most a few GB; the disk test sets this high.
            "min_free_disk_mb": 64,
            "timeouts": {"association_request_s": 10, "read_s": 10, "idle_s": 30},
            "allowed_callers": copy.deepcopy(DEFAULT_CALLERS),
        },
        "series": {"quiet_seconds": 0.5, "early_completion": True, "spacing_tolerance": 0.1},
        "log": {"format": "text", "level": "info"},
    }


class NodeDied(AssertionError):
    pass


class Node:
    """One biomarker-node process on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path, overrides: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.port = free_port()
        self.http_port = free_port()
        self.config = _merge(default_config(self.data_dir, self.port, self.http_port), overrides or {})
        self.config_path = self.workdir / "node.yaml"
        self.log_path = self.workdir / "node.log"
        self.proc: subprocess.Popen | None = None
        self._expected_exit = False
        # Appended to `serve --config F` (e.g. `["--role", "receiver"]`).
        self.serve_args: list[str] = []
        self.write_config()

    # ---------------------------------------------------------------- config
    def write_config(self) -> None:
        # JSON is YAML 1.2 flow syntax; serde_yaml reads it as written.
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")

    def reconfigure(self, overrides: dict) -> None:
        """New settings for the next start (same port and data_dir)."""
        self.config = _merge(self.config, overrides)
        self.write_config()

    @property
    def ae_title(self) -> str:
        return self.config["node"]["ae_title"]

    # ---------------------------------------------------------------- process
    def start(self, timeout: float = 30.0) -> "Node":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        binary = node_binary()
        if not binary.exists():
            raise FileNotFoundError(f"{binary} missing: run `cargo build --release` first")
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.config_path), *self.serve_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        self._expected_exit = False
        self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeDied(
                    f"node exited with {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"node did not listen on {self.port} within {timeout}s:\n{self.log_tail()}")

    # ------------------------------------------------------------------ http
    def http(self, path: str, method: str = "GET", body: bytes | None = None,
             token: str | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        """One request to the node's HTTP interface: (status, headers, body)."""
        import urllib.error
        import urllib.request

        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def http_json(self, path: str, method: str = "GET", body: bytes | None = None, token: str | None = None,
                  expect: int = 200):
        status, _, data = self.http(path, method, body, token)
        assert status == expect, f"{method} {path}: HTTP {status}, expected {expect}: {data[:500]!r}"
        return json.loads(data)

    def _record_peak_rss(self) -> None:
        """With BIOMARKER_RSS_REPORT=FILE, append `test<TAB>peak MiB` before the
        node goes away: the figures behind the closing note's attack table."""
        out = os.environ.get("BIOMARKER_RSS_REPORT")
        if not out or not self.running():
            return
        try:
            rss = self.peak_rss_mib()
        except (OSError, AssertionError):
            return
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(out, "a") as f:
            f.write(f"{test}\t{rss:.1f}\n")

    def kill(self) -> None:
        """SIGKILL: the crash the node must survive."""
        self._record_peak_rss()
        if self.proc and self.proc.poll() is None:
            self._expected_exit = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL if it does not exit in time."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self._record_peak_rss()
        self._expected_exit = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def restart(self, kill: bool = False) -> "Node":
        self.kill() if kill else self.stop()
        return self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        if not self.running():
            raise NodeDied(
                f"node is not running (exit {self.proc.returncode if self.proc else None}):\n"
                f"{self.log_tail()}"
            )

    def peak_rss_mib(self) -> float:
        """VmHWM of the running node: its peak resident memory so far."""
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc status")

    def died_unexpectedly(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None and not self._expected_exit

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = _ANSI.sub("", self.log_text())
        return "\n".join(text.splitlines()[-lines:])

    # ---------------------------------------------------------------- CLI
    def series(self) -> list[dict]:
        """`biomarker-node series --json`: one JSON object per line."""
        r = subprocess.run(
            [str(node_binary()), "series", "--config", str(self.config_path), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, f"series --json exited {r.returncode}:\n{r.stderr}"
        out = []
        for line in r.stdout.splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line))
        return out

    def series_by_uid(self) -> dict[str, dict]:
        return {s["series_instance_uid"]: s for s in self.series()}

    def wait_series(self, uid: str, pred, timeout: float, poll: float = 0.1) -> dict | None:
        """Poll `series --json` until pred(entry) holds; returns the entry or the last seen."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.series_by_uid().get(uid)
            if last is not None and pred(last):
                return last
            if time.monotonic() >= deadline:
                return last
            time.sleep(poll)

    # ---------------------------------------------------------------- spool
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite"

    def spool_path(self, study: str, series: str, sop: str) -> Path:
        return self.spool_dir / study / series / f"{sop}.dcm"

    def spool_files(self) -> dict[str, Path]:
        """SOP Instance UID -> path, for every instance under spool/."""
        out = {}
        if self.spool_dir.exists():
            for p in self.spool_dir.glob("*/*/*.dcm"):
                out[p.stem] = p
        return out

    def spool_entries(self) -> list[Path]:
        """Every file under spool/, whatever its name: stray files count too."""
        if not self.spool_dir.exists():
            return []
        return sorted(p for p in self.spool_dir.rglob("*") if p.is_file())

    def spool_digest(self) -> dict[str, str]:
        return {str(p.relative_to(self.spool_dir)): sha256(p) for p in self.spool_entries()}


def completed(entry: dict | None) -> bool:
    """A series that has completed: `complete`, or any later stage's state
    (routing and analysis move it on), with the reason it completed."""
    return (
        entry is not None
        and entry["state"] != "receiving"
        and entry["completion_reason"] in ("quiet_timer", "association_released")
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------- DCMTK peers


def run_tool(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def echoscu(node: Node, calling: str = "ECHOSCU", called: str | None = None) -> subprocess.CompletedProcess:
    return run_tool(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called or node.ae_title, "127.0.0.1", str(node.port)],
        timeout=30,
    )


def storescu(
    node: Node,
    files: list,
    calling: str = "STORESCU",
    extra: list[str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """All `files` in one association (storescu sends every file it is given in one)."""
    return run_tool(
        [dcmtk("storescu"), "-v", "-aet", calling, "-aec", node.ae_title, *(extra or []),
         "127.0.0.1", str(node.port), *[str(f) for f in files]],
        timeout=timeout,
    )


def assert_serving(node: Node) -> None:
    """The node is up and answers a C-ECHO from a well-behaved peer."""
    node.assert_alive()
    r = echoscu(node)
    assert r.returncode == 0, f"echoscu failed ({r.returncode}):\n{r.stdout}{r.stderr}\n--- node log ---\n{node.log_tail()}"


def storescu_exact(node: Node, path, sop_class: str, ts: str, workdir: Path, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    """storescu proposing exactly one presentation context: (sop_class, ts).

    Plain storescu proposes only uncompressed syntaxes and converts (or fails
    to convert) compressed files; `-R` does not change that. An association
    profile (-xf) makes it send each file in its own transfer syntax, or fail
    with "No Acceptable Presentation Contexts" when the node refuses it.
    """
    cfg = Path(workdir) / f"storescu-{sop_class}-{ts}.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = " + ts + "\n\n"
        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = " + sop_class + "\\TS\n\n"
        "[[Profiles]]\n[EXACT]\nPresentationContexts = PC\n"
    )
    return storescu(node, [path], calling=calling, extra=["-xf", str(cfg), "EXACT"], timeout=60)
