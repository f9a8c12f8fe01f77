"""DICOM TLS (PS3.15 B.1): the TLS listener (`node.tls`) and TLS
destinations (`destinations.<name>.tls`), against DCMTK built with OpenSSL.

Every test module run makes a throwaway PKI with the openssl CLI: a CA, a
server certificate for localhost/127.0.0.1, a client certificate from the
same CA, and a rogue CA with a client certificate of its own. DCMTK checks
the chain but not the host name; the node's SCU checks both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

import instances
import rawdul as ul
from nodeharness import DEFAULT_CALLERS, dcmtk, free_port, node_binary, run_tool, storescu
from test_results_orthanc import (FAST_OUTBOX, _listening, analyze, expected_outputs, node_overrides,  # noqa: F401
                                  outbox, pending_after_failure, pma_phantom, procs, routes_named, wait_for)

# ------------------------------------------------------------------ PKI


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}:\n{r.stderr}"


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _leaf(d: Path, ca: str, name: str, cn: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        msg = "openssl CLI not installed (scripts/install-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _leaf(d, "ca", "server", "localhost")
    _leaf(d, "ca", "client", "storescu")
    _ca(d, "rogue-ca")
    _leaf(d, "rogue-ca", "rogue", "storescu")
    return Pki(d)


# ------------------------------------------------------------------ node and peers


def tls_node(node_factory, pki: Pki, client_ca: bool = True, plain: bool = True, **node_over):
    """A node with a TLS listener on its own free port; `.tls_port` is set."""
    tls_port = free_port()
    tls = {"port": tls_port, "certificate": pki.path("server.pem"), "private_key": pki.path("server.key"),
           "plain": plain}
    if client_ca:
        tls["client_ca"] = pki.path("ca.pem")
    n = node_factory({"node": {"tls": tls, **node_over}}, start=False)
    n.tls_port = tls_port
    if not plain:
        # The harness waits for `port`; there is only the TLS one.
        n.port = tls_port
    return n.start()


def client_tls(pki: Pki, cert: str | None = "client") -> list[str]:
    """DCMTK TLS options: our certificate (`None`: anonymous) and the CA that
    must have signed the node's."""
    mine = ["+tls", pki.path(f"{cert}.key"), pki.path(f"{cert}.pem")] if cert else ["+tla"]
    return [*mine, "+cf", pki.path("ca.pem")]


def echo_tls(node, pki: Pki, cert: str | None = "client", calling: str = "ECHOSCU",
             port: int | None = None) -> subprocess.CompletedProcess:
    return run_tool([dcmtk("echoscu"), "-v", "-aet", calling, "-aec", node.ae_title, *client_tls(pki, cert),
                     "127.0.0.1", str(port or node.tls_port)], timeout=30)


