#!/usr/bin/env python3
"""Crash trials: SIGKILL the node while 8 DCMTK storescu associations store real CT.

    python3 integration-tests/bench/crash_trials.py                  # 20 trials
    python3 integration-tests/bench/crash_trials.py --trials 3       # what CI runs (test_crash_trials.py)

Needs a release build (target/release/biomarker-node, or $BIOMARKER_NODE_BIN),
DCMTK (/usr/bin/storescu, or $DCMTK_BIN) and ../shared/realct.

Data: `--senders` series of `--per-sender` clones of the real chest slice
(explicit VR LE, 530 kB, fresh Study/Series/SOP Instance UIDs, made with
pydicom by integration-tests/instances.py), one directory per sender. The
same files serve every trial: each trial starts a node on an empty data_dir.

One trial:
  1. start a node (nodeharness.Node, its own ports and data_dir);
  2. start one /usr/bin/storescu -v per sender, each sending its directory in
     ONE association, all at once;
  3. read their verbose logs as they come; once a random number of C-STORE
     responses with status Success (0x0000, "Received Store Response
     (Success)") has been seen across all senders, SIGKILL the node;
  4. wait for the senders to give up; the acknowledged instances are those
     whose "Sending file" line is followed by a Success response (read in
     full after the senders exit, so none is missed by the kill racing the
     reader);
  5. restart the node on the same data_dir and wait until `series --json`
     counts, per series, as many instances as the spool holds;
  6. present = SOP Instance UIDs under spool/ after the restart, every file
     whole (pydicom reads it; the pixel data has its full length), tmp/
     empty, the index agreeing with the spool per series, and the node
     answering C-ECHO.

Columns: acked = acknowledged before the kill; present = instances of the
trial under spool/ (and indexed) after the restart; lost = acked but not
present (must be 0); extra = present but never acknowledged. Extra is fine:
the node had fsync'd the instance and the kill came before its response
reached the peer (or the peer's log line); such an instance is whole, and
the sender would send it again, which the node de-duplicates by SOP
Instance UID.

Exit status: 0 when nothing acknowledged was lost and every check held;
1 when an acknowledged instance was lost or a check failed; 2 when the
trials could not run (no binary, no DCMTK, no data, a node that would not
start).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nodeharness import REALCT, Node, dcmtk, echoscu, node_binary  # noqa: E402

SUCCESS = "Received Store Response (Success)"
SENDING = "Sending file: "


class Sender:
    """One /usr/bin/storescu process sending a directory in one association.

    `lines` is its whole verbose log; `live_acks` counts Success responses as
    they are read, only to decide when to kill the node."""

    def __init__(self, node: Node, directory: Path, log_path: Path):
        self.log_path = log_path
        self.lines: list[str] = []
        self.live_acks = 0
        self.proc = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", node.ae_title, "+sd",
             "127.0.0.1", str(node.port), str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, bufsize=1,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if SUCCESS in line:
                self.live_acks += 1

    def finish(self, timeout: float) -> int | str:
        try:
            rc: int | str = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            rc = "timeout"
        self.reader.join(timeout=10)
        self.log_path.write_text("\n".join(self.lines) + "\n")
        return rc

    def acknowledged_files(self) -> list[str]:
        """Paths whose C-STORE got a Success response, from the whole log."""
        out, current = [], None
        for line in self.lines:
            i = line.find(SENDING)
            if i >= 0:
                current = line[i + len(SENDING):].strip()
            elif SUCCESS in line:
                if current is None:
                    raise AssertionError(f"{self.log_path}: a Success response with no file sent before it")
                out.append(current)
                current = None
        return out


@dataclass
class Trial:
    number: int
    kill_after: int
    acked: int = 0
    present: int = 0
    lost: list[str] = field(default_factory=list)
    extra: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.lost and not self.problems


def make_data(root: Path, senders: int, per_sender: int):
    """Returns ({path: sop}, {sop: series}, [series uid per sender])."""
    import instances

    by_path, series_of, series = {}, {}, []
    for i in range(senders):
        s = instances.write_series(root / f"s{i}", per_sender)
        series.append(s.series)
        for inst in s.instances:
            by_path[str(inst.path.resolve())] = inst.sop
            series_of[inst.sop] = s.series
    return by_path, series_of, series


def whole(path: Path, sop: str) -> str | None:
    """None when the spooled file is a complete instance of `sop`, else why not."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        if ds.SOPInstanceUID != sop:
            return f"{path.name}: SOPInstanceUID {ds.SOPInstanceUID}"
        want = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) != want:
            return f"{path.name}: pixel data {len(ds.PixelData)} bytes, {want} expected"
    except Exception as e:  # any read failure is a broken file
        return f"{path.name}: {type(e).__name__}: {e}"
    return None


