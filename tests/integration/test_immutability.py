"""The shared image is never modified: 50 real CRIU restores through one mount leave every
file's bytes and mtime as they were, and every write through the view gets EROFS, in both
serve modes (symlinks lead into a read-only bind of IMAGE_DIR, docs/security.md)."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.mount import mounted

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.criu]

A4, A6 = "10.77.0.1", "fd77::1"
CYCLES = int(os.environ.get("IMMUTABILITY_CYCLES", "50"))


def snapshot(d: Path) -> dict[str, tuple[str, int, int, int]]:
    """path -> (sha256, mtime_ns, size, mode) of every file, directory and symlink."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files + ["."]:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if os.path.islink(p):
                digest = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            else:
                digest = "dir:" + ",".join(sorted(os.listdir(p)))
            out[os.path.normpath(p)] = (digest, st.st_mtime_ns, st.st_size, st.st_mode)
    return out


def writes(mp: Path) -> dict[str, Callable[[], object]]:
    """Every way to change something, on a socket image, on a file served as a symlink or
    through read(), and on a directory."""
    f, pages, d = mp / "files.img", mp / "pages-1.img", mp
    return {
        "write files.img": lambda: open(f, "r+b"),
        "write pages (O_WRONLY)": lambda: os.open(pages, os.O_WRONLY),
        "write pages (O_RDWR)": lambda: os.open(pages, os.O_RDWR),
        "append pages": lambda: open(pages, "ab"),
        "truncate pages": lambda: os.truncate(pages, 0),
        "create": lambda: os.open(d / "new.img", os.O_WRONLY | os.O_CREAT, 0o644),
        "create over pages": lambda: os.open(pages, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        "rename": lambda: os.rename(pages, d / "x.img"),
        "unlink": lambda: os.unlink(pages),
        "unlink files.img": lambda: os.unlink(f),
        "mkdir": lambda: os.mkdir(d / "sub"),
        "rmdir": lambda: os.rmdir(d / "extra"),
        "rename dir": lambda: os.rename(d / "extra", d / "extra2"),
        "create in subdir": lambda: open(d / "extra" / "x", "wb"),
        "symlink": lambda: os.symlink("x", d / "s"),
        "link": lambda: os.link(f, d / "hard"),
        "chmod files.img": lambda: os.chmod(f, 0o600),
        "chmod pages": lambda: os.chmod(pages, 0o600),
        "chown pages": lambda: os.chown(pages, 1, 1),
        "utime pages": lambda: os.utime(pages, (0, 0)),
        "utime dir": lambda: os.utime(d),
        "setxattr files.img": lambda: os.setxattr(f, "user.x", b"1"),
        "setxattr pages": lambda: os.setxattr(pages, "user.x", b"1"),
        "removexattr pages": lambda: os.removexattr(pages, "user.x"),
    }


def assert_all_erofs(mp: Path) -> None:
    for what, fn in writes(mp).items():
        with pytest.raises(OSError) as ei:
            r = fn()
            if isinstance(r, int):
                os.close(r)
        # removexattr of an absent attribute on a read-only fs: EROFS before ENODATA
        assert ei.value.errno == errno.EROFS, (what, ei.value)


@pytest.fixture
def dumped(testnet, image_dirs):
    a = testnet.add_host("A")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001",
                                  "--udp-bind", f"udp4@{A4}:7002",
                                  "--tcp-listen", f"tcp6@[{A6}]:7004"])
    criu.dump(a, pid, image_dirs.images)
    (image_dirs.images / "extra").mkdir()  # a subdirectory, for rmdir and rename
    return testnet, image_dirs


def test_50_restores_through_one_mount_change_nothing(dumped):
    net, dirs = dumped
    b = net.add_host("B")
    images = dirs.images
    (images / "pages-1.img").stat()  # the files the EROFS checks use exist
    before = snapshot(images)
    took = []
    with mounted(images, dirs.root / "mnt", ["--map", f"{A4}={b.ipv4}",
                                             "--map", f"{A6}={b.ipv6}"]) as mnt:
        mp = Path(mnt)
        for i in range(CYCLES):
            t0 = time.monotonic()
            pid = criu.restore(b, mp, dirs.work)
            took.append(time.monotonic() - t0)
            if i % 10 == 0 or i == CYCLES - 1:  # it really runs, on B's addresses
                assert probe.tcp_hello(b, str(b.ipv4), 7001) == f"tcp4 {b.ipv4} 7001"
            criu.kill_tree(pid)
        assert_all_erofs(mp)
    assert snapshot(images) == before
    took.sort()
    print(f"\n{CYCLES} restores through one mount: median {took[len(took) // 2] * 1000:.0f} ms,"
          f" max {took[-1] * 1000:.0f} ms")


def test_erofs_in_read_mode_too(dumped):
    _net, dirs = dumped
    before = snapshot(dirs.images)
    with mounted(dirs.images, dirs.root / "mnt", ["--serve", "read",
                                                  "--map", f"{A4}=10.77.0.9"]) as mnt:
        assert not os.path.islink(Path(mnt) / "pages-1.img")
        assert_all_erofs(Path(mnt))
    assert snapshot(dirs.images) == before
