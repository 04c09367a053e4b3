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
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from inetsk_testbed import criu, probe

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]
A4, A6 = "10.77.0.1", "fd77::1"
B4, B6 = "10.77.0.2", "fd77::2"


def our_mounts(under: Path) -> list[str]:
    key = str(under)
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(key)]


def restore_cmd(*args: str, tmp: Path, env: dict[str, str] | None = None,
                timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run `overlayfs-inetsk restore ...` with TMPDIR under tmp (its temporary dirs show)."""
    (tmp / "tmpdir").mkdir(exist_ok=True)
    e = dict(os.environ if env is None else env)
    e["TMPDIR"] = str(tmp / "tmpdir")
    return subprocess.run([*CLI, "restore", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, stdin=subprocess.DEVNULL)


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
    assert our_mounts(image_dirs.root) == []
    assert os.listdir(image_dirs.root / "tmpdir") == []
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
    assert our_mounts(image_dirs.root) == []
    assert b.pids() == []


# ------------------------------------------------------------- a stand-in criu ($CRIU)
FAKE_CRIU = r"""#!/bin/sh
# records its argv (one per line) and the files.img it reads from -D, then exits $FAKE_RC
out="$FAKE_OUT"
printf '%s\n' "$@" > "$out/argv"
dir=""
prev=""
for a in "$@"; do [ "$prev" = "-D" ] && dir="$a"; prev="$a"; done
cat "$dir/files.img" > "$out/files.img" 2>"$out/cat.err"
if [ -n "$FAKE_SLEEP" ]; then
  trap 'echo TERM > "$out/signal"; exit 7' TERM
  echo started > "$out/started"
  sleep "$FAKE_SLEEP" & wait $!
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
    assert view.startswith(str(tmp_path / "tmpdir")) and view != str(fake["img"])
    # criu read rewritten bytes through the view
    assert src_addrs((out / "files.img").read_bytes()) == [B4, B4]
    # failure: criu's log named, work dir kept; the view is unmounted either way
    assert f"criu restore failed (exit 42); log: {work}/restore.log" in cp.stderr
    assert os.path.isdir(work) and os.path.isfile(os.path.join(work, "mount.log"))
    assert not os.path.exists(view)
    assert our_mounts(tmp_path) == []


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
    assert os.listdir(tmp_path / "tmpdir") == []  # success: temporary dirs removed
    cp = restore_cmd(str(img), "--map", f"{A4}={B4}", "--", "--tcp-close", tmp=tmp_path,
                     env=fake["env"])  # type: ignore[arg-type]
    argv = (out / "argv").read_text().splitlines()
    assert cp.returncode == 0 and "--tcp-established" not in argv and "--tcp-close" in argv


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
    env = dict(fake["env"], FAKE_SLEEP="30", TMPDIR=str(tmp_path / "tmpdir"))  # type: ignore[arg-type]
    (tmp_path / "tmpdir").mkdir()
    out: Path = fake["out"]  # type: ignore[assignment]
    p = subprocess.Popen([*CLI, "restore", str(fake["img"]), "--map", f"{A4}={B4}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (out / "started").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        assert len(our_mounts(tmp_path)) == 1
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (out / "signal").read_text().strip() == "TERM"
    assert p.returncode == 7, err  # criu's status after the signal
    assert our_mounts(tmp_path) == []


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
    assert our_mounts(tmp_path) == [] and os.listdir(tmp_path / "tmpdir") == []