def store_tls(node, pki: Pki, files: list, cert: str | None = "client",
              calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return run_tool([dcmtk("storescu"), "-v", "-aet", calling, "-aec", node.ae_title, *client_tls(pki, cert),
                     "127.0.0.1", str(node.tls_port), *[str(f) for f in files]], timeout=120)


def out(r: subprocess.CompletedProcess) -> str:
    return f"rc={r.returncode}\n{r.stdout}{r.stderr}"


def handshake_failures(node, at_least: int = 1) -> list[str]:
    """The node's `TLS handshake failed` lines, once there are `at_least`:
    the line is written just after the socket closes, so the client may see
    the close first."""
    lines = lambda: [l for l in node.log_text().splitlines() if "TLS handshake failed" in l]
    return wait_for(lambda: (lambda ls: ls if len(ls) >= at_least else None)(lines()), 5,
                    f"{at_least} 'TLS handshake failed' line(s)", diag=node.log_tail)


def assert_tls_serving(node, pki: Pki) -> None:
    node.assert_alive()
    r = echo_tls(node, pki)
    assert r.returncode == 0, f"{out(r)}\n--- node log ---\n{node.log_tail()}"


# ================================================================== SCP


class TestTlsScp:
    def test_echo_and_store_are_byte_identical_in_the_spool(self, node_factory, pki, tmp_path, realct):
        node = tls_node(node_factory, pki)
        r = echo_tls(node, pki)
        assert r.returncode == 0, out(r)
        s = instances.write_series(tmp_path / "in", 3)
        # Explicit VR LE, which storescu sends as it is (it converts implicit).
        real = realct / "chest-slice-encodings" / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
        files = [*s.paths, real]
        r = store_tls(node, pki, files)
        assert r.returncode == 0, f"{out(r)}\n{node.log_tail()}"
        spool = node.spool_files()
        assert len(spool) == len(files), spool
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            stored = node.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            src_ts, src_body = ul.split_part10(f)
            got_ts, got_body = ul.split_part10(stored)
            assert got_ts == src_ts, f"{f.name}: stored as {got_ts}, sent as {src_ts}"
            assert got_body == src_body, f"{f.name}: spooled dataset differs from what was sent over TLS"
        # The plain listener still serves alongside.
        r = storescu(node, [real])
        assert r.returncode == 0, out(r)

    def test_plain_client_on_tls_port_fails_cleanly(self, node_factory, pki):
        node = tls_node(node_factory, pki)
        r = run_tool([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", node.ae_title,
                      "127.0.0.1", str(node.tls_port)], timeout=30)
        assert r.returncode != 0, out(r)
        # A raw DUL client gets the connection closed, not a hang.
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as s:
            s.sendall(bytes.fromhex("01000000004a0001") + b"\x00" * 70)
            s.settimeout(10)
            data = s.recv(4096)
            while data:
                assert not data.startswith(b"\x02"), "an A-ASSOCIATE-AC in clear text on the TLS port"
                data = s.recv(4096)
        assert_tls_serving(node, pki)
        fails = handshake_failures(node, at_least=2)
        assert "127.0.0.1:" in fails[0], fails[0]
        # ... and counted where monitoring sees it
        metrics = node.http("/metrics")[2].decode()
        n = [float(l.split()[-1]) for l in metrics.splitlines()
             if l.startswith("biomarker_node_tls_handshakes_failed_total ")]
        assert n and n[0] >= 2, metrics

    def test_silent_client_is_closed_after_artim(self, node_factory, pki):
        node = tls_node(node_factory, pki, timeouts={"association_request_s": 2, "read_s": 10, "idle_s": 30})
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=15) as s:
            assert s.recv(4096) == b""
        assert time.monotonic() - t0 < 10
        assert "not completed within" in handshake_failures(node)[0]
        assert_tls_serving(node, pki)

    @pytest.mark.parametrize("cert", ["rogue", None], ids=["untrusted-cert", "no-cert"])
    def test_client_without_a_trusted_certificate_is_refused(self, node_factory, pki, cert, tmp_path):
        node = tls_node(node_factory, pki, client_ca=True)
        r = echo_tls(node, pki, cert=cert)
        assert r.returncode != 0, out(r)
        s = instances.write_series(tmp_path / "in", 1)
        r = store_tls(node, pki, s.paths, cert=cert)
        assert r.returncode != 0, out(r)
        assert node.spool_files() == {}
        assert all("certificate" in l.lower() for l in handshake_failures(node, at_least=2))
        assert_tls_serving(node, pki)

    @pytest.mark.parametrize("version", ["1.2", "1.3"])
    def test_tls_versions(self, node_factory, pki, version):
        node = tls_node(node_factory, pki)
        r = run_tool(["openssl", "s_client", "-connect", f"127.0.0.1:{node.tls_port}", f"-tls{version.replace('.', '_')}",
                      "-cert", pki.path("client.pem"), "-key", pki.path("client.key"), "-CAfile", pki.path("ca.pem"),
                      "-verify_return_error", "-brief"], timeout=30)
        assert f"TLSv{version}" in r.stdout + r.stderr, out(r)
        assert_tls_serving(node, pki)

    def test_anonymous_client_is_served_without_client_ca(self, node_factory, pki):
        node = tls_node(node_factory, pki, client_ca=False)
        r = echo_tls(node, pki, cert=None)
        assert r.returncode == 0, out(r)

    def test_allow_lists_apply_over_tls(self, node_factory, pki):
        callers = DEFAULT_CALLERS + [{"ae_title": "FARAWAY", "host": "192.0.2.7"}]
        node = tls_node(node_factory, pki, allowed_callers=callers)
        r = echo_tls(node, pki, calling="INTRUDER")
        assert r.returncode != 0, out(r)
        assert "Association Rejected" in r.stdout + r.stderr, out(r)
        # The source address is the TCP peer's, under TLS too.
        r = echo_tls(node, pki, calling="FARAWAY")
        assert r.returncode != 0 and "Association Rejected" in r.stdout + r.stderr, out(r)
        r = echo_tls(node, pki, calling="HOSTBOUND")
        assert r.returncode == 0, out(r)
        rejected = [l for l in node.log_text().splitlines() if "association rejected" in l]
        assert len(rejected) == 2, node.log_tail()

    def test_tls_only_node_has_no_plain_listener(self, node_factory, pki):
        node = tls_node(node_factory, pki, plain=False)
        plain_port = node.config["node"]["port"]
        assert not _listening(plain_port)
        assert_tls_serving(node, pki)


