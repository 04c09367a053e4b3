"""Fixtures shared by the container-runtime tests (Podman, runc, containerd).

OVERLAYFS_INETSK_TEST_CLI names another overlayfs-inetsk to install and run the plugin with
(e.g. a wrapper running another tree); by default the one beside this interpreter, which
uses the plugin scripts/setup.sh built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inetsk_testbed.podman import PodmanError, cleanup_stale, ensure_base_image

ROOT = Path(__file__).resolve().parents[2]
CLI = os.environ.get("OVERLAYFS_INETSK_TEST_CLI") or str(Path(sys.executable).parent
                                                        / "overlayfs-inetsk")


@pytest.fixture(scope="module")
def base_image() -> str:
    cleanup_stale()
    try:
        return ensure_base_image(ROOT / "scripts" / "setup-containers.sh")
    except PodmanError as e:
        pytest.fail(f"cannot make the base image: {e}")


@pytest.fixture(scope="module")
def plugin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CRIU plugin dir holding only our plugin and its config file, made by `plugin install
    --libdir`. The config names an agent socket in the test's tmp dir, where none listens:
    the runtime's CRIU (which gets none of our environment) never asks whatever agent
    listens on the machine's default socket, and runs the CLI."""
    lib = tmp_path_factory.mktemp("criu-lib")
    so = ROOT / "plugin" / "build" / "overlayfs_inetsk_plugin.so"  # this tree's (setup.sh)
    sock = lib / "no-agent.sock"
    cp = subprocess.run([CLI, "plugin", "install", "--libdir", str(lib), "--so", str(so),
                         "--cli", CLI, "--agent-socket", str(sock)],
                        capture_output=True, text=True, timeout=60)
    if "invalid choice: 'plugin'" in cp.stderr:
        pytest.skip(f"{CLI} has no `plugin` command (set OVERLAYFS_INETSK_TEST_CLI)")
    assert cp.returncode == 0, cp.stderr
    assert sorted(p.name for p in lib.glob("*.so")) == ["overlayfs_inetsk_plugin.so"]
    return lib
