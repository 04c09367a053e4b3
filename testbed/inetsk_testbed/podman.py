"""Podman (with runc and CRIU 4.2.1) as a test bed: a private podman network, containers
with fixed addresses running the sample workload, checkpoint --export / restore --import,
probes from a client container's network namespace, and cleanup of everything made.
(Podman's commands, containers and restores: podmanrun.py; archives, checkpoint images,
and the stale sweep: podmanfiles.py.)

    with PodmanNet() as net:                       # 10.77.X.0/24 + fd77::X:0/112
        c = net.run("srv", 10, workload_args)      # --ip 10.77.X.10 --ip6 fd77::X:10
        probe.tcp_hello(net.client, c.ipv4, 7001)
        net.checkpoint(c, archive, leave_running=True)
        r = net.restore(archive, "copy1", ignore_static_ip=True)
        img = net.checkpoint_image(c, "ck")          # podman checkpoint --create-image
        r = net.restore_image(img, "copy2")          # podman restore IMAGE (CRI-O's route)
        rs = net.restore_group([a1, a2], gap=1.0)    # concurrent restores, one after another
    # every container (also failed restores), every checkpoint image, the network and the
    # client are removed

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
  archive), and checkpoint images (which take no label) are named
  ``localhost/oitrt<run id>p<owner pid>-NAME``, so :func:`cleanup_stale` finds what a
  crashed run left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .podmanfiles import (_sh, _taken_subnets, cleanup_stale, image_state,
                          repack_archive)
from .podmanrun import (ALLOWED_V4, ALLOWED_V6, BASE_IMAGE, LABEL, PREFIX, RUNTIME, TESTBED,
                        TESTBED_CWD, TESTBED_IN, ULIMITS, WORKLOAD_ARGV, _LOGFILE_RE, Container,
                        NetnsOf, PodmanError, RestoreResult, ensure_base_image, missing, podman,
                        sha256)

__all__ = ["BASE_IMAGE", "LABEL", "PREFIX", "TESTBED", "TESTBED_CWD",
           "TESTBED_IN", "WORKLOAD_ARGV", "Container", "NetnsOf", "PodmanError", "PodmanNet",
           "RestoreResult", "cleanup_stale", "ensure_base_image", "image_state", "missing",
           "podman", "repack_archive", "sha256"]


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
        self.images: list[str] = []
        self._confs: list[Path] = []
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

    def write_criu_conf(self, lib: Path, extra: Iterable[str] = (), name: str = "") -> Path:
        """A CRIU config file (for runc, via the org.criu.config annotation) whose plugin
        dir is ``lib``, plus the ``extra`` lines (e.g. ``tcp-established``, ``action-script
        PATH``); in workdir (or /run) so it outlives nothing but this network. ``name``
        tells several files apart (one per container)."""
        base = self.workdir or Path("/run")
        conf = base / f"{self.name}{'-' + name if name else ''}-criu.conf"
        conf.write_text(f"lib {lib}\n" + "".join(f"{x}\n" for x in extra))
        if self.workdir is None:
            self._confs.append(conf)
        return conf

    def close(self) -> None:
        errors = []
        for name in self._all_containers():
            cp = podman(["rm", "-f", "-t", "0", name], check=False)
            if cp.returncode != 0 and "no such container" not in cp.stderr:
                errors.append(cp.stderr.strip())
        for image in self.images:
            cp = podman(["rmi", "-f", image], check=False)
            if cp.returncode != 0 and "image not known" not in cp.stderr:
                errors.append(cp.stderr.strip())
        podman(["network", "rm", "-f", self.name], check=False)
        confs = [*self._confs, *([self.criu_conf] if self.criu_conf is not None
                                 and self.workdir is None else [])]
        for conf in confs:
            with contextlib.suppress(FileNotFoundError):
                conf.unlink()
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
            extra: Sequence[str] = (), wait: bool = True, criu_conf: Path | None = None,
            ready: int | None = None) -> Container:
        """Start a container (``--ip``/``--ip6`` of host number ``host``, or IPAM's when
        None) running the workload with ARGV (or ARGV itself, workload=False: the testbed
        package is mounted at TESTBED_IN, the cwd its parent, either way). Its CRIU
        config is ``criu_conf`` or the network's. With wait, returns once ``ready``
        processes said READY (default: 1 for the workload, none for another command)."""
        full = f"{self.name}-{name}"
        args = ["run", "-d", "--name", full, "--network", self.name, "--label", self.label,
                *ULIMITS]
        if host is not None:
            args += ["--ip", self.ipv4(host), "--ip6", self.ipv6(host)]
        conf = criu_conf or self.criu_conf
        if conf is not None:
            args += ["--annotation", f"org.criu.config={conf}"]
        args += ["-v", f"{TESTBED}:{TESTBED_IN}:ro", "-w", TESTBED_CWD]
        args += [*extra, self.image]
        args += [*WORKLOAD_ARGV, *argv] if workload else list(argv)
        self.containers.append(full)
        podman(args)
        c = Container(full, self)
        c.inspect()
        count = (1 if workload else 0) if ready is None else ready
        if wait and count:
            c.wait_ready(count=count)
        return c

    def run_stream(self, name: str, host: int, argv: Sequence[str], **kw: Any) -> Container:
        """A container running the testbed's numbered TCP stream (:mod:`.stream`, stdlib
        only: the package is mounted read-only) with ARGV; waits for its READY."""
        return self.run(name, host, ["python3", "-m", "inetsk_testbed.stream", *argv],
                        workload=False, ready=1, **kw)

    def run_service(self, name: str, host: int, front: Sequence[str],
                    worker: Sequence[str], **kw: Any) -> Container:
        """A container holding two workload processes: ``worker`` (started first, in the
        background) and ``front`` (the container's main process, pid 1; give its
        --tcp-connect to the worker ``retry=S``). Waits for both READY lines."""
        wl = " ".join(WORKLOAD_ARGV)
        sh = (f"{wl} {' '.join(_sh(a) for a in worker)} & "
              f"exec {wl} {' '.join(_sh(a) for a in front)}")
        return self.run(name, host, ["/bin/sh", "-c", sh], workload=False, ready=2, **kw)

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

    def checkpoint_image(self, c: Container, name: str, *, leave_running: bool = True,
                         extra: Sequence[str] = ()) -> str:
        """``podman container checkpoint --create-image IMAGE C``: a checkpoint image (the
        form Kubernetes moves checkpoints in), removed by close(). Returns its name."""
        image = f"localhost/{PREFIX}{self.run_id}p{os.getpid()}-{name}:1"
        self.images.append(image)
        args = ["container", "checkpoint", "--create-image", image]
        if leave_running:
            args.append("--leave-running")
        podman([*args, *extra, c.name])
        return image

    def restore(self, archive: Path, name: str | None, *, ignore_static_ip: bool = True,
                keep: bool = False, extra: Sequence[str] = (), env: dict[str, str] | None = None,
                check: bool = True) -> RestoreResult:
        """``podman container restore --import ARCHIVE [--name N] [--ignore-static-ip]``.
        The container is tracked for cleanup even when the restore fails (Podman leaves it
        in Created). With check=True a failure raises PodmanError with restore.log's
        errors; else the result carries them."""
        return self._restore(["--import", str(archive)], str(archive), name,
                             ignore_static_ip=ignore_static_ip, keep=keep, extra=extra,
                             env=env, check=check)

    def restore_image(self, image: str, name: str | None, *, ignore_static_ip: bool = True,
                      keep: bool = False, extra: Sequence[str] = (),
                      check: bool = True) -> RestoreResult:
        """``podman container restore [--name N] [--ignore-static-ip] IMAGE``: a new
        container from a checkpoint image (Podman copies the image's checkpoint/ into the
        container's own dir first, as CRI-O does)."""
        return self._restore([], image, name, ignore_static_ip=ignore_static_ip, keep=keep,
                             extra=[*extra, image], check=check)

    def _restore(self, source: list[str], what: str, name: str | None, *,
                 ignore_static_ip: bool, keep: bool, extra: Sequence[str],
                 env: dict[str, str] | None = None, check: bool = True) -> RestoreResult:
        args = ["container", "restore", *source]
        full = f"{self.name}-{name}" if name else None
        if full:
            args += ["--name", full]
            self.containers.append(full)
        if ignore_static_ip:
            args.append("--ignore-static-ip")
        if keep:
            args.append("--keep")
        cp = podman([*args, *extra], check=False, env=env)
        return self._restore_result(cp, full, what, keep, check)

    def _restore_result(self, cp: subprocess.CompletedProcess[str], full: str | None,
                        what: str, keep: bool, check: bool) -> RestoreResult:
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
            raise PodmanError(f"restore of {what} failed: {cp.stderr.strip()[-1500:]}\n"
                              f"restore.log errors:\n{errs[-3000:]}")
        return RestoreResult(cp.returncode, cp.stderr, log, c)

    def restore_group(self, archives: Sequence[Path], *, gap: float = 1.0,
                      extra: Sequence[str] = ("--tcp-established",), keep: bool = True,
                      timeout: float = 90, check: bool = True,
                      between: Callable[[int], None] | None = None) -> list[RestoreResult]:
        """Restore several archives at once, the way a group is restored on several nodes:
        ``podman container restore --import A`` for each (no --name: each container takes
        the name in its archive), each started ``gap`` seconds after the one before and
        running concurrently with it (a barrier in the restores' action scripts may hold
        the first until the last arrives). ``between(i)`` runs after the gap, before the
        i-th restore (i >= 1) starts: to look at the ones already running. Every restore
        has the deadline ``timeout``."""
        procs: list[tuple[Path, subprocess.Popen[str]]] = []
        try:
            for i, archive in enumerate(archives):
                if i:
                    time.sleep(gap)
                    if between is not None:
                        between(i)
                argv = ["podman", *RUNTIME, "container", "restore", "--import", str(archive),
                        *(["--keep"] if keep else []), *extra]
                procs.append((archive, subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)))
            end = time.monotonic() + timeout
            done = []
            for archive, p in procs:
                try:
                    out, err = p.communicate(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise PodmanError(f"restore of {archive}: no answer within {timeout} s"
                                      ) from None
                done.append((archive, subprocess.CompletedProcess(p.args, p.returncode, out,
                                                                  err)))
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        return [self._restore_result(cp, None, str(archive), keep, check)
                for archive, cp in done]
