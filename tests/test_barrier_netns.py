"""Where the group barrier locks: in criu's own network namespace, or in the restored tasks'
own (runc, Podman: criu runs in the host's), as CRIU decides from the images
(core/netnsmask.py). The action script runs as CRIU runs it (no arguments, CRTOOLS_*
in the environment) in a test-made namespace standing for criu's; the restored root task
is a process in another one; real netfilter in both."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, ns_images
from inetsk_testbed.netns import scratch_netns
from overlayfs_inetsk.app import barrier as group
from overlayfs_inetsk.cli import main
from overlayfs_inetsk.core import netnsmask
from overlayfs_inetsk.errors import BarrierError, ImageError

CONN = ("10.77.0.3", 40000, "10.77.0.4", 7400)


def images(tmp_path: Path, own: bool) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    ns_images(img, dumper_net=2, task_net=9 if own else 2)
    (img / "files.img").write_bytes(files_img(inet_file_entry(isk(3, *CONN))))
    return img


def test_criu_s_decision_read_from_the_images(tmp_path):
    for dumper, task, own in ((2, 2, False), (2, 9, True), (2, None, True), (None, None, False)):
        d = tmp_path / f"{dumper}-{task}"
        d.mkdir()
        ns_images(d, dumper_net=dumper, task_net=task, pid=7)
        assert group.tasks_own_netns(str(d)) is own, (dumper, task)


def test_bad_images_are_named(tmp_path):
    img = images(tmp_path, own=True)
    (img / "ids-1.img").unlink()
    with pytest.raises(ImageError, match=r"img/ids-1.img: No such file"):
        group.tasks_own_netns(str(img))
    ns_images(img, dumper_net=2, task_net=9)
    inv = (img / "inventory.img").read_bytes()
    (img / "inventory.img").write_bytes(inv[:-3])
    with pytest.raises(ImageError, match=r"img/inventory.img: entry at offset 4: entry length \d+ runs past"):
        group.tasks_own_netns(str(img))
    (img / "inventory.img").write_bytes(b"\x19\x43\x56\x54" * 3)
    with pytest.raises(ImageError, match=r"inventory.img: wrong image type"):
        group.tasks_own_netns(str(img))
    with pytest.raises(ImageError, match="x.img: a varint runs past"):
        netnsmask.field(b"\x08\xff", 1, "x.img")


def test_the_view_s_links_to_other_images_are_no_news(tmp_path, expect_log):
    """The plugin's view holds files.img and relative links to the other images, which lie
    outside it: the barrier reads the sockets only (before: one WARNING per link)."""
    real = tmp_path / "real"
    real.mkdir()
    view = images(tmp_path, own=True)
    for name in ("core-1.img", "pages-1.img"):
        (real / name).write_bytes(b"x")
        (view / name).symlink_to(f"../real/{name}")
    assert group.image_connections(str(view)) == [(4, *CONN)]


def test_unlock_only_in_the_namespace_locked(tmp_path):
    (tmp_path / "C.locked").write_text("netns 1 net:[1]\n4 10.77.0.3 40000 10.77.0.4 7400\n")
    env = {"CRTOOLS_SCRIPT_ACTION": "network-unlock", "CRTOOLS_INIT_PID": str(os.getpid())}
    with pytest.raises(BarrierError, match=r"put into task 1's network namespace net:\[1\]"):
        group.run_action(str(tmp_path), "C", 1, 1, env=env)


# ------------------------------------------------------------------ real netfilter
@pytest.fixture
def spaces() -> Iterator[tuple[str, str, int]]:
    """(criu's namespace, the tasks' namespace, the pid of a process in the latter)."""
    with scratch_netns(prefix="oitbc") as criu_ns, scratch_netns(prefix="oitbt") as task_ns:
        task = subprocess.Popen(["nsenter", f"--net={task_ns}", "sleep", "120"])
        try:
            yield criu_ns, task_ns, task.pid
        finally:
            task.kill()
            task.wait(10)


def drops(netns: str) -> list[str]:
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        cp = subprocess.run(["nsenter", f"--net={netns}", cmd], capture_output=True,
                            text=True, timeout=30, check=True)
        out += [ln for ln in cp.stdout.splitlines() if ln.endswith("-j DROP")]
    return out


def script(tmp_path: Path, members: int, timeout: float) -> tuple[Path, Path]:
    bdir = tmp_path / "barrier"
    bdir.mkdir()
    path = tmp_path / "barrier-C.sh"
    assert main(["barrier-script", str(path), "--dir", str(bdir), "--members", str(members),
                 "--name", "C", "--timeout", str(timeout)]) == 0
    return path, bdir


def act(path: Path, criu_ns: str, action: str, img: Path, pid: int | None
        ) -> subprocess.CompletedProcess[str]:
    """Run the action script as CRIU would at `action`, in criu's namespace (CRIU sets
    CRTOOLS_INIT_PID from setup-namespaces on)."""
    env = dict(os.environ, CRTOOLS_SCRIPT_ACTION=action, CRTOOLS_IMAGE_DIR=str(img))
    if pid is not None:
        env["CRTOOLS_INIT_PID"] = str(pid)
    return subprocess.run(["nsenter", f"--net={criu_ns}", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)


ORDER = ("pre-restore", "setup-namespaces", "post-setup-namespaces", "post-restore",
         "network-unlock", "pre-resume", "post-resume")


@pytest.mark.root
def test_the_lock_goes_where_the_tasks_live(spaces, tmp_path):
    """The tasks get a namespace of their own: nothing is locked at pre-restore, CRIU's
    rules go into the tasks' namespace at post-setup-namespaces (before any socket exists)
    and stay through post-restore; network-unlock removes them. criu's namespace (under
    runc the host's) never holds a rule. Before, the rules went into criu's and stayed."""
    criu_ns, task_ns, pid = spaces
    img = images(tmp_path, own=True)
    path, bdir = script(tmp_path, members=1, timeout=5)
    seen = {}
    for action in ORDER:
        cp = act(path, criu_ns, action, img, None if action == "pre-restore" else pid)
        assert cp.returncode == 0, (action, cp.stderr)
        seen[action] = (len(drops(criu_ns)), len(drops(task_ns)))
    assert seen == {"pre-restore": (0, 0), "setup-namespaces": (0, 0),
                    "post-setup-namespaces": (0, 2), "post-restore": (0, 2),
                    "network-unlock": (0, 0), "pre-resume": (0, 0), "post-resume": (0, 0)}
    ident = os.readlink(f"/proc/{pid}/ns/net")
    assert (bdir / "C.locked").read_text() == (f"netns {pid} {ident}\n"
                                               "4 10.77.0.3 40000 10.77.0.4 7400\n")
    assert sorted(p.name for p in bdir.iterdir()) == ["C.arrived", "C.locked", "C.passed",
                                                       "C.unlocked", "outcome"]


@pytest.mark.root
def test_a_timeout_removes_the_lock_from_the_tasks_namespace(spaces, tmp_path):
    criu_ns, task_ns, pid = spaces
    img = images(tmp_path, own=True)
    path, _ = script(tmp_path, members=2, timeout=0.3)
    for action in ORDER[:3]:
        assert act(path, criu_ns, action, img, pid).returncode == 0
    assert len(drops(task_ns)) == 2
    cp = act(path, criu_ns, "post-restore", img, pid)
    assert cp.returncode == 7 and "gave up after 0.3 s with 1 of 2" in cp.stderr, cp.stderr
    assert drops(task_ns) == [] and drops(criu_ns) == []


@pytest.mark.root
def test_tasks_in_criu_s_namespace_are_locked_at_pre_restore(spaces, tmp_path):
    """`criu restore` run inside the target namespace: as before, the lock is put in at
    pre-restore (no action runs between it and the sockets) and CRIU's network unlock
    removes it; here the barrier times out, so the script removes it."""
    criu_ns, task_ns, pid = spaces
    img = images(tmp_path, own=False)
    path, bdir = script(tmp_path, members=2, timeout=0.3)
    assert act(path, criu_ns, "pre-restore", img, None).returncode == 0
    assert len(drops(criu_ns)) == 2
    assert act(path, criu_ns, "post-setup-namespaces", img, pid).returncode == 0
    assert len(drops(criu_ns)) == 2 and drops(task_ns) == []
    assert (bdir / "C.locked").read_text() == "4 10.77.0.3 40000 10.77.0.4 7400\n"
    cp = act(path, criu_ns, "post-restore", img, pid)
    assert cp.returncode == 7, cp.stderr
    assert drops(criu_ns) == [] and drops(task_ns) == []


@pytest.mark.root
@pytest.mark.parametrize("own", [False, True])
def test_a_lock_that_cannot_be_recorded_is_removed(spaces, tmp_path, own):
    """NAME.locked cannot be written (here: a directory is in its way): the rules just
    added are removed and the action fails with one line naming the file (before, at
    pre-restore: a traceback, and the rules stayed)."""
    criu_ns, task_ns, pid = spaces
    img = images(tmp_path, own=own)
    path, bdir = script(tmp_path, members=1, timeout=1)
    (bdir / "C.locked").mkdir()
    action = "post-setup-namespaces" if own else "pre-restore"
    cp = act(path, criu_ns, action, img, pid)
    assert cp.returncode == 7, cp.stderr
    assert cp.stderr.strip().splitlines() == [
        f"overlayfs-inetsk: error: {bdir}/C.locked: Is a directory"], cp.stderr
    assert drops(criu_ns) == [] and drops(task_ns) == []
