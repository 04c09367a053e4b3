"""Fuzz target over the image codec and the rewrite (hypothesis, structure-aware mutations).

    FUZZ_SECONDS=300 .venv/bin/python tests/fuzz_rewrite.py      # standalone, prints figures
    .venv/bin/python -m pytest -m fuzz -s                         # the CI run (test_fuzz_*.py)

Inputs are seeds (a files.img from a real CRIU dump in tests/fuzz_corpus/seeds/, plus
images built here with pycriu's classes) mutated by byte flips, length-prefix edits,
truncation, splicing, garbage and protobuf-aware edits of inet socket entries (family,
address word counts, ids, states, ports, unknown fields). Each input goes through
imagefile.parse/encode and rewrite.plan_checkpoint with one of several maps and options.

The property: bad input ends in an InetskError whose message is one line naming the file;
anything else escaping is a crash. A rewritten image must parse again, keep its entry count
and copy every entry it did not change byte for byte. A crashing input is written to
$FUZZ_CRASH_DIR (default: a temp dir) and named in the failure; add it to
tests/fuzz_corpus/ so tests/test_fuzz_regressions.py replays it for good.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pycriu.images import fdinfo_pb2

from inetsk_testbed.imagefactory import files_img, inet_file_entry, inetsk_img, isk, reg_file_entry
from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.errors import ImageError, InetskError
from overlayfs_inetsk.cli.render import render_table
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint, problems

CORPUS = Path(__file__).parent / "fuzz_corpus"
U32 = struct.Struct("=I")


def built_seeds() -> list[tuple[str, bytes]]:
    """Small images with every socket shape the rewrite distinguishes."""
    socks = [
        isk(1, "10.0.1.5", 80),  # listener
        isk(2, "10.0.1.5", 5000, "10.0.1.9", 80, state=1),  # established, peer moves
        isk(3, "10.0.1.5", 5001, "192.0.2.1", 443, state=1),  # peer outside the map
        isk(4, "10.0.1.5", 5002, "10.0.1.5", 5003, state=1),  # connection to itself
        isk(5, "fd00::5", 53, proto="udp"),
        isk(6, "::ffff:10.0.1.5", 8080),
        isk(7, "127.0.0.1", 81),
        isk(8, "0.0.0.0", 82),
        isk(9, "10.0.1.5", 6000, "10.0.2.7", 53, proto="udp"),
        isk(10, "fd00::5", 7000, "fd00::9", 80, state=8),
    ]
    return [
        ("files.img", files_img(reg_file_entry(100), *(inet_file_entry(s) for s in socks))),
        ("inetsk.img", inetsk_img(*socks[:6])),
        ("files.img", files_img(reg_file_entry(1), reg_file_entry(2, "/x" * 50))),
    ]


def load_seeds() -> list[tuple[str, bytes]]:
    seeds = built_seeds()
    for p in sorted(CORPUS.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            kind = "inetsk.img" if "inetsk" in p.name else "files.img"
            seeds.append((kind, data))
    return seeds


def _resolve(family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address("10.77.9.9" if family == 4 else "fd77::9")


MAPS = [
    AddressMap.from_args(["10.0.1.0/24=10.77.1.0/24", "fd00::/64=fd77::/64"]),
    AddressMap.from_args(["local=10.77.0.7"]),
    AddressMap.from_args(["10.0.1.5=auto", "fd00::5=auto"]),
    AddressMap.from_args(["local=auto"]),
    AddressMap.from_args([]),
    AddressMap.from_args(["local=10.77.0.7", ":80=:8080", "10.0.1.5:53=[::ffff:10.0.1.6]:5353"],
                         port_offset=60000),
]
OPTIONS = [RewriteOptions(strict=s, tcp_outside=f) for s in (False, True)
           for f in ("close", "keep", "fail")]

INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF_FFFF, 0x8000_0000,
                   0xFFFF_FFFE, 0xFFFF_FFFF, 0x0A00_0105, 0x0501_000A]


# -- the target --------------------------------------------------------------------------
class Stats:
    inputs = 0
    malformed = 0
    rewritten = 0


def frames_of(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, start, end) of the well-formed prefix of entries (for mutations)."""
    out = []
    pos = 8
    while pos + 4 <= len(data):
        (n,) = U32.unpack_from(data, pos)
        if n > len(data) - pos - 4:
            break
        out.append((pos, pos + 4, pos + 4 + n))
        pos += 4 + n
    return out


