import ipaddress as ip

import pytest
from hypothesis import given, settings, strategies as st
from pycriu.images import fdinfo_pb2, sk_inet_pb2

from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.errors import ImageError, RewriteError
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import plan_checkpoint, rewrite_checkpoint
from overlayfs_inetsk.core.sockaddr import words_to_addr

from inetsk_testbed.imagefactory import files_img, inet_file_entry, inetsk_img, isk, reg_file_entry


def sockets_of(data, name="files.img"):
    img = imagefile.parse(data, name)
    out = {}
    for e in img.entries:
        if name == "inetsk.img":
            s = sk_inet_pb2.inet_sk_entry.FromString(e.payload)
        else:
            fe = fdinfo_pb2.file_entry.FromString(e.payload)
            if fe.type != 4:
                continue
            s = fe.isk
        out[s.id] = s
    return out


def addr(s, which):
    return words_to_addr(list(getattr(s, which)), s.family)


def rw(data, specs, name="files.img", **opts):
    res = rewrite_checkpoint({name: data}, AddressMap.from_args(specs), None, RewriteOptions(**opts),
                        reports=True)
    return res[name]


def test_listener_udp_dualstack_and_loopback():
    data = files_img(
        reg_file_entry(1),
        inet_file_entry(isk(2, "10.0.1.5", 80)),
        inet_file_entry(isk(3, "10.0.1.5", 53, proto="udp")),
        inet_file_entry(isk(4, "::ffff:10.0.1.5", 8080)),
        inet_file_entry(isk(5, "127.0.0.1", 81)),
        inet_file_entry(isk(6, "0.0.0.0", 82)),
        inet_file_entry(isk(7, "fd00::5", 83)),
    )
    res = rw(data, ["10.0.1.5=10.9.0.7", "fd00::5=fd09::7"])
    s = sockets_of(res.data)
    assert addr(s[2], "src_addr") == ip.ip_address("10.9.0.7")
    assert addr(s[3], "src_addr") == ip.ip_address("10.9.0.7")
    assert addr(s[4], "src_addr") == ip.ip_address("::ffff:10.9.0.7")
    assert addr(s[5], "src_addr") == ip.ip_address("127.0.0.1")
    assert addr(s[6], "src_addr") == ip.ip_address("0.0.0.0")
    assert addr(s[7], "src_addr") == ip.ip_address("fd09::7")
    verdicts = {r.id: r.verdict for r in res.reports}
    assert verdicts == {2: "rewritten", 3: "rewritten", 4: "rewritten", 5: "kept", 6: "kept",
                        7: "rewritten"}
    # the regular-file entry and the kept sockets are byte-identical
    before = imagefile.parse(data, "files.img").entries
    after = imagefile.parse(res.data, "files.img").entries
    for i in (0, 4, 5):
        assert before[i].payload == after[i].payload
    # nothing but addresses changed
    s2_old = sockets_of(data)[2]
    s2_old.src_addr[0] = s[2].src_addr[0]
    assert s2_old == s[2]


def test_connected_udp_dst_outside_map_stays():
    data = files_img(inet_file_entry(isk(2, "10.0.1.5", 4000, "10.0.3.3", 53, proto="udp")))
    res = rw(data, ["local=10.9.0.7"])
    s = sockets_of(res.data)[2]
    assert addr(s, "src_addr") == ip.ip_address("10.9.0.7")
    assert addr(s, "dst_addr") == ip.ip_address("10.0.3.3")
    assert res.reports[0].klass == "udp-connected"


