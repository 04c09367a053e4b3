"""core/bytepass.py (the pass on the entries' bytes) against plan.py's upb pass: the same
bytes, verdicts, problems and errors, over the image factory's images, their mutations
(hand-made ones for every check of patch.HEAD and patch.TailCheck, then hypothesis'), the
real dumps in tests/fuzz_corpus, and crit's route where it applies."""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycriu.images import fdinfo_pb2, sk_inet_pb2

import overlayfs_inetsk.core.plan as plan_mod
from fuzz_rewrite import MAPS, OPTIONS, _mutate, built_seeds, load_seeds
from inetsk_testbed.critroute import CRIT, crit_rewrite
from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from overlayfs_inetsk.core import bytepass, imagefile, patch
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.entries import Interner
from overlayfs_inetsk.core.plan import plan_checkpoint
from overlayfs_inetsk.errors import InetskError

KEEP = RewriteOptions(tcp_outside="keep")
MAPS_HERE = [*MAPS, AddressMap.from_args(["local=10.77.0.99", "local=fd77::99"]),
             AddressMap.from_args(["local=10.77.0.7", "local=fd77::7"])]
OPTS_HERE = [*OPTIONS, KEEP]


def _resolve(family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address("10.77.9.9" if family == 4 else "fd77::9")


def outcome(name: str, data: bytes, amap: AddressMap, opts: RewriteOptions) -> object:
    try:
        res = plan_checkpoint({name: data}, amap, _resolve, opts, reports=False)[name]
    except InetskError as e:
        return ("error", type(e).__name__, str(e))
    return (bytes(res.data), res.counts, [p.line() for p in res.problems], res.changed)


def upb_outcome(monkeypatch: pytest.MonkeyPatch, *args: object) -> object:
    with monkeypatch.context() as m:
        m.setattr(plan_mod, "plan_bytes", lambda *a: None)
        return outcome(*args)  # type: ignore[arg-type]


def same_both_ways(monkeypatch: pytest.MonkeyPatch, name: str, data: bytes) -> None:
    for amap in MAPS_HERE:
        for opts in OPTS_HERE:
            assert outcome(name, data, amap, opts) == upb_outcome(
                monkeypatch, name, data, amap, opts), (amap, opts)


def took_bytes(data: bytes, amap: AddressMap, opts: RewriteOptions = KEEP) -> bool:
    """Whether bytepass planned the image itself (not handing it to upb's pass)."""
    bmap = amap.bind([], _resolve)
    return bytepass.plan_bytes("files.img", data, Interner(), bmap, opts, None) is not None


# -- hand-made entries -----------------------------------------------------------------
def entry(isk_bytes: bytes, sid: int = 1, after: bytes = b"") -> bytes:
    """A file_entry of type INETSK around these isk bytes (protobuf-c's layout)."""
    return (b"\x08\x04\x10" + patch.varint(sid) + b"\x22" + patch.varint(len(isk_bytes))
            + isk_bytes + after)


def isk_bytes(*a: object, **kw: object) -> bytes:
    return isk(*a, **kw).SerializeToString()  # type: ignore[arg-type, no-any-return]


def _replace_once(b: bytes, old: bytes, new: bytes) -> bytes:
    assert b.count(old) >= 1, (b.hex(), old.hex())
    return b.replace(old, new, 1)


def odd_entries() -> Iterator[tuple[str, bytes]]:
    """Inet entries just outside what patch.HEAD and patch.TailCheck accept, and some
    just inside, each in an image beside a plain one."""
    v4 = isk_bytes(1, "10.0.1.5", 5000, "10.0.1.9", 80, state=1)
    v6 = isk_bytes(1, "fd00::5", 5000, "fd00::9", 80, state=1)
    fown_at = v4.index(b"\x6a")
    ino = b"\x10" + patch.varint(1001)
    yield "plain v4", entry(v4)
    yield "plain v6", entry(v6)
    yield "overlong ino", entry(_replace_once(v4, ino, b"\x10\xe9\x87\x00"))
    yield "overlong zero port", entry(_replace_once(v4, b"\x40\x50", b"\x40\xd0\x00"))
    yield "flags over 32 bits", entry(_replace_once(v4, b"\x48\x02", b"\x48\x82\x80\x80\x80\x10"))
    yield "isk.id differs", entry(v4, sid=2)
    yield "a field after isk", entry(v4, after=b"\x10\x01")
    yield "unknown field at the end", entry(v4 + b"\xaa\x06\x03abc")
    yield "unknown field inside the tail", entry(v4[:fown_at] + b"\xaa\x06\x01z" + v4[fown_at:])
    yield "state again in the tail", entry(v4 + b"\x30\x07")
    yield "src word again in the tail", entry(v4 + b"\x58\x05")
    opts_at = v4.index(b"\x72", fown_at)
    yield "opts before fown", entry(v4[:fown_at] + v4[opts_at:] + v4[fown_at:opts_at])
    yield "fown without uid", entry(_replace_once(v4, b"\x6a\x0a\x08\x00", b"\x6a\x08"))
    yield "packed src words", entry(_replace_once(
        v4, b"\x58" + patch.varint(isk(1, "10.0.1.5", 1).src_addr[0]),
        b"\x5a\x05" + patch.varint(isk(1, "10.0.1.5", 1).src_addr[0])))
    two = sk_inet_pb2.inet_sk_entry.FromString(v4)
    two.src_addr.append(7)
    yield "v4 with two src words", entry(two.SerializeToString())
    one = sk_inet_pb2.inet_sk_entry.FromString(v6)
    del one.dst_addr[1:]
    yield "v6 with one dst word", entry(one.SerializePartialToString())
    yield "mapped peer that moves", entry(isk_bytes(1, "::ffff:10.0.1.5", 5000,
                                                    "::ffff:10.0.1.9", 80, state=1))
    yield "mapped peer of its own", entry(isk_bytes(1, "::ffff:10.0.1.5", 5000,
                                                    "::ffff:10.0.1.5", 81, state=1))
    yield "udp bound", entry(isk_bytes(1, "10.0.1.5", 53, proto="udp"))
    yield "listener on any", entry(isk_bytes(1, "0.0.0.0", 80))


ODD = list(odd_entries())


@pytest.mark.parametrize("name,payload", ODD, ids=[n for n, _ in ODD])
def test_odd_entries_give_what_upb_gives(monkeypatch: pytest.MonkeyPatch, name: str,
                                         payload: bytes) -> None:
    data = files_img(reg_file_entry(100), payload,
                     inet_file_entry(isk(3, "10.0.1.5", 8080)))
    same_both_ways(monkeypatch, "files.img", data)


def test_the_bytes_route_is_taken_where_it_should_be_and_not_elsewhere() -> None:
    """The differential tests compare two routes only if the bytes route runs: it does for
    protobuf-c's layout, and hands the others to upb."""
    amap = MAPS_HERE[-1]
    took = {name: took_bytes(files_img(p), amap) for name, p in ODD}
    inside = {"plain v4", "plain v6", "mapped peer that moves", "mapped peer of its own",
              "udp bound", "listener on any"}  # an unknown field (even last): upb's route
    assert {n for n, t in took.items() if t} == inside, took


def test_closed_connections_take_the_bytes_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """fate close (the default) on the bytes: state, ports, both addresses and shutdown, in
    v4 and v6 entries, with shutdown already in the tail or not."""
    amap = AddressMap.from_args(["local=10.77.0.7", "local=fd77::7"])
    half = isk(3, "fd00::5", 5001, "fd00:1::9", 80, state=1)
    half.shutdown = 1
    data = files_img(inet_file_entry(isk(1, "10.0.1.5", 80)),
                     inet_file_entry(isk(2, "10.0.1.5", 5000, "192.0.2.1", 80, state=1)),
                     inet_file_entry(half),
                     inet_file_entry(isk(4, "fd00::5", 5002, "fd00:1::a", 80, state=1)))
    assert took_bytes(data, amap, RewriteOptions())
    res = plan_checkpoint({"files.img": data}, amap, None, RewriteOptions(),
                          reports=False)["files.img"]
    assert res.counts["closed"] == 3 and res.changed == 4
    same_both_ways(monkeypatch, "files.img", data)


def test_the_real_dump_takes_the_bytes_route(monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(os.path.dirname(__file__), "fuzz_corpus", "seeds", "service-files.img")
    data = open(path, "rb").read()
    amap = AddressMap.from_args(["local=10.77.0.99", "local=fd77::99"])
    assert took_bytes(data, amap)
    res = plan_checkpoint({"files.img": data}, amap, None, KEEP, reports=False)["files.img"]
    assert res.changed > 0
    same_both_ways(monkeypatch, "files.img", data)


@pytest.mark.parametrize("i", range(len(load_seeds())))
def test_seeds_give_what_upb_gives(monkeypatch: pytest.MonkeyPatch, i: int) -> None:
    name, data = load_seeds()[i]
    same_both_ways(monkeypatch, name, data)


def test_a_source_met_late_replans_with_raw_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection to 10.0.1.9 is judged (on its bytes: its class was decided for the
    connection before it) not one of the image's addresses; a listener on 10.0.1.9 comes
    later: the plan is made again and the peer moves too (BoundMap.said_not_local reads
    the keys bytepass notes)."""
    data = files_img(inet_file_entry(isk(1, "10.0.1.5", 5000, "192.0.2.1", 80, state=1)),
                     inet_file_entry(isk(2, "10.0.1.5", 5001, "10.0.1.9", 80, state=1)),
                     inet_file_entry(isk(3, "10.0.1.9", 80)))
    amap = AddressMap.from_args(["local=10.77.0.7"])
    assert took_bytes(data, amap)
    got = outcome("files.img", data, amap, KEEP)
    assert got == upb_outcome(monkeypatch, "files.img", data, amap, KEEP)
    res = plan_checkpoint({"files.img": data}, amap, None, KEEP, reports=True)["files.img"]
    assert [r.decision.new_dst for r in res.reports] == [
        None, ipaddress.ip_address("10.77.0.7"), None]


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_mutations_give_what_upb_gives(data: st.DataObject) -> None:
    seeds = built_seeds()[:1] + [("files.img", files_img(*(p for _, p in ODD[:2]),
                                                          *(p for _, p in ODD[-4:])))]
    name, img = seeds[data.draw(st.integers(0, len(seeds) - 1))]
    for _ in range(data.draw(st.integers(1, 3))):
        img = _mutate(data.draw, img)
    amap = MAPS_HERE[data.draw(st.integers(0, len(MAPS_HERE) - 1))]
    opts = OPTS_HERE[data.draw(st.integers(0, len(OPTS_HERE) - 1))]
    mp = pytest.MonkeyPatch()
    try:
        assert outcome(name, img, amap, opts) == upb_outcome(mp, name, img, amap, opts)
    finally:
        mp.undo()


def test_crit_gives_the_same_bytes(tmp_path: os.PathLike[str]) -> None:
    """crit's route (decode, replace addresses, encode) as an oracle: the addresses-only
    rewrite of many sockets of both families, through the bytes route."""
    if not os.path.exists(CRIT) and shutil.which("crit") is None:
        pytest.fail("crit is not installed (scripts/setup.sh installs it into .venv)")
    socks = [isk(i, "10.0.1.5", 20000 + i, proto="udp") for i in range(1, 40)]
    socks += [isk(100 + i, "fd00::5", 8080, f"fd00:1::{i:x}", 30000 + i, state=1)
              for i in range(1, 40)]
    socks += [isk(200, "10.0.1.5", 8080), isk(201, "10.0.1.5", 8080, "192.0.2.7", 4000,
                                              state=1)]
    data = files_img(reg_file_entry(1), *(inet_file_entry(s) for s in socks))
    amap = AddressMap.from_args(["local=10.77.0.99", "local=fd77::99"])
    assert took_bytes(data, amap)
    ours = plan_checkpoint({"files.img": data}, amap, None, KEEP, reports=False)["files.img"]
    src = os.path.join(tmp_path, "files.img")
    with open(src, "wb") as f:
        f.write(data)
    dst = os.path.join(tmp_path, "crit.img")
    crit_rewrite(src, dst, {"10.0.1.5": "10.77.0.99", "fd00::5": "fd77::99"})
    with open(dst, "rb") as f:
        assert bytes(ours.data) == f.read()
    assert ours.changed == len(socks)


def test_helpers_round_trip() -> None:
    for n in (0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 2**28 - 1, 2**28, 2**32 - 1):
        raw = patch.varint(n)
        assert patch.uvarint(raw) == (n, len(raw))
        assert patch.HEAD is not None
    words = (1, 0x80, 2**32 - 1, 0)
    assert patch.field_words(patch.words_field(patch.DST_TAG, words)) == words
    # what pycriu writes for these words is what words_field writes
    sk = sk_inet_pb2.inet_sk_entry(dst_addr=list(words))
    assert sk.SerializePartialToString() == patch.words_field(patch.DST_TAG, words)
    assert imagefile.LENGTH.unpack_from(imagefile.LENGTH.pack(77))[0] == 77
    assert fdinfo_pb2.INETSK == 4