def run_one(kind: str, data: bytes, map_i: int, opt_i: int) -> None:
    """One input through codec and rewrite; raises AssertionError (or anything else) on a
    property violation."""
    path = f"/fuzz/{kind}"
    Stats.inputs += 1
    try:
        img = imagefile.parse(data, path, imagefile.MAGIC_BY_NAME[kind])
    except ImageError as e:
        _check_message(e, path)
        img = None
    if img is not None:
        assert imagefile.encode(img.magic, (e.payload for e in img.entries)) == data
    amap, options = MAPS[map_i], OPTIONS[opt_i]
    try:
        results = plan_checkpoint({path: data}, amap, _resolve, options, reports=True)
        problems(results, options)
    except InetskError as e:
        _check_message(e, path)
        Stats.malformed += 1
        return
    assert img is not None, "rewrite accepted an image the codec rejects"
    res = results[path]
    render_table("/fuzz", results, with_map=True)
    out = bytes(res.data)
    if res.changed:
        Stats.rewritten += 1
    out_img = imagefile.parse(out, path, img.magic)  # a rewritten image is well formed
    assert len(out_img.entries) == len(img.entries)
    changed = 0
    for a, b in zip(img.entries, out_img.entries):
        if a.payload != b.payload:
            changed += 1
            assert _is_inet(kind, a.payload), "a non-socket entry was changed"
    assert changed <= res.changed
    # and the output goes through the rewrite again without a parse error
    plan_checkpoint({path: out}, amap, _resolve, options, reports=False)


def _is_inet(kind: str, payload: bytes) -> bool:
    if kind == "inetsk.img":
        return True
    return fdinfo_pb2.file_entry.FromString(payload).type == fdinfo_pb2.INETSK


def _check_message(e: InetskError, path: str) -> None:
    msg = str(e)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    if isinstance(e, ImageError):
        assert msg.startswith(path), f"message does not name the file: {msg!r}"


# -- mutations ---------------------------------------------------------------------------
def _mutate(draw: Callable[..., object], data: bytes) -> bytes:
    buf = bytearray(data)
    op = draw(st.integers(0, 9))
    size = len(buf)
    fr = frames_of(bytes(buf))
    if op == 0 and size:  # flip bytes
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, size - 1))
            buf[i] ^= draw(st.integers(1, 255))
    elif op == 1 and fr:  # edit a length prefix
        off, _s, _e = fr[draw(st.integers(0, len(fr) - 1))]
        v = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, 0xFFFF_FFFF))
        buf[off:off + 4] = U32.pack(v)  # type: ignore[arg-type]
    elif op == 2:  # truncate
        del buf[draw(st.integers(0, size)):]
    elif op == 3:  # insert bytes
        i = draw(st.integers(0, size))
        buf[i:i] = draw(st.binary(min_size=1, max_size=16))  # type: ignore[assignment]
    elif op == 4 and size:  # delete a range
        i = draw(st.integers(0, size - 1))
        del buf[i:i + draw(st.integers(1, 16))]  # type: ignore[operator]
    elif op == 5 and fr:  # duplicate an entry somewhere
        off, _s, end = fr[draw(st.integers(0, len(fr) - 1))]
        frame = bytes(buf[off:end])
        at = draw(st.sampled_from([f[0] for f in fr] + [size]))
        buf[at:at] = frame  # type: ignore[index]
    elif op == 6:  # trailing garbage
        buf += draw(st.binary(min_size=1, max_size=12))  # type: ignore[operator]
    elif op == 7:  # header words
        word = draw(st.sampled_from([imagefile.IMG_COMMON, imagefile.FILES_MAGIC,
                                     imagefile.INETSK_MAGIC, 0, 0xFFFF_FFFF]))
        i = draw(st.sampled_from([0, 4]))
        if size >= i + 4:
            buf[i:i + 4] = U32.pack(word)  # type: ignore[arg-type]
    elif fr:  # protobuf-aware edit of one socket entry
        off, start, end = fr[draw(st.integers(0, len(fr) - 1))]
        payload = _mutate_socket(draw, bytes(buf[start:end]))
        if payload is not None:
            buf[off:end] = U32.pack(len(payload)) + payload
    return bytes(buf)


