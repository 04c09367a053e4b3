"""containerd's `ctr` checkpoint/restore through runc, with the overlayfs-inetsk CRIU plugin
(issue 10, test 8).

A private containerd (testbed/containerd.py) runs a container in a test host's network
namespace (`ctr run --with-ns network:PATH`), with the org.criu.config annotation naming a
plugin dir that holds only our plugin. `ctr containers checkpoint --task` makes a checkpoint
image; the host's address then changes (the checkpoint's spec names the same netns:
`ctr containers restore` has no way to give it another one); `ctr containers restore
--live` restores the server onto the new address.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inetsk_testbed import probe
from inetsk_testbed.containerd import Containerd
from inetsk_testbed.podman import TESTBED, TESTBED_CWD, TESTBED_IN, WORKLOAD_ARGV

from .runtimes import base_image, plugin_lib  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.podman]


@pytest.fixture(scope="module")
def containerd(base_image: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    if not (shutil.which("containerd") and shutil.which("ctr")):
        pytest.skip("needs containerd and ctr (package containerd; scripts/setup-containers.sh)")
    with Containerd(tmp_path_factory.mktemp("containerd")) as cd:
        cd.import_image(base_image)
        yield cd


def _hello(p, addr: str) -> str | None:
    try:
        return probe.tcp_hello(p, addr, 7001, timeout=1)
    except probe.ProbeError:
        return None


def test_ctr_restore_onto_a_new_address(containerd: Containerd, plugin_lib: Path,  # noqa: F811
                                        base_image: str, testnet, tmp_path: Path):  # noqa: F811
    a, p = testnet.add_host("A"), testnet.add_host("P")
    old4, old6 = str(a.ipv4), str(a.ipv6)
    new4, new6 = "10.77.0.21", "fd77::21"
    conf = tmp_path / "criu.conf"
    conf.write_text(f"lib {plugin_lib}\n")
    name, ref = "srv", "localhost/oitrt-checkpoint:srv"
    containerd.ctr(
        "run", "-d", "--null-io", "--with-ns", f"network:{a.netns_path}",
        "--annotation", f"org.criu.config={conf}",
        "--mount", f"type=bind,src={TESTBED},dst={TESTBED_IN},options=rbind:ro",
        "--cwd", TESTBED_CWD, base_image, name, *WORKLOAD_ARGV,
        "--tcp-listen", f"t4@{old4}:7001", "--udp-bind", f"u4@{old4}:7002",
        "--tcp-listen", f"t6@[{old6}]:7004")
    assert probe.wait_for(lambda: _hello(p, old4), 15, "the server") == f"t4 {old4} 7001"
    containerd.ctr("containers", "checkpoint", "--task", name, ref)
    containerd.remove_container(name)
    a.del_addr(f"{old4}/16")
    a.del_addr(f"{old6}/64")
    a.add_addr(f"{new4}/16")
    a.add_addr(f"{new6}/64")
    containerd.ctr("containers", "restore", "--live", name, ref)
    assert "RUNNING" in containerd.ctr("tasks", "ls").stdout
    assert probe.tcp_hello(p, new4, 7001) == f"t4 {new4} 7001"
    assert probe.udp_echo(p, new4, 7002, "c") == "u4 c"
    assert probe.tcp_hello(p, new6, 7004) == f"t6 {new6} 7004"
