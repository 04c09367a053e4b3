"""`overlayfs-inetsk doctor`: can this node restore checkpoints through overlayfs-inetsk?

Each check has a status (ok, warn, fail, skip), what was found, and for anything not ok a
concrete fix. The node is ready when no check fails; warnings are optional features.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from ..errors import InetskError

TESTED_CRIU = (4, 2, 1)
MIN_CRIU = (4, 0)
SCHEMA = 1
SETUP = "run scripts/setup.sh (builds CRIU 4.2.1 from Debian's source package, installs fuse3)"

Runner = Callable[..., subprocess.CompletedProcess[str]]


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""
    state: str | None = None  # agent and route only (docs/json.md)


def _run(run: Runner, argv: list[str], env: Mapping[str, str],
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(argv, capture_output=True, text=True, timeout=timeout, env=dict(env),
               stdin=subprocess.DEVNULL)


def parse_criu_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", text, re.M)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _criu_messages(text: str) -> list[str]:
    """criu's `Warn (file:line): msg` / `Error (file:line): msg` lines, without the source
    position."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*(Warn|Error)\s*\([^)]*\):\s*(.*)$", line)
        if m:
            out.append(f"{m.group(1).lower()}: {m.group(2).strip()}")
    return out


def _tool(name: str, env: Mapping[str, str], why: str, fix: str) -> Check:
    path = shutil.which(name, path=env.get("PATH", os.defpath))
    if path:
        return Check(name, "ok", path)
    return Check(name, "fail", f"{name} not found on $PATH ({why})", fix)


def run_checks(env: Mapping[str, str] | None = None, run: Runner = subprocess.run,
               euid: int | None = None, dev_fuse: str = "/dev/fuse") -> list[Check]:
    from ..node.criu import find_criu

    env = dict(os.environ) if env is None else dict(env)
    euid = os.geteuid() if euid is None else euid
    checks: list[Check] = []

    if euid == 0:
        checks.append(Check("root", "ok", "running as root"))
    else:
        checks.append(Check("root", "fail", f"running as uid {euid}: criu restore and FUSE "
                            "mounts for criu need root", "run as root (sudo overlayfs-inetsk ...)"))

    criu: str | None
    try:
        criu = find_criu(env)
        checks.append(Check("criu", "ok", criu))
    except InetskError as e:
        criu = None
        checks.append(Check("criu", "fail", str(e), SETUP + ", or set $CRIU to its path"))

    if criu is None:
        checks += [Check(n, "skip", "no criu") for n in ("criu-version", "criu-check",
                                                          "kernel-features")]
    else:
        checks.append(_check_version(run, criu, env))
        if euid != 0:
            checks += [Check(n, "skip", "criu check needs root")
                       for n in ("criu-check", "kernel-features")]
        else:
            checks += _check_criu_check(run, criu, env)

    checks.append(_check_dev_fuse(dev_fuse))
    checks.append(_tool("fusermount3", env, "unmounts the view",
                        "apt-get install fuse3 (or run scripts/setup.sh)"))
    checks.append(_tool("nsenter", env, "restore runs criu in the target network namespace",
                        "apt-get install util-linux"))
    checks.append(_tool("iptables-restore", env, "criu locks the network with it during "
                        "restore", "apt-get install iptables (or pass `-- --network-lock "
                        "nftables` to restore)"))
    checks.append(_check_modules())
    from ..plugin.agentstate import doctor_checks

    checks += [Check(f.name, f.status, f.detail, f.fix, f.state)
               for f in doctor_checks(criu, env, run)]
    return checks