def run_trial(t: Trial, work: Path, data: Path, senders: int, by_path: dict, series_of: dict,
              series: list[str], keep: bool) -> None:
    t0 = time.monotonic()
    node = Node(work / f"trial{t.number:02d}", {"series": {"quiet_seconds": 2}})
    node.start()
    try:
        procs = [Sender(node, data / f"s{i}", node.workdir / f"storescu{i}.log") for i in range(senders)]
        deadline = time.monotonic() + 120
        while (sum(p.live_acks for p in procs) < t.kill_after
               and any(p.proc.poll() is None for p in procs) and time.monotonic() < deadline):
            time.sleep(0.002)
        node.kill()
        for p in procs:
            p.finish(timeout=60)
        acked_sops = set()
        for p in procs:
            for f in p.acknowledged_files():
                sop = by_path.get(str(Path(f).resolve()))
                if sop is None:
                    t.problems.append(f"storescu acknowledged a file not made for this run: {f}")
                else:
                    acked_sops.add(sop)
        t.acked = len(acked_sops)
        if t.acked == len(by_path):
            t.problems.append("every instance was acknowledged before the kill: nothing was cut off")
        if t.acked == 0:
            t.problems.append("nothing acknowledged before the kill")

        node.start()
        leftovers = [p for p in node.tmp_dir.rglob("*") if p.is_file()] if node.tmp_dir.exists() else []
        if leftovers:
            t.problems.append(f"tmp/ not emptied at start-up: {[str(p) for p in leftovers[:3]]}")
        spooled = node.spool_files()
        stray = [p for p in node.spool_entries() if p.suffix != ".dcm"]
        if stray:
            t.problems.append(f"non-instance files under spool/: {[str(p) for p in stray[:3]]}")
        unknown = set(spooled) - set(series_of)
        if unknown:
            t.problems.append(f"{len(unknown)} instances under spool/ that no sender sent")
        for sop, path in spooled.items():
            why = whole(path, sop)
            if why:
                t.problems.append(f"broken file under spool/: {why}")
        present = set(spooled) & set(series_of)
        t.present = len(present)
        t.lost = sorted(acked_sops - present)
        t.extra = len(present - acked_sops)

        # The index (what routing sees) agrees with the spool, series by series.
        want = {s: sum(1 for sop in present if series_of[sop] == s) for s in series}
        deadline = time.monotonic() + 60
        while True:
            got = {s: e["instances"] for s, e in node.series_by_uid().items()}
            if all(got.get(s, 0) == n for s, n in want.items()):
                break
            if time.monotonic() > deadline:
                bad = {s[-12:]: (got.get(s, 0), n) for s, n in want.items() if got.get(s, 0) != n}
                t.problems.append(f"index (series --json) vs spool per series after restart: {bad}")
                break
            time.sleep(0.2)
        r = echoscu(node)
        if r.returncode != 0:
            t.problems.append(f"no C-ECHO after restart: {r.stdout}{r.stderr}")
    finally:
        node.kill()
        t.seconds = time.monotonic() - t0
        if t.ok and not keep:
            shutil.rmtree(node.workdir, ignore_errors=True)
        elif not t.ok:
            print(f"trial {t.number}: kept {node.workdir}\n{node.log_tail(20)}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--per-sender", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1, help="seeds the kill points (the data has fresh UIDs each run)")
    ap.add_argument("--keep", action="store_true", help="keep every trial's data_dir and logs")
    args = ap.parse_args()

    missing = [str(p) for p in (node_binary(), Path(dcmtk("storescu")), Path(dcmtk("echoscu"))) if not p.exists()]
    if not REALCT.is_dir():
        missing.append(str(REALCT))
    if missing:
        print(f"crash_trials: missing {missing}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="crash-trials."))
    total = args.senders * args.per_sender
    print(f"== {args.trials} trials, {args.senders} storescu associations x {args.per_sender} instances "
          f"(real CT clones, 530 kB), work dir {work}", flush=True)
    by_path, series_of, series = make_data(work / "data", args.senders, args.per_sender)
    rng = random.Random(args.seed)
    trials = []
    try:
        for n in range(1, args.trials + 1):
            # Anywhere from the first few responses to most of the data: early
            # kills hit associations still negotiating, late ones hit the
            # index catching up.
            t = Trial(n, kill_after=rng.randint(max(1, total // 40), total * 9 // 10))
            try:
                run_trial(t, work / "trials", work / "data", args.senders, by_path, series_of, series, args.keep)
            except Exception as e:  # a node that would not (re)start, a tool that hung
                t.problems.append(f"{type(e).__name__}: {e}")
            trials.append(t)
            print(f"trial {n:2d}: kill after {t.kill_after:3d} acks: acked {t.acked}, present {t.present}, "
                  f"lost {len(t.lost)}, extra {t.extra} ({t.seconds:.1f}s)"
                  + ("" if t.ok else f"  PROBLEMS: {t.problems[:3]}"), flush=True)
    finally:
        if all(t.ok for t in trials) and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"SIGKILL under {args.senders} concurrent /usr/bin/storescu associations, {total} instances offered per trial")
    print(f"{'trial':>5} {'acked':>6} {'present':>8} {'lost':>5} {'extra':>6}  checks")
    for t in trials:
        print(f"{t.number:>5} {t.acked:>6} {t.present:>8} {len(t.lost):>5} {t.extra:>6}  "
              + ("ok" if t.ok else "; ".join(([f"LOST {len(t.lost)}"] if t.lost else []) + t.problems)[:200]))
    lost = sum(len(t.lost) for t in trials)
    extra = sum(t.extra for t in trials)
    print(f"total: acked {sum(t.acked for t in trials)}, present {sum(t.present for t in trials)}, "
          f"lost {lost}, extra {extra}")
    if extra:
        print("extra = stored (fsync'd) but its Success response never reached the peer before the kill: "
              "whole files, allowed; a resend is de-duplicated by SOP Instance UID")
    for t in trials:
        if t.lost:
            print(f"trial {t.number}: LOST {len(t.lost)} acknowledged instances, e.g. {t.lost[:3]}")
    failed = [t.number for t in trials if not t.ok]
    if failed:
        print(f"FAILED trials: {failed}")
        return 1
    print("OK: nothing acknowledged was lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
