"""Podman's commands as the testbed runs them (podman.py's conventions): the podman() runner,
the base image, a container and a probe host in its network namespace, a restore's result.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .podman import PodmanNet

BASE_IMAGE = "localhost/overlayfs-inetsk-base:bookworm"
PREFIX = "oitrt"
LABEL = "overlayfs-inetsk.testrun"
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
# the testbed package (stdlib only: it runs in the image's python3), mounted read-only at
# TESTBED_IN; the workload runs as WORKLOAD_ARGV, in the package's parent dir
TESTBED = Path(__file__).parent
ALLOWED_V4 = ipaddress.IPv4Network("10.77.0.0/16")
ALLOWED_V6 = ipaddress.IPv6Network("fd77::/64")
_LOGFILE_RE = re.compile(r"log file: (\S+)")
TESTBED_IN = "/srv/inetsk_testbed"
TESTBED_CWD = "/srv"
WORKLOAD_ARGV = ["python3", "-m", "inetsk_testbed.workload"]
_IMAGE_RE = re.compile(rf"^localhost/{PREFIX}([0-9a-f]{{6}})p(\d+)-")


class PodmanError(RuntimeError):
    """A podman command the harness needed failed (its stderr is in the message)."""


def missing() -> str | None:
    """Why Podman tests cannot run here, or None."""
    for prog, pkg in (("podman", "podman"), ("runc", "runc")):
        if not shutil.which(prog):
            return f"needs {prog} (package {pkg}; scripts/setup-containers.sh installs it)"
    return None


def podman(args: Sequence[str], *, check: bool = True, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``podman --runtime runc ARGS``; text output captured."""
    argv = ["podman", *RUNTIME, *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL, env=env)
    if check and cp.returncode != 0:
        raise PodmanError(f"{' '.join(argv)}: exit {cp.returncode}: {cp.stderr.strip()[-2000:]}")
    return cp


def ensure_base_image(setup_script: Path) -> str:
    """The base image, made by the project's own set-up script when it is missing."""
    if podman(["image", "exists", BASE_IMAGE], check=False).returncode != 0:
        cp = subprocess.run(["bash", str(setup_script)], capture_output=True, text=True,
                            timeout=900, stdin=subprocess.DEVNULL)
        if cp.returncode != 0:
            raise PodmanError(f"{setup_script}: exit {cp.returncode}: {cp.stderr[-2000:]}")
    return BASE_IMAGE


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class NetnsOf:
    """A probe "host" (see :mod:`.probe`): runs commands in the network namespace of a
    process (only the network namespace changes)."""

    def __init__(self, pid: int):
        self.pid = pid

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw and "capture_output" not in kw:
            kw["capture_output"] = True
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.cmd(argv), check=check, timeout=timeout, **kw)


@dataclass
class Container:
    name: str
    net: PodmanNet
    ipv4: str = ""
    ipv6: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def inspect(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(podman(["container", "inspect", self.name]).stdout)[0]
        self.info = out
        nets = (out.get("NetworkSettings", {}).get("Networks") or {}).get(self.net.name) or {}
        self.ipv4 = nets.get("IPAddress", "")
        self.ipv6 = nets.get("GlobalIPv6Address", "")
        return out

    @property
    def state(self) -> str:
        return str(self.inspect()["State"]["Status"])

    @property
    def pid(self) -> int:
        return int(self.inspect()["State"]["Pid"])

    @property
    def userdata(self) -> Path:
        """Podman's per-container dir (restore.log, checkpoint/ with --keep)."""
        return Path(self.inspect()["StaticDir"])

    def logs(self) -> str:
        return podman(["logs", self.name], check=False).stdout

    def wait_ready(self, timeout: float = 20, count: int = 1) -> None:
        """Wait for the workload's READY line (``count`` of them: one per workload
        process in the container), or its ERROR, or the container's end."""
        end = time.monotonic() + timeout
        while True:
            out = self.logs()
            if out.count("READY") >= count:
                return
            if "ERROR" in out or self.state not in ("running", "created", "configured"):
                raise PodmanError(f"{self.name}: workload did not start: {out.strip()[-500:]}")
            if time.monotonic() > end:
                raise PodmanError(f"{self.name}: no READY within {timeout} s: {out!r}")
            time.sleep(0.1)


@dataclass
class RestoreResult:
    returncode: int
    stderr: str
    log: str  # CRIU's restore.log (a failed restore keeps it; a good one with keep=True)
    container: Container
