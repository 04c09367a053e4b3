"""Small CRIU socket images built in code from pycriu's generated classes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

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


def _ids(net_ns_id: int | None) -> bytes:
    from pycriu.images import pb

    ids = pb.task_kobj_ids_entry(vm_id=1, files_id=1, fs_id=1, sighand_id=1, pid_ns_id=1,
                                 mnt_ns_id=5)
    if net_ns_id is not None:
        ids.net_ns_id = net_ns_id
    data: bytes = ids.SerializeToString()
    return data


def ns_images(directory: Path, *, dumper_net: int | None, task_net: int | None,
              pid: int = 1) -> None:
    """inventory.img (root_ids: the dumping criu's namespace ids), pstree.img (one task,
    `pid`) and ids-<pid>.img (its ids) in `directory`: CRIU restores the task in a
    network namespace of its own when the two net_ns_id differ."""
    from pycriu.images import magic, pb

    inv = pb.inventory_entry(img_version=2, fdinfo_per_id=True)
    inv.root_ids.ParseFromString(_ids(dumper_net))
    u32 = imagefile.pack_length
    body = inv.SerializeToString()
    (directory / "inventory.img").write_bytes(
        u32(magic.by_name["INVENTORY"]) + u32(len(body)) + body)
    tree = pb.pstree_entry(pid=pid, ppid=0, pgid=pid, sid=0).SerializeToString()
    (directory / "pstree.img").write_bytes(imagefile.encode(magic.by_name["PSTREE"], [tree]))
    (directory / f"ids-{pid}.img").write_bytes(
        imagefile.encode(magic.by_name["IDS"], [_ids(task_net)]))
