"""Small CRIU socket images built in code from pycriu's generated classes."""

from __future__ import annotations

import ipaddress

from pycriu.images import fdinfo_pb2, fown_pb2, regfile_pb2, sk_inet_pb2, sk_opts_pb2

from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.core.sockaddr import AF_INET, AF_INET6, addr_to_words


def isk(
    id: int,
    src: str,
    sport: int,
    dst: str = "",
    dport: int = 0,
    *,
    proto: str = "tcp",
    state: int | None = None,
    family: int | None = None,
) -> sk_inet_pb2.inet_sk_entry:
    s = ipaddress.ip_address(src)
    fam = family if family is not None else (AF_INET if s.version == 4 else AF_INET6)
    zero = "0.0.0.0" if fam == AF_INET else "::"
    d = ipaddress.ip_address(dst or zero)
    if state is None:
        state = 10 if proto == "tcp" and not dport else (1 if proto == "tcp" else 7)
    e = sk_inet_pb2.inet_sk_entry(
        id=id, ino=1000 + id, family=fam, type=1 if proto == "tcp" else 2,
        proto=6 if proto == "tcp" else 17, state=state, src_port=sport, dst_port=dport,
        flags=2, backlog=128 if state == 10 else 0,
        src_addr=addr_to_words(s), dst_addr=addr_to_words(d),
        fown=fown_pb2.fown_entry(uid=0, euid=0, signum=0, pid_type=0, pid=0),
        opts=sk_opts_pb2.sk_opts_entry(so_sndbuf=16384, so_rcvbuf=131072,
                                       so_snd_tmo_sec=0, so_snd_tmo_usec=0,
                                       so_rcv_tmo_sec=0, so_rcv_tmo_usec=0),
    )
    if fam == AF_INET6:
        e.v6only = False
    return e


def inet_file_entry(sk: sk_inet_pb2.inet_sk_entry) -> bytes:
    fe = fdinfo_pb2.file_entry(type=fdinfo_pb2.INETSK, id=sk.id)
    fe.isk.CopyFrom(sk)
    data: bytes = fe.SerializeToString()
    return data


def reg_file_entry(id: int, name: str = "/tmp/x") -> bytes:
    fe = fdinfo_pb2.file_entry(type=fdinfo_pb2.REG, id=id)
    fe.reg.CopyFrom(regfile_pb2.reg_file_entry(
        id=id, flags=0, pos=0, name=name,
        fown=fown_pb2.fown_entry(uid=0, euid=0, signum=0, pid_type=0, pid=0)))
    data: bytes = fe.SerializeToString()
    return data


def files_img(*payloads: bytes) -> bytes:
    return imagefile.encode(imagefile.FILES_MAGIC, payloads)


def inetsk_img(*sks: sk_inet_pb2.inet_sk_entry) -> bytes:
    return imagefile.encode(imagefile.INETSK_MAGIC, [s.SerializeToString() for s in sks])
