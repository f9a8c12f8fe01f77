#!/usr/bin/env python3
"""Micro-benchmark: how the spool's flushes scale with concurrent stores (issue 15).

What it measures: T threads (1, 4, 8), each storing 530 kB "instances" in a loop
into one shared series directory, the way `spool::DiskSpool` does it: an unnamed
O_TMPFILE partial, written in 256 kB pieces with sync_file_range after each (the
spool's early writeback), then linked into place with linkat (through
/proc/self/fd). Three ways to make an instance durable before it is acknowledged:

  a  fsync(file), link, fsync(dir)         each store its own (no group commit)
  b  fsync(file), link, grouped fsync(dir) leader/follower, like the spool's DirSync
                                           today (the node's current path)
  c  link, grouped syncfs(dirfd)           one syncfs per group covers the file's
                                           data, its inode and the directory entry

The group logic (b, c) is the spool's: a store takes a ticket after its link; the
leader reads the highest ticket just before it starts the flush, and only that
flush acknowledges those tickets. Threads release the GIL in os.write, os.fsync,
and in ctypes calls (linkat, syncfs, sync_file_range), so the I/O really is concurrent.

Prints instances/s per (mode, threads). The machine is shared: print `uptime`
beside the numbers. Note that syncfs flushes every dirty page of the whole file
system, so its cost also depends on what other processes write there.

    python3 integration-tests/bench/group_commit.py            # 240 instances per run
    N=400 ROUNDS=3 THREADS="1 8" MODES="b c" SRF=0 DIR=/tmp python3 integration-tests/bench/group_commit.py

Result (issue 15, 2026-12-02, 2-core dev VM, kernel 6.18, ext4 on /dev/vda with
`discard`, /tmp; N=240 per run, 3 rounds, mean inst/s; load average 1.2-2.5 on a
shared machine): a negative result. The group syncfs (c) is only 1-12 % faster
than today's path (b) at 8 threads, 13-22 % at 1 thread, so it was not built.

  run (SRF)        threads      a       b       c    c/b
  1 (srf on)             1    959    1090    1259   1.16
                         4   1636    1615    1765   1.09
                         8   1906    1890    2005   1.06
  2 (srf off)            1    875     875    1048   1.20
                         8   1939    1829    1912   1.05
  3 (srf on)             1    932     949    1067   1.13
                         8   1779    1775    1785   1.01
  4 (srf off)            1    737     686     819   1.19
                         8   1496    1503    1568   1.04
  5 (srf on)             1    767     774     921   1.19
                         8   1528    1502    1611   1.07
  6 (srf on)             1   1046    1015    1234   1.22
                         4   1731    1614    1808   1.12
                         8   1665    1771    1984   1.12

The flush path costs about 1 ms per instance alone (b, 1 thread) and 0.5 ms per
instance at 8 threads: jbd2 already batches concurrent fsyncs into one journal
commit, so grouping them again in user space buys little. In the node itself
(strace -T, 200 instances, 1 sender) the file fsync took 0.38 ms and the
directory fsync 0.15 ms (typical), out of about 3 ms per instance; with 8
senders DirSync made 244 fsyncs for 200 instances (mean 0.68 ms each, run
concurrently). The gap to storescp +B is elsewhere.

One earlier run of a first version (one 530 kB write per file, 2 rounds) saw the
whole file system slow (a: 120 inst/s at 1 thread, c/b 2.26 at 1 thread, 1.10 at
8): a co-tenant's writes make every flush wait (ext4 data=ordered), and syncfs
also writes back other processes' dirty pages, so its cost on a shared spool
file system is not bounded by the spool's own writes.
"""
import ctypes
import os
import shutil
import sys
import tempfile
import threading
import time

