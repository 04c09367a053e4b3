"""Real mounts: `overlayfs-inetsk mount` in a subprocess, files read through the kernel."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from pycriu.images import fdinfo_pb2
from inetsk_testbed.mount import mount_daemons
from inetsk_testbed.netns import scratch_netns, veth_with_route

pytestmark = [pytest.mark.root, pytest.mark.fuse]

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]
ODD = b"odd \xff name"


def served_src(data: bytes) -> list[str]:
    """Source addresses of the inet sockets in a files.img, decoded here with pycriu's
    classes (independent of the core's parser)."""
    assert struct.unpack_from("=II", data) == (0x54564319, 0x56303138)
    out, off = [], 8
    while off < len(data):
        (n,) = struct.unpack_from("=I", data, off)
        fe = fdinfo_pb2.file_entry.FromString(data[off + 4:off + 4 + n])
        off += 4 + n
        if fe.type == fdinfo_pb2.INETSK:
            raw = b"".join(struct.pack("=I", w) for w in fe.isk.src_addr)
            out.append(str(ipaddress.ip_address(raw[:4] if fe.isk.family == 2 else raw)))
    return out


class Mounts:
    """Starts mounts, remembers them, and always clears them (and their daemons)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.points: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def mountpoint(self, name: str = "mnt") -> Path:
        mp = self.tmp / name
        mp.mkdir(exist_ok=True)
        self.points.append(mp)
        return mp

    def mount(self, image: Path, mp: Path, *opts: str,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        self.points.append(mp)
        log = self.tmp / f"{mp.name}.log"
        cp = subprocess.run([*CLI, "mount", str(image), str(mp), "--log-file", str(log), *opts],
                            capture_output=True, text=True, timeout=60)
        if check:
            assert cp.returncode == 0, cp.stderr
            assert os.path.ismount(mp)
        return cp

    def foreground(self, image: Path, mp: Path, *opts: str,
                   env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.points.append(mp)
        p = subprocess.Popen([*CLI, "mount", str(image), str(mp), "--foreground", *opts],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.procs.append(p)
        return p

    def umount(self, mp: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "umount", str(mp)], capture_output=True, text=True,
                              timeout=60)

    def close(self) -> None:
        for mp in self.points:
            if os.path.ismount(mp) or _stale(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in mount_daemons(self.tmp):
            os.kill(pid, signal.SIGKILL)
        for mp in self.points:  # the read-only bind a killed daemon left behind
            self.umount(mp)


def _stale(mp: Path) -> bool:
    try:
        os.stat(mp)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """Extracted Podman-style checkpoint: checkpoint/ with a files.img, beside other files."""
    root = tmp_path / "img"
    (root / "checkpoint").mkdir(parents=True)
    (root / "checkpoint" / "files.img").write_bytes(files_img(
        inet_file_entry(isk(1, "1.2.3.4", 8080)),
        reg_file_entry(2),
        inet_file_entry(isk(3, "10.0.1.5", 53, proto="udp")),
    ))
    (root / "checkpoint" / "pages-1.img").write_bytes(os.urandom(300_000))
    (root / "spec.dump").write_bytes(b'{"x": 1}')
    with open(os.path.join(os.fsencode(root), ODD), "wb") as f:
        f.write(b"odd")
    return root


MAP = ("--map", "1.2.3.4=10.200.200.200", "--map", "10.0.1.0/24=10.9.0.0/24")


def test_mount_serves_rewritten_and_original_bytes(mounts: Mounts, image: Path) -> None:
    mp = mounts.mountpoint()
    t0 = time.monotonic()
    cp = mounts.mount(image, mp, *MAP)
    took = time.monotonic() - t0
    assert "mounted on" in cp.stdout and "pid" in cp.stdout
    assert took < 5, took  # target < 1 s; generous against a loaded CI box
    with open("/proc/mounts") as f:
        line = next(ln for ln in f if f" {mp} " in ln)
    src, _, fstype, opts = line.split()[:4]
    assert src == "overlayfs-inetsk" and fstype == "fuse.overlayfs-inetsk"
    assert "ro" in opts.split(",") and "default_permissions" in opts
    assert "allow_other" not in opts
    served = (mp / "checkpoint" / "files.img").read_bytes()
    # the image fixture's entries with MAP applied, built here with pycriu's classes (not
    # by the production rewrite)
    assert served == files_img(inet_file_entry(isk(1, "10.200.200.200", 8080)),
                               reg_file_entry(2),
                               inet_file_entry(isk(3, "10.9.0.5", 53, proto="udp")))
    assert served_src(served) == ["10.200.200.200", "10.9.0.5"]
    # generated size (not the original's) once generated
    assert os.stat(mp / "checkpoint" / "files.img").st_size == len(served)
    for rel in ("checkpoint/pages-1.img", "spec.dump"):
        # into the read-only bind of the image dir, not the original (docs/security.md)
        # relative to the link's own dir, so it resolves in a container's mount namespace
        # too (runc restore --image-path MOUNTPOINT: tests/integration/test_runc.py)
        target = os.readlink(mp / rel)
        assert not os.path.isabs(target)
        resolved = os.path.normpath(os.path.join(os.path.dirname(mp / rel), target))
        assert resolved.startswith("/run/overlayfs-inetsk/ro/") and resolved.endswith("/" + rel)
        assert (mp / rel).read_bytes() == (image / rel).read_bytes()
    odd = os.path.join(os.fsencode(mp), ODD)
    with open(odd, "rb") as f:
        assert f.read() == b"odd"
    assert sorted(os.listdir(mp)) == sorted(["checkpoint", "spec.dump", os.fsdecode(ODD)])
    cp2 = mounts.umount(mp)
    assert cp2.returncode == 0, cp2.stderr
    assert not os.path.ismount(mp)
    time.sleep(0.3)
    assert mount_daemons(mounts.tmp) == []  # the daemon ends with its mount


def test_erofs(mounts: Mounts, image: Path) -> None:
    mp = mounts.mountpoint()
    mounts.mount(image, mp, *MAP)
    ck = mp / "checkpoint"
    checks = {
        "write": lambda: open(ck / "files.img", "r+b"),
        "create": lambda: open(ck / "new", "wb"),
        "unlink": lambda: os.unlink(ck / "files.img"),
        "rename": lambda: os.rename(ck / "files.img", ck / "x"),
        "mkdir": lambda: os.mkdir(ck / "d"),
        "rmdir": lambda: os.rmdir(ck),
        "chmod": lambda: os.chmod(ck / "files.img", 0o600),
        "utime": lambda: os.utime(ck),
        "truncate": lambda: os.truncate(ck / "files.img", 0),
        "setxattr": lambda: os.setxattr(ck / "files.img", "user.x", b"1"),
        "symlink": lambda: os.symlink("x", ck / "s"),
    }
    for what, fn in checks.items():
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == errno.EROFS, what
    assert (image / "checkpoint" / "files.img").exists()


def test_serve_read(mounts: Mounts, image: Path) -> None:
    mp = mounts.mountpoint()
    mounts.mount(image, mp, "--serve", "read", *MAP)
    pages = mp / "checkpoint" / "pages-1.img"
    assert not pages.is_symlink()
    assert pages.read_bytes() == (image / "checkpoint" / "pages-1.img").read_bytes()
    assert served_src((mp / "checkpoint" / "files.img").read_bytes())[0] == "10.200.200.200"


def test_serve_read_serves_only_the_file_it_listed(mounts: Mounts, image: Path,
                                                   tmp_path: Path) -> None:
    """--serve read with --allow-other: the daemon (root) opens the original for whoever
    reads the view. An original swapped after the mount for a symlink (to a file the
    reader may not see) or for another file gets EIO and one log line; the rest is served."""
    mp = mounts.mountpoint()
    mounts.mount(image, mp, "--serve", "read", "--allow-other", *MAP)
    pages, spec = image / "checkpoint" / "pages-1.img", image / "spec.dump"
    original = pages.read_bytes()
    assert (mp / "checkpoint" / "pages-1.img").read_bytes() == original
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)
    pages.rename(tmp_path / "pages-1.img.orig")
    pages.symlink_to(secret)  # swapped for a symlink
    with pytest.raises(OSError) as ei:
        (mp / "checkpoint" / "pages-1.img").read_bytes()
    assert ei.value.errno == errno.EIO
    spec.rename(tmp_path / "spec.orig")
    spec.write_bytes(b'{"x": 2}')  # swapped for another file (another inode)
    with pytest.raises(OSError) as ei:
        (mp / "spec.dump").read_bytes()
    assert ei.value.errno == errno.EIO
    assert served_src((mp / "checkpoint" / "files.img").read_bytes())[0] == "10.200.200.200"
    assert (mp / os.fsdecode(ODD)).read_bytes() == b"odd"  # still serving
    pages.unlink()
    (tmp_path / "pages-1.img.orig").rename(pages)  # the listed file back: served again
    assert (mp / "checkpoint" / "pages-1.img").read_bytes() == original
    log = (mounts.tmp / "mnt.log").read_text()
    lines = [ln for ln in log.splitlines() if "ERROR" in ln]
    assert len(lines) == 2, lines
    assert "checkpoint/pages-1.img: it is a symlink now (not followed)" in lines[0]
    assert "spec.dump: not the file listed at mount time (inode " in lines[1]
    assert "Traceback" not in log


def test_kill9_then_umount_and_fresh_mount(mounts: Mounts, image: Path) -> None:
    mp = mounts.mountpoint()
    mounts.mount(image, mp, *MAP)
    [pid] = mount_daemons(mounts.tmp)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(OSError) as ei:
        os.listdir(mp)
    assert ei.value.errno == errno.ENOTCONN
    cp = mounts.mount(image, mp, *MAP, check=False)  # refused, with a hint
    assert cp.returncode != 0 and "umount" in cp.stderr
    cp = mounts.umount(mp)
    assert cp.returncode == 0, cp.stderr
    assert not os.path.ismount(mp) and not _stale(mp)
    mounts.mount(image, mp, *MAP)
    assert served_src((mp / "checkpoint" / "files.img").read_bytes())[0] == "10.200.200.200"


def test_two_mounts_independent(mounts: Mounts, image: Path) -> None:
    a, b = mounts.mountpoint("a"), mounts.mountpoint("b")
    mounts.mount(image, a, "--map", "1.2.3.4=10.1.1.1")
    mounts.mount(image, b, "--map", "1.2.3.4=10.2.2.2", "--serve", "read")
    assert served_src((a / "checkpoint" / "files.img").read_bytes())[0] == "10.1.1.1"
    assert served_src((b / "checkpoint" / "files.img").read_bytes())[0] == "10.2.2.2"
    assert mounts.umount(a).returncode == 0
    assert os.path.ismount(b) and not os.path.ismount(a)
    assert served_src((b / "checkpoint" / "files.img").read_bytes())[0] == "10.2.2.2"


def test_failed_generation_is_eio_and_daemon_keeps_serving(mounts: Mounts,
                                                           image: Path) -> None:
    mp = mounts.mountpoint()
    # auto on an interface that does not exist: generation fails at open time
    mounts.mount(image, mp, "--map", "1.2.3.4=auto", "--iface", "nonexistent0")
    with pytest.raises(OSError) as ei:
        (mp / "checkpoint" / "files.img").read_bytes()
    assert ei.value.errno == errno.EIO
    with pytest.raises(OSError):  # not cached: retried, fails again
        (mp / "checkpoint" / "files.img").read_bytes()
    assert (mp / "spec.dump").read_bytes() == b'{"x": 1}'
    log = (mounts.tmp / "mnt.log").read_text()
    lines = [ln for ln in log.splitlines() if "ERROR" in ln]
    assert len(lines) == 2 and "checkpoint/files.img" in lines[0]
    assert "nonexistent0" in lines[0]
    assert "Traceback" not in log


def test_validation_errors_are_one_line(mounts: Mounts, image: Path, tmp_path: Path) -> None:
    mp = mounts.mountpoint()
    bad = tmp_path / "bad"
    (bad / "checkpoint").mkdir(parents=True)
    (bad / "checkpoint" / "files.img").write_bytes(b"\x19\x43\x56\x54garbage")
    cases = [
        ((str(image), str(mp), "--map", "1.2.3.4=nonsense"), "nonsense"),
        ((str(tmp_path / "missing"), str(mp)), "missing"),
        ((str(bad), str(mp)), "files.img"),
        ((str(image), str(mp), "--netns", "/run/netns/oit-missing-ns"), "oit-missing-ns"),
        ((str(image), str(tmp_path / "nomp")), "nomp"),
        ((str(image), str(image)), "overlap"),
    ]
    for args, word in cases:
        for fg in ((), ("--foreground",)):
            cp = subprocess.run([*CLI, "mount", *args, *fg], capture_output=True, text=True,
                                timeout=60)
            assert cp.returncode != 0, args
            err = cp.stderr.strip()
            assert "\n" not in err and word in err and "Traceback" not in err, (args, err)
            assert not os.path.ismount(mp)
    assert not os.path.exists("/run/netns/oit-missing-ns")


def test_umount_errors(mounts: Mounts, tmp_path: Path) -> None:
    cp = mounts.umount(tmp_path)
    assert cp.returncode != 0 and "not mounted" in cp.stderr
    cp = mounts.umount(Path("/proc"))
    assert cp.returncode != 0 and "not an overlayfs-inetsk mount" in cp.stderr


def test_foreground_sigterm_and_systemd_notify(mounts: Mounts, image: Path,
                                               tmp_path: Path) -> None:
    mp = mounts.mountpoint()
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(sock_path)
        ns.settimeout(20)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        p = mounts.foreground(image, mp, "--systemd", *MAP, env=env)
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg
        assert os.path.ismount(mp)  # READY only once the mount serves
        assert served_src((mp / "checkpoint" / "files.img").read_bytes())[0] == "10.200.200.200"
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert "STOPPING=1" in ns.recv(4096).decode()
    assert not os.path.ismount(mp)
    # SIGINT too, and an unmount from another shell ends a foreground daemon
    p = mounts.foreground(image, mp, *MAP)
    _wait_mounted(mp)
    p.send_signal(signal.SIGINT)
    assert p.wait(20) == 0 and not os.path.ismount(mp)
    p = mounts.foreground(image, mp, *MAP)
    _wait_ready(p)  # unmounted before it served, it would say it never became ready
    subprocess.run(["fusermount3", "-u", str(mp)], check=True)
    assert p.wait(20) == 0 and not os.path.ismount(mp)


def _wait_ready(p: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until the foreground daemon's log says it serves ("ready")."""
    import select

    assert p.stderr is not None
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        assert left > 0, "the daemon did not become ready"
        if select.select([p.stderr], [], [], left)[0]:
            line = p.stderr.readline()
            assert line, "the daemon exited before it was ready"
            if line.rstrip().endswith(b": ready"):
                return


def _wait_mounted(mp: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not os.path.ismount(mp):
        assert time.monotonic() < end, "mount did not appear"
        time.sleep(0.02)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with 10.77.31.7/24 and fd77::31:7/64 on a veth holding the default route."""
    with scratch_netns(*veth_with_route("10.77.31.7/24", "10.77.31.1", "fd77::31:7/64")) as ns:
        yield ns


def test_auto_in_netns(mounts: Mounts, image: Path, netns: str) -> None:
    mp = mounts.mountpoint()
    mounts.mount(image, mp, "--map", "1.2.3.4=auto", "--netns", netns)
    assert served_src((mp / "checkpoint" / "files.img").read_bytes())[0] == "10.77.31.7"
    # a /proc/PID/ns/net path works as well
    holder = subprocess.Popen(["nsenter", f"--net={netns}", "sleep", "60"])
    try:
        time.sleep(0.2)
        mp2 = mounts.mountpoint("mnt2")
        mounts.mount(image, mp2, "--map", "1.2.3.4=auto", "--netns",
                     f"/proc/{holder.pid}/ns/net", "--iface", "v0")
        assert served_src((mp2 / "checkpoint" / "files.img").read_bytes())[0] == "10.77.31.7"
    finally:
        holder.kill()
        holder.wait()


def test_stop_signal_right_after_mounting_unmounts_cleanly(mounts: Mounts, image: Path) -> None:
    """A SIGTERM/SIGINT that lands between the mount and the loop's signal receiver is acted
    on, not lost and not fatal: exit 0 and no mount left (a race seen in this suite)."""
    mp = mounts.mountpoint()
    for i in range(10):
        p = mounts.foreground(image, mp, *MAP)
        end = time.monotonic() + 20
        while not os.path.ismount(mp) and p.poll() is None:
            assert time.monotonic() < end, "mount did not appear"
            time.sleep(0.001)
        p.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        assert p.wait(20) == 0
        assert not os.path.ismount(mp)


def test_auto_follows_the_node_address_between_opens(mounts: Mounts, image: Path,
                                                     netns: str) -> None:
    """`auto` is looked up again at every open of a socket image: after the namespace's
    address changed, the next open serves the new one; an open handle keeps the bytes it
    opened; an open with no change does not regenerate."""
    mp = mounts.mountpoint()
    mounts.mount(image, mp, "--map", "1.2.3.4=auto", "--netns", netns)
    files = mp / "checkpoint" / "files.img"
    assert served_src(files.read_bytes())[0] == "10.77.31.7"
    assert served_src(files.read_bytes())[0] == "10.77.31.7"
    held = os.open(files, os.O_RDONLY)
    try:
        name = os.path.basename(netns)
        for args in (["addr", "del", "10.77.31.7/24", "dev", "v0"],
                     ["addr", "add", "10.77.31.8/24", "dev", "v0"],
                     ["route", "add", "default", "via", "10.77.31.1", "dev", "v0"]):
            subprocess.run(["ip", "-n", name, *args], check=True, capture_output=True)
        assert served_src(files.read_bytes())[0] == "10.77.31.8"
        # the handle opened before the change keeps its bytes
        assert served_src(os.pread(held, 1 << 20, 0))[0] == "10.77.31.7"
    finally:
        os.close(held)
    log = (mounts.tmp / "mnt.log").read_text()
    # the first open used what the mount planned (the same address); the unchanged second
    # open reused it; the change made one generation
    planned = [ln for ln in log.splitlines() if "as the mount planned them" in ln]
    assert len(planned) == 1 and "(IPv4 10.77.31.7)" in planned[0], log
    generated = [ln for ln in log.splitlines() if ": generated " in ln]
    assert len(generated) == 1, log
    assert "IPv4 10.77.31.7 -> IPv4 10.77.31.8: generating" in log, log


def test_refusal_known_at_mount_is_refused_at_mount(mounts: Mounts, image: Path,
                                                   tmp_path: Path, netns: str) -> None:
    """--strict and --tcp-outside fail refusals that the map already decides are refused by
    `mount` itself: one line naming the socket, RewriteError's exit code (5), nothing
    mounted, no daemon left (background and foreground alike)."""
    mp = mounts.mountpoint()
    est = tmp_path / "est"
    est.mkdir()
    (est / "files.img").write_bytes(files_img(
        inet_file_entry(isk(1, "1.2.3.4", 8080)),
        inet_file_entry(isk(7, "1.2.3.4", 40000, "10.99.0.1", 5555, state=1))))
    cases = [
        ((str(image), str(mp), "--map", "1.2.3.4=10.1.1.1", "--strict"), "socket id 3"),
        ((str(est), str(mp), "--map", "1.2.3.4=10.1.1.1", "--tcp-outside", "fail"),
         "socket id 7"),
        # auto resolves now (the namespace has its address): planned fully too
        ((str(image), str(mp), "--map", "1.2.3.4=auto", "--netns", netns, "--strict"),
         "socket id 3"),
    ]
    for args, word in cases:
        for fg in ((), ("--foreground",)):
            cp = subprocess.run([*CLI, "mount", *args, *fg], capture_output=True, text=True,
                                timeout=60)
            err = cp.stderr.strip()
            assert cp.returncode == 5, (args, fg, cp.returncode, err)
            assert "\n" not in err and word in err and "Traceback" not in err, (args, err)
            assert not os.path.ismount(mp)
            assert mount_daemons(tmp_path) == []


def test_auto_without_address_warns_at_mount_and_mounts(mounts: Mounts, image: Path,
                                                        netns: str) -> None:
    """`auto` with no address in the namespace yet (lo has none of scope global): one
    WARNING line naming the family and the namespace, the view mounts, and the open fails
    with EIO until the node has its address."""
    mp = mounts.mountpoint()
    cp = mounts.mount(image, mp, "--map", "1.2.3.4=auto", "--netns", netns, "--iface", "lo")
    warn = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and "WARNING" in warn[0], cp.stderr
    assert "IPv4" in warn[0] and netns in warn[0], warn
    with pytest.raises(OSError) as ei:
        (mp / "checkpoint" / "files.img").read_bytes()
    assert ei.value.errno == errno.EIO
    subprocess.run(["ip", "-n", os.path.basename(netns), "addr", "add", "10.77.32.1/32",
                    "dev", "lo"], check=True)
    assert served_src((mp / "checkpoint" / "files.img").read_bytes())[0] == "10.77.32.1"


def test_default_log_kept_only_when_worth_reading(mounts: Mounts, image: Path,
                                                  netns: str) -> None:
    """The default log (/run/overlayfs-inetsk/<mountpoint>.log) of a daemon that ended
    cleanly and logged nothing above INFO is removed with it; a warning, a SIGKILL, or an
    earlier daemon's lines in it keep it (docs/logging.md)."""
    from overlayfs_inetsk.fuse.spawn import default_log_file

    mp = mounts.mountpoint()
    log = Path(default_log_file(str(mp)))
    # a map whose addresses the namespace has (MAP's are no address of this one: a warning)
    clean = ("--map", "local=auto", "--netns", netns)

    def mount(*opts: str) -> None:
        cp = subprocess.run([*CLI, "mount", str(image), str(mp), *opts], capture_output=True,
                            text=True, timeout=60)
        assert cp.returncode == 0 and str(log) in cp.stdout, cp.stderr

    try:
        mount(*clean)
        assert log.exists()  # while mounted
        (mp / "checkpoint" / "files.img").read_bytes()
        assert mounts.umount(mp).returncode == 0
        _wait_gone(log)
        # a warning: kept
        mount("--map", "1.2.3.4=auto", "--netns", netns, "--iface", "lo")
        assert mounts.umount(mp).returncode == 0
        time.sleep(1)
        assert "WARNING" in log.read_text()
        log.unlink()
        # killed: kept; the next clean daemon appends and keeps it too
        mount(*clean)
        [pid] = mount_daemons(mounts.tmp)
        os.kill(pid, signal.SIGKILL)
        assert mounts.umount(mp).returncode == 0
        mount(*clean)
        assert mounts.umount(mp).returncode == 0
        time.sleep(1)
        assert log.read_text().count(" ready") == 2
    finally:
        log.unlink(missing_ok=True)


def _wait_gone(path: Path, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < end, f"{path} is still there: {path.read_text()}"
        time.sleep(0.05)


def test_under_systemd_every_log_line_carries_its_priority(mounts: Mounts, image: Path,
                                                           tmp_path: Path) -> None:
    """stderr is the journal ($JOURNAL_STREAM names it): every line the daemon logs starts
    with `<N>` (so `journalctl -p warning` finds its errors), the error as <3>."""
    bad = image / "bad"
    bad.mkdir()
    good = files_img(inet_file_entry(isk(1, "1.2.3.4", 8080)))
    (bad / "files.img").write_bytes(good)
    mp = mounts.mountpoint()
    with open(tmp_path / "journal", "w+") as journal:
        st = os.fstat(journal.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        mounts.points.append(mp)
        p = subprocess.Popen([*CLI, "mount", str(image), str(mp), "--foreground", "--systemd",
                              *MAP], stdout=subprocess.DEVNULL, stderr=journal, env=env)
        mounts.procs.append(p)
        _wait_mounted(mp)
        (bad / "files.img").write_bytes(good[:-3])  # broken after the mount's checks
        with pytest.raises(OSError) as exc:
            (mp / "bad" / "files.img").read_bytes()
        assert exc.value.errno == errno.EIO
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        journal.seek(0)
        lines = journal.read().splitlines()
    assert lines and [x for x in lines if not re.match(r"<[0-7]>", x)] == []
    assert any(x.startswith("<3>") and "bad/files.img" in x for x in lines), lines
    assert any(x.startswith("<6>") and "SIGTERM" in x for x in lines), lines


def test_port_taken_in_netns_warns_and_strict_refuses(mounts: Mounts, image: Path,
                                                      netns: str) -> None:
    """The image's UDP socket 10.0.1.5:53 moves to 10.77.31.7:5353 (local address of the
    namespace); a socket there already holds udp 5353: `mount` names it on stderr (the
    background parent) and mounts; with --strict it refuses before mounting (exit 5)."""
    from overlayfs_inetsk.host.netns import in_netns

    def hold() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 5353))
        return s

    opts = ("--map", "10.0.1.5=10.77.31.7", "--map", ":53=:5353", "--netns", netns)
    with in_netns(netns, hold):
        mp = mounts.mountpoint()
        cp = mounts.mount(image, mp, *opts)
        # the daemon's warning, passed to the mount command through its ready pipe
        assert (f"WARNING {image}/checkpoint/files.img: socket id 3: udp 10.77.31.7:5353 is "
                f"taken in netns {netns} by udp 0.0.0.0:5353 bound") in cp.stderr
        assert mounts.umount(mp).returncode == 0
        mp2 = mounts.mountpoint("mnt2")
        cp = mounts.mount(image, mp2, *opts, "--strict", "--map", "1.2.3.4=10.77.31.7",
                          check=False)
        assert cp.returncode == 5, cp.stderr
        assert len(cp.stderr.strip().splitlines()) == 1 and "(--strict)" in cp.stderr
        assert not os.path.ismount(mp2)
    # the port is free again: no warning
    mp3 = mounts.mountpoint("mnt3")
    assert "warning" not in mounts.mount(image, mp3, *opts).stderr


def test_umount_of_a_busy_view_detaches_it_and_says_so(mounts: Mounts, image: Path) -> None:
    """A process holds a file of the view open: fusermount3 -u refuses (busy), umount
    detaches the view lazily, exits 0 and says so in one line; the daemon ends once the
    file is closed."""
    mp = mounts.mountpoint()
    mounts.mount(image, mp, *MAP)
    daemons = set(mount_daemons(mounts.tmp))
    assert daemons
    held = open(mp / "checkpoint" / "files.img", "rb")
    try:
        cp = mounts.umount(mp)
        assert cp.returncode == 0, cp.stderr
        lines = cp.stderr.splitlines()
        assert len(lines) == 1 and f"{mp}: busy" in lines[0] and "detached" in lines[0], lines
        assert not os.path.ismount(mp)
        assert held.read(4)  # the open file still reads
    finally:
        held.close()
    deadline = time.monotonic() + 20
    while set(mount_daemons(mounts.tmp)) & daemons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(mount_daemons(mounts.tmp)) & daemons, "the daemon outlived its last user"
    # not busy: nothing said
    mounts.mount(image, mp, *MAP)
    cp = mounts.umount(mp)
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr
