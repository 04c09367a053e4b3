"""portcheck: which ports a restore will bind are taken in the target namespace."""

from __future__ import annotations

import ipaddress as ip
import socket
from contextlib import ExitStack

import pytest

from overlayfs_inetsk.host.netns import NodeAddressError, in_netns
from overlayfs_inetsk.core.portcheck import Holder, Want, clashes, parse_table
from overlayfs_inetsk.host.proctables import read_tables
from overlayfs_inetsk.planner.ports import taken
from overlayfs_inetsk.core.sockaddr import AF_INET, AF_INET6
from inetsk_testbed.netns import scratch_netns

A = ip.ip_address

TCP4 = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 112 1
   2: 01004D0A:A000 02004D0A:0050 01 00000000:00000000 00:00000000 00000000     0        0 113 1
   3: 01004D0A:1F91 02004D0A:0051 06 00000000:00000000 00:00000000 00000000     0        0 0 1
"""
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 221 2 0 0
  1: 000077FD000000000000000001000000:1389 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 222 2 0 0
"""


def holders():
    return parse_table(TCP4, "tcp", AF_INET) + parse_table(UDP6, "udp", AF_INET6)


def test_parse_table_reads_addresses_ports_states():
    hs = holders()
    assert [(str(h.addr), h.port, h.state, h.inode) for h in hs] == [
        ("0.0.0.0", 80, 10, 111), ("127.0.0.1", 8080, 10, 112), ("10.77.0.1", 40960, 1, 113),
        ("10.77.0.1", 8081, 6, 0), ("::", 53, 7, 221), ("fd77::1", 5001, 7, 222)]
    assert str(hs[0]) == "tcp 0.0.0.0:80 LISTEN (inode 111)"
    assert str(hs[4]) == "udp6 [::]:53 bound (inode 221)"


@pytest.mark.parametrize(
    "want, holder_inode",
    [
        (Want("tcp", AF_INET, A("10.77.0.1"), 80), 111),  # under a 0.0.0.0 listener
        (Want("tcp", AF_INET, A("0.0.0.0"), 8080), 112),  # wildcard over a specific one
        (Want("tcp", AF_INET, A("127.0.0.1"), 8080), 112),
        (Want("tcp", AF_INET6, A("::"), 80), 111),  # dual-stack :: covers IPv4
        (Want("tcp", AF_INET6, A("::ffff:10.77.0.1"), 80), 111),
        (Want("tcp", AF_INET, A("10.77.0.1"), 40960), 113),  # a connection, no SO_REUSEADDR
        (Want("udp", AF_INET, A("10.77.0.5"), 53), 221),  # v4 under a dual-stack udp6 ::
        (Want("udp", AF_INET6, A("fd77::1"), 5001), 222),
        (Want("udp", AF_INET6, A("::"), 5001), 222),
        # not taken:
        (Want("tcp", AF_INET, A("10.77.0.1"), 8080), None),  # 127.0.0.1:8080 only
        (Want("tcp", AF_INET6, A("::"), 80, v6only=True), None),
        (Want("tcp", AF_INET, A("10.77.0.1"), 40960, reuseaddr=True), None),
        (Want("tcp", AF_INET, A("10.77.0.1"), 8081), None),  # TIME_WAIT
        (Want("udp", AF_INET, A("10.77.0.1"), 80), None),  # other protocol
        (Want("udp", AF_INET6, A("fd77::2"), 5001), None),
        (Want("tcp", AF_INET, A("10.77.0.1"), 81), None),
    ],
)
def test_clash_rules(want, holder_inode):
    got = clashes([want], holders(), "netns X")
    assert [c.holder.inode for c in got] == ([] if holder_inode is None else [holder_inode])


def test_clash_message_names_the_socket_and_the_holder():
    (c,) = clashes([Want("tcp", AF_INET, A("10.77.0.1"), 80, "files.img: socket id 7")],
                   holders(), "netns /run/netns/n1")
    assert str(c) == ("files.img: socket id 7: tcp 10.77.0.1:80 is taken in netns "
                      "/run/netns/n1 by tcp 0.0.0.0:80 LISTEN (inode 111)")


def test_port_zero_is_never_taken():
    assert clashes([Want("udp", AF_INET, A("0.0.0.0"), 0)],
                   [Holder("udp", AF_INET, A("0.0.0.0"), 0, 7, 1)], "x") == []


# --- in a network namespace made here ---------------------------------------------------

@pytest.fixture
def netns():
    with scratch_netns(("link", "set", "lo", "up")) as ns:
        yield ns


def _open(netns, family, kind, addr, port, listen=False):
    def make():
        s = socket.socket(family, kind)
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((addr, port))
            if listen:
                s.listen()
        except BaseException:
            s.close()
            raise
        return s

    return in_netns(netns, make)


