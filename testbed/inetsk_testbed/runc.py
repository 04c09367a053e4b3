"""runc driven directly (no Podman): an OCI bundle over the cached base rootfs whose
network namespace is a test host's (:class:`.net.Host`), running the sample workload;
``runc checkpoint --image-path`` / ``runc restore --image-path`` as a runtime does.

    with RuncContainer(bundle_dir, host_a, workload_args) as c:   # runc run -d
        c.checkpoint(images)                                        # runc checkpoint
    with RuncContainer(bundle_dir2, host_b, ...) as r:
        r.restore(view_dir)                                         # runc restore -d

The rootfs is the debootstrap tree scripts/setup-containers.sh keeps in
/var/cache/overlayfs-inetsk/podman-base/rootfs, used read-only (``root.readonly``); the
workload script is bind-mounted read-only; stdio is /dev/null. Every container is deleted
(``runc delete -f``) on the way out, whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .podman import TESTBED, TESTBED_CWD, TESTBED_IN, WORKLOAD_ARGV

BASE_ROOTFS = Path(os.environ.get("OVERLAYFS_INETSK_CACHE", "/var/cache/overlayfs-inetsk")
                   ) / "podman-base" / "rootfs"


class RuncError(RuntimeError):
    pass


def runc(args: Sequence[str], *, check: bool = True, timeout: float = 60
         ) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(["runc", *args], capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise RuncError(f"runc {' '.join(args)}: exit {cp.returncode}: {cp.stderr.strip()[-2000:]}")
    return cp


def bundle_config(rootfs: Path, netns: str, argv: Sequence[str],
                  criu_conf: Path | None = None) -> dict[str, Any]:
    """An OCI config (runc's own `runc spec` defaults) running ARGV in netns ``netns``."""
    cfg = _spec()
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = list(argv)
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    for ns in cfg["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = netns
    cfg["process"]["cwd"] = TESTBED_CWD
    cfg["mounts"].append({"destination": TESTBED_IN, "type": "bind",
                          "source": str(TESTBED), "options": ["rbind", "ro"]})
    if criu_conf is not None:
        cfg.setdefault("annotations", {})["org.criu.config"] = str(criu_conf)
    return cfg


def _spec() -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        runc(["spec", "--bundle", d])
        spec: dict[str, Any] = json.loads(Path(d, "config.json").read_text())
        return spec


class RuncContainer:
    """One runc container in its own bundle dir, in test host ``host``'s netns."""

    def __init__(self, bundle: Path, host: Any, workload_args: Sequence[str],
                 criu_conf: Path | None = None, rootfs: Path = BASE_ROOTFS):
        self.id = f"oitrt{secrets.token_hex(3)}"
        self.bundle = bundle
        self.host = host
        bundle.mkdir(parents=True, exist_ok=True)
        cfg = bundle_config(rootfs, host.netns_path, [*WORKLOAD_ARGV, *workload_args],
                            criu_conf)
        (bundle / "config.json").write_text(json.dumps(cfg, indent=1))

    def __enter__(self) -> RuncContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def _stdio(self) -> dict[str, Any]:
        return {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                "stderr": subprocess.DEVNULL}

    def start(self) -> None:
        cp = subprocess.run(["runc", "run", "-d", "--bundle", str(self.bundle), self.id],
                            timeout=60, **self._stdio())
        if cp.returncode != 0:
            raise RuncError(f"runc run {self.id}: exit {cp.returncode}")

    def checkpoint(self, images: Path, work: Path, *, leave_running: bool = False) -> None:
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        args = ["checkpoint", "--image-path", str(images), "--work-path", str(work)]
        if leave_running:
            args.append("--leave-running")
        cp = runc([*args, self.id], check=False)
        if cp.returncode != 0:
            raise RuncError(f"runc checkpoint: {cp.stderr.strip()[-1000:]}\n"
                            + _errors(work / "dump.log"))

    def restore(self, images: Path, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        cp = subprocess.run(["runc", "restore", "-d", "--image-path", str(images),
                             "--work-path", str(work), "--bundle", str(self.bundle), self.id],
                            timeout=120, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
        if cp.returncode != 0:
            raise RuncError(f"runc restore: {cp.stderr.strip()[-1000:]}\n"
                            + _errors(work / "restore.log"))

    def state(self) -> str:
        cp = runc(["state", self.id], check=False)
        return str(json.loads(cp.stdout)["status"]) if cp.returncode == 0 else "absent"

    def delete(self) -> None:
        runc(["delete", "-f", self.id], check=False)


def _errors(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"({log}: none)"
    errs = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return f"{log} errors:\n" + "\n".join(errs[-20:])
