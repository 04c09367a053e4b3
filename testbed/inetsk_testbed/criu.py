"""Run the workload, CRIU dump and CRIU restore inside test hosts.

    pid = start_workload(host, ["--tcp-listen", "10.77.0.1:8000"])  # init of its own pid ns
    dump(host, pid, images_dir)                  # the task is gone afterwards
    rpid = restore(host, images_dir, work_dir)   # restored root (host pid), detached
    kill_tree(rpid)

The workload is started as ``nsenter --net=<ns> unshare --pid --fork setsid python -m
inetsk_testbed.workload`` and the pid dumped is the child of ``unshare``: init of
its own pid namespace (CRIU then restores it into a fresh pid namespace; see FACTS.md).
CRIU runs with ``nsenter --net=<ns>`` so the network namespace is not part of the image.

``restore`` makes this process a child subreaper (``PR_SET_CHILD_SUBREAPER``), so that a
restored tree, detached by ``criu restore -d``, becomes our child and can be reaped when
killed (pid 1 on these machines does not reap orphans).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .net import Host
from .procs import become_subreaper, try_reap

CRIU = "/usr/local/sbin/criu"
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where inetsk_testbed is


class CriuError(RuntimeError):
    """criu failed; ``log_tail`` holds the end of its log, ``log_path`` the whole log."""

    def __init__(self, what: str, returncode: int | None, log_path: Path, log_tail: str):
        super().__init__(f"{what} failed (exit {returncode}); {log_path}:\n{log_tail}")
        self.returncode = returncode
        self.log_path = log_path
        self.log_tail = log_tail

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return self.log_tail


class WorkloadError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 25) -> str:
    """The log's Error lines (but the harmless RLIMIT_NOFILE one), then its last lines."""
    try:
        all_lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    errors = [ln for ln in all_lines if "Error (" in ln and "RLIMIT_NOFILE" not in ln]
    tail = all_lines[-lines:]
    head = [ln for ln in errors if ln not in tail]
    return "\n".join(head + (["..."] if head else []) + tail)


def workload_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME")}
    env["PYTHONPATH"] = PKG_ROOT
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def start_workload(host: Host, args: Sequence[str], timeout: float = 10,
                   module: str = "inetsk_testbed.workload") -> int:
    """Start the workload in ``host`` as init of a new pid namespace, wait for READY.

    Returns its pid (as seen here). Raises :class:`WorkloadError` (with the workload's
    error line or stderr) when it fails to set up its sockets.
    """
    r, w = os.pipe()
    try:
        argv = ["unshare", "--pid", "--fork", "setsid", sys.executable, "-m",
                module, "--ready-fd", str(w), *args]
        # start_new_session: unshare leads its own group, so its child is no group
        # leader and `setsid` need not fork: python is pid 1 of the new pid namespace.
        p = host.popen(argv, pass_fds=(w,), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd="/", env=workload_env(),
                       start_new_session=True)
    finally:
        os.close(w)
    try:
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                raise WorkloadError(f"workload not READY after {timeout}s: {list(args)}")
            chunk = os.read(r, 4096)
            if not chunk:
                break
            line += chunk
    finally:
        os.close(r)
    text = line.decode(errors="replace").strip()
    if not text.startswith("READY "):
        p.kill()
        _, err = p.communicate(timeout=5)
        raise WorkloadError(f"workload failed: {text or '(no output)'}; args={list(args)}; "
                            f"stderr={err.decode(errors='replace')[-2000:]}")
    pid = int(text.split()[1])
    if _ppid(pid) != p.pid:
        raise WorkloadError(f"workload pid {pid} is not the child of unshare {p.pid}")
    assert p.stderr is not None
    p.stderr.close()  # nothing more comes: the workload's fd 2 is /dev/null now
    return pid


