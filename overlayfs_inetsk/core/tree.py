"""ImageTree: the model of what a view of IMAGE_DIR shows, built once from a listing of it.

Which dirs are checkpoints (every dir holding files.img or inetsk.img), which entries are
shown and how (the symlink policy) is decided here, for the FUSE view, the offline
`rewrite` and `inspect` alike. An inode table of directories, socket images (generated on
open by the FUSE layer), symlinks (to originals or, for in-tree directory symlinks, to the
view's own entry) and files served through read(). Names and paths are bytes throughout.

Pure: the file system is walked by host/listing.py, which hands over a Listing (every
directory's entries with their lstat, every symlink's target and its stat; for a view
written as links, which serves no attributes, a plain file's lstat is not read: UNREAD);
nothing here touches the file system. The values are in core/treenode.py.

The table is a snapshot taken at mount time: a CRIU image directory does not change after
the dump, and a static table keeps inode numbers stable for the mount's whole life.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping

from .. import lazylog
from ..errors import TreeError
from .imagedir import SOCKET_IMAGE_NAMES
from .treenode import UNREAD, Entry, Kind, Listing, Node

TYPE_CHECKING = False  # (typing is not loaded at run time: record.py)
if TYPE_CHECKING:
    from typing import Literal

__all__ = ["ROOT_INODE", "SERVE_MODES", "UNREAD", "Entry", "ImageTree", "Kind", "Listing",
           "Node", "ServeMode"]

log = lazylog.getLogger(__name__)

ROOT_INODE = 1
if TYPE_CHECKING:
    ServeMode = Literal["symlink", "read"]
else:
    ServeMode = str
SERVE_MODES: tuple[ServeMode, ...] = ("symlink", "read")
_SOCKET_NAMES_B = {os.fsencode(n): n for n in SOCKET_IMAGE_NAMES}
CRIU_PARENT_LINK = b"parent"  # CRIU's CR_PARENT_LINK: a dump's link to the previous one


class ImageTree:
    """The view's inode table (build). link_root: where the symlinks to files point: image_dir
    itself, or a read-only bind of it (the daemon's /run/overlayfs-inetsk/ro/..., so a write
    through a symlink gets EROFS); link_from: where the view itself is seen (the
    mountpoint): file links are relative to it when set. attrs=False: a view written as
    links (rewrite, the plugin), which serves no attributes: a plain file's Node.st UNREAD."""

    def __init__(self, image_dir: bytes, serve: ServeMode, link_root: bytes = b"",
                 link_from: bytes | None = None, sockets_only: bool = False,
                 attrs: bool = True) -> None:
        self.image_dir = image_dir  # absolute real path
        self.serve = serve
        self.link_root = link_root
        self.link_from = link_from
        self.attrs = attrs
        self.nodes: dict[int, Node] = {}
        # directory inode -> {socket image name ("files.img"): real path of its original}
        self.socket_groups: dict[int, dict[str, bytes]] = {}
        self.left_out: list[tuple[bytes, str]] = []  # (view path, reason)
        # CRIU's `parent` links (--prev-images-dir) pointing outside image_dir: (real path
        # of the link, its resolved target); the planner refuses them (check_parents)
        self.outside_parents: list[tuple[bytes, bytes]] = []
        # the caller reads socket images only (inspect): a plain file left out is no news
        self.sockets_only = sockets_only

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

    def holds_images(self) -> bool:
        """Whether this is a CRIU image dir (or a tree of them): a socket image or an
        inventory.img anywhere in it. A server's config dir or an empty dir is none."""
        return bool(self.socket_groups) or any(
            n.name == b"inventory.img" for n in self.nodes.values())

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
        if serve == "read" and not listing.attrs:
            raise TreeError("a tree served through read() needs a listing with attributes")
        real = listing.root
        root = real if link_root is None else os.fsencode(link_root)
        if not os.path.isabs(root):
            raise TreeError(f"link root {os.fsdecode(root)!r} is not an absolute path")
        tree = cls(real, serve, root.rstrip(b"/") or b"/", None, sockets_only, listing.attrs)
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
        log.log(lazylog.DEBUG if quiet else lazylog.WARNING, "left out %s: %s",
                os.fsdecode(vpath), reason)

    def _inside(self, path: bytes) -> bool:
        return path == self.image_dir or path.startswith(self.image_dir.rstrip(b"/") + b"/")

    def _link_base(self, dino: int) -> tuple[bytes, int, bytes | None]:
        """How a symlink in directory `dino` shows the file at `real` (inside image_dir):
        (prefix, cut, None) for prefix + real[cut:], made once a directory, as
        os.path.relpath would make it for each file; (abs, cut, here) when the view is seen
        from inside link_root: relpath(abs + real[cut:], here) for each."""
        if self.link_root == self.image_dir and self.link_from is None:
            return b"", 0, None
        cut = len(self.image_dir.rstrip(b"/")) + 1
        absolute = self.link_root.rstrip(b"/") + b"/"
        if self.link_from is None:
            return absolute, cut, None
        here = os.path.normpath(os.path.join(self.link_from, self.path(dino)))
        root = os.path.normpath(self.link_root)
        if here == root or here.startswith(root.rstrip(b"/") + b"/"):
            return absolute, cut, here
        return os.path.relpath(root, here) + b"/", cut, None

    @staticmethod
    def _link(base: tuple[bytes, int, bytes | None], real: bytes) -> bytes:
        prefix, cut, here = base
        return prefix + real[cut:] if here is None else os.path.relpath(prefix + real[cut:],
                                                                        here)

    def _walk(self, listing: Listing) -> None:
        next_ino = ROOT_INODE
        nodes = self.nodes
        self._add(Node(ROOT_INODE, Kind.DIR, b"", ROOT_INODE, self.image_dir, listing.root_st,
                       children={}))
        dir_by_real: dict[bytes, int] = {self.image_dir: ROOT_INODE}
        pending_dir_links: list[tuple[int, bytes, bytes, os.stat_result]] = []
        links = self.serve == "symlink"
        stack = [ROOT_INODE]
        while stack:
            dino = stack.pop()
            dnode = nodes[dino]
            children = dnode.children
            assert children is not None
            entries = listing.dirs.get(dnode.real_path, [])
            if isinstance(entries, str):
                # the root was checked readable; a subdirectory is shown empty
                log.warning("cannot list %s: %s", self.display(dino), entries)
                continue
            base = self._link_base(dino) if links else (b"", 0, None)
            prefix, cut, slow = base
            subdirs: list[int] = []
            for name, path, lst, error, target, tst, target_error in entries:
                if lst is UNREAD:  # a plain regular file (a listing without attributes)
                    next_ino += 1
                    nodes[next_ino] = Node(next_ino, Kind.LINK, name, dino, path, lst,
                                           prefix + path[cut:] if slow is None
                                           else self._link(base, path))
                    children[name] = next_ino
                    continue
                if lst is None:
                    self._leave_out(dino, name, f"cannot stat: {error}")
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
                    if target is None or tst is None:
                        err, why = target_error or (0, "unresolved")
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
                elif links:
                    self._add(Node(next_ino, Kind.LINK, name, dino, real, st,
                                   link_target=self._link(base, real)))
                else:
                    self._add(Node(next_ino, Kind.FILE, name, dino, real, st))
            stack.extend(reversed(subdirs))
        linked: set[int] = set()
        for dino, name, target, tst in pending_dir_links:
            tino = dir_by_real.get(target)
            link_dir = nodes[dino].real_path
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
            linked.add(dino)
        for dino in linked:  # keep their children in name order (dir links came last)
            n = nodes[dino]
            assert n.children is not None
            n.children = dict(sorted(n.children.items()))
