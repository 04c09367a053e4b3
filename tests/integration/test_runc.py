"""The FUSE view in a container runtime's path (issue 10, test 7): `runc restore
--image-path MOUNTPOINT` of a runc container checkpoint, onto another test host.

runc runs CRIU in the host's mount namespace, but the restored tasks read their pagemap,
pages and core images after switching into the container's mount namespace, where no host
path exists: the view's symlinks must be relative (they resolve from the link's dentry).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inetsk_testbed import probe
from inetsk_testbed.mount import mounted
from inetsk_testbed.podman import PodmanError, ensure_base_image
from inetsk_testbed.runc import BASE_ROOTFS, RuncContainer, RuncError

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse, pytest.mark.podman]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rootfs() -> Path:
    try:
        ensure_base_image(ROOT / "scripts" / "setup-containers.sh")
    except PodmanError as e:
        pytest.fail(f"cannot make the base image: {e}")
    assert (BASE_ROOTFS / "usr" / "bin" / "python3").exists(), BASE_ROOTFS
    return BASE_ROOTFS


def service(v4: str, v6: str) -> list[str]:
    return ["--tcp-listen", f"t4@{v4}:7001", "--udp-bind", f"u4@{v4}:7002",
            "--tcp-listen", f"t6@[{v6}]:7004", "--udp-bind", f"u6@[{v6}]:7005"]


def test_runc_restore_from_the_fuse_view(testnet, tmp_path: Path, rootfs: Path) -> None:
    a, b, p = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("P")
    a4, a6, b4, b6 = str(a.ipv4), str(a.ipv6), str(b.ipv4), str(b.ipv6)
    images = tmp_path / "images"
    with RuncContainer(tmp_path / "bundle-a", a, service(a4, a6), rootfs=rootfs) as c:
        c.start()
        assert probe.wait_for(lambda: _hello(p, a4), 15, "the container on A") == f"t4 {a4} 7001"
        c.checkpoint(images, tmp_path / "work-a")
        assert c.state() == "absent"  # runc checkpoint ends the container
    before = {f.name: f.read_bytes() for f in images.iterdir()}

    # without the view, restoring onto B cannot bind A's address: the view is needed
    with RuncContainer(tmp_path / "bundle-b0", b, service(a4, a6), rootfs=rootfs) as r0:
        with pytest.raises(RuncError, match="Cannot assign requested address"):
            r0.restore(images, tmp_path / "work-b0")

    with RuncContainer(tmp_path / "bundle-b", b, service(a4, a6), rootfs=rootfs) as r:
        with mounted(images, tmp_path / "mnt",
                     ["--map", "local=auto", "--netns", b.netns_path]) as mnt:
            r.restore(Path(mnt), tmp_path / "work-b")
        assert r.state() == "running"
        assert probe.tcp_hello(p, b4, 7001) == f"t4 {b4} 7001"
        assert probe.tcp_hello(p, b6, 7004) == f"t6 {b6} 7004"
        assert probe.udp_echo(p, b4, 7002, "x") == "u4 x"
        assert probe.udp_echo(p, b6, 7005, "y") == "u6 y"
    assert {f.name: f.read_bytes() for f in images.iterdir()} == before


def _hello(p, addr: str) -> str | None:
    try:
        return probe.tcp_hello(p, addr, 7001, timeout=1)
    except probe.ProbeError:
        return None
