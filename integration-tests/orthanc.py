"""A throw-away Orthanc (the PACS results go back to), driven over REST.

`Orthanc(workdir, dicom_port=..., modalities=..., always_allow_store=...)`
owns one temporary directory: its JSON config, its storage, its index and
its log. `start()` waits until REST `/system` answers; `stop()` kills it.
It can be restarted on the same storage (the same ports).

Every instance Orthanc *receives* over DICOM is logged by a Lua
`ReceivedInstanceFilter` as `RECEIVED-SOP <SOPInstanceUID>`, before Orthanc
decides whether it is new. `received_sops()` reads those lines back: a
result the node delivered twice with the same SOP Instance UID is one
instance in Orthanc's database but two lines here, so "exactly once" is
checkable and not hidden by Orthanc's de-duplication.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from nodeharness import free_port

ORTHANC_BIN = os.environ.get("ORTHANC_BIN") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"

_LUA = r"""
function ReceivedInstanceFilter(dicom, origin, info)
   print('RECEIVED-SOP ' .. tostring(dicom.SOPInstanceUID) .. ' FROM ' .. tostring(origin.RemoteAet))
   return true
end
"""


def orthanc_available() -> bool:
    return Path(ORTHANC_BIN).exists()


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin (Debian's `orthanc-dicomweb`), or None."""
    env = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if env:
        return Path(env)
    for c in [Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
              *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))]:
        if c.exists():
            return c
    return None


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        dicom_port: int | None = None,
        aet: str = "ORTHANC",
        modalities: dict | None = None,
        always_allow_store: bool = True,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ):
        """`dicomweb`: load the DICOMweb plugin, its root at `/dicom-web/`
        (`dicomweb_url`). `users`: HTTP basic auth on for every REST call,
        these user → password pairs; the helpers here use the first."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.aet = aet
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        lua = self.workdir / "received.lua"
        lua.write_text(_LUA)
        restrictive = not always_allow_store
        self.config = {
            "Name": "biomarker-it",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": always_allow_store,
            # Orthanc admits any caller if any of these is true; a
            # refusing Orthanc must clear them all.
            "DicomAlwaysAllowEcho": not restrictive,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": modalities or {},
            "StorageCompression": False,
            "DicomScuTimeout": 10,
            "LuaScripts": [str(lua)],
            "Plugins": [],
        }
        self.auth = next(iter(users.items())) if users else None
        if dicomweb:
            plugin = dicomweb_plugin()
            if plugin is None:
                raise RuntimeError("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
            self.config["Plugins"] = [str(plugin)]
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    # ---------------------------------------------------------------- process
    def start(self, timeout: float = 30.0) -> "Orthanc":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, "--verbose", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(self.url + "/system", timeout=1, auth=self.auth)
                if r.ok:
                    with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                        return self
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"Orthanc did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL (teardown: the storage is thrown away anyway)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def received_sops(self, from_aet: str | None = None) -> list[str]:
        """SOP Instance UIDs received (one per C-STORE or REST upload, in
        order), only those from calling AE `from_aet` if given."""
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            i = line.find("RECEIVED-SOP ")
            if i >= 0:
                f = line[i:].split()
                if from_aet is None or (len(f) >= 4 and f[3] == from_aet):
                    out.append(f[1])
        return out

    # ---------------------------------------------------------------- REST
    def get(self, path: str, **kw):
        r = requests.get(self.url + path, timeout=30, auth=self.auth, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, data=None, json_body=None, timeout: float = 60):
        r = requests.post(self.url + path, data=data, json=json_body, timeout=timeout, auth=self.auth)
        r.raise_for_status()
        return r.json() if r.content else None

    def upload(self, path: Path) -> dict:
        """POST /instances: {ID, ParentStudy, ParentSeries, ...}."""
        return self.post("/instances", data=Path(path).read_bytes())

    def store_to(self, modality: str, resources: list[str]) -> dict:
        """C-STORE `resources` (Orthanc IDs) to a configured modality, synchronously."""
        return self.post(f"/modalities/{modality}/store", json_body={"Resources": resources, "Synchronous": True})

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_tags(self, iid: str) -> dict:
        return self.get(f"/instances/{iid}/simplified-tags")

    def instance_file(self, iid: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{iid}/file", timeout=30, auth=self.auth)
        r.raise_for_status()
        return r.content

    def find_instances(self, **query) -> list[dict]:
        """/tools/find at instance level, expanded, e.g. Modality="SR"."""
        return self.post(
            "/tools/find",
            json_body={"Level": "Instance", "Query": query, "Expand": True},
        )

    def study_instances(self, study_id: str) -> list[dict]:
        """Every instance of an Orthanc study, with its series' MainDicomTags."""
        out = []
        for s in self.get(f"/studies/{study_id}/series"):
            for iid in s["Instances"]:
                out.append({"ID": iid, "Series": s["MainDicomTags"], "SeriesID": s["ID"]})
        return out

    def wait(self, pred, timeout: float, poll: float = 0.1, what: str = "condition"):
        """Poll pred() until truthy; returns its value or raises with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() >= deadline:
                raise AssertionError(f"Orthanc: {what} not reached within {timeout}s\n{self.log_tail()}")
            time.sleep(poll)
