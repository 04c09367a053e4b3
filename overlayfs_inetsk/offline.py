"""`rewrite`: write a restorable view directory offline.

The same tree a mount serves (view.View decides what is shown), written to disk: socket
images rewritten, every other file a symlink to the original (no bulk data is copied; CRIU
follows symlinks in its images dir), directories as directories. The view is built in a
temporary directory beside OUT_DIR and renamed into place, so OUT_DIR is whole or absent.
IMAGE_DIR is never opened for writing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .addrmap import AddressMap, Resolver
from .errors import InetskError
from .imagedir import check_image_dir, read_group
from .rewrite import RewriteOptions, RewriteResult, rewrite_group
from .view import ROOT_INODE, Kind, View


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def write_view_dir(
    image_dir: str,
    out_dir: str,
    amap: AddressMap,
    resolve: Resolver | None,
    options: RewriteOptions,
) -> dict[str, RewriteResult]:
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

    # All rewriting happens before anything is written, so errors leave nothing behind.
    view = View.build(root)
    results: dict[str, RewriteResult] = {}
    for _dino, group in view.iter_socket_groups():
        results.update(
            rewrite_group(read_group(group.values()), amap, resolve, options, reports=True)
        )

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_abs)}.", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        _populate(view, os.fsencode(tmp), results)
        os.rename(tmp, out_abs)  # replaces an empty OUT_DIR atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _populate(view: View, tmp: bytes, results: dict[str, RewriteResult]) -> None:
    # parents come before their children in the inode table
    for node in view.nodes.values():
        if node.inode == ROOT_INODE:
            continue
        dest = os.path.join(tmp, view.path(node.inode))
        if node.kind is Kind.DIR:
            os.mkdir(dest, 0o755)
        elif node.kind is Kind.SOCKET_IMAGE:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(results[os.fsdecode(node.real_path)].data)
        else:
            assert node.link_target is not None
            os.symlink(node.link_target, dest)
