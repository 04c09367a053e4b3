"""Mounting views for tests and the demo: `overlayfs-inetsk mount` as a user runs it, and an
unmount that always happens."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

BIN = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")


def overlayfs_inetsk(*args: str, check: bool = True, timeout: float = 60
                     ) -> subprocess.CompletedProcess[str]:
    """Run the CLI (the venv's console script) and capture its output."""
    cp = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RuntimeError(f"overlayfs-inetsk {' '.join(args)}: exit {cp.returncode}: "
                           f"{cp.stderr.strip()}")
    return cp


def mount_daemons(under: str | os.PathLike[str]) -> list[int]:
    """Pids of `overlayfs-inetsk mount` daemons whose command line names a path under
    `under` (what a test or the soak counts as left behind)."""
    key = os.fsencode(str(under))
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"overlayfs_inetsk" in cmd and b"\0mount\0" in cmd and key in cmd:
                out.append(int(d))
    return out


def ismount(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == p for line in f)


@contextlib.contextmanager
def mounted(image_dir: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
            options: Sequence[str] = ()) -> Iterator[str]:
    """`overlayfs-inetsk mount IMAGE_DIR MOUNTPOINT OPTIONS...` (background daemon); yields
    the mountpoint; `overlayfs-inetsk umount` on the way out, whatever happened."""
    mp = os.fspath(mountpoint)
    os.makedirs(mp, exist_ok=True)
    overlayfs_inetsk("mount", os.fspath(image_dir), mp, *options)
    try:
        yield mp
    finally:
        if ismount(mp):
            overlayfs_inetsk("umount", mp, check=False)
        if ismount(mp):  # last resort, so no test leaves a mount behind
            subprocess.run(["umount", "-l", mp], check=False)


def kept_restore_dirs(pid: int) -> list[str]:
    """The paths the `restore` that ran as `pid` left in RESTORE_DIR (a restore whose criu
    failed or was killed keeps its work dir there: docs/cli.md)."""
    from overlayfs_inetsk.host.stale import RESTORE_DIR

    try:
        return [os.path.join(RESTORE_DIR, n) for n in sorted(os.listdir(RESTORE_DIR))
                if n.startswith(f"{pid}-")]
    except FileNotFoundError:
        return []


def remove_kept_restore_dirs(pids: list[int]) -> None:
    """Remove what the restores that ran as `pids` kept in RESTORE_DIR (pids is emptied),
    except a dir that still holds a mount (a live restore's view)."""
    import shutil

    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4] for ln in f]
    while pids:
        for path in kept_restore_dirs(pids.pop()):
            if not any(p == path or p.startswith(path + "/") for p in points):
                shutil.rmtree(path, ignore_errors=True)


class Ran(subprocess.CompletedProcess[str]):
    """A finished command, with the pid it ran as (a restore's dirs are RESTORE_DIR/<pid>-*)."""

    def __init__(self, args: Sequence[str], rc: int, out: str, err: str, pid: int) -> None:
        super().__init__(args, rc, out, err)
        self.pid = pid


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> Ran:
    """Run `python -m overlayfs_inetsk.cli ARGS` (stdin closed) to its end, killed after
    `timeout` seconds."""
    args_ = [sys.executable, "-m", "overlayfs_inetsk.cli", *args]
    p = subprocess.Popen(args_,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return Ran(list(args_), p.returncode, out, err, p.pid)


async def read_in_process(ops: object, *path: bytes) -> bytes:
    """All of a file of a view read through fuse/ops.ViewOperations in this process (no
    mount): lookups from the root along `path`, open, read, release."""
    from overlayfs_inetsk.core.tree import ROOT_INODE

    inode = ROOT_INODE
    for name in path:
        inode = (await ops.lookup(inode, name, None)).st_ino  # type: ignore[attr-defined]
    fi = await ops.open(inode, os.O_RDONLY, None)  # type: ignore[attr-defined]
    try:
        return bytes(await ops.read(fi.fh, 0, 1 << 20))  # type: ignore[attr-defined]
    finally:
        await ops.release(fi.fh)  # type: ignore[attr-defined]
