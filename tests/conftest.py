"""Marker gating: tests marked root / fuse / criu / podman skip, with a reason, where they
cannot run."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

CRIU = "/usr/local/sbin/criu"


@functools.cache
def _missing(marker: str) -> str | None:
    if marker == "root":
        return None if os.geteuid() == 0 else "needs root (euid 0)"
    if marker == "fuse":
        if not os.path.exists("/dev/fuse"):
            return "needs /dev/fuse"
        return None if shutil.which("fusermount3") else "needs fusermount3 (package fuse3)"
    if marker == "criu":
        try:
            cp = subprocess.run([CRIU, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"needs {CRIU} (scripts/setup.sh builds it): {e}"
        if cp.returncode != 0:
            return f"{CRIU} --version failed: {cp.stderr.strip()[:200]}"
        return None if shutil.which("ip") else "needs ip (iproute2) for network namespaces"
    if marker == "podman":
        for prog, pkg in (("podman", "podman"), ("runc", "runc"), ("nsenter", "util-linux")):
            if not shutil.which(prog):
                return f"needs {prog} (package {pkg}; scripts/setup-containers.sh installs it)"
        return None
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("root", "fuse", "criu", "podman"):
        if item.get_closest_marker(marker) is not None and (why := _missing(marker)):
            pytest.skip(f"[{marker}] {why}")
