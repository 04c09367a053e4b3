"""`overlayfs-inetsk restore`: the one-line restore, on real mounts (and real CRIU where
marked).

With real CRIU on test hosts: a checkpoint of host A restored detached (`-- -d`) on host B
answers on B's addresses, seen from host C; a restore criu refuses exits with criu's status
and names its log. With a stand-in criu ($CRIU, a shell script): the command line criu gets,
the bytes it reads through the view, the exit status passed through, the signal forwarded,
the JSON report, and that nothing stays mounted.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from inetsk_testbed import criu, probe
from inetsk_testbed.mount import (
    Ran,
    kept_restore_dirs,
    mount_daemons,
    remove_kept_restore_dirs,
    run_cli,
)
from overlayfs_inetsk.host.stale import RESTORE_DIR

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]
A4, A6 = "10.77.0.1", "fd77::1"
B4, B6 = "10.77.0.2", "fd77::2"


def our_mounts(under: Path | str) -> list[str]:
    key = str(under)
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(key)]


def restore_cmd(*args: str, tmp: Path, env: dict[str, str] | None = None,
                timeout: float = 90) -> Ran:
    """Run `overlayfs-inetsk restore ...`; the result also has the `pid` it ran as (its
    temporary dirs are RESTORE_DIR/<pid>-*, see leftovers())."""
    r = run_cli("restore", *args, env=dict(os.environ if env is None else env),
                timeout=timeout)
    RAN.append(r.pid)
    return r


STOP_TIMEOUT = 2.0  # restore --stop-timeout here (the default, 10 s, cost 10 s a test)
RAN: list[int] = []  # pids of the restores run here (their kept work dirs are removed)


@pytest.fixture(autouse=True)
def _remove_kept_work_dirs() -> Iterator[None]:
    yield
    remove_kept_restore_dirs(RAN)


def leftovers(pid: int) -> list[str]:
    """What the restore that ran as `pid` left in RESTORE_DIR."""
    return [os.path.basename(p) for p in kept_restore_dirs(pid)]


def daemons_under(path: str) -> list[int]:
    """Mount daemons whose command line names a path under `path`."""
    return mount_daemons(path)


# -------------------------------------------------------------------------- real CRIU
@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_detached_restore_on_another_host_answers_there(testnet, image_dirs):
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    assert (str(a.ipv4), str(b.ipv4)) == (A4, B4)
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001",
                                  "--udp-bind", f"udp4@{A4}:7002",
                                  "--tcp-listen", f"tcp6@[{A6}]:7004"])
    criu.dump(a, pid, image_dirs.images)
    pidfile = image_dirs.root / "restored.pid"

    cp = restore_cmd(str(image_dirs.images), "--netns", b.netns_path, "--",
                     "-d", "--pidfile", str(pidfile), tmp=image_dirs.root)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rpid = int(pidfile.read_text())
    b.adopt(rpid)
    # the summary: what moved, and that the map was the default one
    assert f"{A4}:7001" in cp.stdout and f"{B4}:7001" in cp.stdout
    assert f"[{B6}]:7004" in cp.stdout
    assert "3 inet socket(s): 3 rewritten" in cp.stdout
    assert "map: --map local=auto (the default" in cp.stdout
    # the restored service answers on B's addresses, seen from another host
    assert probe.tcp_hello(c, B4, 7001) == f"tcp4 {B4} 7001"
    assert probe.udp_echo(c, B4, 7002, "ping") == "udp4 ping"
    assert probe.tcp_hello(c, B6, 7004) == f"tcp6 {B6} 7004"
    # nothing stays mounted, the temporary dir is gone (the work dir too: it succeeded)
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == []
    assert leftovers(cp.pid) == []
    criu.kill_tree(rpid)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_failed_restore_exits_with_criu_status_and_keeps_its_log(testnet, image_dirs):
    a, b = testnet.add_host("A"), testnet.add_host("B")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001"])
    criu.dump(a, pid, image_dirs.images)

    # B has no 10.77.0.99: criu's bind fails, and so does the restore
    cp = restore_cmd(str(image_dirs.images), "--netns", b.netns_path,
                     "--map", f"{A4}=10.77.0.99", "--", "-d", tmp=image_dirs.root)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "criu restore failed (exit 1); log: " in cp.stderr
    log_path = cp.stderr.split("log: ", 1)[1].split(";", 1)[0]
    assert "Cannot assign requested address" in Path(log_path).read_text()
    assert Path(log_path).parent.is_dir(), "the work dir is kept on failure"
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == []
    assert b.pids() == []


# ------------------------------------------------------------- a stand-in criu ($CRIU)
FAKE_CRIU = r"""#!/bin/sh
# records its argv (one per line) and the files.img it reads from -D, writes its -o log,
# then exits $FAKE_RC
out="$FAKE_OUT"
printf '%s\n' "$@" > "$out/argv"
dir=""
log=""
prev=""
for a in "$@"; do
  [ "$prev" = "-D" ] && dir="$a"
  [ "$prev" = "-o" ] && log="$a"
  prev="$a"
