"""Running CRIU for `restore` (app/restore.py): finding it on this node (doctor checks it
too), its command line, the images dir it restores, and the signals passed on to it while
it runs (--foreground: to the restored root task, SIGKILL after the stop timeout)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import RestoreError

log = logging.getLogger(__name__)

CRIU_DEFAULT = "/usr/local/sbin/criu"


def find_criu(env: Mapping[str, str]) -> str:
    """$CRIU, else `criu` on $PATH, else /usr/local/sbin/criu."""
    if env.get("CRIU"):
        path = env["CRIU"]
        if shutil.which(path) is None:
            raise RestoreError(f"$CRIU={path}: not an executable")
        return path
    found = shutil.which("criu", path=env.get("PATH", os.defpath))
    if found:
        return found
    if os.access(CRIU_DEFAULT, os.X_OK):
        return CRIU_DEFAULT
    raise RestoreError("criu not found ($CRIU, $PATH, /usr/local/sbin/criu): run "
                       "scripts/setup.sh, which builds CRIU 4.2.1, or set $CRIU")


# criu options restore sets itself: a second value would point criu elsewhere
RESERVED_CRIU_OPTIONS = ("-D", "--images-dir", "-W", "--work-dir", "-o", "--log-file")
TCP_OPTIONS = ("--tcp-established", "--tcp-close")
DETACH_OPTIONS = ("-d", "--restore-detached", "--daemon")
# --foreground: seconds between the stop signal passed on to the restored root task and its
# SIGKILL (`podman stop`'s default; a pid-namespace init without a handler ignores SIGTERM;
# restore --stop-timeout)
STOP_TIMEOUT = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def criu_subdir(image_real: str) -> str:
    """Where inventory.img is: '' (a plain CRIU dir) or 'checkpoint' (an extracted Podman or
    CRI-O checkpoint archive)."""
    for rel in ("", "checkpoint"):
        if os.path.isfile(os.path.join(image_real, rel, "inventory.img")):
            return rel
    raise RestoreError(f"{image_real}: no inventory.img (nor checkpoint/inventory.img): "
                       "not a CRIU image dir")


def has_tcp_stream(criu_dir: str) -> bool:
    try:
        return any(n.startswith("tcp-stream-") and n.endswith(".img")
                   for n in os.listdir(criu_dir))
    except OSError:
        return False


def check_criu_args(args: Sequence[str], foreground: bool = False) -> None:
    for a in args:
        name = a.split("=", 1)[0] if a.startswith("--") else a[:2]
        if name in RESERVED_CRIU_OPTIONS:
            raise RestoreError(f"criu option {a!r}: restore sets -D, -W and -o itself "
                               "(use --work-dir for the work dir)")
        if foreground and a in DETACH_OPTIONS:
            raise RestoreError(f"criu option {a!r} detaches: it contradicts --foreground")


def user_pidfile(args: Sequence[str]) -> str | None:
    """The --pidfile given among criu's options, if any (relative to the work dir)."""
    for i, a in enumerate(args):
        if a == "--pidfile" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--pidfile="):
            return a.split("=", 1)[1]
    return None


def criu_argv(criu: str, netns: str | None, images: str, work: str,
              extra: Sequence[str], tcp_established: bool, foreground: bool = False
              ) -> list[str]:
    argv = [] if netns is None else ["nsenter", f"--net={netns}", "--"]
    argv += [criu, "restore", "-D", images, "-W", work, "-o", os.path.join(work, "restore.log"),
             "-v4"]
    if not foreground and not any(a in DETACH_OPTIONS for a in extra):
        argv.append("-d")
    if foreground and user_pidfile(extra) is None:
        argv += ["--pidfile", os.path.join(work, "restored.pid")]
    if tcp_established:
        argv.append("--tcp-established")
    return argv + list(extra)


class CriuSignals:
    """While installed: SIGINT/SIGTERM/SIGHUP are passed on to criu while it runs (with
    `pidfile`, a foreground restore: to the restored root task named there, once criu wrote
    it); before that they are noted and acted on at the next step (never raised in the
    middle of starting the view, which could leave a mount nobody unmounts)."""

    def __init__(self, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.stop_timeout = stop_timeout
        self.child: subprocess.Popen[bytes] | None = None
        self.pidfile: str | None = None
        self.signum = 0
        self.kill_at: float | None = None  # when to SIGKILL the root task that was signalled
        self.root = 0
        self._prev: dict[int, Any] = {}

    def _root_pid(self) -> int | None:
        if self.pidfile is None:
            return None
        try:
            with open(self.pidfile, encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None  # not restored yet

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            name = signal.Signals(signum).name
            root = self._root_pid()
            if root is not None:
                try:
                    os.kill(root, signum)
                    log.info("%s: passed on to the restored root task %d (SIGKILL in %.0f s "
                             "if it is still there)", name, root, self.stop_timeout)
                    self.root = root
                    if self.kill_at is None:
                        self.kill_at = time.monotonic() + self.stop_timeout
                    return
                except ProcessLookupError:
                    pass
            log.info("%s: passed on to criu", name)
            self.child.send_signal(signum)

    def wait(self) -> int:
        """Wait for criu; SIGKILL the signalled root task when the stop timeout has passed."""
        assert self.child is not None
        while True:
            try:
                return self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    self.kill_at = float("inf")
                    log.warning("the restored root task %d did not stop within %.0f s: "
                                "SIGKILL", self.root, self.stop_timeout)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.root, signal.SIGKILL)

    def __enter__(self) -> CriuSignals:
        try:
            for s in SIGNALS:
                self._prev[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._prev.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h)
