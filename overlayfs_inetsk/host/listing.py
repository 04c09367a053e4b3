"""The listing of IMAGE_DIR that core/tree.py builds a view's inode table from: one walk of
the file system, made here so that the tree's model stays pure.

Every real directory under IMAGE_DIR is listed (sorted by name), each entry lstat()ed, each
symlink resolved (realpath, then stat of its target); a symlink to a directory is not
followed, and with cross_mounts=False a directory on another file system (a mount point:
the read-only bind of IMAGE_DIR is not recursive, so the view leaves it out) is not listed
either. Nothing is opened but directories.
"""

from __future__ import annotations

import gc
import os
import stat

from ..core.tree import Entry, ImageTree, Listing, ServeMode
from ..errors import TreeError


def list_tree(image_dir: str | bytes, cross_mounts: bool = True) -> Listing:
    """The listing of the directory `image_dir`; TreeError when it is unusable (missing, not
    a directory, unreadable). A subdirectory that cannot be listed is recorded as such."""
    raw = os.fsencode(image_dir)
    try:
        real = os.path.realpath(raw, strict=True)
        st = os.stat(real)
    except OSError as exc:
        raise TreeError(f"{os.fsdecode(raw)}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise TreeError(f"{os.fsdecode(raw)}: not a directory")
    try:
        os.listdir(real)
    except OSError as exc:
        raise TreeError(f"{os.fsdecode(raw)}: {exc.strerror}") from None
    listing = Listing(real, st, {})
    new = tuple.__new__  # = Entry(...) without its __new__: 10,000 files, 10,000 entries
    stack = [(real, st)]
    while stack:
        path, dst = stack.pop()
        try:
            with os.scandir(path) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as err:
            listing.dirs[path] = err.strerror or str(err)
            continue
        entries = []
        for e in found:
            try:
                lst = e.stat(follow_symlinks=False)
            except OSError as exc:
                entries.append(Entry(e.name, e.path, None, exc.strerror or str(exc)))
                continue
            if stat.S_ISLNK(lst.st_mode):
                try:
                    target = os.path.realpath(e.path, strict=True)
                    tst = os.stat(target)
                except OSError as exc:
                    entries.append(Entry(e.name, e.path, lst, None, None, None,
                                         (exc.errno or 0, exc.strerror or str(exc))))
                    continue
                entries.append(Entry(e.name, e.path, lst, None, target, tst))
                continue
            if stat.S_ISDIR(lst.st_mode) and (cross_mounts or lst.st_dev == dst.st_dev):
                stack.append((e.path, lst))
            entries.append(new(Entry, (e.name, e.path, lst, None, None, None, None)))
        listing.dirs[path] = entries
    return listing


def build_tree(image_dir: str | bytes, serve: ServeMode = "symlink",
               link_root: str | bytes | None = None, link_from: str | bytes | None = None,
               sockets_only: bool = False) -> ImageTree:
    """ImageTree.build over this file system's listing of image_dir (see ImageTree.build;
    a tree whose links go into a read-only bind lists no mount point below IMAGE_DIR)."""
    if serve not in ("symlink", "read"):
        raise TreeError(f"unknown serve mode {serve!r}")
    real = os.path.realpath(os.fsencode(image_dir))
    cross = link_root is None or os.fsencode(link_root).rstrip(b"/") == real.rstrip(b"/")
    # the cyclic GC paused meanwhile: the listing and the inode table hold no cycles, and
    # the collections their allocations set off took a third of the build (10,000 files:
    # 90 -> 58 ms CPU)
    paused = gc.isenabled()
    gc.disable()
    try:
        return ImageTree.build(list_tree(image_dir, cross_mounts=cross), serve, link_root,
                               link_from, sockets_only)
    finally:
        if paused:
            gc.enable()
