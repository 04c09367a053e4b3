"""The values of a view's tree (core/tree.py): what host/listing.py hands over (a Listing of
Entry rows) and what the inode table holds (Node, of a Kind). Pure, as the tree."""

from __future__ import annotations

import enum
import os
import stat

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ..record import NamedTuple


class Entry(NamedTuple):
    """One directory entry of a Listing."""

    name: bytes
    path: bytes  # the directory's path joined with name
    lst: os.stat_result | None  # its lstat (UNREAD: not read); None: cannot (error says why)
    error: str | None = None
    target: bytes | None = None  # a symlink: its real path (None: unresolved)
    tst: os.stat_result | None = None  # ... and that path's stat
    target_error: tuple[int, str] | None = None  # (errno, strerror) of resolving it


# the lstat of a plain regular file in a listing made without attributes (attrs=False: for a
# view written as links, which serves none): its type, from the directory entry, and nothing
# else. Never a socket image, a directory or a symlink (those are always stat'ed).
UNREAD = os.stat_result((stat.S_IFREG, 0, 0, 0, 0, 0, 0, 0, 0, 0))


class Listing(NamedTuple):
    """IMAGE_DIR as host/listing.py saw it: its real path and stat, and for each directory
    it listed (by path), its entries sorted by name, or why it could not be listed (dirs is
    filled in as the walk goes: unhashable, as its dict). attrs=False: plain files UNREAD."""

    root: bytes
    root_st: os.stat_result
    dirs: dict[bytes, list[Entry] | str]
    attrs: bool = True


class Kind(enum.Enum):
    DIR = "dir"
    SOCKET_IMAGE = "socket-image"  # bytes generated from the original on first open
    LINK = "link"  # a symlink; readlink gives Node.link_target
    FILE = "file"  # served through read() from Node.real_path (--serve read)


class Node:
    """One entry of the view (a plain class: 10,000 files, 10,000 nodes, built at every
    start). Compared by identity."""

    __slots__ = ("inode", "kind", "name", "parent", "real_path", "st", "link_target",
                 "children")

    def __init__(self, inode: int, kind: Kind, name: bytes, parent: int, real_path: bytes,
                 st: os.stat_result, link_target: bytes | None = None,
                 children: dict[bytes, int] | None = None) -> None:
        self.inode = inode
        self.kind = kind
        self.name = name
        self.parent = parent
        self.real_path = real_path  # absolute resolved path of the original (LINK: its target)
        self.st = st  # stat of the original (symlinks resolved); UNREAD in a tree of no attrs
        self.link_target = link_target
        self.children = children  # DIR only, insertion order = sorted names

    def __repr__(self) -> str:
        return f"Node({self.inode}, {self.kind.name}, {self.name!r})"

    @property
    def mode(self) -> int:
        """st_mode in the view: no write bits anywhere, symlinks 0777."""
        if self.kind is Kind.LINK:
            return stat.S_IFLNK | 0o777
        perm = stat.S_IMODE(self.st.st_mode) & 0o555
        if self.kind is Kind.DIR:
            return stat.S_IFDIR | perm
        return stat.S_IFREG | perm

    @property
    def size(self) -> int:
        """Size as far as the view knows it (a socket image's real size comes after
        generation, see the FUSE layer)."""
        if self.kind is Kind.LINK:
            return len(self.link_target or b"")
        if self.kind is Kind.DIR:
            return 0
        return self.st.st_size
