"""Write the seed corpus for fuzz/pdu_stream: a valid association that
echoes and stores a small dataset, plus hostile variants."""
import os
import struct
import zlib

OUT = os.path.join(os.path.dirname(__file__), "corpus", "pdu_stream")
CT = b"1.2.840.10008.5.1.4.1.1.2"
ELE = b"1.2.840.10008.1.2.1"
IMPL = b"1.2.840.10008.1.2"
DEFLATED = b"1.2.840.10008.1.2.1.99"
VERIF = b"1.2.840.10008.1.1"


def item(t, body):
    return struct.pack(">BBH", t, 0, len(body)) + body


def pad(b):
    return b + (b"\0" if len(b) % 2 else b"")


def assoc_rq(deflated=False):
    body = struct.pack(">HH", 1, 0) + b"BIOMARKER".ljust(16) + b"FUZZ".ljust(16) + b"\0" * 32
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    body += item(0x20, bytes([1, 0, 0, 0]) + item(0x30, CT) + item(0x40, DEFLATED if deflated else ELE))
    body += item(0x20, bytes([3, 0, 0, 0]) + item(0x30, VERIF) + item(0x40, IMPL))
    body += item(0x50, item(0x51, struct.pack(">I", 16384)))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def elem_implicit(g, e, v):
    return struct.pack("<HHI", g, e, len(v)) + v


def command(field, msg_id, sop_class, sop_inst=None, dataset=True):
    els = elem_implicit(0, 2, pad(sop_class))
    els += elem_implicit(0, 0x100, struct.pack("<H", field))
    els += elem_implicit(0, 0x110, struct.pack("<H", msg_id))
    els += elem_implicit(0, 0x800, struct.pack("<H", 0 if dataset else 0x0101))
    if sop_inst:
        els += elem_implicit(0, 0x1000, pad(sop_inst))
    return elem_implicit(0, 0, struct.pack("<I", len(els))) + els


def elem_explicit(g, e, vr, v):
    v = pad(v) if vr != b"UI" else pad(v)
    return struct.pack("<HH", g, e) + vr + struct.pack("<H", len(v)) + v


def dataset(sop):
    return (elem_explicit(0x0008, 0x0016, b"UI", CT) + elem_explicit(0x0008, 0x0018, b"UI", sop)
            + elem_explicit(0x0008, 0x0060, b"CS", b"CT")
            + elem_explicit(0x0020, 0x000D, b"UI", b"1.2.3") + elem_explicit(0x0020, 0x000E, b"UI", b"1.2.3.4"))


def pdata(ctx, is_cmd, last, data):
    hdr = (1 if is_cmd else 0) | (2 if last else 0)
    pdv = struct.pack(">IB", len(data) + 2, ctx) + bytes([hdr]) + data
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


RELEASE = bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def deflate(raw, level):
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush()


def ob(g, e, v):
    return struct.pack("<HH", g, e) + b"OB\0\0" + struct.pack("<I", len(v)) + v


def store(ds, deflated=True):
    """Associate (context 1 deflated), store `ds` in PDVs of at most 16000 bytes, release."""
    out = assoc_rq(deflated) + pdata(1, True, True, command(0x01, 2, CT, b"1.2.3.4.5"))
    chunks = [ds[i:i + 16000] for i in range(0, len(ds), 16000)] or [b""]
    for i, c in enumerate(chunks):
        out += pdata(1, False, i == len(chunks) - 1, c)
    return out + RELEASE


def main():
    os.makedirs(OUT, exist_ok=True)
    ds = dataset(b"1.2.3.4.5")
    valid = (assoc_rq() + pdata(3, True, True, command(0x30, 1, VERIF, dataset=False))
             + pdata(1, True, False, command(0x01, 2, CT, b"1.2.3.4.5")[:10])
             + pdata(1, True, True, command(0x01, 2, CT, b"1.2.3.4.5")[10:])
             + pdata(1, False, False, ds[:20]) + pdata(1, False, True, ds[20:]) + RELEASE)
    seeds = {
        "valid_echo_store_release": valid,
        "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "truncated_pdu": valid[:40],
        "oversized_pdata": assoc_rq() + bytes([4, 0, 0, 1, 0, 0]) + b"\0" * 64,
        "unaccepted_context": assoc_rq() + pdata(9, True, True, command(0x30, 1, VERIF, dataset=False)),
        "truncated_dataset": assoc_rq() + pdata(1, True, True, command(0x01, 2, CT, b"1.2.3.4.5")) + pdata(1, False, True, ds[:-5]),
        "overrun_element": assoc_rq() + pdata(1, True, True, command(0x01, 2, CT, b"1.2.3.4.5"))
        + pdata(1, False, True, ds[:6] + struct.pack("<H", 0xFFF0) + ds[8:]),
        # Deflated Explicit VR LE: a valid store; the same in stored (level 0)
        # blocks, whose content the fuzzer can mutate and still inflate; a
        # bomb inflating past the harness's 1 MiB limit; corrupt deflate data.
        "deflated_store": store(deflate(ds, 6)),
        "deflated_stored_blocks": store(deflate(ds + ob(0x0009, 0x1010, bytes(64)), 0)),
        "deflate_bomb": store(deflate(ds + ob(0x0009, 0x1010, bytes(2 << 20)), 9)),
        "deflate_corrupt": store(b"\x07" + bytes(16)),
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
