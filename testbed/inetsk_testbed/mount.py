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