done
[ -n "$log" ] && echo "fake criu: $*" > "$log"  # as criu, which opens its log first
cat "$dir/files.img" > "$out/files.img" 2>"$out/cat.err"
if [ -n "$FAKE_SLEEP" ]; then
  # the sleep holds none of our stdio (restore's caller would wait for its end to read
  # restore's output to EOF) and goes with us on TERM
  sleep "$FAKE_SLEEP" </dev/null >/dev/null 2>&1 &
  pid=$!
  trap 'echo TERM > "$out/signal"; kill $pid 2>/dev/null; exit 7' TERM
  echo started > "$out/started"
  wait $pid
fi
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, object]:
    """An image dir (inventory.img, files.img with 10.77.0.1 sockets) and a fake criu."""
    img = tmp_path / "img"
    img.mkdir()
    (img / "inventory.img").write_bytes(b"inventory")
    (img / "files.img").write_bytes(files_img(
        inet_file_entry(isk(1, A4, 8080)),
        inet_file_entry(isk(2, A4, 53, proto="udp"))))
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "criu"
    script.write_text(FAKE_CRIU)
    script.chmod(0o755)
    env = dict(os.environ, CRIU=str(script), FAKE_OUT=str(out))
    return {"img": img, "out": out, "env": env}


def src_addrs(data: bytes) -> list[str]:
    from pycriu.images import fdinfo_pb2

    out, off = [], 8
    while off < len(data):
        (n,) = struct.unpack_from("=I", data, off)
        fe = fdinfo_pb2.file_entry.FromString(data[off + 4:off + 4 + n])
        off += 4 + n
        out.append(".".join(str(x) for x in struct.pack("=I", fe.isk.src_addr[0])))
    return out




@pytest.mark.root
@pytest.mark.fuse
def test_criu_gets_the_view_and_its_exit_status_is_ours(fake, tmp_path):
    env = dict(fake["env"], FAKE_RC="42")  # type: ignore[arg-type]
    cp = restore_cmd(str(fake["img"]), "--map", f"{A4}={B4}", "--", "--shell-job", "-d",
                     tmp=tmp_path, env=env)
    assert cp.returncode == 42, cp.stderr
    out: Path = fake["out"]  # type: ignore[assignment]
    argv = (out / "argv").read_text().splitlines()
    assert argv[0] == "restore"
    view, work = argv[argv.index("-D") + 1], argv[argv.index("-W") + 1]
    assert argv[argv.index("-o") + 1] == os.path.join(work, "restore.log")
    assert "-v4" in argv and argv[-2:] == ["--shell-job", "-d"]
    assert "--tcp-established" not in argv  # no tcp-stream-*.img
    assert view.startswith(f"{RESTORE_DIR}/{cp.pid}-") and view != str(fake["img"])
    # criu read rewritten bytes through the view
    assert src_addrs((out / "files.img").read_bytes()) == [B4, B4]
    # failure: criu's log named, work dir kept; the view is unmounted either way
    assert f"criu restore failed (exit 42); log: {work}/restore.log" in cp.stderr
    assert os.path.isdir(work) and os.path.isfile(os.path.join(work, "mount.log"))
    assert not os.path.exists(view)
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == []


@pytest.mark.root
@pytest.mark.fuse
def test_tcp_established_added_only_for_tcp_stream_images(fake, tmp_path):
    img: Path = fake["img"]  # type: ignore[assignment]
    out: Path = fake["out"]  # type: ignore[assignment]
    (img / "tcp-stream-1234.img").write_bytes(b"x")
    cp = restore_cmd(str(img), "--map", f"{A4}={B4}", tmp=tmp_path, env=fake["env"])  # type: ignore[arg-type]
    assert cp.returncode == 0, cp.stderr
    assert "--tcp-established" in (out / "argv").read_text().splitlines()
    assert "criu: --tcp-established added" in cp.stdout
    assert leftovers(cp.pid) == []  # success: temporary dirs removed
    cp = restore_cmd(str(img), "--map", f"{A4}={B4}", "--", "--tcp-close", tmp=tmp_path,
                     env=fake["env"])  # type: ignore[arg-type]
    argv = (out / "argv").read_text().splitlines()
    assert cp.returncode == 0 and "--tcp-established" not in argv and "--tcp-close" in argv


