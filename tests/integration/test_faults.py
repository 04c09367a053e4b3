"""Faults around a mount: the daemon killed during a real CRIU restore, the `auto` network
namespace gone when files.img is opened, map file errors. Each ends in a clear error, and
nothing is left behind (mount, read-only bind, daemon)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from overlayfs_inetsk.host.mounts import find_mount, ro_bind_path
from inetsk_testbed import criu, probe
from inetsk_testbed.mount import BIN, ismount, mounted, overlayfs_inetsk

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.criu]

A4 = "10.77.0.1"


def daemon_pid(mp: str) -> int:
    """The daemon serving `mp` (its command line names the mountpoint)."""
    key = os.fsencode(mp)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"overlayfs_inetsk.cli.mount" in cmd and key in cmd:
                return int(d)
    raise AssertionError(f"no daemon for {mp}")


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.criu
def test_daemon_killed_during_restore(testnet, image_dirs):
    """The daemon is stopped, criu restore starts and blocks on the view, the daemon is
    SIGKILLed: criu fails with an error (no process restored), `umount` clears the dead
    mount and its read-only bind, and a new mount serves a restore that works."""
    a, b = testnet.add_host("A"), testnet.add_host("B")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001"])
    criu.dump(a, pid, image_dirs.images)
    opts = ["--map", f"{A4}={b.ipv4}"]
    mp = str(image_dirs.root / "mnt")
    os.makedirs(mp)
    overlayfs_inetsk("mount", str(image_dirs.images), mp, *opts)
    bind = ro_bind_path(os.path.realpath(mp))
    try:
        dpid = daemon_pid(mp)
        os.kill(dpid, signal.SIGSTOP)
        work = image_dirs.work
        log = work / "restore.log"
        p = b.popen([criu.CRIU, "restore", "-D", mp, "-W", str(work), "-o", str(log), "-v4",
                     "-d", "--pidfile", str(work / "restore.pid")],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        time.sleep(1.0)
        assert p.poll() is None, "criu did not wait for the stopped daemon"
        os.kill(dpid, signal.SIGKILL)
        os.kill(dpid, signal.SIGCONT)
        rc = p.wait(30)
        assert rc != 0
        text = log.read_text(errors="replace") if log.exists() else ""
        text += p.stderr.read().decode(errors="replace") if p.stderr else ""
        # criu was blocked opening the images dir (its first access to the view): the
        # kernel aborts the FUSE request when the daemon dies, and criu stops there
        assert f"Can't open dir {mp}: Software caused connection abort" in text, text[-2000:]
        assert f"Couldn't open image dir {mp}" in text, text[-2000:]
        assert not (work / "restore.pid").exists()  # nothing was restored
        with pytest.raises(OSError) as ei:
            os.listdir(mp)
        assert ei.value.errno == errno.ENOTCONN
        assert find_mount(bind) is not None  # the killed daemon could not remove it
        cp = overlayfs_inetsk("umount", mp, check=False)
        assert cp.returncode == 0, cp.stderr
        assert not ismount(mp) and find_mount(bind) is None and not os.path.exists(bind)
        with mounted(image_dirs.images, mp, opts):
            rpid = criu.restore(b, mp, image_dirs.work_for("again"))
            assert probe.tcp_hello(b, str(b.ipv4), 7001) == f"tcp4 {b.ipv4} 7001"
            criu.kill_tree(rpid)
    finally:
        if ismount(mp) or find_mount(bind) is not None:
            overlayfs_inetsk("umount", mp, check=False)


def test_auto_netns_gone_at_open_is_eio_with_the_reason(tmp_path: Path) -> None:
    """`auto` is resolved when files.img is first opened: a namespace deleted after the
    mount gives EIO and one log line naming it; the daemon keeps serving."""
    import secrets

    from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

    img = tmp_path / "img"
    img.mkdir()
    (img / "files.img").write_bytes(files_img(inet_file_entry(isk(1, "10.0.1.5", 80))))
    (img / "pages-1.img").write_bytes(b"p")
    name = f"oitf{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    path = f"/run/netns/{name}"
    log = tmp_path / "daemon.log"
    try:
        with mounted(img, tmp_path / "mnt", ["--map", "10.0.1.5=auto", "--netns", path,
                                             "--iface", "lo", "--log-file", str(log)]) as mp:
            subprocess.run(["ip", "netns", "del", name], check=True)
            with pytest.raises(OSError) as ei:
                (Path(mp) / "files.img").read_bytes()
            assert ei.value.errno == errno.EIO
            errors = [ln for ln in log.read_text().splitlines() if " ERROR " in ln]
            assert len(errors) == 1, errors
            assert "files.img" in errors[0] and f"netns {path}" in errors[0]
            assert "No such file or directory" in errors[0]
            assert (Path(mp) / "pages-1.img").read_bytes() == b"p"  # still serving
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("content,words", [
    (None, "No such file"),
    ('rules = [ "10.0.1.5=', "map"),  # TOML syntax error
    ('[map]\n"10.0.1.5" = "not-an-address"\n', "not-an-address"),
    ('{"rules": ["10.0.1.5=nonsense"]}', "nonsense"),
    ('{"rules": ["10.0.1.5=10.77.0.1"], "extra": 1}', "extra"),
], ids=["missing", "toml-syntax", "bad-rule-toml", "bad-rule-json", "unknown-key"])
def test_map_file_errors_before_mounting(tmp_path: Path, content: str | None,
                                         words: str) -> None:
    from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

    img = tmp_path / "img"
    img.mkdir()
    (img / "files.img").write_bytes(files_img(inet_file_entry(isk(1, "10.0.1.5", 80))))
    suffix = ".json" if content and content.startswith("{") else ".toml"
    mf = tmp_path / f"map{suffix}"
    if content is not None:
        mf.write_text(content)
    mp = tmp_path / "mnt"
    mp.mkdir()
    for fg in ((), ("--foreground",)):
        cp = subprocess.run([BIN, "mount", str(img), str(mp), "--map-file", str(mf), *fg],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 3, cp.stderr
        err = cp.stderr.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert str(mf) in err and words in err, err
        assert not os.path.ismount(mp)
        assert not os.path.exists(ro_bind_path(str(mp)))
