"""The README's main job (scripts/demo.sh runs this module after set-up) really works."""

import re
import subprocess
import sys

import pytest

from inetsk_testbed.netns import NETNS_DIR, PREFIX

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def test_demo_moves_the_service_and_leaves_nothing():
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
    # only the demo's own namespaces (its test net's run prefix, read from the host lines it
    # prints): other jobs on the machine may make and remove namespaces meanwhile
    # (a host's namespace is the prefix + its name; the switch's too, and then "-sw")
    hosts = re.findall(rf"host (\w+): .* \(netns {NETNS_DIR}/(\S+)\)$", out, re.M)
    runs = {netns.removesuffix(name) for name, netns in hosts}
    assert len(hosts) == 2 and len(runs) == 1, out
    run = runs.pop()
    assert run.startswith(PREFIX) and run != PREFIX, run
    assert sorted(n for n in netns_names() if n.startswith(run)) == []
    with open("/proc/mounts") as f:
        assert "overlayfs-inetsk-demo" not in f.read()