@pytest.mark.root
@pytest.mark.fuse
def test_the_checkpoint_is_planned_once(fake, tmp_path):
    """restore plans (its summary, its refusals) and hands the plan to the view's daemon,
    which plans nothing: criu reads those bytes (issue 19: the daemon planned the same
    again). -v: the daemon's log would show a decision line per socket if it planned."""
    work = tmp_path / "keep"
    cp = restore_cmd("-v", str(fake["img"]), "--map", f"{A4}={B4}", "--work-dir", str(work),
                     tmp=tmp_path, env=fake["env"])  # type: ignore[arg-type]
    assert cp.returncode == 0, cp.stderr
    decisions = [ln for ln in cp.stderr.splitlines() if ln.startswith("DEBUG")
                 and ": socket id " in ln]
    assert len(decisions) == 2, cp.stderr  # restore's own plan, one line a socket
    daemon = (work / "mount.log").read_text()
    assert "the plan of 1 checkpoint dir(s) handed over" in daemon, daemon
    assert ": socket id " not in daemon, daemon  # no decision made there
    assert "socket images as the mount planned them" in daemon and "generated " not in daemon
    out: Path = fake["out"]  # type: ignore[assignment]
    assert src_addrs((out / "files.img").read_bytes()) == [B4, B4]


@pytest.mark.root
@pytest.mark.fuse
def test_a_parent_link_outside_is_refused_before_mounting(fake, tmp_path):
    """A dump whose `parent` link (--prev-images-dir) points outside IMAGE_DIR: restore
    refuses it at once, as mount does, in one line, having made nothing (it mounted a view
    first, whose daemon refused it, and left its work dir)."""
    img: Path = fake["img"]  # type: ignore[assignment]
    (tmp_path / "prev").mkdir()
    os.symlink(tmp_path / "prev", img / "parent")
    cp = restore_cmd(str(img), "--map", f"{A4}={B4}", tmp=tmp_path, env=fake["env"])  # type: ignore[arg-type]
    assert cp.returncode == 1, cp.stderr
    assert cp.stderr.count("\n") == 1 and "the link to the previous dump" in cp.stderr
    out: Path = fake["out"]  # type: ignore[assignment]
    assert not (out / "argv").exists(), "criu must not run"
    assert leftovers(cp.pid) == [] and our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == []


@pytest.mark.root
@pytest.mark.fuse
def test_json_report(fake, tmp_path):
    work = tmp_path / "keep"
    cp = restore_cmd(str(fake["img"]), "--map", f"{A4}={B4}", "--work-dir", str(work),
                     "--json", tmp=tmp_path, env=fake["env"])  # type: ignore[arg-type]
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["schema"] == 1
    assert doc["summary"]["rewritten"] == 2
    assert [s["new_src"] for s in doc["sockets"]] == [B4, B4]
    assert doc["map_defaulted"] is False
    r = doc["restore"]
    assert r["exit_code"] == 0 and r["work_dir"] == str(work)
    assert r["log"] == str(work / "restore.log") and r["criu_argv"][1] == "restore"
    assert work.is_dir(), "a work dir given with --work-dir is kept"


