"""The README's main job (scripts/demo.sh runs this module after set-up) really works."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]


def test_demo_moves_the_service_and_leaves_nothing():
    before_ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    cp = subprocess.run([sys.executable, "-m", "inetsk_testbed.demo"],
                        capture_output=True, text=True, timeout=300)
    out = cp.stdout
    assert cp.returncode == 0, out + cp.stderr
    assert "demo succeeded" in out
    for line in ("web 10.77.0.2 8080", "web6 fd77::2 8080", "'dns hello'", "unchanged"):
        assert line in out
    assert out.count(" ok\n") == 4
    # the view showed B's addresses before the restore
    assert "10.77.0.2:8080   0.0.0.0:0        listener" in out
    after_ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert after_ns == before_ns
    with open("/proc/mounts") as f:
        assert "overlayfs-inetsk-demo" not in f.read()