def _words(draw: Callable[..., object]) -> list[int]:
    n = draw(st.sampled_from([0, 1, 1, 2, 3, 4, 4, 5, 8]))
    word = st.sampled_from(INTERESTING_U32) | st.integers(0, 0xFFFF_FFFF)
    return [draw(word) for _ in range(n)]  # type: ignore[call-overload, misc]


def _mutate_socket(draw: Callable[..., object], payload: bytes) -> bytes | None:
    try:
        fe = fdinfo_pb2.file_entry.FromString(payload)
    except Exception:
        fe = None
    if fe is None or fe.type != fdinfo_pb2.INETSK:
        try:
            from pycriu.images import sk_inet_pb2
            sk = sk_inet_pb2.inet_sk_entry.FromString(payload)
        except Exception:
            return None
        target = sk
    else:
        target = fe.isk
    what = draw(st.integers(0, 8))
    if what == 0:
        target.family = draw(st.sampled_from([0, 1, 2, 10, 99, 0xFFFF]))
    elif what == 1:
        del target.src_addr[:]
        target.src_addr.extend(_words(draw))
    elif what == 2:
        del target.dst_addr[:]
        target.dst_addr.extend(_words(draw))
    elif what == 3 and fe is not None:
        fe.id = draw(st.integers(0, 0xFFFF_FFFF))
    elif what == 4:
        target.state = draw(st.integers(0, 20))
        target.type = draw(st.sampled_from([1, 2, 3, 5, 10]))
    elif what == 5:
        target.src_port = draw(st.integers(0, 0xFFFF_FFFF))
        target.dst_port = draw(st.integers(0, 0xFFFF_FFFF))
    elif what == 6 and fe is not None:
        fe.type = draw(st.integers(0, 20))
    elif what == 7 and fe is not None:
        fe.ClearField("isk")
    out = (fe if fe is not None else target).SerializePartialToString()
    if what == 8:  # an unknown field, varint or length-delimited
        tag = draw(st.integers(21, 2000))
        out += bytes(_varint(tag << 3 | 2)) + bytes([3]) + b"abc"
    return out


def _varint(n: int) -> bytearray:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return out


# -- the driver --------------------------------------------------------------------------
def crash_dir() -> Path:
    d = os.environ.get("FUZZ_CRASH_DIR")
    return Path(d) if d else Path(tempfile.gettempdir()) / "overlayfs-inetsk-fuzz-crashes"


def keep_crash(kind: str, data: bytes) -> Path:
    d = crash_dir()
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"crash-{hashlib.sha256(data).hexdigest()[:16]}-{kind}"
    p.write_bytes(data)
    return p


def budget_seconds() -> float:
    env = os.environ.get("FUZZ_SECONDS")
    if env:
        return float(env)
    return 60.0 if os.environ.get("CI") == "true" else 10.0


def fuzz(seconds: float) -> tuple[int, float]:
    """Run for `seconds`; returns (inputs tried, seconds taken). Raises on a crash (after
    saving the input)."""
    seeds = load_seeds()
    deadline = time.monotonic() + seconds

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        kind, buf = data.draw(st.sampled_from(seeds))
        for _ in range(data.draw(st.integers(1, 4))):
            buf = _mutate(data.draw, buf)
        map_i = data.draw(st.integers(0, len(MAPS) - 1))
        opt_i = data.draw(st.integers(0, len(OPTIONS) - 1))
        if time.monotonic() > deadline:  # drawn all the same: generation stays consistent
            return
        try:
            run_one(kind, buf, map_i, opt_i)
        except Exception as e:
            p = keep_crash(kind, buf)
            raise AssertionError(f"{type(e).__name__}: {e} (input kept in {p})") from e

    t0 = time.monotonic()
    before = Stats.inputs
    while time.monotonic() < deadline:
        one()
    return Stats.inputs - before, time.monotonic() - t0


def report(n: int, took: float) -> str:
    return (f"fuzz_rewrite: {n} inputs in {took:.1f} s ({n / max(took, 1e-9):.0f}/s); "
            f"{Stats.malformed} rejected with an error, {Stats.rewritten} rewritten")


def run_budget() -> str:
    """The fuzz run of the test suite: FUZZ_SECONDS, then the figures line."""
    n, took = fuzz(budget_seconds())
    assert n > 0
    return report(n, took)


if __name__ == "__main__":
    n, took = fuzz(budget_seconds())
    print(report(n, took))
