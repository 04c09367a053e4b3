"""The view written to disk as a directory: `rewrite` (offline, no FUSE), and the plugin's
views.

The same tree a mount serves (core.tree.ImageTree decides what is shown; the planner plans
it, planner/planner.py: this module only writes what it made), written to disk: socket
images rewritten, every other file a symlink to the original (no bulk data is copied; CRIU
follows symlinks in its images dir), directories as directories. The view is built in a
temporary directory beside OUT_DIR and renamed into place, so OUT_DIR is whole or absent.
IMAGE_DIR is never opened for writing. The view holds a marker file (VIEW_MARKER), so that
the runtime plugin does not rewrite a view again.

A tree made with link_from=view_location(OUT_DIR) (the runtime plugin): the symlinks are
relative to their own directory, so they resolve inside a restored container's mount
namespace too, where the host's absolute paths do not exist (docs/podman.md).

Modes, whatever the caller's umask: a rewritten socket image has its original's (CRIU
writes 0600); a directory has its original's, without group or world write, plus the
owner's rwx (so that its owner can remove the view). Nothing is wider than the original.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from .core.plan import RewriteResult
from .core.tree import ROOT_INODE, ImageTree, Kind
from .errors import InetskError
from .host.files import check_image_dir

VIEW_MARKER = ".overlayfs-inetsk-view"


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_out_dir(image_dir: str, out_dir: str) -> str:
    """IMAGE_DIR's real path, once OUT_DIR is known to be writable as a view of it (new or
    empty, not inside IMAGE_DIR, its parent there): checked before anything is planned."""
    root = check_image_dir(image_dir)
    out_abs = os.path.abspath(out_dir)
    if inside(os.path.realpath(out_abs), root):
        raise InetskError(f"{out_dir}: OUT_DIR must not be inside IMAGE_DIR {image_dir}")
    if os.path.lexists(out_abs):
        if not os.path.isdir(out_abs) or os.path.islink(out_abs):
            raise InetskError(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_abs):
            raise InetskError(f"{out_dir}: OUT_DIR must be new or empty")
    parent = os.path.dirname(out_abs)
    if not os.path.isdir(parent):
        raise InetskError(f"{out_dir}: parent directory {parent} does not exist")
    return root


def _mkdtemp(prefix: str) -> str:
    """A new directory PREFIX<12 hex digits>, mode 0700, as tempfile.mkdtemp makes one
    (the tempfile module loads shutil, random and their imports: about 2 ms of every plugin
    CLI restore)."""
    for _ in range(100):
        path = prefix + os.urandom(6).hex()
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{prefix}*: no free name")


def write_view_dir(image_dir: str, out_dir: str, tree: ImageTree,
                   results: Mapping[str, RewriteResult]) -> None:
    """Write the planned view of IMAGE_DIR (its tree and every socket image's plan, made
    by the planner before anything is written, so errors leave nothing behind) as OUT_DIR.
    The tree decides the links: made with link_from=OUT_DIR's real path, they are
    relative."""
    check_out_dir(image_dir, out_dir)
    out_abs = os.path.abspath(out_dir)
    parent = os.path.dirname(out_abs)
    tmp = _mkdtemp(os.path.join(parent, f".{os.path.basename(out_abs)}."))
    try:
        root_mode = dir_mode(tree.root.st.st_mode)
        _populate(tree, os.fsencode(tmp), results)
        _write_marker(os.path.join(tmp, VIEW_MARKER), root_mode & 0o444)
        os.chmod(tmp, root_mode)
        os.rename(tmp, out_abs)  # replaces an empty OUT_DIR atomically
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def view_location(out_dir: str) -> str:
    """Where OUT_DIR will be, by its parent's real path (what a tree's link_from is for
    relative links)."""
    out_abs = os.path.abspath(out_dir)
    return os.path.join(os.path.realpath(os.path.dirname(out_abs)), os.path.basename(out_abs))


def dir_mode(original: int) -> int:
    """A view directory's permissions: its original's, without group or world write, plus
    the owner's rwx."""
    return stat.S_IMODE(original) & 0o755 | 0o700


def _write_marker(path: str, mode: int) -> None:
    try:  # O_EXCL: a marker linked from IMAGE_DIR (a view of a view) is left as it is
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write("a per-node view written by overlayfs-inetsk: its socket images are "
                "rewritten already\n")
        os.fchmod(f.fileno(), mode | 0o400)


def _populate(tree: ImageTree, tmp: bytes, results: Mapping[str, RewriteResult]) -> None:
    """Every node below the root made in TMP, each by its name relative to an fd of its
    directory (symlinkat, mkdirat, openat): the kernel does not look the view's path up
    again for every file, nor Python join it (10,000 links on tmpfs: 62 -> 45 ms)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    root = os.open(tmp, flags)
    cur, dfd = ROOT_INODE, root
    symlink = os.symlink
    try:
        # parents come before their children in the inode table, and a directory's entries
        # are next to each other (but its links to directories, made last)
        for node in tree.nodes.values():
            if node.parent != cur:
                if dfd != root:
                    os.close(dfd)
                cur = node.parent
                dfd = root if cur == ROOT_INODE else os.open(tree.path(cur), flags,
                                                              dir_fd=root)
            if node.kind is Kind.LINK:
                assert node.link_target is not None
                symlink(node.link_target, node.name, dir_fd=dfd)
            elif node.inode == ROOT_INODE:
                continue
            elif node.kind is Kind.DIR:
                os.mkdir(node.name, 0o700, dir_fd=dfd)
                os.chmod(node.name, dir_mode(node.st.st_mode), dir_fd=dfd)
            elif node.kind is Kind.SOCKET_IMAGE:
                fd = os.open(node.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                with os.fdopen(fd, "wb") as f:
                    f.write(results[os.fsdecode(node.real_path)].data)
                    os.fchmod(f.fileno(), stat.S_IMODE(node.st.st_mode) & 0o777)
            else:  # no FILE node in a tree of links (serve "symlink")
                raise ValueError(f"{tree.display(node.inode)}: a view dir holds no {node.kind}")
    finally:
        if dfd != root:
            os.close(dfd)
        os.close(root)