def test_tcp_self_and_group_peer_follow_the_map():
    data = files_img(
        inet_file_entry(isk(2, "10.0.1.5", 5000, "10.0.1.5", 80)),
        inet_file_entry(isk(3, "10.0.1.5", 5001, "10.0.2.6", 80)),
    )
    res = rw(data, ["10.0.1.5=10.9.0.7", "10.0.2.6=10.9.0.8"])
    s = sockets_of(res.data)
    assert (addr(s[2], "src_addr"), addr(s[2], "dst_addr")) == (
        ip.ip_address("10.9.0.7"), ip.ip_address("10.9.0.7"))
    assert (addr(s[3], "src_addr"), addr(s[3], "dst_addr")) == (
        ip.ip_address("10.9.0.7"), ip.ip_address("10.9.0.8"))
    assert [r.klass for r in res.reports] == ["tcp-self", "tcp-peer-moved"]
    assert s[2].state == 1 and s[2].src_port == 5000 and s[2].dst_port == 80


def test_tcp_peer_outside_fates():
    data = files_img(inet_file_entry(isk(2, "10.0.1.5", 5001, "10.0.3.3", 443)))
    closed = rw(data, ["local=10.9.0.7"])
    s = sockets_of(closed.data)[2]
    assert (s.state, s.src_port, s.dst_port, s.shutdown) == (7, 0, 0, 3)
    assert list(s.src_addr) == [0] and list(s.dst_addr) == [0]
    assert closed.reports[0].verdict == "closed"

    kept = rw(data, ["local=10.9.0.7"], tcp_outside="keep")
    s = sockets_of(kept.data)[2]
    assert addr(s, "src_addr") == ip.ip_address("10.9.0.7")
    assert addr(s, "dst_addr") == ip.ip_address("10.0.3.3")
    assert s.state == 1
    assert "reset" in kept.reports[0].reason

    with pytest.raises(RewriteError, match="outside the map"):
        rw(data, ["local=10.9.0.7"], tcp_outside="fail")
    planned = plan_checkpoint({"files.img": data}, AddressMap.from_args(["local=10.9.0.7"]), None,
                         RewriteOptions(tcp_outside="fail"))
    assert planned["files.img"].reports[0].verdict == "refused"


def test_strict_refuses_uncovered_specific_address():
    data = files_img(inet_file_entry(isk(2, "10.0.1.5", 80)), inet_file_entry(isk(3, "fd00::5", 80)))
    res = rw(data, ["10.0.1.5=10.9.0.7"])
    assert [r.verdict for r in res.reports] == ["rewritten", "needs-address"]
    assert "IP_FREEBIND" in res.reports[1].reason
    with pytest.raises(RewriteError, match=r"\[fd00::5\]:80.*needs-address"):
        rw(data, ["10.0.1.5=10.9.0.7"], strict=True)


def test_legacy_inetsk_img():
    data = inetsk_img(isk(2, "10.0.1.5", 80), isk(3, "127.0.0.1", 80))
    res = rw(data, ["local=10.9.0.7"], name="inetsk.img")
    s = sockets_of(res.data, "inetsk.img")
    assert addr(s[2], "src_addr") == ip.ip_address("10.9.0.7")
    assert addr(s[3], "src_addr") == ip.ip_address("127.0.0.1")


def test_local_addresses_gathered_across_files_img_and_inetsk_img():
    files = files_img(inet_file_entry(isk(2, "10.0.1.5", 5000, "10.0.1.6", 80)))
    legacy = inetsk_img(isk(3, "10.0.1.6", 80))
    res = rewrite_checkpoint({"files.img": files, "inetsk.img": legacy},
                        AddressMap.from_args(["local=10.9.0.7"]))
    s = sockets_of(res["files.img"].data)[2]
    assert addr(s, "dst_addr") == ip.ip_address("10.9.0.7")  # the peer is local: follows


def test_auto_without_resolver_is_a_rewrite_error_naming_the_file():
    data = files_img(inet_file_entry(isk(2, "10.0.1.5", 80)))
    with pytest.raises(RewriteError, match=r"^/x/files.img: --map local=auto: auto target has no IPv4"):
        rewrite_checkpoint({"/x/files.img": data}, AddressMap.from_args(["local=auto"]), None)