class TestTlsConfig:
    def _check(self, tmp_path, over: dict) -> subprocess.CompletedProcess:
        from nodeharness import Node
        n = Node(tmp_path / "cfg", over)
        return run_tool([str(node_binary()), "check-config", "--config", str(n.config_path)], timeout=30)

    def test_bad_files_are_named_by_key(self, tmp_path, pki):
        r = self._check(tmp_path, {"node": {"tls": {"certificate": pki.path("server.pem"),
                                                    "private_key": pki.path("client.key")}}})
        assert r.returncode == 2, out(r)
        assert "node.tls.private_key" in r.stdout + r.stderr, out(r)
        r = self._check(tmp_path, {"node": {"tls": {"certificate": pki.path("missing.pem"),
                                                    "private_key": pki.path("server.key")}},
                                   "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                                                             "tls": {"ca": pki.path("server.key")}}}})
        assert r.returncode == 2, out(r)
        text = r.stdout + r.stderr
        assert "node.tls.certificate" in text and "destinations.pacs.tls.ca" in text, out(r)

    def test_good_files_pass(self, tmp_path, pki):
        r = self._check(tmp_path, {"node": {"tls": {"certificate": pki.path("server.pem"),
                                                    "private_key": pki.path("server.key"),
                                                    "client_ca": pki.path("ca.pem")}}})
        assert r.returncode == 0, out(r)


# ================================================================== SCU (outbox)


def tls_storescp(tmp_path: Path, pki: Pki, port: int, procs: list, require_client_cert: bool) -> Path:
    """DCMTK storescp with TLS on `port`, writing what it receives to the returned dir."""
    od = tmp_path / "storescp-in"
    od.mkdir()
    log = open(tmp_path / "storescp.log", "wb")
    auth = ["+cf", pki.path("ca.pem")] + ([] if require_client_cert else ["-ic"])
    p = subprocess.Popen([dcmtk("storescp"), "-v", "-od", str(od), "+tls", pki.path("server.key"),
                          pki.path("server.pem"), *auth, str(port)],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs.append(p)
    wait_for(lambda: _listening(port) or p.poll() is not None, 10, "storescp +tls listening")
    assert p.poll() is None, (tmp_path / "storescp.log").read_text()
    return od


def received_sops(od: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in od.iterdir() if f.is_file())


@pytest.mark.parametrize("mutual", [True, False], ids=["client-cert", "server-cert-only"])
def test_outbox_delivers_to_tls_storescp(tmp_path, node_factory, pki, procs, pma_phantom, mutual):
    dest_port = free_port()
    over = node_overrides(dest_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX, dest_ae="STORESCP")
    tls = {"ca": pki.path("ca.pem")}
    if mutual:
        tls |= {"certificate": pki.path("client.pem"), "private_key": pki.path("client.key")}
    over["destinations"]["pacs"]["tls"] = tls
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    od = tls_storescp(tmp_path, pki, dest_port, procs, require_client_cert=mutual)
    node = node_factory(over)
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, out(r)
    peer_log = lambda: (tmp_path / "storescp.log").read_text(errors="replace")[-3000:]
    items = wait_for(lambda: (lambda it: it if len(it) == n_items and all(i["state"] == "delivered" for i in it)
                              else None)(outbox(node)),
                     60, "every result delivered over TLS",
                     diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}\n{peer_log()}")
    assert received_sops(od) == sorted(i["sop_instance_uid"] for i in items), peer_log()


def test_outbox_refuses_an_untrusted_destination(tmp_path, node_factory, pki, procs, pma_phantom):
    """The destination's certificate is not from the CA we trust: nothing is
    sent, and the item waits for a retry with the reason."""
    dest_port = free_port()
    over = node_overrides(dest_port, routes_named("pma-single-slice"), outbox=FAST_OUTBOX, dest_ae="STORESCP")
    over["destinations"]["pacs"]["tls"] = {"ca": pki.path("rogue-ca.pem")}
    n_items = expected_outputs(analyze(tmp_path / "analyze", over, pma_phantom))
    od = tls_storescp(tmp_path, pki, dest_port, procs, require_client_cert=False)
    node = node_factory(over)
    r = storescu(node, [pma_phantom / "CT0001.dcm"])
    assert r.returncode == 0, out(r)
    items = wait_for(lambda: (lambda it: it if pending_after_failure(it, n_items) else None)(outbox(node)),
                     30, "every item failed its first attempt", diag=lambda: f"{outbox(node)}\n{node.log_tail(30)}")
    assert any("certificate" in i["last_error"].lower() for i in items), items
    assert received_sops(od) == []
