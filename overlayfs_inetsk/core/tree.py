"""ImageTree: the model of what a view of IMAGE_DIR shows, built once from a listing of it.

Which dirs are checkpoints (every dir holding files.img or inetsk.img), which entries are
shown and how (the symlink policy) is decided here, for the FUSE view, the offline
`rewrite` and `inspect` alike. An inode table of directories, socket images (generated on
open by the FUSE layer), symlinks (to originals or, for in-tree directory symlinks, to the
view's own entry) and files served through read(). Names and paths are bytes throughout.

Pure: the file system is walked by host/listing.py, which hands over a Listing (every
directory's entries with their lstat, every symlink's target and its stat); nothing here
touches the file system.

The table is a snapshot taken at mount time: a CRIU image directory does not change after
the dump, and a static table keeps inode numbers stable for the mount's whole life.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from ..errors import TreeError
from .imagedir import SOCKET_IMAGE_NAMES
from ..record import Record

log = logging.getLogger(__name__)

ROOT_INODE = 1
ServeMode = Literal["symlink", "read"]
SERVE_MODES: tuple[ServeMode, ...] = ("symlink", "read")
_SOCKET_NAMES_B = {os.fsencode(n): n for n in SOCKET_IMAGE_NAMES}
CRIU_PARENT_LINK = b"parent"  # CRIU's CR_PARENT_LINK: a dump's link to the previous one


class Entry(NamedTuple):
    """One directory entry of a Listing."""

    name: bytes
    path: bytes  # the directory's path joined with name
    lst: os.stat_result | None  # its lstat; None: it could not be stat'ed (error says why)
    error: str | None = None
    target: bytes | None = None  # a symlink: its real path (None: unresolved)
    tst: os.stat_result | None = None  # ... and that path's stat
    target_error: tuple[int, str] | None = None  # (errno, strerror) of resolving it


class Listing(Record):
    """IMAGE_DIR as host/listing.py saw it: its real path and stat, and for each directory
    it listed (by path), its entries sorted by name, or why it could not be listed."""

    __slots__ = ("root", "root_st", "dirs")
    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is
    root: bytes
    root_st: os.stat_result
    dirs: dict[bytes, list[Entry] | str]

    def __init__(self, root: bytes, root_st: os.stat_result,
                 dirs: dict[bytes, list[Entry] | str]) -> None:
        self.root, self.root_st, self.dirs = root, root_st, dirs


class Kind(enum.Enum):
    DIR = "dir"
    SOCKET_IMAGE = "socket-image"  # bytes generated from the original on first open
    LINK = "link"  # a symlink; readlink gives Node.link_target
    FILE = "file"  # served through read() from Node.real_path (--serve read)


@dataclass(eq=False)
class Node:
    inode: int
    kind: Kind
    name: bytes
    parent: int
    real_path: bytes  # absolute resolved path of the original (for LINK: what it stands for)
    st: os.stat_result  # stat of the original (symlinks resolved)
    link_target: bytes | None = None
    children: dict[bytes, int] | None = None  # DIR only, insertion order = sorted names

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


@dataclass
class ImageTree:
    image_dir: bytes  # absolute real path
    serve: ServeMode
    # where the symlinks to files point: image_dir itself, or a read-only bind of it (the
    # daemon's /run/overlayfs-inetsk/ro/..., so a write through a symlink gets EROFS)
    link_root: bytes = b""
    # where the view itself is seen (the mountpoint): file links are relative to it when set
    link_from: bytes | None = None
    nodes: dict[int, Node] = field(default_factory=dict)
    # directory inode -> {socket image name ("files.img"): real path of its original}
    socket_groups: dict[int, dict[str, bytes]] = field(default_factory=dict)
    left_out: list[tuple[bytes, str]] = field(default_factory=list)  # (view path, reason)
    # CRIU's `parent` links (--prev-images-dir) that point outside image_dir:
    # (real path of the link, its resolved target); the planner refuses them (planner.check_parents)
    outside_parents: list[tuple[bytes, bytes]] = field(default_factory=list)
    # the caller reads socket images only (inspect): a plain file left out is no news
    sockets_only: bool = False

    # -- queries -------------------------------------------------------------------------
    def node(self, inode: int) -> Node:
        """Raises KeyError for an unknown inode."""
        return self.nodes[inode]

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INODE]

    def lookup(self, parent: int, name: bytes) -> Node | None:
        """Child `name` of directory `parent`; handles `.` and `..`. None if absent."""
        p = self.nodes.get(parent)
        if p is None or p.kind is not Kind.DIR:
            return None
        if name == b".":
            return p
        if name == b"..":
            return self.nodes[p.parent]
        assert p.children is not None
        ino = p.children.get(name)
        return None if ino is None else self.nodes[ino]

    def children(self, inode: int) -> list[Node]:
        """Entries of a directory in name order (no `.`/`..`)."""
        n = self.nodes[inode]
        if n.children is None:
            return []
        return [self.nodes[i] for i in n.children.values()]

    def path(self, inode: int) -> bytes:
        """Path of a node inside the view, relative to its root (b"." for the root)."""
        parts: list[bytes] = []
        n = self.nodes[inode]
        while n.inode != ROOT_INODE:
            parts.append(n.name)
            n = self.nodes[n.parent]
        return b"/".join(reversed(parts)) if parts else b"."

    def display(self, inode: int) -> str:
        """Path for log lines and messages (odd bytes escaped)."""
        return os.fsdecode(self.path(inode))

    def socket_group(self, dir_inode: int) -> Mapping[str, bytes]:
        """All socket images of one directory: name -> real path of the original."""
        return self.socket_groups.get(dir_inode, {})

    def iter_socket_groups(self) -> Iterator[tuple[int, Mapping[str, bytes]]]:
        yield from self.socket_groups.items()

    def __len__(self) -> int:
        return len(self.nodes)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def build(cls, listing: Listing, serve: ServeMode = "symlink",
              link_root: str | bytes | None = None,
              link_from: str | bytes | None = None, sockets_only: bool = False) -> ImageTree:
        """The inode table of a listing of IMAGE_DIR (host/listing.py: build_tree lists the
        file system and calls this).

        Symlinks to files point at their original's real path, re-rooted under `link_root`
        when given (a path where IMAGE_DIR is bind-mounted read-only; it need not exist yet).
        With `link_from` (the absolute path where the view itself is seen, e.g. the FUSE
        mountpoint) those targets are made relative to each link's own directory there: they
        then resolve from the link's dentry in any mount namespace, e.g. after a container
        runtime's restored tasks switched into the container's (where an absolute host path
        does not exist and CRIU fails with "No pagemap-1.img image").
        real_path stays the original's (socket images are read, and named in messages, there).

        Raises TreeError for a bad serve mode or link path. Entries that cannot be shown
        (escaping, dangling or looping symlinks, special files, unreadable directories)
        are left out with one WARNING line each and listed in `left_out`. With
        `sockets_only` (the caller reads socket images and nothing else, as `inspect`), a
        left-out file that is neither a socket image nor a directory (e.g. a `rewrite`
        output's links to the original dir) is logged at DEBUG: it changes nothing shown.
        """
        if serve not in SERVE_MODES:
            raise TreeError(f"unknown serve mode {serve!r}")
        real = listing.root
        root = real if link_root is None else os.fsencode(link_root)
        if not os.path.isabs(root):
            raise TreeError(f"link root {os.fsdecode(root)!r} is not an absolute path")
        tree = cls(image_dir=real, serve=serve, link_root=root.rstrip(b"/") or b"/",
                   sockets_only=sockets_only)
        if link_from is not None:
            tree.link_from = os.fsencode(link_from)
            if not os.path.isabs(tree.link_from):
                raise TreeError(f"view location {os.fsdecode(tree.link_from)!r} "
                                "is not an absolute path")
        tree._walk(listing)
        return tree

    def _add(self, node: Node) -> Node:
        self.nodes[node.inode] = node
        if node.inode != ROOT_INODE:
            parent = self.nodes[node.parent]
            assert parent.children is not None
            parent.children[node.name] = node.inode
        return node

    def _leave_out(self, parent: int, name: bytes, reason: str, warn: bool = True,
                   plain_file: bool = False) -> None:
        """warn=False: reported elsewhere; plain_file: the entry is a file and not a socket
        image (it holds no socket: no news for a caller that reads socket images only)."""
        p = self.path(parent)
        vpath = name if p == b"." else p + b"/" + name
        self.left_out.append((vpath, reason))
        if not warn:
            return
        quiet = plain_file and self.sockets_only and name not in _SOCKET_NAMES_B
        log.log(logging.DEBUG if quiet else logging.WARNING, "left out %s: %s",
                os.fsdecode(vpath), reason)

    def _inside(self, path: bytes) -> bool:
        return path == self.image_dir or path.startswith(self.image_dir.rstrip(b"/") + b"/")

    def _link_to(self, real: bytes, dino: int) -> bytes:
        """What a symlink in directory `dino` to the file at `real` (inside image_dir)
        shows."""
        if self.link_root == self.image_dir:
            target = real
        else:
            rel = os.path.relpath(real, self.image_dir)
            target = self.link_root if rel == b"." else os.path.join(self.link_root, rel)
        if self.link_from is None:
            return target
        here = os.path.normpath(os.path.join(self.link_from, self.path(dino)))
        return os.path.relpath(target, here)

    def _walk(self, listing: Listing) -> None:
        next_ino = ROOT_INODE
        self._add(Node(ROOT_INODE, Kind.DIR, b"", ROOT_INODE, self.image_dir, listing.root_st,
                       children={}))
        dir_by_real: dict[bytes, int] = {self.image_dir: ROOT_INODE}
        pending_dir_links: list[tuple[int, bytes, bytes, os.stat_result]] = []
        stack = [ROOT_INODE]
        while stack:
            dino = stack.pop()
            dnode = self.nodes[dino]
            entries = listing.dirs.get(dnode.real_path, [])
            if isinstance(entries, str):
                # the root was checked readable; a subdirectory is shown empty
                log.warning("cannot list %s: %s", self.display(dino), entries)
                continue
            subdirs: list[int] = []
            for e in entries:
                name = e.name
                path = e.path
                lst = e.lst
                if lst is None:
                    self._leave_out(dino, name, f"cannot stat: {e.error}")
                    continue
                if name in _SOCKET_NAMES_B and not stat.S_ISREG(lst.st_mode):
                    # a socket image must be a regular file: a symlink, FIFO, device or
                    # directory is kept as what it is, so validation (and any open)
                    # refuses it by name, as inspect/rewrite do; nothing else opens it
                    next_ino += 1
                    self._add(Node(next_ino, Kind.SOCKET_IMAGE, name, dino, path, lst))
                    self.socket_groups.setdefault(dino, {})[_SOCKET_NAMES_B[name]] = path
                    continue
                if stat.S_ISLNK(lst.st_mode):
                    target, tst = e.target, e.tst
                    if target is None or tst is None:
                        err, why = e.target_error or (0, "unresolved")
                        reason = ("symlink loops" if err == errno.ELOOP
                                  else f"dangling symlink ({why})")
                        self._leave_out(dino, name, reason)
                        continue
                    if not self._inside(target):
                        parent_link = name == CRIU_PARENT_LINK
                        # a `parent` link is reported by planner.check_parents(): an
                        # error for a view, one warning for inspect
                        self._leave_out(dino, name, "symlink points outside the image dir "
                                        f"({os.fsdecode(target)})", warn=not parent_link,
                                        plain_file=not stat.S_ISDIR(tst.st_mode))
                        if parent_link:
                            self.outside_parents.append((path, target))
                        continue
                    if stat.S_ISDIR(tst.st_mode):
                        # resolved after the walk, when every real directory has an inode
                        pending_dir_links.append((dino, name, target, tst))
                        continue
                    real, st = target, tst
                else:
                    real, st = path, lst
                if (stat.S_ISDIR(lst.st_mode) and lst.st_dev != dnode.st.st_dev
                        and self.link_root != self.image_dir):
                    # the read-only bind is not recursive: nothing below shows through it
                    self._leave_out(dino, name, "a mount point inside the image dir")
                    continue
                next_ino += 1
                if stat.S_ISDIR(st.st_mode):
                    self._add(Node(next_ino, Kind.DIR, name, dino, real, st, children={}))
                    dir_by_real[real] = next_ino
                    subdirs.append(next_ino)
                elif not stat.S_ISREG(st.st_mode):
                    next_ino -= 1
                    self._leave_out(dino, name, "not a regular file, directory or symlink",
                                    plain_file=True)
                elif name in _SOCKET_NAMES_B:
                    self._add(Node(next_ino, Kind.SOCKET_IMAGE, name, dino, real, st))
                    self.socket_groups.setdefault(dino, {})[_SOCKET_NAMES_B[name]] = real
                elif self.serve == "symlink":
                    self._add(Node(next_ino, Kind.LINK, name, dino, real, st,
                                   link_target=self._link_to(real, dino)))
                else:
                    self._add(Node(next_ino, Kind.FILE, name, dino, real, st))
            stack.extend(reversed(subdirs))
        for dino, name, target, tst in pending_dir_links:
            tino = dir_by_real.get(target)
            link_dir = self.nodes[dino].real_path
            if tino is None:
                self._leave_out(dino, name, "symlink to a directory the view does not show")
                continue
            if target == link_dir or link_dir.startswith(target.rstrip(b"/") + b"/"):
                self._leave_out(dino, name, "symlink loops (points at its own ancestor)")
                continue
            # relative, so the link stays inside the view (socket images there get rewritten)
            rel = os.path.relpath(target, link_dir)
            next_ino += 1
            self._add(Node(next_ino, Kind.LINK, name, dino, target, tst, link_target=rel))
        # keep every directory's children in name order (dir links were added last)
        for n in self.nodes.values():
            if n.children is not None and len(n.children) > 1:
                n.children = dict(sorted(n.children.items()))
