"""A map whose new address the target node does not have (a typo: 10.77.0.99 for
10.77.0.2), with real CRIU: `restore` (and `mount`, `inspect --netns`) name each socket whose
new address is no address of the target namespace, one line each, before criu runs; with
`--strict` the first stops the restore (exit 5) and criu never runs.

Before: the IPv4 listener made criu fail with `criu restore failed (exit 1); log: ...`
(the reason only inside criu's log), and an IPv6-only service restored "fine" (exit 0) onto
an address nobody has: unreachable, nothing said (IP_FREEBIND).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inetsk_testbed import criu, probe
from inetsk_testbed.mount import Ran, kept_restore_dirs, remove_kept_restore_dirs, run_cli
from inetsk_testbed.probe import ProbeError

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]
A4, A6 = "10.77.0.1", "fd77::1"
TYPO4, TYPO6 = "10.77.0.99", "fd77::99"


RAN: list[int] = []  # pids of the commands run here: their kept work dirs are removed


def cli(*args: str, timeout: float = 90) -> Ran:
    r = run_cli(*args, timeout=timeout)
    RAN.append(r.pid)
    return r


@pytest.fixture(autouse=True)
def _remove_kept_work_dirs() -> Iterator[None]:
    """A restore criu failed keeps its work dir (docs/cli.md): the code before ran criu."""
    yield
    remove_kept_restore_dirs(RAN)


def test_a_new_address_the_node_lacks_is_named_before_criu_runs(testnet, image_dirs):
    a, b = testnet.add_host("A"), testnet.add_host("B")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7001",
                                  "--udp-bind", f"udp6@[{A6}]:7002"])
    criu.dump(a, pid, image_dirs.images)
    typo = ["--map", f"{A4}={TYPO4}", "--map", f"{A6}={TYPO6}"]

    # --strict: one line naming the first such socket, exit 5, criu never ran
    p = cli("restore", str(image_dirs.images), "--netns", b.netns_path, *typo, "--strict")
    assert p.returncode == 5, p
    assert p.stderr.count("\n") == 1, p.stderr
    assert (f"tcp {TYPO4}:7001: {TYPO4} is not an address of netns {b.netns_path}"
            in p.stderr), p.stderr
    assert "running:" not in p.stderr and b.pids() == []
    # nothing mounted, no temporary dir
    assert [d for pid in RAN for d in kept_restore_dirs(pid)] == []

    # inspect --netns says the same, one warning line per socket, and exits 0
    p = cli("inspect", str(image_dirs.images), "--netns", b.netns_path, *typo)
    assert p.returncode == 0, p
    warnings = [ln for ln in p.stderr.splitlines() if "is not an address of" in ln]
    assert len(warnings) == 2, p.stderr
    assert any(f"udp [{TYPO6}]:7002: {TYPO6} is not an address of netns {b.netns_path}" in w
               and "IP_FREEBIND" in w for w in warnings), warnings
    assert any("Cannot assign requested address" in w for w in warnings), warnings

    # the right map: no such line
    p = cli("inspect", str(image_dirs.images), "--netns", b.netns_path,
            "--map", f"{A4}={b.ipv4}", "--map", f"{A6}={b.ipv6}")
    assert p.returncode == 0 and "is not an address of" not in p.stderr, p


def test_an_ipv6_service_onto_an_absent_address_is_no_longer_silent(testnet, image_dirs):
    """The IPv6 case criu does not refuse: without --strict the restore goes on (as the
    docs say: a warning), but the user is told, and the service is indeed unreachable."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp6@[{A6}]:7003"])
    criu.dump(a, pid, image_dirs.images)
    p = cli("restore", str(image_dirs.images), "--netns", b.netns_path,
            "--map", f"{A6}={TYPO6}")
    try:
        assert p.returncode == 0, p
        [line] = [ln for ln in p.stderr.splitlines() if "is not an address of" in ln]
        assert line == (f"WARNING {image_dirs.images}/files.img: socket id "
                        f"{line.split('socket id ', 1)[1].split(':', 1)[0]}: tcp "
                        f"[{TYPO6}]:7003: {TYPO6} is not an address of netns "
                        f"{b.netns_path}: it binds anyway (IP_FREEBIND) and is "
                        "unreachable there"), line
        with pytest.raises(ProbeError):
            probe.tcp_hello(c, str(b.ipv6), 7003, timeout=2)
    finally:
        b.kill_all()


def test_mount_names_it_too(testnet, image_dirs, tmp_path: Path):
    a, b = testnet.add_host("A"), testnet.add_host("B")
    pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{A4}:7004"])
    criu.dump(a, pid, image_dirs.images)
    mp = tmp_path / "view"
    mp.mkdir()
    try:
        p = cli("mount", str(image_dirs.images), str(mp), "--netns", b.netns_path,
                "--map", f"{A4}={TYPO4}", "--strict")
    finally:
        with open("/proc/self/mountinfo") as f:
            mounted = f" {mp} " in f.read()
        if mounted:  # the code before mounted it
            cli("umount", str(mp))
    assert not mounted
    assert p.returncode == 5, p
    assert f"{TYPO4} is not an address of netns {b.netns_path}" in p.stderr, p.stderr