def _check_version(run: Runner, criu: str, env: Mapping[str, str]) -> Check:
    try:
        cp = _run(run, [criu, "--version"], env, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("criu-version", "fail", f"{criu} --version: {e}", SETUP)
    version = parse_criu_version(cp.stdout + cp.stderr)
    if cp.returncode != 0 or version is None:
        return Check("criu-version", "fail", f"{criu} --version exited {cp.returncode}: "
                     f"{(cp.stderr or cp.stdout).strip()[:200]}", SETUP)
    v = ".".join(map(str, version))
    if version < MIN_CRIU:
        return Check("criu-version", "fail", f"CRIU {v} is too old (Debian 12's 3.17 fails "
                     "`criu check` on current kernels: vdso bounds)", SETUP)
    if version < TESTED_CRIU:
        return Check("criu-version", "warn", f"CRIU {v}: older than 4.2.1, the version "
                     "overlayfs-inetsk is tested with", SETUP)
    return Check("criu-version", "ok", f"CRIU {v}")


def _check_criu_check(run: Runner, criu: str, env: Mapping[str, str]) -> list[Check]:
    out = []
    try:
        cp = _run(run, [criu, "check"], env)
        text = cp.stdout + cp.stderr
        if cp.returncode == 0 and "Looks good" in text:
            out.append(Check("criu-check", "ok", "criu check: Looks good."))
        else:
            msgs = [m for m in _criu_messages(text) if "RLIMIT_NOFILE" not in m]
            out.append(Check("criu-check", "fail", f"criu check exited {cp.returncode}: "
                             + ("; ".join(msgs) or text.strip()[-300:]),
                             "the kernel or this criu lacks what CRIU needs: a CRIU built for "
                             "this kernel (" + SETUP + ") or a newer kernel"))
    except (OSError, subprocess.TimeoutExpired) as e:
        out.append(Check("criu-check", "fail", f"criu check: {e}", SETUP))
    try:
        cp = _run(run, [criu, "check", "--all"], env)
        msgs = [m for m in _criu_messages(cp.stdout + cp.stderr) if "RLIMIT_NOFILE" not in m]
        if cp.returncode == 0 and not msgs:
            out.append(Check("kernel-features", "ok", "criu check --all: nothing missing"))
        else:
            out.append(Check("kernel-features", "warn", "criu check --all reports: "
                             + ("; ".join(msgs) or f"exit {cp.returncode}"),
                             "optional features: only some process trees need them (e.g. "
                             "dirty tracking for pre-dumps); see `criu check --all`"))
    except (OSError, subprocess.TimeoutExpired) as e:
        out.append(Check("kernel-features", "warn", f"criu check --all: {e}"))
    return out


def _check_dev_fuse(path: str) -> Check:
    fix = "modprobe fuse (in a container: --device /dev/fuse and CAP_SYS_ADMIN)"
    try:
        st = os.stat(path)
    except OSError as e:
        return Check("dev-fuse", "fail", f"{path}: {e.strerror}", fix)
    if not stat.S_ISCHR(st.st_mode):
        return Check("dev-fuse", "fail", f"{path} is not a character device", fix)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return Check("dev-fuse", "fail", f"{path}: cannot open: {e.strerror}",
                     "run as root; " + fix)
    os.close(fd)
    return Check("dev-fuse", "ok", f"{path} opens read-write")


def _check_modules() -> Check:
    missing = []
    for mod in ("pyfuse3", "trio", "pycriu.images.fdinfo_pb2"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # ImportError, or a broken generated module
            missing.append(f"{mod} ({e.__class__.__name__}: {e})")
    if missing:
        return Check("python-modules", "fail", "cannot import " + ", ".join(missing),
                     SETUP + " (pycriu comes from CRIU's source tree, not PyPI)")
    return Check("python-modules", "ok", "pyfuse3, trio, pycriu")


def ready(checks: list[Check]) -> bool:
    return all(c.status != "fail" for c in checks)


def render_text(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            lines.append(f"{'':4}  {'':<{width}}  fix: {c.fix}")
    failed = [c.name for c in checks if c.status == "fail"]
    lines.append("ready" if not failed else f"not ready: {', '.join(failed)}")
    return "\n".join(lines) + "\n"


def render_json(checks: list[Check]) -> str:
    doc = {"schema": SCHEMA, "ready": ready(checks),
           "checks": [{k: v for k, v in asdict(c).items() if k != "state" or v is not None}
                      for c in checks]}
    return json.dumps(doc, indent=2) + "\n"
