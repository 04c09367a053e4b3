"""Podman (with runc and CRIU 4.2.1) as a test bed: a private podman network, containers
with fixed addresses running the sample workload, checkpoint --export / restore --import,
probes from a client container's network namespace, and cleanup of everything made.
Long: making and always cleaning up the network, containers and archives go together.

    with PodmanNet() as net:                       # 10.77.X.0/24 + fd77::X:0/112
        c = net.run("srv", 10, workload_args)      # --ip 10.77.X.10 --ip6 fd77::X:10
        probe.tcp_hello(net.client, c.ipv4, 7001)
        net.checkpoint(c, archive, leave_running=True)
        r = net.restore(archive, "copy1", ignore_static_ip=True)
    # every container (also failed restores), the network and the client are removed

Conventions (docs/podman.md, ../shared/FACTS.md "Container runtimes"):

* every podman command runs with ``--runtime runc`` (Debian's crun has no CRIU support and
  cannot start containers on this host's cgroups) and every container gets
  ``--ulimit nofile=20000:20000 --ulimit nproc=32768:32768`` (no CAP_SYS_RESOURCE here);
* CRIU's options for runc come from the container annotation ``org.criu.config``: a file
  this module writes (``lib DIR`` names a dir holding only the plugin under test, so tests
  never touch /usr/lib/criu or /etc/criu); runc reads it for the dump and, from the
  archive's spec, for every restore;
* the network is a bridge with ``--disable-dns``, as users have it: the bridge (in the
  root namespace) holds the gateway address X.1 and containers a default route to it
  (``local=auto`` needs that route). ``internal=True`` makes an ``--internal`` network
  (no gateway address, no route, no NAT rule). Probes run in the network namespace of a
  ``client`` container on the same network (``nsenter --net`` only), so :mod:`.probe`
  works unchanged (a :class:`NetnsOf` is its ``host``); only addresses of the network's
  subnets are ever used;
* names start with ``oitrt`` and carry a run id; containers carry the label
  ``overlayfs-inetsk.testrun=<run id>:<owner pid>`` (restored copies keep it: it is in the
  archive), so :func:`cleanup_stale` finds what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_IMAGE = "localhost/overlayfs-inetsk-base:bookworm"
PREFIX = "oitrt"
LABEL = "overlayfs-inetsk.testrun"
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
WORKLOAD = Path(__file__).with_name("workload.py")  # stdlib only: runs in the image's python3
WORKLOAD_IN = "/srv/workload.py"
ALLOWED_V4 = ipaddress.IPv4Network("10.77.0.0/16")
ALLOWED_V6 = ipaddress.IPv6Network("fd77::/64")
_LOGFILE_RE = re.compile(r"log file: (\S+)")


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
    import hashlib

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

    def wait_ready(self, timeout: float = 20) -> None:
        """Wait for the workload's READY line (or its ERROR, or the container's end)."""
        end = time.monotonic() + timeout
        while True:
            out = self.logs()
            if "READY" in out:
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


class PodmanNet:
    """A private podman network (IPv4 /24 in 10.77.128-250.0 and IPv6 /112 in fd77::/64),
    a client container on it, and every container made through this object."""

    def __init__(self, criu_lib: Path | None = None, workdir: Path | None = None,
                 image: str = BASE_IMAGE, internal: bool = False):
        self.run_id = secrets.token_hex(3)
        self.name = f"{PREFIX}{self.run_id}"
        self.image = image
        self.internal = internal
        self.criu_lib = criu_lib
        self.workdir = workdir
        self.containers: list[str] = []
        self.label = f"{LABEL}={self.run_id}:{os.getpid()}"
        self.v4: ipaddress.IPv4Network | None = None
        self.v6: ipaddress.IPv6Network | None = None
        self.criu_conf: Path | None = None
        self._client: Container | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> PodmanNet:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        taken = _taken_subnets()
        for _ in range(50):
            k = 128 + secrets.randbelow(123)
            v4 = ipaddress.IPv4Network(f"10.77.{k}.0/24")
            if not any(v4.overlaps(t) for t in taken if t.version == 4):
                break
        else:
            raise PodmanError("no free 10.77.X.0/24 for a podman test network")
        v6 = ipaddress.IPv6Network(f"fd77::{k:x}:0/112")
        assert v4.subnet_of(ALLOWED_V4) and v6.subnet_of(ALLOWED_V6)
        self.v4, self.v6 = v4, v6
        podman(["network", "create", *(["--internal"] if self.internal else []),
                "--disable-dns", "--label", self.label,
                "--subnet", str(v4), "--subnet", str(v6), self.name])
        if self.criu_lib is not None:
            self.criu_conf = self.write_criu_conf(self.criu_lib)

    def write_criu_conf(self, lib: Path, extra: Iterable[str] = ()) -> Path:
        """A CRIU config file (for runc, via the org.criu.config annotation) whose plugin
        dir is ``lib``; in workdir (or /run) so it outlives nothing but this network."""
        base = self.workdir or Path("/run")
        conf = base / f"{self.name}-criu.conf"
        conf.write_text(f"lib {lib}\n" + "".join(f"{x}\n" for x in extra))
        return conf

    def close(self) -> None:
        errors = []
        for name in self._all_containers():
            cp = podman(["rm", "-f", "-t", "0", name], check=False)
            if cp.returncode != 0 and "no such container" not in cp.stderr:
                errors.append(cp.stderr.strip())
        podman(["network", "rm", "-f", self.name], check=False)
        if self.criu_conf is not None and self.workdir is None:
            with contextlib.suppress(FileNotFoundError):
                self.criu_conf.unlink()
        if errors:
            raise PodmanError("cleanup: " + "; ".join(errors))

    def _all_containers(self) -> list[str]:
        names = list(self.containers)
        cp = podman(["ps", "-a", "--filter", f"label={self.label}", "--format", "{{.Names}}"],
                    check=False)
        names += [n for n in cp.stdout.split() if n not in names]
        return names

    # -- addresses -----------------------------------------------------------------------
    def ipv4(self, host: int) -> str:
        assert self.v4 is not None and 2 <= host < 250
        return str(self.v4[host])

    def ipv6(self, host: int) -> str:
        assert self.v6 is not None and 2 <= host < 250
        return str(self.v6[host])

    # -- containers ------------------------------------------------------------------------
    def run(self, name: str, host: int | None, argv: Sequence[str], *, workload: bool = True,
            extra: Sequence[str] = (), wait: bool = True) -> Container:
        """Start a container (``--ip``/``--ip6`` of host number ``host``, or IPAM's when
        None) running ``python3 /srv/workload.py ARGV`` (or ARGV itself, workload=False)."""
        full = f"{self.name}-{name}"
        args = ["run", "-d", "--name", full, "--network", self.name, "--label", self.label,
                *ULIMITS]
        if host is not None:
            args += ["--ip", self.ipv4(host), "--ip6", self.ipv6(host)]
        if self.criu_conf is not None:
            args += ["--annotation", f"org.criu.config={self.criu_conf}"]
        if workload:
            args += ["-v", f"{WORKLOAD}:{WORKLOAD_IN}:ro"]
        args += [*extra, self.image]
        args += ["python3", WORKLOAD_IN, *argv] if workload else list(argv)
        self.containers.append(full)
        podman(args)
        c = Container(full, self)
        c.inspect()
        if wait and workload:
            c.wait_ready()
        return c

    @property
    def client(self) -> NetnsOf:
        """A probe host on this network: the network namespace of a sleeping container."""
        if self._client is None:
            self._client = self.run("client", None, ["sleep", "infinity"], workload=False)
        return NetnsOf(self._client.pid)

    def checkpoint(self, c: Container, archive: Path, *, leave_running: bool = False,
                   tcp_established: bool = False, extra: Sequence[str] = ()) -> None:
        args = ["container", "checkpoint", "--export", str(archive)]
        if leave_running:
            args.append("--leave-running")
        if tcp_established:
            args.append("--tcp-established")
        podman([*args, *extra, c.name])

    def restore(self, archive: Path, name: str | None, *, ignore_static_ip: bool = True,
                keep: bool = False, extra: Sequence[str] = (), env: dict[str, str] | None = None,
                check: bool = True) -> RestoreResult:
        """``podman container restore --import ARCHIVE [--name N] [--ignore-static-ip]``.
        The container is tracked for cleanup even when the restore fails (Podman leaves it
        in Created). With check=True a failure raises PodmanError with restore.log's
        errors; else the result carries them."""
        args = ["container", "restore", "--import", str(archive)]
        full = f"{self.name}-{name}" if name else None
        if full:
            args += ["--name", full]
            self.containers.append(full)
        if ignore_static_ip:
            args.append("--ignore-static-ip")
        if keep:
            args.append("--keep")
        cp = podman([*args, *extra], check=False, env=env)
        log = ""
        m = _LOGFILE_RE.search(cp.stderr)
        if m and os.path.exists(m.group(1)):
            log = Path(m.group(1)).read_text(errors="replace")
        lines = cp.stdout.strip().splitlines()
        cname = full or (lines[-1] if lines else "")
        if cname and cname not in self.containers:
            self.containers.append(cname)
        c = Container(cname, self)
        if cname:
            with contextlib.suppress(PodmanError):
                c.inspect()
                if not log and keep:
                    rl = c.userdata / "restore.log"
                    log = rl.read_text(errors="replace") if rl.exists() else ""
        if check and cp.returncode != 0:
            errs = "\n".join(ln for ln in log.splitlines() if "Error" in ln or "rror (" in ln)
            raise PodmanError(f"restore of {archive} failed: {cp.stderr.strip()[-1500:]}\n"
                              f"restore.log errors:\n{errs[-3000:]}")
        return RestoreResult(cp.returncode, cp.stderr, log, c)


def _taken_subnets() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Subnets of the existing podman networks and of the root namespace's routes."""
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    cp = podman(["network", "ls", "--format", "{{.Name}}"], check=False)
    names = cp.stdout.split()
    if names:
        cp = podman(["network", "inspect", *names], check=False)
        with contextlib.suppress(ValueError):
            for n in json.loads(cp.stdout or "[]"):
                for s in n.get("subnets") or []:
                    out.append(ipaddress.ip_network(s["subnet"], strict=False))
    cp2 = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                         text=True)
    for line in cp2.stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if "/" in word:
                out.append(ipaddress.ip_network(word, strict=False))
    return out


def cleanup_stale() -> list[str]:
    """Remove containers and networks of earlier runs whose owner process is gone."""
    removed = []
    cp = podman(["ps", "-a", "--filter", f"label={LABEL}",
                 "--format", "{{.Names}} {{index .Labels \"" + LABEL + "\"}}"], check=False)
    dead_runs = set()
    for line in cp.stdout.splitlines():
        name, _, val = line.partition(" ")
        _, _, pid = val.partition(":")
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            podman(["rm", "-f", "-t", "0", name], check=False)
            removed.append(name)
            dead_runs.add(val.partition(":")[0])
    cp = podman(["network", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}"],
                check=False)
    for name in cp.stdout.split():
        ins = podman(["network", "inspect", name], check=False)
        with contextlib.suppress(ValueError, IndexError, KeyError):
            val = json.loads(ins.stdout)[0]["labels"][LABEL]
            pid = val.partition(":")[2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                podman(["network", "rm", "-f", name], check=False)
                removed.append(name)
    return removed
