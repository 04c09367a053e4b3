"""Whether CRIU 4.2.1 restores a checkpoint's tasks in a network namespace of their own, read
from the images the way CRIU decides it.

CRIU compares the root task's namespace ids (`ids-<pid>.img`, a task_kobj_ids_entry) with
those of the criu that dumped it (`inventory.img`'s root_ids): when the net_ns_id differs,
CLONE_NEWNET is in the restore's namespace mask (pstree.c get_clone_mask), and then:

- the root task enters that namespace (an external one, as runc hands over with
  `extRootNetNS`, or a fresh one CRIU fills from the images) before the `setup-namespaces`
  action, and no socket exists before the tasks fork, after `post-setup-namespaces`;
- CRIU's network unlock does NOT delete the per-connection lock rules
  (sk-tcp.c rst_unlock_tcp_connections returns early) but runs the `network-unlock` action;
- without it, the tasks live in criu's own namespace, no action runs between `pre-restore`
  and the sockets, and the network unlock deletes those rules.

The group barrier (app/barrier.py) locks the connections where they will live by this.
Pure: bytes in. The root task is the first entry of `pstree.img`.
"""

from __future__ import annotations

import struct
import sys

from ..errors import ImageError

IMG_COMMON = 0x54564319
IMG_SERVICE = 0x55105940
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
IDS_MAGIC = 0x54432030
ROOT_IDS = 3  # inventory_entry.root_ids
NET_NS_ID = 6  # task_kobj_ids_entry.net_ns_id
PID = 1  # pstree_entry.pid

_U32 = struct.Struct("<I" if sys.byteorder == "little" else ">I")


def first_entry(data: bytes, path: str, magic: int) -> bytes:
    """The first packed message of an image file: its magic (after IMG_COMMON, except in
    inventory.img, which has none) must be `magic`."""
    pos = 0

    def u32(what: str) -> int:
        nonlocal pos
        if len(data) - pos < 4:
            raise ImageError(path, f"{len(data)} bytes: too short for {what}")
        (v,) = _U32.unpack_from(data, pos)
        pos += 4
        return int(v)

    kind = u32("the image magic")
    if kind in (IMG_COMMON, IMG_SERVICE):
        kind = u32("the image magic")
    if kind != magic:
        raise ImageError(path, f"wrong image type: magic 0x{kind:08x}, expected 0x{magic:08x}")
    length = u32("an entry")
    if length > len(data) - pos:
        raise ImageError(path, f"entry length {length} runs past the end of the file "
                               f"({len(data) - pos} bytes left): truncated or corrupt", pos - 4)
    return data[pos:pos + length]


def _varint(msg: bytes, pos: int, path: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(msg) or shift > 63:
            raise ImageError(path, "a varint runs past its message: truncated or corrupt")
        b = msg[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def field(msg: bytes, number: int, path: str) -> int | bytes | None:
    """The last value of field `number` in a packed protobuf message (a varint as an int,
    a length-delimited one as bytes), None when absent. Other fields are skipped."""
    pos, found = 0, None
    value: int | bytes
    while pos < len(msg):
        key, pos = _varint(msg, pos, path)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos, path)
        elif wire == 2:
            n, pos = _varint(msg, pos, path)
            if n > len(msg) - pos:
                raise ImageError(path, f"field {num} runs past its message: truncated or "
                                       "corrupt")
            value, pos = msg[pos:pos + n], pos + n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if width > len(msg) - pos:
                raise ImageError(path, f"field {num} runs past its message")
            value, pos = msg[pos:pos + width], pos + width
        else:
            raise ImageError(path, f"field {num} has wire type {wire}: not a CRIU image")
        if num == number:
            found = value
    return found


def _int(v: int | bytes | None, path: str, what: str) -> int | None:
    if isinstance(v, bytes):
        raise ImageError(path, f"{what} is not a varint")
    return v


def root_pid(pstree: bytes, path: str) -> int:
    """The root task's pid (its ids are in ids-<pid>.img)."""
    pid = _int(field(first_entry(pstree, path, PSTREE_MAGIC), PID, path), path, "pid")
    if not pid:
        raise ImageError(path, "the first pstree entry has no pid")
    return pid


def tasks_own_netns(inventory: bytes, inventory_path: str, ids: bytes, ids_path: str) -> bool:
    """True when CRIU restores the tasks in a network namespace other than criu's own
    (CLONE_NEWNET): the root task's net_ns_id differs from the dumping criu's. An absent
    id counts as 0, as in CRIU's comparison."""
    inv = first_entry(inventory, inventory_path, INVENTORY_MAGIC)
    root = field(inv, ROOT_IDS, inventory_path)
    if not isinstance(root, bytes):
        raise ImageError(inventory_path, "no root_ids: images of a CRIU too old")
    dumper = _int(field(root, NET_NS_ID, inventory_path), inventory_path, "net_ns_id") or 0
    task = _int(field(first_entry(ids, ids_path, IDS_MAGIC), NET_NS_ID, ids_path), ids_path,
                "net_ns_id") or 0
    return task != dumper
