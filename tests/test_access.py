"""Who can see the view, where its symlinks lead, what the daemon creates (docs/security.md).

- by default only the mounting user (root) sees the view: no allow_other;
- every symlink of the view resolves inside the read-only bind of IMAGE_DIR (same directory,
  mounted ro,nosuid,nodev,noexec); a symlink in the image that escapes IMAGE_DIR is not shown;
- nothing the daemon creates is group- or world-writable, whatever the caller's umask.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk.host.mounts import RO_DIR, find_mount, ro_bind_path
from inetsk_testbed.mount import BIN, mounted

pytestmark = [pytest.mark.root, pytest.mark.fuse]

NOBODY = 65534
MAP = ["--map", "10.0.1.0/24=10.77.1.0/24"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    (d / "checkpoint").mkdir(parents=True)
    (d / "checkpoint" / "files.img").write_bytes(
        files_img(inet_file_entry(isk(1, "10.0.1.5", 80))))
    (d / "checkpoint" / "pages-1.img").write_bytes(b"p" * 4096)
    (d / "spec.dump").write_text("{}")
    os.symlink("checkpoint/pages-1.img", d / "link-in")
    os.symlink("checkpoint", d / "dirlink")
    os.symlink("/etc/passwd", d / "link-out")
    os.symlink("../../../../../../etc", d / "link-out-rel")
    for p in (tmp_path, d, d / "checkpoint"):
        p.chmod(0o755)
    return d


def _as_nobody(fn: Callable[[], object]) -> int:
    """Run fn in a child process as uid/gid 65534; its errno (0 if it worked)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        os.write(w, bytes([code]))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    os.waitpid(pid, 0)
    return got[0]


