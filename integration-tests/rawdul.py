"""A deliberately small DICOM Upper Layer client that builds every byte itself.

pynetdicom and DCMTK behave like well-mannered peers; these tests also need a
rude one: PDUs with lying lengths, P-DATA on a context that was never
accepted, command and dataset bytes that do not agree, associations that stop
half-way. Everything here follows PS3.8 (Upper Layer, Annex 9) and PS3.7
(DIMSE command set, Annex E); section numbers are given where it matters.

Nothing here retries or tolerates surprises: a test that uses it wants to see
exactly what the node put on the wire.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from dataclasses import dataclass, field

# PDU types, PS3.8 9.3.1
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7433.1.1"  # test-only root

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# A-ASSOCIATE-RJ fields, PS3.8 9.3.4
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_ACSE, RJ_SOURCE_PRESENTATION = 1, 2, 3
RJ_USER_CALLING_AE_NOT_RECOGNIZED = 3
RJ_USER_CALLED_AE_NOT_RECOGNIZED = 7
RJ_PRES_TEMPORARY_CONGESTION = 1
RJ_PRES_LOCAL_LIMIT_EXCEEDED = 2

# Presentation context results in A-ASSOCIATE-AC, PS3.8 9.3.3.2
PC_ACCEPTANCE = 0
PC_USER_REJECTION = 1
PC_NO_REASON = 2
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# DIMSE command fields, PS3.7 E.1
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101


class PeerClosed(Exception):
    """The node closed the TCP connection."""


class UnexpectedPdu(Exception):
    def __init__(self, pdu: "Pdu", wanted: str):
        super().__init__(f"expected {wanted}, got {pdu}")
        self.pdu = pdu


@dataclass
class Pdu:
    type: int
    body: bytes

    def __str__(self) -> str:
        name = PDU_NAMES.get(self.type, f"PDU type 0x{self.type:02x}")
        if self.type == A_ASSOCIATE_RJ:
            r = parse_rj(self.body)
            return f"{name}(result={r.result}, source={r.source}, reason={r.reason})"
        if self.type == A_ABORT and len(self.body) >= 4:
            return f"{name}(source={self.body[2]}, reason={self.body[3]})"
        return f"{name}({len(self.body)} bytes)"


# ---------------------------------------------------------------- encoding


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    assert len(raw) <= 16, title
    return raw.ljust(16, b" ")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(uid: str) -> bytes:
    # UIDs in items are not padded (PS3.8 9.3.2.1).
    return uid.encode("ascii")


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str,
    calling: str,
    contexts: list[tuple[int, str, list[str]]],
    max_pdu: int = 16384,
) -> bytes:
    """contexts: (odd presentation context id, abstract syntax, [transfer syntaxes])."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    body += _item(0x10, _uid(APPLICATION_CONTEXT))
    for pcid, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(t)) for t in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", pcid, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
    user += _item(0x55, b"RAWDUL_TEST")
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def p_data(pcid: int, data: bytes, command: bool, last: bool) -> bytes:
    """One P-DATA-TF holding one PDV (PS3.8 9.3.5, E.2 message control header)."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(data) + 2, pcid, header) + data
    return pdu(P_DATA_TF, pdv)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, bytes(4))


def release_rp() -> bytes:
    return pdu(A_RELEASE_RP, bytes(4))


def abort(source: int = 0, reason: int = 0) -> bytes:
    return pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def _ui_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_command(fields: list[tuple[int, int, bytes]]) -> bytes:
    """Implicit VR LE group 0000 with its group length first (PS3.7 6.3.1).

    fields: (group=0, element, already encoded value); sorted here.
    """
    body = b""
    for grp, elem, value in sorted(fields, key=lambda f: (f[0], f[1])):
        assert grp == 0
        body += struct.pack("<HHI", grp, elem, len(value)) + value
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def us(v: int) -> bytes:
    return struct.pack("<H", v)


def c_echo_rq(msg_id: int) -> bytes:
    return encode_command(
        [
            (0, 0x0002, _ui_value(VERIFICATION)),
            (0, 0x0100, us(C_ECHO_RQ)),
            (0, 0x0110, us(msg_id)),
            (0, 0x0800, us(NO_DATASET)),
        ]
    )


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    return encode_command(
        [
            (0, 0x0002, _ui_value(sop_class)),
            (0, 0x0100, us(C_STORE_RQ)),
            (0, 0x0110, us(msg_id)),
            (0, 0x0700, us(priority)),
            (0, 0x0800, us(0x0000)),
            (0, 0x1000, _ui_value(sop_instance)),
        ]
    )


# ---------------------------------------------------------------- decoding


@dataclass
class Rejection:
    result: int
    source: int
    reason: int


def parse_rj(body: bytes) -> Rejection:
    return Rejection(result=body[1], source=body[2], reason=body[3])


@dataclass
class Accepted:
    # pcid -> (result, transfer syntax or None)
    contexts: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    max_pdu: int = 0
    called: str = ""
    calling: str = ""


def _items(buf: bytes):
    off = 0
    while off + 4 <= len(buf):
        t, _, n = struct.unpack_from(">BBH", buf, off)
        yield t, buf[off + 4 : off + 4 + n]
        off += 4 + n


def parse_ac(body: bytes) -> Accepted:
    ac = Accepted(called=body[4:20].decode().strip(), calling=body[20:36].decode().strip())
    for t, payload in _items(body[68:]):
        if t == 0x21:
            pcid, _, result, _ = struct.unpack_from(">BBBB", payload, 0)
            ts = None
            for st, sp in _items(payload[4:]):
                if st == 0x40:
                    ts = sp.decode().rstrip("\0 ")
            ac.contexts[pcid] = (result, ts)
        elif t == 0x50:
            for st, sp in _items(payload):
                if st == 0x51:
                    (ac.max_pdu,) = struct.unpack(">I", sp)
    return ac


def decode_command(buf: bytes) -> dict[int, bytes]:
    """Implicit VR LE group 0000 -> {element: raw value}."""
    out: dict[int, bytes] = {}
    off = 0
    while off + 8 <= len(buf):
        grp, elem, n = struct.unpack_from("<HHI", buf, off)
        out[elem if grp == 0 else (grp << 16) | elem] = buf[off + 8 : off + 8 + n]
        off += 8 + n
    return out


@dataclass
class Response:
    command_field: int
    message_id_responded: int
    status: int
    affected_sop_class: str | None
    affected_sop_instance: str | None
    raw: dict[int, bytes]

    @classmethod
    def from_command(cls, cmd: dict[int, bytes]) -> "Response":
        def ui(e):
            v = cmd.get(e)
            return None if v is None else v.decode("ascii").rstrip("\0 ")

        def u16(e):
            v = cmd.get(e)
            return None if v is None else struct.unpack("<H", v[:2])[0]

        return cls(
            command_field=u16(0x0100),
            message_id_responded=u16(0x0120),
            status=u16(0x0900),
            affected_sop_class=ui(0x0002),
            affected_sop_instance=ui(0x1000),
            raw=cmd,
        )


# ---------------------------------------------------------------- Part 10 files


def split_part10(path) -> tuple[str, bytes]:
    """(transfer syntax UID, dataset bytes exactly as in the file).

    Reads the file meta group itself (explicit VR LE, PS3.10 7.1) rather than
    trusting its group length, so files with odd meta (an over-long AE, a
    missing group length) still split correctly.
    """
    data = open(path, "rb").read()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path}: no DICM prefix")
    off = 132
    ts = None
    while off + 8 <= len(data):
        grp, elem = struct.unpack_from("<HH", data, off)
        if grp != 0x0002:
            break
        vr = data[off + 4 : off + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (n,) = struct.unpack_from("<I", data, off + 8)
            hdr = 12
        else:
            (n,) = struct.unpack_from("<H", data, off + 6)
            hdr = 8
        if elem == 0x0010:
            ts = data[off + hdr : off + hdr + n].decode("ascii").rstrip("\0 ")
        off += hdr + n
    if ts is None:
        raise ValueError(f"{path}: no TransferSyntaxUID in file meta")
    return ts, data[off:]


# ---------------------------------------------------------------- the client


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PeerClosed(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class RawAssociation:
    """One TCP connection to the node, driven PDU by PDU."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, bind: str | None = None):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(bind, 0) if bind else None
        )
        self.sock.settimeout(timeout)
        self.accepted: Accepted | None = None
        self.next_msg_id = 1

    # -- transport
    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def recv_pdu(self, timeout: float | None = None) -> Pdu:
        if timeout is not None:
            self.sock.settimeout(timeout)
        head = _recv_exact(self.sock, 6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        return Pdu(pdu_type, _recv_exact(self.sock, length))

    def wait_closed_or_abort(self, timeout: float) -> str:
        """'abort' if an A-ABORT arrived, 'closed' if the connection just ended,
        raises socket.timeout if neither happened within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"node neither aborted nor closed within {timeout}s")
            try:
                p = self.recv_pdu(timeout=left)
            except PeerClosed:
                return "closed"
            except ConnectionResetError:
                return "closed"
            if p.type == A_ABORT:
                return "abort"
            # Anything else (e.g. a late response) is skipped; keep waiting.

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- association
    def request(
        self,
        called: str = "BIOMARKER",
        calling: str = "RAWSCU",
        contexts: list[tuple[int, str, list[str]]] | None = None,
        max_pdu: int = 16384,
    ) -> Pdu:
        if contexts is None:
            contexts = [(1, VERIFICATION, [IMPLICIT_LE])]
        self.send(associate_rq(called, calling, contexts, max_pdu))
        reply = self.recv_pdu()
        if reply.type == A_ASSOCIATE_AC:
            self.accepted = parse_ac(reply.body)
        return reply

    def associate(self, **kw) -> Accepted:
        reply = self.request(**kw)
        if reply.type != A_ASSOCIATE_AC:
            raise UnexpectedPdu(reply, "A-ASSOCIATE-AC")
        assert self.accepted is not None
        return self.accepted

    def release(self) -> None:
        self.send(release_rq())
        reply = self.recv_pdu()
        if reply.type != A_RELEASE_RP:
            raise UnexpectedPdu(reply, "A-RELEASE-RP")
        self.close()

    def abort(self) -> None:
        self.send(abort())
        self.close()

    # -- DIMSE
    def _max_data(self) -> int:
        peer_max = self.accepted.max_pdu if self.accepted and self.accepted.max_pdu else 1 << 20
        return max(peer_max - 6, 1)

    def send_message(self, pcid: int, command: bytes, dataset: bytes | None) -> None:
        self.send(p_data(pcid, command, command=True, last=True))
        if dataset is None:
            return
        step = self._max_data()
        if not dataset:
            self.send(p_data(pcid, b"", command=False, last=True))
        for off in range(0, len(dataset), step):
            chunk = dataset[off : off + step]
            self.send(p_data(pcid, chunk, command=False, last=off + step >= len(dataset)))

    def recv_response(self, timeout: float | None = None) -> Response:
        """Reassemble one command set from P-DATA-TF PDUs."""
        buf = io.BytesIO()
        while True:
            p = self.recv_pdu(timeout)
            if p.type != P_DATA_TF:
                raise UnexpectedPdu(p, "P-DATA-TF with a DIMSE response")
            off = 0
            done = False
            while off + 6 <= len(p.body):
                n, _pcid, hdr = struct.unpack_from(">IBB", p.body, off)
                buf.write(p.body[off + 6 : off + 4 + n])
                off += 4 + n
                if hdr & 0x01 and hdr & 0x02:
                    done = True
            if done:
                return Response.from_command(decode_command(buf.getvalue()))

    def c_echo(self, pcid: int = 1) -> Response:
        msg_id = self._msg_id()
        self.send_message(pcid, c_echo_rq(msg_id), None)
        return self.recv_response()

    def c_store(
        self, pcid: int, sop_class: str, sop_instance: str, dataset: bytes, msg_id: int | None = None
    ) -> Response:
        msg_id = self._msg_id() if msg_id is None else msg_id
        self.send_message(pcid, c_store_rq(msg_id, sop_class, sop_instance), dataset)
        return self.recv_response()

    def _msg_id(self) -> int:
        m = self.next_msg_id
        self.next_msg_id = (self.next_msg_id % 0xFFFF) + 1
        return m

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
