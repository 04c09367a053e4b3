"""The one stale sweeper (host/stale.py): a restore's dir, like a plugin view, lives while
someone holds a flock on it; pid numbers say nothing (issue 19: a restore's dir named after
a pid that lives again, reused, was never cleared)."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

from overlayfs_inetsk.host.stale import DIR_FLAGS, clear_restores, hold_new, sweep


def _restore_dir(root: Path, pid: int, view: bool = True) -> Path:
    base = root / f"{pid}-abcd1234"
    (base / "work").mkdir(parents=True)
    if view:
        (base / "view").mkdir()
    return base


def test_a_dir_nobody_holds_is_cleared_whatever_its_pid(tmp_path: Path, expect_log) -> None:
    """Named after a live pid (ours: as after pid reuse), held by nobody: cleared."""
    base = _restore_dir(tmp_path, os.getpid())
    expect_log(logging.WARNING, rf"cleared {base}/view, left by restore pid {os.getpid()}")
    assert clear_restores(str(tmp_path)) == [str(base / "view")]
    assert not base.exists()


def test_a_held_dir_stays_and_goes_once_let_go(tmp_path: Path, expect_log) -> None:
    """Held by another process (as the criu a killed restore ran holds it): left alone;
    once that process is gone, cleared."""
    base = _restore_dir(tmp_path, 1)
    fd = os.open(base, DIR_FLAGS)
    os.set_inheritable(fd, True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, pass_fds=(fd,))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.close(fd)  # the holder's copy of the open file keeps the lock
        assert clear_restores(str(tmp_path)) == [] and base.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    expect_log(logging.WARNING, r"left by restore pid 1 \(killed\)")
    assert clear_restores(str(tmp_path)) == [str(base / "view")] and not base.exists()


def test_a_failed_restores_kept_work_dir_stays(tmp_path: Path) -> None:
    base = _restore_dir(tmp_path, 1, view=False)  # its logs, for the user
    assert clear_restores(str(tmp_path)) == [] and (base / "work").is_dir()


def test_an_entry_being_made_is_never_swept(tmp_path: Path) -> None:
    """hold_new holds the root while the entry is made and locked: a sweep meanwhile finds
    the root busy and leaves everything for a later one."""
    root_fd = os.open(tmp_path, DIR_FLAGS)
    seen: list[list[str]] = []

    def make() -> str:
        (tmp_path / "new").mkdir()
        other = os.open(tmp_path, DIR_FLAGS)  # another sweeper's own open of the root
        try:
            seen.append(sweep(other, lambda n: True, lambda n: True))
        finally:
            os.close(other)
        return "new"

    try:
        name, fd = hold_new(root_fd, make)
        os.close(fd)
    finally:
        os.close(root_fd)
    assert (name, seen) == ("new", [[]])


def test_remove_tree_at_removes_a_view_and_follows_no_link(tmp_path: Path) -> None:
    """The sweep's remover (fd-relative, O_NOFOLLOW, as the C plugin's fini): a view's
    files, links and sub-dirs go; what a link points to stays, a link given as the name is
    not entered, a missing name is False."""
    from overlayfs_inetsk.host.stale import remove_tree_at

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.img").write_bytes(b"k")
    view = tmp_path / "root" / "view-1"
    (view / "sub" / "deeper").mkdir(parents=True)
    (view / "files.img").write_bytes(b"x")
    (view / "sub" / "deeper" / "a").write_bytes(b"a")
    (view / "pages.img").symlink_to(outside / "keep.img")
    (view / "sub" / "out").symlink_to(outside)
    (tmp_path / "root" / "link").symlink_to(outside)
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert not remove_tree_at(fd, "link") and (outside / "keep.img").exists()
        assert remove_tree_at(fd, "view-1")
        assert not remove_tree_at(fd, "view-1")
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path / "root")) == ["link"]
    assert sorted(os.listdir(outside)) == ["keep.img"]