def _mount_opts(mp: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mp:  # per-mount options, then the superblock's
                return fields[5].split(",") + line.split(" - ")[1].split()[2].split(",")
    raise AssertionError(f"{mp} not mounted")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory everyone can traverse (pytest's own tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="oit-access-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_only_root_sees_the_view_by_default(image: Path, public_dir: Path) -> None:
    mnt = public_dir / "mnt"
    with mounted(image, mnt, MAP) as mp:
        assert "allow_other" not in _mount_opts(mp)
        assert os.listdir(mp)  # root does
        assert _as_nobody(lambda: os.listdir(mp)) == errno.EACCES
        assert _as_nobody(lambda: os.stat(Path(mp) / "spec.dump")) == errno.EACCES
    with mounted(image, mnt, [*MAP, "--allow-other"]) as mp:
        assert "allow_other" in _mount_opts(mp)
        assert _as_nobody(lambda: os.listdir(mp)) == 0  # opt-in only
        # and even then nobody writes: spec.dump leads into the read-only bind, where the
        # file's own mode (0644, root's) refuses first; a world-writable one: read-only
        assert _as_nobody(lambda: open(Path(mp) / "spec.dump", "r+b")) == errno.EACCES
        os.chmod(image / "spec.dump", 0o666)
        assert _as_nobody(lambda: open(Path(mp) / "spec.dump", "r+b")) == errno.EROFS


def test_symlinks_lead_only_into_the_read_only_bind(image: Path, tmp_path: Path) -> None:
    with mounted(image, tmp_path / "mnt", MAP) as mp:
        bind = ro_bind_path(os.path.realpath(mp))
        assert os.path.dirname(bind) == RO_DIR
        # the bind is IMAGE_DIR itself, read-only, nosuid, nodev, noexec
        b, i = os.stat(bind), os.stat(image)
        assert (b.st_dev, b.st_ino) == (i.st_dev, i.st_ino)
        assert set(_mount_opts(bind)) >= {"ro", "nosuid", "nodev", "noexec"}
        assert os.statvfs(bind).f_flag & os.ST_RDONLY
        links = 0
        for root, dirs, files in os.walk(mp):
            for name in dirs + files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    continue
                target = os.readlink(p)
                resolved = os.path.realpath(p)
                if name == "dirlink":  # relative, inside the view itself
                    assert target == "checkpoint" and resolved.startswith(mp + "/")
                    continue
                links += 1
                # relative to the link's dir (resolves in a container's mount namespace too)
                assert not os.path.isabs(target), target
                assert os.path.normpath(os.path.join(root, target)).startswith(bind + "/")
                assert resolved.startswith(bind + "/") and os.path.exists(resolved)
                rel = os.path.relpath(resolved, bind)
                assert os.path.samefile(resolved, image / rel)
        assert links == 3  # spec.dump, link-in, checkpoint/pages-1.img
        names = os.listdir(mp)
        assert "link-out" not in names and "link-out-rel" not in names
    assert not os.path.exists(bind) and find_mount(bind) is None  # removed on a clean exit


def test_serve_read_needs_no_bind(image: Path, tmp_path: Path) -> None:
    with mounted(image, tmp_path / "mnt", [*MAP, "--serve", "read"]) as mp:
        assert not os.path.exists(ro_bind_path(os.path.realpath(mp)))
        assert not any(os.path.islink(os.path.join(mp, n)) for n in ("spec.dump", "link-in"))


def _not_group_or_world_writable(p: str) -> None:
    mode = os.lstat(p).st_mode
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH), f"{p}: {stat.filemode(mode)}"


def test_nothing_created_world_writable_even_with_umask_0(image: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    for fg in (False, True):
        log = tmp_path / ("fg" if fg else "bg") / "sub" / "daemon.log"
        argv = [BIN, "mount", str(image), str(mp), *MAP, "--log-file", str(log)]
        if fg:
            p = subprocess.Popen([*argv, "--foreground"], umask=0, stderr=subprocess.PIPE)
            for _ in range(200):
                if os.path.ismount(mp):
                    break
                p.poll()
                assert p.returncode is None, p.stderr.read() if p.stderr else ""
                time.sleep(0.02)
        else:
            subprocess.run(argv, umask=0, check=True, capture_output=True, timeout=60)
        try:
            bind = ro_bind_path(str(mp))
            for path in (str(log), str(log.parent), RO_DIR, os.path.dirname(RO_DIR)):
                _not_group_or_world_writable(path)
            assert stat.S_IMODE(os.stat(log).st_mode) == 0o640
            assert find_mount(bind) is not None
            for root, dirs, files in os.walk(mp):  # nothing in the view has a write bit
                for n in dirs + files:
                    st = os.lstat(os.path.join(root, n))
                    if not stat.S_ISLNK(st.st_mode):
                        assert not st.st_mode & 0o222, n
        finally:
            subprocess.run([BIN, "umount", str(mp)], capture_output=True, timeout=60)
            if fg:
                p.wait(20)
        assert not os.path.ismount(mp) and not os.path.exists(bind)


def test_bind_falls_back_to_bind_and_remount(image: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels without the new mount API (< 5.12): mount --bind, then remount read-only."""
    from overlayfs_inetsk.host import mounts as daemon

    def no_new_api(*_a: object) -> None:
        raise OSError(errno.ENOSYS, "open_tree: Function not implemented")

    monkeypatch.setattr(daemon, "_bind_new_api", no_new_api)
    target = daemon.ro_bind_path(str(tmp_path / "fallback-mnt"))
    mount_id = daemon.make_ro_bind(str(image), target)
    try:
        assert set(_mount_opts(target)) >= {"ro", "nosuid", "nodev", "noexec"}
        with pytest.raises(OSError) as ei:
            open(os.path.join(target, "spec.dump"), "r+b")
        assert ei.value.errno == errno.EROFS
        assert not daemon.clear_ro_bind(target, mount_id + 1000)  # not ours: left alone
        assert find_mount(target) is not None
    finally:
        assert daemon.clear_ro_bind(target, mount_id)
    assert find_mount(target) is None and not os.path.exists(target)


def test_the_new_mount_api_is_called_only_where_its_numbers_are_known(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Syscall 428 is open_tree on x86_64 and arm64, not on mips (4428, 5428, 6428) or
    alpha (538): on a machine not known to share the generic table the numbers are never
    called (they would be another system call), and the old API binds."""
    from overlayfs_inetsk.host import mounts as daemon

    calls: list[tuple[object, ...]] = []
    real_libc = daemon._libc()

    class Libc:
        real = real_libc

        def syscall(self, *args: object) -> int:
            calls.append(args)
            return -1

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    monkeypatch.setattr(daemon, "_libc", lambda: Libc())
    real_uname = os.uname()
    monkeypatch.setattr(daemon.os, "uname", lambda: os.uname_result(
        (*real_uname[:4], "mips64")))
    target = daemon.ro_bind_path(str(tmp_path / "mips-mnt"))
    mount_id = daemon.make_ro_bind(str(image), target)
    try:
        assert calls == [] and set(_mount_opts(target)) >= {"ro", "nosuid", "nodev", "noexec"}
    finally:
        assert daemon.clear_ro_bind(target, mount_id)


def test_mount_point_inside_image_dir_is_left_out(image: Path, tmp_path: Path) -> None:
    """The bind is not recursive: a file system mounted inside IMAGE_DIR would show as
    dangling links, so the view leaves it out (symlink mode) with a warning."""
    sub = image / "checkpoint" / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "oit-test", str(sub)], check=True)
    try:
        (sub / "x.img").write_bytes(b"x")
        log = tmp_path / "daemon.log"
        with mounted(image, tmp_path / "mnt", [*MAP, "--log-file", str(log)]) as mp:
            assert "sub" not in os.listdir(Path(mp) / "checkpoint")
        assert "left out checkpoint/sub: a mount point inside the image dir" in log.read_text()
        with mounted(image, tmp_path / "mnt", [*MAP, "--serve", "read"]) as mp:
            assert (Path(mp) / "checkpoint" / "sub" / "x.img").read_bytes() == b"x"
    finally:
        subprocess.run(["umount", str(sub)], check=True)