def _with(sk, **changes):
    for k, v in changes.items():
        if isinstance(v, list):
            del getattr(sk, k)[:]
            getattr(sk, k).extend(v)
        else:
            setattr(sk, k, v)
    return sk


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"\x08\x04\xff\xff", "not a valid file_entry"),
        (inet_file_entry(_with(isk(2, "10.0.0.1", 80), src_addr=[])), "AF_INET address with no words"),
        (inet_file_entry(_with(isk(2, "fd00::1", 80), src_addr=[1, 2])), "AF_INET6 address with 2 words"),
        (inet_file_entry(_with(isk(2, "10.0.0.1", 80), family=10)), "AF_INET6 address with 1 words"),
        (inet_file_entry(_with(isk(2, "10.0.0.1", 80), family=7)), "family 7"),
        (fdinfo_pb2.file_entry(type=4, id=2).SerializeToString(), "has no isk"),
    ],
)
def test_malformed_socket_entries(payload, fragment):
    with pytest.raises(ImageError) as ei:
        rw(files_img(reg_file_entry(1), payload), ["local=10.9.0.7"])
    assert fragment in str(ei.value)
    assert "files.img: entry at offset" in str(ei.value)


def test_id_mismatch():
    fe = fdinfo_pb2.file_entry(type=4, id=9)
    fe.isk.CopyFrom(isk(2, "10.0.0.1", 80))
    with pytest.raises(ImageError, match=r"file_entry.id 9 != isk.id 2"):
        rw(files_img(fe.SerializeToString()), [])


# --- properties -------------------------------------------------------------------------

v4 = st.integers(min_value=1, max_value=2**32 - 1).map(ip.IPv4Address)
v6 = st.integers(min_value=1, max_value=2**128 - 1).map(ip.IPv6Address)


@st.composite
def socket_specs(draw):
    fam6 = draw(st.booleans())
    a = v6 if fam6 else v4
    src = draw(st.one_of(a, st.sampled_from(["10.0.1.5", "10.0.1.6"]) if not fam6
                         else st.sampled_from(["fd00::5", "::ffff:10.0.1.5"])))
    dst = draw(st.one_of(a, st.just("::" if fam6 else "0.0.0.0")))
    proto = draw(st.sampled_from(["tcp", "udp"]))
    dport = 0 if str(dst) in ("::", "0.0.0.0") else draw(st.integers(1, 65535))
    return str(src), draw(st.integers(0, 65535)), str(dst), dport, proto


@st.composite
def images(draw):
    specs = draw(st.lists(socket_specs(), max_size=12))
    payloads, n = [], 1
    for src, sport, dst, dport, proto in specs:
        if draw(st.booleans()):
            payloads.append(reg_file_entry(n))
            n += 1
        payloads.append(inet_file_entry(isk(n, src, sport, dst, dport, proto=proto)))
        n += 1
    return files_img(*payloads)


MAPS = [
    [],
    ["10.0.1.5=10.9.0.7"],
    ["local=10.9.0.7", "local6=fd09::7"],
    ["10.0.0.0/8=11.0.0.0/8", "fd00::/16=fd09::/16"],
    ["0.0.0.0/1=10.7.0.1"],
]
# The same maps, written out by hand for the model below: (prefix rules as (old, new, keep
# the host part)), {version: local target}
MODEL = [
    ([], {}),
    ([("10.0.1.5/32", "10.9.0.7", False)], {}),
    ([], {4: "10.9.0.7", 6: "fd09::7"}),
    ([("10.0.0.0/8", "11.0.0.0", True), ("fd00::/16", "fd09::", True)], {}),
    ([("0.0.0.0/1", "10.7.0.1", False)], {}),
]


def _plain(a):
    return a.ipv4_mapped if a.version == 6 and a.ipv4_mapped is not None else a


def _special(a):
    p = _plain(a)
    return p.is_unspecified or p.is_loopback or p.is_link_local