@pytest.mark.root
@pytest.mark.fuse
def test_sigterm_is_passed_to_criu_and_the_view_unmounted(fake, tmp_path):
    env = dict(fake["env"], FAKE_SLEEP="30")  # type: ignore[arg-type]
    out: Path = fake["out"]  # type: ignore[assignment]
    p = subprocess.Popen([*CLI, "restore", str(fake["img"]), "--map", f"{A4}={B4}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    RAN.append(p.pid)
    try:
        deadline = time.monotonic() + 30
        while not (out / "started").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        assert len(our_mounts(f"{RESTORE_DIR}/{p.pid}-")) == 1
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (out / "signal").read_text().strip() == "TERM"
    assert p.returncode == 7, err  # criu's status after the signal
    assert our_mounts(f"{RESTORE_DIR}/{p.pid}-") == [] and leftovers(p.pid) == []


@pytest.mark.root
@pytest.mark.fuse
def test_refused_before_mounting(fake, tmp_path):
    out: Path = fake["out"]  # type: ignore[assignment]
    cp = restore_cmd(str(fake["img"]), "--map", "10.77.0.50=10.77.0.51", "--strict",
                     tmp=tmp_path, env=fake["env"])  # type: ignore[arg-type]
    assert cp.returncode == 5, cp.stderr
    assert "needs-address" in cp.stderr and cp.stderr.count("\n") == 1
    assert not (out / "argv").exists(), "criu must not run"
    cp = restore_cmd(str(fake["img"]), "--", "-W", "/tmp", tmp=tmp_path, env=fake["env"])  # type: ignore[arg-type]
    assert cp.returncode == 1 and "restore sets -D, -W and -o itself" in cp.stderr
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == [] and leftovers(cp.pid) == []


# ------------------------------------------------ lifecycle: detached, foreground, killed
def _dump_a(testnet, image_dirs):  # type: ignore[no-untyped-def]
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001"])
    criu.dump(a, pid, image_dirs.images)
    return b, c


def _wait(pred, timeout: float = 60, what: str = "condition"):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def _cwd(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _start_foreground(image_dirs, b, pidfile: Path) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    p = subprocess.Popen([*CLI, "restore", str(image_dirs.images), "--netns", b.netns_path,
                          "--foreground", "--stop-timeout", str(STOP_TIMEOUT), "--",
                          "--pidfile", str(pidfile)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    RAN.append(p.pid)
    return p


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_default_restore_returns_with_the_service_running_and_nothing_mounted(
        testnet, image_dirs):
    """Without `-- -d`, restore returns once the tree runs (criu -d), the view unmounted."""
    b, c = _dump_a(testnet, image_dirs)
    pidfile = image_dirs.root / "restored.pid"
    cp = restore_cmd(str(image_dirs.images), "--netns", b.netns_path, "--",
                     "--pidfile", str(pidfile), tmp=image_dirs.root, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rpid = int(pidfile.read_text())
    b.adopt(rpid)
    assert probe.tcp_hello(c, B4, 7001) == f"tcp4 {B4} 7001"  # still serving after we left
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == [] and leftovers(cp.pid) == []
    assert daemons_under(f"{RESTORE_DIR}/{cp.pid}-") == []
    criu.kill_tree(rpid)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_restore_stops_the_service_on_a_signal_and_leaves_nothing(
        testnet, image_dirs, signum):
    """--foreground: restore stays while the service runs, the view mounted; SIGTERM/SIGINT
    go to the restored root task (SIGKILL after STOP_TIMEOUT if it ignores them); then
    criu returns, the view is unmounted, the temporary dir removed, no daemon left."""
    b, c = _dump_a(testnet, image_dirs)
    pidfile = image_dirs.root / "restored.pid"
    p = _start_foreground(image_dirs, b, pidfile)
    try:
        _wait(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
        rpid = int(pidfile.read_text())
        assert probe.tcp_hello(c, B4, 7001) == f"tcp4 {B4} 7001"
        time.sleep(0.5)
        assert p.poll() is None, p.communicate()
        assert len(our_mounts(f"{RESTORE_DIR}/{p.pid}-")) == 1  # mounted while it runs
        t0 = time.monotonic()
        p.send_signal(signum)
        out, err = p.communicate(timeout=40)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out + err  # criu's status: the service ran and ended
    # the workload, init of its pid namespace, has no SIGTERM handler: it ignores SIGTERM
    # and is SIGKILLed after --stop-timeout; SIGINT ends it at once
    if signum == signal.SIGTERM:
        assert STOP_TIMEOUT <= took < STOP_TIMEOUT + 5, (took, err)
        assert f"did not stop within {STOP_TIMEOUT:.0f} s: SIGKILL" in err, err
    else:
        assert took < STOP_TIMEOUT, (took, err)
    assert not criu.is_alive(rpid)
    assert b.pids() == []
    assert our_mounts(f"{RESTORE_DIR}/{p.pid}-") == [] and leftovers(p.pid) == []
    assert daemons_under(f"{RESTORE_DIR}/{p.pid}-") == []


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_sigkilled_restore_is_cleared_by_the_next_restore(testnet, image_dirs):
    """SIGKILL leaves the view mounted (nobody is left to unmount it); once nothing runs in
    it any more, the next restore clears it: mount, read-only bind, daemon, dir."""
    b, c = _dump_a(testnet, image_dirs)
    pidfile = image_dirs.root / "restored.pid"
    p = _start_foreground(image_dirs, b, pidfile)
    try:
        _wait(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
        rpid = int(pidfile.read_text())
    finally:
        p.kill()
        p.wait()
    prefix = f"{RESTORE_DIR}/{p.pid}-"
    assert len(our_mounts(prefix)) == 1 and daemons_under(prefix)  # left behind
    b.kill_all()  # the service ends; its criu (our orphan now) returns
    _wait(lambda: not any(criu.is_alive(x) for x in [rpid]), what="service gone")
    pidfile.unlink()
    cp = restore_cmd(str(image_dirs.images), "--netns", b.netns_path, "--",
                     "--pidfile", str(pidfile), tmp=image_dirs.root, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    b.adopt(int(pidfile.read_text()))
    assert f"left by restore pid {p.pid} (killed)" in cp.stderr
    assert our_mounts(prefix) == [] and leftovers(p.pid) == []
    _wait(lambda: daemons_under(prefix) == [], timeout=10, what="daemon gone")
    assert probe.tcp_hello(c, B4, 7001) == f"tcp4 {B4} 7001"


@pytest.mark.root
@pytest.mark.fuse
def test_sigkilled_restore_is_cleared_by_umount(fake, tmp_path):
    """The same with a stand-in criu, cleared by `umount VIEW` (the path criu was given)."""
    env = dict(fake["env"], FAKE_SLEEP="30")  # type: ignore[arg-type]
    out: Path = fake["out"]  # type: ignore[assignment]
    p = subprocess.Popen([*CLI, "restore", str(fake["img"]), "--map", f"{A4}={B4}",
                          "--foreground"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    RAN.append(p.pid)
    try:
        _wait(lambda: (out / "started").exists(), what="criu started")
    finally:
        p.kill()
        p.wait()
    prefix = f"{RESTORE_DIR}/{p.pid}-"
    argv = (out / "argv").read_text().splitlines()
    assert "-d" not in argv and "--pidfile" in argv  # --foreground
    view = argv[argv.index("-D") + 1]
    assert our_mounts(prefix) == [view]
    # criu still runs in its work dir: umount leaves its view alone
    cp = subprocess.run([*CLI, "umount", "/nonexistent-mp"], capture_output=True, text=True)
    assert our_mounts(prefix) == [view]
    users = [int(d) for d in os.listdir("/proc") if d.isdigit() and _cwd(d).startswith(prefix)]
    assert users
    for pid in users:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: not any(_cwd(str(x)).startswith(prefix) for x in users), what="criu gone")
    cp = subprocess.run([*CLI, "umount", view], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert our_mounts(prefix) == [] and leftovers(p.pid) == []
    _wait(lambda: daemons_under(prefix) == [], timeout=10, what="daemon gone")


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_a_criu_that_fails_before_its_log_names_no_log(fake, tmp_path):
    """A typo in a criu option after `--` (real criu: it prints its usage and exits 1 before
    it opens its log): restore says so instead of naming a restore.log that is not there
    (before: `criu restore failed (exit 1); log: .../restore.log; ...`, no such file)."""
    env = {k: v for k, v in os.environ.items() if k != "CRIU"}
    cp = restore_cmd(str(fake["img"]), "--map", f"{A4}={B4}", "--", "--tcp-establised",
                     tmp=tmp_path, env=env)
    assert cp.returncode == 1, cp
    assert "unrecognized option '--tcp-establised'" in cp.stderr, cp.stderr
    [line] = [ln for ln in cp.stderr.splitlines() if "criu restore failed" in ln]
    work = line.rsplit("work dir kept: ", 1)[1]
    assert line == (f"ERROR criu restore failed (exit 1) before it wrote its log (its "
                    f"message is above); work dir kept: {work}"), line
    assert not os.path.exists(os.path.join(work, "restore.log"))
    assert os.path.exists(os.path.join(work, "mount.log"))  # what the work dir holds
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == []


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_json_stdout_is_the_report_alone_whatever_criu_prints(fake, tmp_path):
    """restore --json's stdout is one JSON document even when criu writes on its stdout (real
    criu given an option it does not know prints its usage there): criu's output goes to
    stderr. Before, the usage text came first and `json.loads(stdout)` failed."""
    env = {k: v for k, v in os.environ.items() if k != "CRIU"}
    cp = restore_cmd(str(fake["img"]), "--map", f"{A4}={B4}", "--json",
                     "--", "--tcp-establised", tmp=tmp_path, env=env)
    assert cp.returncode == 1, cp
    r = json.loads(cp.stdout)["restore"]
    assert r["exit_code"] == 1 and r["log"] is None and r["work_dir"], r
    assert "Usage:" in cp.stderr and "unrecognized option" in cp.stderr
    assert our_mounts(f"{RESTORE_DIR}/{cp.pid}-") == []
