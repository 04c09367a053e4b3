"""The background mount: re-execute `mount --foreground --ready-fd N` detached and wait for
its ready byte or its one-line failure (forking after pyfuse3.init is not safe, so the child
is a fresh interpreter). Its command line is derived from options.py's description of
the `mount` options, never copied by hand.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time

from ..options import MOUNT_OPTIONS, to_argv
from ..errors import InetskError, MountError
from .daemon import READY_TIMEOUT, MountConfig, default_log_file  # noqa: F401 (the API)

log = logging.getLogger(__name__)

CHILD_MODULE = "overlayfs_inetsk.cli.mount"  # `python -m` entry point of the child


def child_argv(cfg: MountConfig, ready_fd: int, log_file: str) -> list[str]:
    """The command line of the detached foreground daemon: every `mount` option of `cfg`,
    then the ones only the spawn sets."""
    return [sys.executable, "-m", CHILD_MODULE, "mount", *to_argv(MOUNT_OPTIONS, cfg),
            "--foreground", "--ready-fd", str(ready_fd), "--log-file", log_file]


def spawn_background(cfg: MountConfig) -> tuple[int, str]:
    """Start the detached daemon and wait until it serves. Returns (pid, log file); raises
    InetskError carrying the daemon's own one-line message when it fails. cfg.plan_fd (a
    restore's plan) is passed on to the daemon, which reads it at its start."""
    log_file = os.path.abspath(cfg.log_file or default_log_file(cfg.mountpoint))
    try:
        os.makedirs(os.path.dirname(log_file), mode=0o755, exist_ok=True)
        out = os.fdopen(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                                | os.O_NOFOLLOW, 0o640), "ab")
    except OSError as e:
        raise MountError(f"{log_file}: cannot open log file: {e.strerror}") from None
    r, w = os.pipe()
    try:
        with out:
            proc = subprocess.Popen(
                child_argv(cfg, w, log_file), stdin=subprocess.DEVNULL, stdout=out,
                stderr=out, pass_fds=(w,) if cfg.plan_fd is None else (w, cfg.plan_fd),
                start_new_session=True, close_fds=True,
                env=dict(cfg.env), umask=0o022)
        os.close(w)
        w = -1
        msg = _read_ready(r, proc)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    while msg.startswith(b"W") and b"\n" in msg:  # the daemon's warnings, one line each
        line, msg = msg[1:].split(b"\n", 1)
        log.warning("%s", line.decode(errors="replace"))
    if msg == b"R":
        return proc.pid, log_file
    if msg.startswith(b"E"):
        code = proc.wait(5) if proc.poll() is None else proc.returncode
        err = InetskError(msg[1:].decode(errors="replace"))
        err.exit_code = code or 1
        raise err
    rc = proc.poll()
    if rc is None:  # no answer in time: do not leave a half-started daemon behind
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise MountError(f"{cfg.mountpoint}: the daemon did not become ready within "
                         f"{READY_TIMEOUT:.0f} s (log: {log_file})")
    raise MountError(f"{cfg.mountpoint}: the daemon exited with status {rc} before it was "
                     f"ready (log: {log_file})")


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return buf
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            if proc.poll() is not None:  # died without closing? (the pipe would be EOF)
                return buf
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return buf
        buf += chunk
        if buf.endswith(b"R") and (buf == b"R" or buf.endswith(b"\nR")):
            return buf