def model_move(a, is_src, local_srcs, model):
    """A second implementation of what the map makes of address a (docs/map.md), from the
    hand-written model, with ipaddress only: None when it stays."""
    rules, local = model
    p = _plain(a)
    new = None
    for old, target, keep_host in rules:
        net = ip.ip_network(old)
        if p.version == net.version and p in net and not _special(p):
            t = ip.ip_address(target)
            new = type(t)(int(t) | (int(p) & int(net.hostmask))) if keep_host else t
    if new is None and p.version in local and not _special(p) and not p.is_multicast and (
            is_src or p in local_srcs):
        new = ip.ip_address(local[p.version])
    if new is not None and p is not a:  # an IPv4-mapped address stays mapped
        new = ip.IPv6Address(f"::ffff:{new}")
    return None if new == a else new


@settings(max_examples=150, deadline=None)
@given(images(), st.sampled_from(range(len(MAPS))),
       st.sampled_from(["close", "keep", "nat", "fail"]))
def test_rewrite_gives_exactly_the_mapped_addresses(data, mi, fate):
    """Every socket's new addresses (and the fate of a TCP connection whose local end moves
    while its peer stays) are what a second implementation (model_move, from the maps
    written out by hand) says; entries that do not change stay byte for byte."""
    old = sockets_of(data)
    local_srcs = {_plain(addr(s, "src_addr")) for s in old.values()}
    want = {}
    for sid, s in old.items():
        src, dst = addr(s, "src_addr"), addr(s, "dst_addr")
        new_src = model_move(src, True, local_srcs, MODEL[mi])
        new_dst = model_move(dst, False, local_srcs, MODEL[mi])
        outside = (s.type == 1 and s.state == 1 and dst != src and new_src is not None
                   and new_dst is None and not _plain(src).is_loopback)
        want[sid] = ("outside" if outside else "moves", new_src or src, new_dst or dst)
    if fate == "fail" and any(w[0] == "outside" for w in want.values()):
        with pytest.raises(RewriteError, match="refused: peer .* is outside the map"):
            rewrite_checkpoint({"files.img": data}, AddressMap.from_args(MAPS[mi]), None,
                               RewriteOptions(tcp_outside=fate))
        return
    res = rewrite_checkpoint({"files.img": data}, AddressMap.from_args(MAPS[mi]), None,
                             RewriteOptions(tcp_outside=fate))["files.img"]
    before = imagefile.parse(data, "files.img").entries
    after = imagefile.parse(res.data, "files.img").entries
    assert len(before) == len(after)
    new = sockets_of(res.data)
    for b, a in zip(before, after):
        fe = fdinfo_pb2.file_entry.FromString(b.payload)
        if fe.type != 4:
            assert a.payload == b.payload  # untouched entries byte-identical
            continue
        o, n = old[fe.id], new[fe.id]
        how, w_src, w_dst = want[fe.id]
        if how == "outside" and fate == "close":  # restored closed: nothing bound
            assert (n.state, n.src_port, n.dst_port, n.shutdown) == (7, 0, 0, 3)
            assert set(n.src_addr) == {0} and set(n.dst_addr) == {0}
            continue
        assert (addr(n, "src_addr"), addr(n, "dst_addr")) == (w_src, w_dst)
        if (w_src, w_dst) == (addr(o, "src_addr"), addr(o, "dst_addr")):
            assert a.payload == b.payload
        _with(o, src_addr=list(n.src_addr), dst_addr=list(n.dst_addr))
        assert o == n  # nothing but addresses changed


def test_shared_decisions_still_name_each_sockets_own_peer():
    data = files_img(
        inet_file_entry(isk(2, "10.0.1.5", 5001, "10.0.3.3", 443)),
        inet_file_entry(isk(3, "10.0.1.5", 5002, "10.0.3.3", 8443)),
        inet_file_entry(isk(4, "10.0.1.5", 5003, "10.0.3.3", 443)),
    )
    res = rw(data, ["local=10.9.0.7"], tcp_outside="keep")
    assert ["10.0.3.3:443" in r.reason for r in res.reports] == [True, False, True]
    assert "10.0.3.3:8443" in res.reports[1].reason
    assert [r.local for r in res.reports] == ["10.0.1.5:5001", "10.0.1.5:5002", "10.0.1.5:5003"]
