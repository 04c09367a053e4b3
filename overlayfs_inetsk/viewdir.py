"""`rewrite`: write a restorable view directory offline.

Socket images are written rewritten; every other file is a symlink to the original (no bulk
data is copied; CRIU follows symlinks in its images dir). The view is built in a temporary
directory beside OUT_DIR and renamed into place, so OUT_DIR is whole or absent. IMAGE_DIR is
never opened for writing.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile

from .addrmap import AddressMap, Resolver
from .errors import InetskError
from .imagedir import check_image_dir, checkpoint_dirs, is_socket_image, read_group
from .rewrite import RewriteOptions, RewriteResult, rewrite_group

log = logging.getLogger(__name__)


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
    results: dict[str, RewriteResult] = {}
    for reldir, names in checkpoint_dirs(root).items():
        results.update(
            rewrite_group(read_group(root, reldir, names), amap, resolve, options, reports=True)
        )

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_abs)}.", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        _populate(root, tmp, results)
        os.rename(tmp, out_abs)  # replaces an empty OUT_DIR atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _populate(root: str, tmp: str, results: dict[str, RewriteResult]) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dest_dir = tmp if rel == "." else os.path.join(tmp, rel)
        for name in list(dirnames):
            src = os.path.join(dirpath, name)
            if os.path.islink(src):  # os.walk does not descend into symlinked dirs
                dirnames.remove(name)
                _link(root, src, os.path.join(dest_dir, name))
            else:
                os.mkdir(os.path.join(dest_dir, name), 0o755)
        for name in filenames:
            src = os.path.join(dirpath, name)
            dest = os.path.join(dest_dir, name)
            res = results.get(src) if is_socket_image(name) else None
            if res is not None:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(res.data)
            else:
                _link(root, src, dest)


def _link(root: str, src: str, dest: str) -> None:
    """Symlink dest to src's real path, only if that stays inside root."""
    real = os.path.realpath(src)
    if not inside(real, root):
        log.warning("%s: symlink leads outside the image dir (%s); left out", src, real)
        return
    try:
        st = os.stat(real)
    except OSError as exc:
        log.warning("%s: %s; left out", src, exc.strerror)
        return
    if stat.S_ISDIR(st.st_mode) and os.path.islink(src):
        log.warning("%s: symlink to a directory; left out", src)
        return
    os.symlink(real, dest)