SIZE = 530 * 1024
CHUNK = 256 * 1024  # the spool's WRITEBACK_BYTES; the bench's max_pdu
N = int(os.environ.get("N", "240"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
THREADS = [int(t) for t in os.environ.get("THREADS", "1 4 8").split()]
MODES = os.environ.get("MODES", "a b c").split()
SRF = os.environ.get("SRF", "1") == "1"  # SRF=0: no early writeback
BASE = os.environ.get("DIR", tempfile.gettempdir())

libc = ctypes.CDLL(None, use_errno=True)  # ctypes drops the GIL during the call


def syncfs(fd):
    if libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400


def linkat(fd, to):
    """Name an O_TMPFILE inode, like the spool's link_unnamed (Python's
    os.link does not follow the /proc/self/fd link)."""
    rc = libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, to.encode(), AT_SYMLINK_FOLLOW)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), to)


class Group:
    """Leader/follower group flush with tickets (the spool's DirSync logic)."""

    def __init__(self, flush):
        self.flush = flush
        self.cv = threading.Condition()
        self.requested = 0
        self.synced = 0
        self.syncing = False
        self.flushes = 0

    def sync(self):
        with self.cv:
            self.requested += 1
            mine = self.requested
            while True:
                if self.synced >= mine:
                    return
                if self.syncing:
                    self.cv.wait()
                    continue
                self.syncing = True
                covers = self.requested
                self.cv.release()
                try:
                    self.flush()
                    ok = True
                finally:
                    self.cv.acquire()
                    self.syncing = False
                    self.cv.notify_all()
                if ok:
                    self.synced = max(self.synced, covers)
                    self.flushes += 1


def run(mode, threads, n, base):
    series = tempfile.mkdtemp(prefix="gc-series-", dir=base)
    tmp = tempfile.mkdtemp(prefix="gc-tmp-", dir=base)
    dirfd = os.open(series, os.O_RDONLY | os.O_DIRECTORY)
    payload = os.urandom(SIZE)
    if mode == "b":
        group = Group(lambda: os.fsync(dirfd))
    elif mode == "c":
        group = Group(lambda: syncfs(dirfd))
    else:
        group = None
    counter = iter(range(n))
    lock = threading.Lock()
    errors = []

    def worker():
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                fd = os.open(tmp, os.O_TMPFILE | os.O_RDWR, 0o666)
                try:
                    # As the spool: PDV-sized writes, each followed by a
                    # writeback start (sync_file_range WRITE), then the flush.
                    for off in range(0, SIZE, CHUNK):
                        os.write(fd, payload[off:off + CHUNK])
                        if SRF:
                            libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(off + CHUNK), 2)
                    if mode in ("a", "b"):
                        os.fsync(fd)
                    linkat(fd, os.path.join(series, f"{i}.dcm"))
                finally:
                    os.close(fd)
                if mode == "a":
                    d = os.open(series, os.O_RDONLY | os.O_DIRECTORY)
                    os.fsync(d)
                    os.close(d)
                else:
                    group.sync()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    os.close(dirfd)
    shutil.rmtree(series)
    shutil.rmtree(tmp)
    if errors:
        raise errors[0]
    flushes = group.flushes if group else n
    return n / dt, flushes


def main():
    print(f"{N} instances of {SIZE} B per run, {ROUNDS} rounds, sync_file_range {SRF}, under {BASE}, kernel {os.uname().release}")
    print(f"load average before: {os.getloadavg()}")
    results = {}
    for r in range(ROUNDS):
        for threads in THREADS:
            for mode in MODES:
                os.sync()  # start each run with no dirty pages of our own
                rate, flushes = run(mode, threads, N, BASE)
                results.setdefault((mode, threads), []).append(rate)
                print(f"round {r} mode {mode} threads {threads}: {rate:7.1f} inst/s, "
                      f"{N / flushes:4.1f} inst/flush, load {os.getloadavg()[0]:.2f}", flush=True)
    print()
    print("inst/s (best / mean of rounds)")
    print("threads " + "".join(f"{m:>16}" for m in MODES))
    for threads in THREADS:
        row = "".join(f"{max(results[(m, threads)]):8.1f}/{sum(results[(m, threads)]) / ROUNDS:7.1f}" for m in MODES)
        print(f"{threads:7d} {row}")
    if "b" in MODES and "c" in MODES:
        for threads in THREADS:
            b = sum(results[("b", threads)]) / ROUNDS
            c = sum(results[("c", threads)]) / ROUNDS
            print(f"c/b at {threads} threads: {c / b:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
