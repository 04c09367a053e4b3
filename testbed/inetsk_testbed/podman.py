"""Podman (with runc and CRIU 4.2.1) as a test bed: a private podman network, containers
with fixed addresses running the sample workload, checkpoint --export / restore --import,
probes from a client container's network namespace, and cleanup of everything made.
Long: making and always cleaning up the network, containers and archives go together.

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
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import stat
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
TESTBED_IN = "/srv/inetsk_testbed"  # run_stream mounts the testbed package here
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
        None) running ``python3 /srv/workload.py ARGV`` (or ARGV itself, workload=False:
        the testbed's workload.py is mounted at /srv/workload.py either way). Its CRIU
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
        args += ["-v", f"{WORKLOAD}:{WORKLOAD_IN}:ro"]
        args += [*extra, self.image]
        args += ["python3", WORKLOAD_IN, *argv] if workload else list(argv)
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
        pkg = Path(__file__).parent
        extra = ["-v", f"{pkg}:{TESTBED_IN}:ro", "-w", str(Path(TESTBED_IN).parent)]
        return self.run(name, host, ["python3", "-m", "inetsk_testbed.stream", *argv],
                        workload=False, ready=1, extra=[*extra, *kw.pop("extra", ())], **kw)

    def run_service(self, name: str, host: int, front: Sequence[str],
                    worker: Sequence[str], **kw: Any) -> Container:
        """A container holding two workload processes: ``worker`` (started first, in the
        background) and ``front`` (the container's main process, pid 1; give its
        --tcp-connect to the worker ``retry=S``). Waits for both READY lines."""
        sh = (f"python3 {WORKLOAD_IN} {' '.join(_sh(a) for a in worker)} & "
              f"exec python3 {WORKLOAD_IN} {' '.join(_sh(a) for a in front)}")
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
                      timeout: float = 90, check: bool = True) -> list[RestoreResult]:
        """Restore several archives at once, the way a group is restored on several nodes:
        ``podman container restore --import A`` for each (no --name: each container takes
        the name in its archive), each started ``gap`` seconds after the one before and
        running concurrently with it (a barrier in the restores' action scripts may hold
        the first until the last arrives). Every restore has the deadline ``timeout``."""
        procs: list[tuple[Path, subprocess.Popen[str]]] = []
        try:
            for i, archive in enumerate(archives):
                if i:
                    time.sleep(gap)
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


GROUP_SCRIPT = """\
#!/bin/sh
# CRIU action script of one member of a group restored through Podman (runc):
# docs/tcp.md, "Groups through Podman". The member's CRIU config file (the container's
# org.criu.config annotation, or /etc/criu/runc.conf) names it: action-script THIS_FILE.
case "$CRTOOLS_SCRIPT_ACTION" in
setup-namespaces)
    # The restored root task is in the container's new network namespace and no socket
    # exists yet: lock that namespace the way CRIU locks one it restores itself (its
    # CRIU chain, which CRIU deletes at network-unlock, right after post-restore).
    for cmd in iptables-restore ip6tables-restore; do
        nsenter --net="/proc/$CRTOOLS_INIT_PID/ns/net" "$cmd" -w --noflush <<'EOF' || exit 1
*filter
:CRIU - [0:0]
-I INPUT -j CRIU
-I OUTPUT -j CRIU
-A CRIU -m mark --mark 0xC114 -j ACCEPT
-A CRIU -j DROP
COMMIT
EOF
    done ;;
post-restore)
    # Wait until every member's sockets exist. --no-lock: the barrier's own lock would
    # go into criu's network namespace, which under runc is the host's.
    exec {cli} barrier --dir {dir} --members {members} --name {name} --timeout {timeout} \\
        --no-lock ;;
esac
"""


def write_group_script(path: Path, *, cli: str, directory: Path, members: int, name: str,
                       timeout: float = 60) -> Path:
    """GROUP_SCRIPT for one member, executable, at ``path``."""
    path.write_text(GROUP_SCRIPT.format(cli=_sh(cli), dir=_sh(str(directory)),
                                        members=members, name=_sh(name), timeout=f"{timeout:g}"))
    path.chmod(0o755)
    return path


def _sh(arg: str) -> str:
    return shlex.quote(arg)


def image_state(image: str) -> dict[str, Any]:
    """What a checkpoint image is, to show it unchanged: podman's image id and digest,
    and a sha256 over its one layer's whole tree (every path with its type and mode, each
    file's bytes, each link's target), read from the layer's dir in podman's storage."""
    out: dict[str, Any] = json.loads(podman(["image", "inspect", image]).stdout)[0]
    layers = out["RootFS"]["Layers"]
    diff = Path(out["GraphDriver"]["Data"]["UpperDir"])
    h = hashlib.sha256()
    files: list[str] = []
    for root, dirs, names in os.walk(diff):
        dirs.sort()
        for n in sorted([*dirs, *names]):
            path = Path(root) / n
            rel = str(path.relative_to(diff))
            st = path.lstat()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if stat.S_ISREG(st.st_mode):
                files.append(rel)
                h.update(sha256(path).encode())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
    return {"id": out["Id"], "digest": out["Digest"], "layers": layers,
            "tree": h.hexdigest(), "files": files}


def repack_archive(src: Path, dest: Path, *, add: dict[str, str] | None = None,
                   addresses: Sequence[str] = ()) -> Path:
    """A copy of a Podman checkpoint archive (a zstd tar) with files added (``add``:
    path in the archive -> text, e.g. ``checkpoint/overlayfs-inetsk.map``) and, given
    ``addresses`` (the new IPv4 and/or IPv6 address), the container's fixed addresses
    changed to them: in ``network.status`` (each interface's subnets), which is where
    Podman 4.3 takes a restored container's address from unless --ignore-static-ip
    (measured: an edit of config.dump alone changed nothing), and in ``config.dump`` (its
    networks' ``static_ips``), so that the two agree. Podman has no restore option that
    names an address; a group's map needs the members' new addresses before the restore."""
    tree = dest.with_name(dest.name + ".d")
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(src)], check=True, timeout=60)
    for rel, text in (add or {}).items():
        (tree / rel).write_text(text)
    if addresses:
        new = {ipaddress.ip_address(a).version: a for a in addresses}
        status = json.loads((tree / "network.status").read_text())
        for net in status.values():
            for iface in net["interfaces"].values():
                for sub in iface["subnets"]:
                    addr, _, plen = sub["ipnet"].partition("/")
                    v = ipaddress.ip_address(addr).version
                    if v in new:
                        sub["ipnet"] = f"{new[v]}/{plen}"
        (tree / "network.status").write_text(json.dumps(status))
        config = json.loads((tree / "config.dump").read_text())
        for opts in (config.get("newNetworks") or {}).values():
            opts["static_ips"] = [new.get(ipaddress.ip_address(a).version, a)
                                  for a in opts.get("static_ips") or []]
        (tree / "config.dump").write_text(json.dumps(config))
    subprocess.run(["tar", "--zstd", "-C", str(tree), "-cf", str(dest), "."], check=True,
                   timeout=60)
    shutil.rmtree(tree)
    return dest


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
    cp = podman(["images", "--format", "{{.Repository}}:{{.Tag}}"], check=False)
    for image in cp.stdout.split():
        m = _IMAGE_RE.match(image)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            podman(["rmi", "-f", image], check=False)
            removed.append(image)
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
