"""core/isktail.py (an inet_sk_entry's tail checked and closed in its bytes) against upb:
the table it walks is the one pycriu's descriptors give; whatever tail it accepts, upb's
decode and encode give back byte for byte (random tails, their mutations, the fuzz seeds'
entries); it accepts what upb itself writes; and a closed tail is upb's."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycriu.images import fdinfo_pb2, sk_inet_pb2

from fuzz_rewrite import _mutate, built_seeds, frames_of, load_seeds
from inetsk_testbed.imagefactory import isk
from overlayfs_inetsk.core import entries, isktail, patch

HEAD = isk(1, "10.0.1.5", 5000, "10.0.1.9", 80, state=1).SerializeToString()
HEAD = HEAD[:HEAD.index(b"\x6a")]  # fields 1..12: patch.HEAD's part
SETTINGS = settings(max_examples=600, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def upb_gives_back(tail: bytes) -> bool:
    """The old TailCheck: the entry decoded and encoded back by upb is the same bytes."""
    entry = b"\x08\x04\x10\x01\x22" + patch.varint(len(HEAD) + len(tail)) + HEAD + tail
    try:
        fe = fdinfo_pb2.file_entry.FromString(entry)
        return bool(fe.IsInitialized()) and fe.SerializeToString() == entry
    except Exception:  # noqa: BLE001 - a decode error: not given back
        return False


def test_the_table_is_pycriu_s_descriptors() -> None:
    derived = isktail.schema_of(sk_inet_pb2.inet_sk_entry.DESCRIPTOR)
    assert isktail.SCHEMA == derived, f"isktail.SCHEMA drifted; pycriu says: {derived!r}"
    assert entries.FD_INETSK == fdinfo_pb2.INETSK
    sk_opts = sk_inet_pb2.inet_sk_entry.DESCRIPTOR.fields_by_name["shutdown"].enum_type
    assert entries.SHUT_BOTH == sk_opts.values_by_name["BOTH"].number


# -- tails as upb writes them -------------------------------------------------------------
def _value(draw: Callable[..., Any], kind: int, what: Any) -> Any:
    if kind in (isktail.U32, isktail.S32):
        return draw(st.sampled_from([0, 1, 127, 128, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1))
    if kind in (isktail.U64, isktail.F64):
        return draw(st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    if kind == isktail.BOOL:
        return draw(st.booleans())
    if kind == isktail.ENUM:
        return draw(st.sampled_from(what))
    if kind == isktail.STR:
        return draw(st.sampled_from(["", "eth0", "lo", "vé0"]) | st.text(max_size=8))
    raise AssertionError(f"a kind the schema does not use: {kind}")


def _fill(draw: Callable[..., Any], msg: Any, name: str, lowest: int = 1) -> None:
    for num, (_n, fname, kind, repeated, _packed, required, what) in isktail.SCHEMA[name].items():
        if num < lowest or not (required or draw(st.booleans())):
            continue
        if kind == isktail.MSG:
            sub = getattr(msg, fname)
            sub.SetInParent()
            _fill(draw, sub, what)
        elif repeated:
            getattr(msg, fname).extend(
                _value(draw, kind, what) for _ in range(draw(st.integers(0, 3))))
        else:
            setattr(msg, fname, _value(draw, kind, what))


def upb_tail(draw: Callable[..., Any]) -> bytes:
    msg = sk_inet_pb2.inet_sk_entry()
    _fill(draw, msg, isktail.TOP, isktail.FIRST)
    return bytes(msg.SerializePartialToString())


@SETTINGS
@given(st.data())
def test_it_accepts_what_upb_writes(data: st.DataObject) -> None:
    tail = upb_tail(data.draw)
    assert upb_gives_back(tail)
    assert isktail.canonical(tail), tail.hex()


# -- mutated tails: accepted only where upb gives them back -------------------------------
def _fields(tail: bytes) -> list[bytes]:
    """The top-level fields of a tail, each as its bytes (what cannot be read: one piece)."""
    try:
        return _read_fields(tail)
    except IndexError:
        return [tail] if tail else []


def _read_fields(tail: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(tail):
        start = pos
        tag, pos = patch.uvarint(tail, pos)
        if tag & 7 == 0:
            pos = patch.uvarint(tail, pos)[1]
        elif tag & 7 == 1:
            pos += 8
        else:
            n, pos = patch.uvarint(tail, pos)
            pos += n
        if pos > len(tail):
            raise IndexError(pos)
        out.append(tail[start:pos])
    return out


def mutated(draw: Callable[..., Any], tail: bytes) -> bytes:
    buf = bytearray(tail)
    fields = _fields(tail)
    op = draw(st.integers(0, 9))
    if op == 0 and buf:  # flip a byte
        buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
    elif op == 1:  # insert bytes
        at = draw(st.integers(0, len(buf)))
        buf[at:at] = draw(st.binary(min_size=1, max_size=6))
    elif op == 2 and buf:  # delete a span
        at = draw(st.integers(0, len(buf) - 1))
        del buf[at:at + draw(st.integers(1, 6))]
    elif op == 3 and len(fields) > 1:  # two fields swapped
        i = draw(st.integers(0, len(fields) - 2))
        fields[i], fields[i + 1] = fields[i + 1], fields[i]
        buf = bytearray(b"".join(fields))
    elif op == 4 and fields:  # a field twice
        i = draw(st.integers(0, len(fields) - 1))
        fields.insert(i, fields[i])
        buf = bytearray(b"".join(fields))
    elif op == 5:  # a field of any number and wire type, with a small value
        num = draw(st.integers(1, 30))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        body = {0: patch.varint(draw(st.integers(0, 2**70))), 1: bytes(8), 5: bytes(4),
                2: b"\x02\x08\x01"}[wire]
        at = draw(st.sampled_from([0, *(len(b"".join(fields[:i + 1]))
                                        for i in range(len(fields))), len(buf)]))
        buf[at:at] = patch.varint(num << 3 | wire) + body
    elif op == 6 and buf:  # a varint made overlong (a byte 0x80 more, then 0x00 at the end)
        at = draw(st.integers(0, len(buf) - 1))
        end = at
        while end < len(buf) and buf[end] & 0x80:
            end += 1
        if end < len(buf):
            buf[end:end + 1] = bytes((buf[end] | 0x80, 0))
    elif op == 7 and buf:  # a byte set to a value that matters for a bool, enum, length
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.sampled_from([0, 1, 2, 3, 4, 0x7f,
                                                                         0x80, 0xff]))
    elif op == 8:  # truncated
        del buf[draw(st.integers(0, len(buf))):]
    elif fields:  # a field dropped (a required one, a sub-message's whole)
        del fields[draw(st.integers(0, len(fields) - 1))]
        buf = bytearray(b"".join(fields))
    return bytes(buf)


@SETTINGS
@given(st.data())
def test_what_it_accepts_upb_gives_back(data: st.DataObject) -> None:
    tail = upb_tail(data.draw)
    for _ in range(data.draw(st.integers(1, 3))):
        tail = mutated(data.draw, tail)
    if isktail.canonical(tail):
        assert upb_gives_back(tail), tail.hex()


# -- tails written here by the schema, with faults in them --------------------------------
VALUES = [0, 1, 2, 3, 4, 127, 128, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 2**31,
          2**64 - 1]
IN_RANGE = {isktail.U32: lambda v: v < 2**32, isktail.U64: lambda v: v < 2**64,
            isktail.BOOL: lambda v: v < 2}


def _raw(draw: Callable[..., Any], name: str, lowest: int, faulty: bool) -> bytes:
    """A message of the schema in the bytes: canonical unless `faulty` lets a fault in (a
    value out of range, an overlong varint, a wrong wire type, a field out of order or
    twice, a packed record, a required field left out, an unknown field, bad UTF-8)."""
    def fault() -> bool:
        return faulty and draw(st.integers(0, 40)) == 0

    def vint(v: int) -> bytes:
        raw = patch.varint(v)
        if fault() and len(raw) < 10:  # overlong
            raw = raw[:-1] + bytes((raw[-1] | 0x80, 0))
        return raw

    out: list[bytes] = []
    for num, (_n, _fname, kind, repeated, _packed, required, what) in isktail.SCHEMA[name].items():
        if num < lowest or not ((required and not fault()) or draw(st.booleans())):
            continue
        wire = isktail._WIRE[kind]
        if fault():
            wire = draw(st.sampled_from([0, 1, 2, 5]))

        def body(wire: int = wire, kind: int = kind, what: Any = what) -> bytes:
            if wire == 0:
                bad = fault()
                if kind == isktail.ENUM:
                    v = draw(st.sampled_from([4, 2**64 - 1, 2**64 - 2**31] if bad else what))
                else:
                    ok = IN_RANGE.get(kind, lambda v: True)
                    v = draw(st.sampled_from([v for v in VALUES if bad or ok(v)]))
                return vint(v)
            if wire == 1:
                return bytes(draw(st.binary(min_size=8, max_size=8)))
            if wire == 5:
                return bytes(draw(st.binary(min_size=4, max_size=4)))
            if kind == isktail.MSG:
                inner = _raw(draw, what, 1, faulty)
            elif fault():
                inner = b"\xff\xfe"
            else:
                inner = draw(st.sampled_from(["", "eth0", "vé0"])).encode()
            return vint(len(inner)) + inner

        tag = vint(num << 3 | wire)
        n = draw(st.integers(0, 3)) if repeated else 1
        if repeated and fault():  # packed, as upb would read but not write it
            items = b"".join(body() for _ in range(n))
            out.append(vint(num << 3 | 2) + vint(len(items)) + items)
        else:
            out.extend(tag + body() for _ in range(n))
    if fault():
        out.append(vint(draw(st.integers(1, 40)) << 3) + b"\x01")
    if len(out) > 1 and fault():
        i = draw(st.integers(0, len(out) - 2))
        out[i], out[i + 1] = out[i + 1], out[i]
    if out and fault():
        out.append(out[draw(st.integers(0, len(out) - 1))])
    return b"".join(out)


@SETTINGS
@given(st.data())
def test_tails_written_here_with_faults(data: st.DataObject) -> None:
    faulty = data.draw(st.booleans())
    tail = _raw(data.draw, isktail.TOP, isktail.FIRST, faulty)
    if isktail.canonical(tail):
        assert upb_gives_back(tail), tail.hex()
    elif not faulty:  # canonical as written: what upb writes too
        raise AssertionError(f"refused a canonical tail: {tail.hex()}")


def test_hand_made_tails() -> None:
    msg = sk_inet_pb2.inet_sk_entry()
    msg.fown.SetInParent()
    msg.fown.uid = msg.fown.euid = msg.fown.signum = msg.fown.pid_type = msg.fown.pid = 0
    for f in ("so_sndbuf", "so_rcvbuf", "so_snd_tmo_sec", "so_snd_tmo_usec", "so_rcv_tmo_sec",
              "so_rcv_tmo_usec"):
        setattr(msg.opts, f, 7)
    base = msg.SerializePartialToString()
    assert isktail.canonical(base) and upb_gives_back(base)
    no = {
        "empty": b"",
        "no opts": base[:base.index(b"\x72")],
        "unknown field last": base + b"\xaa\x06\x03abc",
        "bool 2": base + b"\x78\x02",
        "enum undeclared": base + b"\x98\x01\x04",
        "enum negative": base + b"\x98\x01" + b"\xff" * 9 + b"\x01",
        "uint32 over 32 bits": base + b"\x90\x01\x80\x80\x80\x80\x10",
        "overlong tag": base + b"\xf8\x00\x01",
        "ifname not utf-8": base + b"\x8a\x01\x01\xff",
        "ifname cut": base + b"\x8a\x01\x05ab",
    }
    no["so_filter as an empty packed record"] = _with_opts(base, b"\x82\x01\x00")
    no["so_filter packed"] = _with_opts(base, b"\x82\x01\x08" + bytes(8))
    no["opts field twice"] = _with_opts(base, b"\x38\x01\x38\x01")
    for name, tail in no.items():
        assert not isktail.canonical(tail), name
    yes = {"ifname": base + b"\x8a\x01\x04eth0", "v6only": base + b"\x78\x01",
           "so_filter twice": _with_opts(base, b"\x81\x01" + bytes(8) + b"\x81\x01" + bytes(8)),
           "shutdown 3, ns_id": base + b"\x90\x01\x05\x98\x01\x03"}
    for name, tail in yes.items():
        assert isktail.canonical(tail) and upb_gives_back(tail), name


def _with_opts(tail: bytes, extra: bytes) -> bytes:
    """`tail` (fown then opts, last) with `extra` at the end of opts."""
    at = tail.index(b"\x72", tail.index(b"\x6a") + 2 + tail[tail.index(b"\x6a") + 1])
    n, p = patch.uvarint(tail, at + 1)
    body = tail[p:p + n] + extra
    return tail[:at] + b"\x72" + patch.varint(len(body)) + body + tail[p + n:]


# -- closing ------------------------------------------------------------------------------
@SETTINGS
@given(st.data())
def test_a_closed_tail_is_upbs(data: st.DataObject) -> None:
    tail = upb_tail(data.draw)
    value = data.draw(st.integers(0, 3))
    msg = sk_inet_pb2.inet_sk_entry.FromString(tail)
    msg.shutdown = value
    assert isktail.with_shutdown(tail, value) == msg.SerializePartialToString()


# -- real dumps and the fuzz seeds --------------------------------------------------------
REAL = os.path.join(os.path.dirname(__file__), "fuzz_corpus", "seeds", "service-files.img")


def tails_of(data: bytes) -> list[bytes]:
    """The tails of an image's inet entries in protobuf-c's layout (patch.HEAD's)."""
    out = []
    for _off, start, end in frames_of(data):
        m = patch.HEAD.match(data, start, end)
        if m is not None:
            out.append(data[m.end():end])
    return out


def test_the_seeds_tails_both_accept() -> None:
    with open(REAL, "rb") as f:
        real = tails_of(f.read())
    assert real, "no inet entry in protobuf-c's layout in the real dump"
    assert all(isktail.canonical(t) and upb_gives_back(t) for t in real)
    for data in (d for _n, d in load_seeds()):
        for tail in tails_of(data):
            assert isktail.canonical(tail) == upb_gives_back(tail), tail.hex()


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_mutated_seed_images_tails(data: st.DataObject) -> None:
    seeds = [*load_seeds(), *built_seeds()]
    _name, img = seeds[data.draw(st.integers(0, len(seeds) - 1))]
    for _ in range(data.draw(st.integers(1, 3))):
        img = _mutate(data.draw, img)
    for tail in tails_of(img):
        if isktail.canonical(tail):
            assert upb_gives_back(tail), tail.hex()