@pytest.mark.root
def test_taken_in_a_namespace_and_only_there(netns):
    with ExitStack() as stack:
        for args in ((socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 7101, True),
                     (socket.AF_INET6, socket.SOCK_STREAM, "::", 7102, True),
                     (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", 7103),
                     (socket.AF_INET6, socket.SOCK_DGRAM, "::1", 7104)):
            stack.enter_context(_open(netns, *args))
        wants = [
            Want("tcp", AF_INET, A("127.0.0.1"), 7101, "a"),
            Want("tcp", AF_INET, A("127.0.0.1"), 7102, "b"),  # under the dual-stack ::
            Want("udp", AF_INET, A("127.0.0.1"), 7103, "c"),
            Want("udp", AF_INET6, A("::1"), 7104, "d"),
            Want("tcp", AF_INET, A("127.0.0.1"), 7103, "e"),  # udp holds 7103, not tcp
            Want("udp", AF_INET, A("127.0.0.1"), 7105, "f"),
        ]
        got = taken(wants, netns)
        assert [c.want.label for c in got] == ["a", "b", "c", "d"]
        assert f"in netns {netns} by tcp6 [::]:7102 LISTEN" in str(got[1])
        # the caller's own namespace does not see those sockets
        theirs = {c.holder.inode for c in got}
        assert not theirs & {h.inode for h in read_tables()}
        assert theirs <= {h.inode for h in read_tables(netns)}
        # closed: nothing taken any more
    assert taken(wants, netns) == []


@pytest.mark.root
def test_taken_matches_a_real_bind(netns):
    """What taken() names, a plain bind (no SO_REUSEADDR) in that namespace refuses."""
    with _open(netns, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 7201, True), \
            _open(netns, socket.AF_INET6, socket.SOCK_DGRAM, "::1", 7202):
        cases = [(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 7201),
                 (socket.AF_INET6, socket.SOCK_STREAM, "::1", 7201),
                 (socket.AF_INET6, socket.SOCK_DGRAM, "::1", 7202),
                 (socket.AF_INET6, socket.SOCK_DGRAM, "::", 7202),
                 (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", 7202),
                 (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", 7201)]
        for fam, kind, addr, port in cases:
            want = Want("tcp" if kind == socket.SOCK_STREAM else "udp",
                        AF_INET if fam == socket.AF_INET else AF_INET6, A(addr), port)
            predicted = bool(taken([want], netns))
            try:
                _open(netns, fam, kind, addr, port).close()
                bound = True
            except NodeAddressError as exc:  # in_netns's form of the bind's OSError
                assert "Address already in use" in str(exc)
                bound = False
            assert predicted == (not bound), (addr, port, kind)


@pytest.mark.root
def test_missing_namespace_is_one_clear_error(tmp_path):
    with pytest.raises(NodeAddressError, match=f"netns {tmp_path}/nope"):
        taken([Want("tcp", AF_INET, A("127.0.0.1"), 1)], str(tmp_path / "nope"))


def test_wants_of_a_plan_are_the_new_endpoints_the_restore_binds():
    from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.core.plan import plan_checkpoint
    from overlayfs_inetsk.core.portcheck import wants_of

    data = files_img(*(inet_file_entry(e) for e in (
        isk(1, "10.0.0.1", 80),                                 # listener: moves
        isk(2, "10.0.0.1", 80, "10.0.0.1", 40000),              # accepted: shares it
        isk(3, "10.0.0.1", 40000, "10.9.9.9", 443),             # outside: closed
        isk(4, "::", 53, proto="udp"),                          # bound udp
        isk(5, "0.0.0.0", 0, state=7),                          # unbound
    )))
    res = plan_checkpoint({"f.img": data}, AddressMap.from_args(["10.0.0.1=10.0.0.2"],
                                                                port_offset=1000))
    got = [(w.proto, str(w.addr), w.port, w.id) for w in wants_of(res["f.img"].reports)]
    assert got == [("tcp", "10.0.0.2", 1080, 1), ("udp", "::", 1053, 4)]


def test_ping_sockets_want_no_port_and_udplite_its_own():
    """A ping socket's src_port is its echo id and CRIU 4.2.1 binds no ICMP socket: it
    wants no port (issue 18: it was checked as UDP). UDP-Lite ports are not UDP ones."""
    from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.core.plan import plan_checkpoint
    from overlayfs_inetsk.core.portcheck import wants_of

    def dgram(id_, src, port, proto):
        e = isk(id_, src, port, proto="udp")
        e.proto = proto
        return e

    data = files_img(*(inet_file_entry(e) for e in (
        dgram(1, "10.0.0.1", 5353, socket.IPPROTO_ICMP),     # ping, echo id 5353
        dgram(2, "fd00::1", 5354, socket.IPPROTO_ICMPV6),    # ping6
        dgram(3, "10.0.0.1", 5355, 136),                     # UDP-Lite
        dgram(4, "10.0.0.1", 5356, socket.IPPROTO_UDP),      # UDP
    )))
    res = plan_checkpoint({"f.img": data}, AddressMap.from_args([]))
    got = [(w.proto, w.port, w.id) for w in wants_of(res["f.img"].reports)]
    assert got == [("udplite", 5355, 3), ("udp", 5356, 4)]


@pytest.mark.root
def test_udplite_and_udp_ports_are_apart_in_a_namespace(netns):
    def make(proto, port):
        def run():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, proto)
            s.bind(("0.0.0.0", port))
            return s
        return in_netns(netns, run)

    with make(136, 7301), make(socket.IPPROTO_UDP, 7302):
        wants = [Want("udp", AF_INET, A("127.0.0.1"), 7301, "a"),
                 Want("udplite", AF_INET, A("127.0.0.1"), 7301, "b"),
                 Want("udplite", AF_INET, A("127.0.0.1"), 7302, "c"),
                 Want("udp", AF_INET, A("127.0.0.1"), 7302, "d")]
        got = taken(wants, netns)
        assert [c.want.label for c in got] == ["b", "d"]
        assert "by udplite 0.0.0.0:7301 bound" in str(got[0])
