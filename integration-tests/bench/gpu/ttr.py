"""Time to result on the GPU machine: last C-STORE acknowledged by the node -> the SRs received by the PACS.

    python3 ttr.py NODE_BIN SERIES_DIR PROVIDER RUNS

The GPU machine has neither DCMTK nor Orthanc, so this is bench/time_to_result.sh's volume case with pynetdicom on
both sides:
- the PACS is a pynetdicom storage SCP in this process, which notes when each SR arrives;
- the sender is a pynetdicom SCU, which sends SERIES_DIR in one association and releases it (t0).

The node runs config/node.yaml's PMA, SFA and CAC routes, with every model on PROVIDER (cpu or cuda), early
completion on and quiet_seconds 30, so only early completion can finish a series in time. Each run gives the series
new Study, Series and SOP Instance UIDs, so the node sees a new study.
Prints one line per run: each SR's arrival after t0, and the last one (the time to result).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

ROUTES = ("pma-single-slice", "sfa-single-slice", "cac-non-contrast")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the node exited during start-up:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"the node never listened on {port}")


def main() -> None:
    node_bin, series_dir, provider, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    root = Path(__file__).resolve().parents[3]
    work = Path(tempfile.mkdtemp(prefix="ttr-gpu."))

    arrivals = []  # (time, modality, study)
    lock = threading.Lock()

    def on_store(event):
        ds = event.dataset
        with lock:
            arrivals.append((time.time(), str(ds.get("Modality", "")), str(ds.get("StudyInstanceUID", ""))))
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.supported_contexts = AllStoragePresentationContexts
    pacs_port = free_port()
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    cfg = yaml.safe_load(open(root / "config" / "node.yaml"))
    node_port = free_port()
    node_cfg = {
        "node": {"ae_title": "BIOMARKER", "bind": "127.0.0.1", "port": node_port, "data_dir": str(work / "data"),
                 "min_free_disk_mb": 64},
        "series": {"quiet_seconds": 30, "early_completion": True},
        "log": {"format": "json", "level": "info,ort=warn"},
        "models": {m: {"card": str(root / "models" / f"{m}.yaml"), "execution_provider": provider}
                   for m in ("pma", "sfa", "cac", "liver")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        "routes": [r for r in cfg["routes"] if r["name"] in ROUTES],
        "http": {"enabled": False},
    }
    (work / "node.yaml").write_text(json.dumps(node_cfg, indent=1))
    log = work / "node.log"
    proc = subprocess.Popen([node_bin, "serve", "--config", str(work / "node.yaml")], stderr=open(log, "w"))
    try:
        wait_port(node_port, proc, log)
        files = sorted(series_dir.glob("*.dcm"))
        datasets = [pydicom.dcmread(f) for f in files]
        ts = datasets[0].file_meta.TransferSyntaxUID
        sender = AE(ae_title="BENCH")
        sender.add_requested_context(datasets[0].SOPClassUID, [ts])
        for run in range(1, runs + 1):
            tag = f"{provider}-{run}-{time.time()}"
            study, series = generate_uid(entropy_srcs=[tag, "study"]), generate_uid(entropy_srcs=[tag, "series"])
            for i, ds in enumerate(datasets):
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(i)])
            t_send = time.time()
            assoc = sender.associate("127.0.0.1", node_port, ae_title="BIOMARKER")
            if not assoc.is_established:
                sys.exit("the node refused the association")
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or status.Status != 0:
                    sys.exit(f"C-STORE failed: {status}")
            assoc.release()
            t0 = time.time()
            deadline = t0 + 60
            while True:
                with lock:
                    srs = sorted(t for t, mod, st in arrivals if mod == "SR" and st == study)
                if len(srs) >= len(ROUTES) or time.time() > deadline:
                    break
                time.sleep(0.005)
            got = ", ".join(f"{t - t0:.2f}" for t in srs)
            last = f"{srs[-1] - t0:.2f} s" if len(srs) == len(ROUTES) else f"only {len(srs)} of {len(ROUTES)} SRs in 60 s"
            print(f"ttr {provider} run {run}: {len(datasets)} slices sent in {t0 - t_send:.2f} s; "
                  f"SRs at [{got}] s; time to result {last}", flush=True)
    finally:
        proc.terminate()
        proc.wait()
        server.shutdown()
    for f in log_fields(log):
        if f.get("message") in ("job done", "job refused", "job failed", "model loaded"):
            print(f"  node: {f.get('message')} {json.dumps({k: v for k, v in f.items() if k != 'message'})}")


def log_fields(path: Path):
    """The `fields` of each line of the node's JSON log (a line that is not JSON, a panic say, is skipped)."""
    with open(path) as lines:
        for line in lines:
            try:
                yield json.loads(line).get("fields", {})
            except ValueError:
                pass


if __name__ == "__main__":
    main()