def _run_criu(host: Host, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return host.run([CRIU, *argv], check=False, timeout=timeout, cwd="/")


def dump(host: Host, pid: int, images_dir: str | os.PathLike[str], *,
         tcp_established: bool = False, leave_running: bool = False,
         extra: Sequence[str] = (), timeout: float = 60) -> Path:
    """``criu dump -t PID -D images_dir -o dump.log -v4`` inside ``host``'s network namespace.

    The task is killed by the dump unless ``leave_running``. Returns the log path
    (``images_dir/dump.log``); raises :class:`CriuError` with the log tail on failure.
    """
    images = Path(images_dir)
    images.mkdir(parents=True, exist_ok=True)
    argv = ["dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4"]
    if tcp_established:
        argv.append("--tcp-established")
    if leave_running:
        argv.append("--leave-running")
    argv += list(extra)
    cp = _run_criu(host, argv, timeout)
    log = images / "dump.log"
    if cp.returncode != 0:
        raise CriuError("criu dump", cp.returncode, log, _tail(log) + cp.stderr[-2000:])
    if not leave_running:
        _wait_gone(pid)
    check_codec_identity(images)
    return log


# the socket images and the protobuf message of each of their entries
_ENTRY_MESSAGES = {"files.img": ("fdinfo_pb2", "file_entry"),
                   "inetsk.img": ("sk_inet_pb2", "inet_sk_entry")}


def check_codec_identity(images: str | os.PathLike[str]) -> None:
    """Every socket image a test dump produces must survive a decode and re-encode byte
    for byte, as CRIU's test/crit-recode.py checks: each entry our codec splits off is
    decoded with pycriu's generated class and serialized again; our codec joins the frames
    back; pycriu's own reader and writer (images.loads/dumps) give the file back. Checked
    here so that it holds for every dump a test makes. AssertionError names the file, the
    entry and its offset."""
    for name in _ENTRY_MESSAGES:
        path = Path(images) / name
        if path.exists():
            check_image_recode(path)


def check_image_recode(path: str | os.PathLike[str]) -> None:
    """check_codec_identity for one socket image (files.img or inetsk.img)."""
    import importlib

    from pycriu import images as pycriu_images

    from overlayfs_inetsk.core import imagefile

    path = Path(path)
    module, message = _ENTRY_MESSAGES[path.name]
    cls = getattr(importlib.import_module(f"pycriu.images.{module}"), message)
    data = path.read_bytes()
    img = imagefile.parse(data, str(path))
    for k, e in enumerate(img.entries):
        where = f"{path}: entry {k} at offset {e.offset}"
        try:
            again = cls.FromString(e.payload).SerializeToString()
        except Exception as exc:  # DecodeError, EncodeError (a required field missing)
            raise AssertionError(f"{where}: not a {message}: {exc}") from None
        if again != e.payload:
            raise AssertionError(f"{where}: decode + encode with pycriu's {message} gives "
                                 f"other bytes ({e.payload.hex()} -> {again.hex()})")
    if imagefile.encode(img.magic, (e.payload for e in img.entries)) != data:
        raise AssertionError(f"{path}: our codec's frames do not join back byte-identical")
    if pycriu_images.dumps(pycriu_images.loads(data)) != data:
        raise AssertionError(f"{path}: pycriu's images.loads + dumps (crit-recode) is not "
                             "byte-identical")


def _wait_gone(pid: int, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _state(pid)
        if st is None or st == "Z":
            return
        time.sleep(0.01)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def restore(host: Host, images_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str],
            *, tcp_established: bool | None = None, extra: Sequence[str] = (),
            timeout: float = 60) -> int:
    """``criu restore -D images_dir -W work_dir -o restore.log -v4 -d --pidfile
    work_dir/restore.pid`` inside ``host``. Nothing is written to images_dir (it may be
    read-only or a FUSE mount). ``--tcp-established`` is passed when ``tcp_established``
    is True, or when it is None (default) and the images hold ``tcp-stream-*.img`` (dumped
    with --tcp-established: restoring them needs it too). Returns the restored root's pid;
    raises :class:`CriuError` with the log tail (``work_dir/restore.log``) on failure."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pidfile = work / "restore.pid"
    pidfile.unlink(missing_ok=True)
    log = work / "restore.log"
    become_subreaper()
    argv = ["restore", "-D", str(images_dir), "-W", str(work), "-o", str(log), "-v4", "-d",
            "--pidfile", str(pidfile)]
    if tcp_established is None:
        tcp_established = any(Path(images_dir).glob("tcp-stream-*.img"))
    if tcp_established:
        argv.append("--tcp-established")
    argv += list(extra)
    cp = _run_criu(host, argv, timeout)
    pid = None
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pass
    if pid is not None:
        host.adopt(pid)
    if cp.returncode != 0:
        if pid is not None:
            kill_tree(pid)
        raise CriuError("criu restore", cp.returncode, log, _tail(log) + cp.stderr[-2000:])
    if pid is None:
        raise CriuError("criu restore (no pidfile)", cp.returncode, log, _tail(log))
    return pid


def kill_tree(pid: int, timeout: float = 5) -> None:
    """SIGKILL ``pid`` (a restored root: init of its pid namespace, so its whole tree goes
    with it) and reap it if it is our child."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if try_reap(pid) and _state(pid) in (None, "Z"):
            return
        time.sleep(0.01)


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return _state(pid) not in (None, "Z")


def nspid(pid: int) -> list[int]:
    """The NSpid line of /proc/PID/status: [pid here, ..., pid in its own namespace]."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


__all__: list[Any] = ["CRIU", "CriuError", "WorkloadError", "start_workload", "dump",
                      "restore", "kill_tree", "is_alive", "nspid", "become_subreaper"]
