"""Where checkpoints travel, through real Podman + runc + CRIU 4.2.1 with our plugin (issue 20).

- Checkpoint images (`podman container checkpoint --create-image`), the form Kubernetes
  moves checkpoints in and CRI-O restores from: copies restored from the image beside the
  running original, each on its own new address; the image unchanged.
- A copy of a two-process service (a front and an engine connected over TCP on the
  container's own address, as vLLM's API server and engine are) restored beside the
  running original WITH that connection (`tcp-established` in the CRIU config file the
  container's org.criu.config annotation names: Podman refuses --tcp-established with
  --name); the original's own client unaffected.
- A group of two containers connected by TCP, checkpointed with --tcp-established and
  restored onto new addresses with one map in both archives and the barrier's own action
  script (`barrier-script`: its lock in each container's new network namespace, nothing
  in the host's), one restore 1.2 s after the other.

Names, networks, images: testbed/podman.py (all removed, also on failure).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from inetsk_testbed import probe
from inetsk_testbed.podman import (
    Container,
    PodmanNet,
    image_state,
    podman,
    repack_archive,
    sha256,
)
from inetsk_testbed.probe import wait_for
from inetsk_testbed.stream import status

from .runtimes import CLI, base_image, plugin_lib  # noqa: F401  (fixtures)
from .test_podman import assert_answers, bound_service, our_views, plugin_lines

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def net(base_image: str, plugin_lib: Path, tmp_path: Path):  # noqa: F811
    with PodmanNet(criu_lib=plugin_lib, workdir=tmp_path, image=base_image) as n:
        yield n


def moved(lines: list[str]) -> bool:
    return (any(ln.startswith("CRIU reads the per-node view") for ln in lines)
            and any(ln.startswith("removed the view") for ln in lines))


# ------------------------------------------------------------------ checkpoint images
@pytest.mark.root
@pytest.mark.criu
@pytest.mark.podman
def test_checkpoint_image_restored_three_times_beside_the_original(net: PodmanNet):
    a4, a6 = net.ipv4(10), net.ipv6(10)
    orig = net.run("srv", 10, bound_service(a4, a6))
    image = net.checkpoint_image(orig, "ck")  # --leave-running
    before = image_state(image)
    assert "checkpoint/files.img" in before["files"], before["files"]
    assert len(before["layers"]) == 1
    views_before = our_views()

    copies = []
    for i in range(3):
        r = net.restore_image(image, f"copy{i}", keep=True)
        assert moved(plugin_lines(r.log)), plugin_lines(r.log)
        copies.append(r.container)
    addrs = {(a4, a6)}
    for c in copies:
        c.inspect()
        assert c.state == "running"
        addrs.add((c.ipv4, c.ipv6))
    assert len(addrs) == 4  # the original and three copies, each on its own address
    for v4, v6 in addrs:
        assert_answers(net, v4, v6)  # each answer names the address its socket is bound to
    assert image_state(image) == before  # id, digest, and every byte of the layer
    assert our_views() == views_before


# ------------------------------------------------------------------ a copy with its connection
ENGINE, API, USER_CTL = 7201, 7200, 7300
SEQ = re.compile(r"SEQ engine conn=(\d+) seq=(\d+) pid=(\d+)$")


def engine_seq(answer: list[str], via: str = "ASK engine OK ") -> tuple[int, int]:
    """(connection number, SEQ number) from the engine's answer relayed by a front."""
    assert len(answer) == 1 and answer[0].startswith(via), answer
    m = SEQ.search(answer[0])
    assert m, answer
    return int(m.group(1)), int(m.group(2))


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.podman
def test_copy_answers_through_its_restored_internal_connection(
        net: PodmanNet, plugin_lib: Path, tmp_path: Path):  # noqa: F811
    a4, u4 = net.ipv4(30), net.ipv4(31)
    conf = net.write_criu_conf(plugin_lib, ["tcp-established"], name="svc")
    svc = net.run_service(
        "svc", 30, criu_conf=conf,
        worker=["--tcp-listen", f"engine@{a4}:{ENGINE}"],
        front=["--tcp-listen", f"api@{a4}:{API}",
               "--tcp-connect", f"engine@{a4}:{ENGINE},retry=10"])
    # the original's user: a client container with one connection to the front, kept
    user = net.run("user", 31, ["--tcp-listen", f"ctl@{u4}:{USER_CTL}",
                                "--tcp-connect", f"api@{a4}:{API}"])
    cl = net.client

    def via_user() -> tuple[int, int]:
        ans = probe.tcp_command(cl, u4, USER_CTL, "ASK api ASK engine SEQ")
        return engine_seq(ans, via="ASK api OK ASK engine OK ")

    def via_front(v4: str) -> tuple[int, int]:
        return engine_seq(probe.tcp_command(cl, v4, API, "ASK engine SEQ"))

    assert via_user() == (1, 1)
    assert via_front(a4) == (1, 2)
    archive = tmp_path / "svc.tar.zst"
    net.checkpoint(svc, archive, leave_running=True)  # no --tcp-established: the config
    digest = sha256(archive)
    assert via_user() == (1, 3)

    r = net.restore(archive, "copy", ignore_static_ip=True, keep=True)  # --name
    copy = r.container
    copy.inspect()
    assert copy.state == "running" and copy.ipv4 and copy.ipv4 != a4
    assert "Will dump/restore TCP connections" in r.log  # tcp-established, from the config
    assert moved(plugin_lines(r.log)), plugin_lines(r.log)
    # the copy's front answers on the new address through the connection it had at the
    # dump: the engine counts on (seq 3 comes after the dump's 2) on connection 1, where
    # a reconnect would be connection 2, seq 1
    assert via_front(copy.ipv4) == (1, 3)
    front = probe.status(cl, copy.ipv4, API)
    conn = [ln.split() for ln in front if ln.startswith("tcp-connect engine ")]
    assert len(conn) == 1, front
    _, _, local, peer, state, reconnects, hello = conn[0]
    assert local.startswith(f"{copy.ipv4}:") and peer == f"{copy.ipv4}:{ENGINE}", conn
    assert (state, reconnects) == ("ESTABLISHED", "reconnects=0"), conn
    assert hello == f"hello=engine_{a4}_{ENGINE}"  # what the front read before the dump
    # the original and its user carry on, on their own connection and counter
    assert via_user() == (1, 4)
    assert via_front(a4) == (1, 5)
    status_user = probe.status(cl, u4, USER_CTL)
    assert any(ln.startswith("tcp-connect api ") and "ESTABLISHED reconnects=0" in ln
               for ln in status_user), status_user
    assert user.state == "running" and svc.state == "running"
    assert sha256(archive) == digest


# ------------------------------------------------------------------ a group of containers
STREAM, CTL = 7400, 7401
GAP = 1.2  # s; without the barrier a reset was measured at this gap (docs/tcp.md)


def group_map(old_new: list[tuple[str, str]]) -> str:
    return "[map]\n" + "".join(f'"{o}" = "{n}"\n' for o, n in old_new)


def _rules(netns: str | None, family: int | None = None) -> list[str]:
    """Every rule and chain of the filter table (iptables-save, ip6tables-save) of the
    namespace at `netns` (None: this process's: the host's)."""
    out = []
    for cmd in {4: ["iptables-save"], 6: ["ip6tables-save"]}.get(
            family or 0, ["iptables-save", "ip6tables-save"]):
        argv = [cmd, "-t", "filter"]
        argv = argv if netns is None else ["nsenter", f"--net={netns}", *argv]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        out += [ln for ln in cp.stdout.splitlines() if ln.startswith(("-A ", ":CRIU"))]
    return out


def naming(rules: list[str], addrs: list[str]) -> list[str]:
    """The rules that name one of addrs (only this test's containers have these)."""
    return [r for r in rules if any(f" {a}/" in r for a in addrs)]


def remove_host_rules(addrs: list[str]) -> None:
    """Delete the host's filter rules naming addrs (this test's only): the lock the old
    barrier left there, so that a failing run leaves nothing either."""
    for family, cmd in ((4, "iptables"), (6, "ip6tables")):
        for rule in naming(_rules(None, family), addrs):
            subprocess.run([cmd, "-w", "-t", "filter", "-D", *shlex.split(rule)[1:]],
                           capture_output=True, timeout=30, check=False)


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.podman
def test_group_moved_with_one_map_and_the_barrier(net: PodmanNet, plugin_lib: Path,  # noqa: F811
                                                  tmp_path: Path):
    """The group through Podman with nothing but `barrier-script`'s script (its own lock,
    no --no-lock, no hand-written iptables): the lock goes into the container's namespace
    (runc's criu runs in the host's), holds until every member arrived, and nothing is left
    in any namespace. Before, the lock went into the host's filter table and stayed."""
    hosts = {"A": 40, "B": 41, "C": 42, "D": 43}  # X: A -> C, Y: B -> D
    v4 = {k: net.ipv4(n) for k, n in hosts.items()}
    v6 = {k: net.ipv6(n) for k, n in hosts.items()}
    ours = [*v4.values(), *v6.values()]
    host_before = naming(_rules(None), ours)
    try:
        _group_move(net, plugin_lib, tmp_path, hosts, v4, v6, host_before)
    finally:
        remove_host_rules(ours)


def _group_move(net: PodmanNet, plugin_lib: Path, tmp_path: Path,  # noqa: F811
                hosts: dict[str, int], v4: dict[str, str], v6: dict[str, str],
                host_before: list[str]) -> None:
    ours = [*v4.values(), *v6.values()]
    barrier = tmp_path / "barrier"
    confs = {}
    for name in "XY":
        script = tmp_path / f"barrier-{name}.sh"
        subprocess.run([CLI, "barrier-script", str(script), "--dir", str(barrier),
                        "--members", "2", "--name", name, "--timeout", "30"],
                       check=True, capture_output=True, text=True, timeout=60)
        confs[name] = net.write_criu_conf(plugin_lib, [f"action-script {script}"], name=name)
    y = net.run_stream("Y", hosts["B"], ["--ctl", f"{v4['B']}:{CTL}",
                                          "--listen", f"{v4['B']}:{STREAM}"],
                       criu_conf=confs["Y"])
    x = net.run_stream("X", hosts["A"], ["--ctl", f"{v4['A']}:{CTL}",
                                          "--connect", f"{v4['B']}:{STREAM}"],
                       criu_conf=confs["X"])
    cl = net.client
    wait_for(lambda: int(status(cl, v4["A"], CTL)["recv"]) > 5, 10, "the stream to flow")

    the_map = group_map([(v4["A"], v4["C"]), (v4["B"], v4["D"]),
                         (v6["A"], v6["C"]), (v6["B"], v6["D"])])
    archives = []
    for c, new in ((x, "C"), (y, "D")):
        exported = tmp_path / f"{c.name}.tar.zst"
        net.checkpoint(c, exported, tcp_established=True)  # the original stops
        archives.append(repack_archive(
            exported, tmp_path / f"{c.name}-{new}.tar.zst",
            add={"checkpoint/overlayfs-inetsk.map": the_map}, addresses=[v4[new], v6[new]]))
    for c in (x, y):  # no --name with --tcp-established: the copies take these names
        podman(["rm", "-f", "-t", "0", c.name])
    digests = [sha256(a) for a in archives]
    barrier.mkdir()

    held: dict[str, object] = {}

    def while_x_waits(_i: int) -> None:
        """X (restored first) is at the barrier: where is its lock?"""
        wait_for(lambda: (barrier / "X.arrived").exists(), 30, "X to reach the barrier")
        locked = (barrier / "X.locked").read_text().splitlines()
        held["locked"] = locked
        held["host"] = naming(_rules(None), ours)
        if locked and locked[0].startswith("netns "):
            held["task"] = _rules(f"/proc/{locked[0].split()[1]}/ns/net")

    results = net.restore_group(archives, gap=GAP, between=while_x_waits)  # X, then Y
    host_after = naming(_rules(None), ours)
    assert host_before == [] and held["host"] == [] and host_after == [], (
        "lock rules in the host's filter table", held["host"], host_after)
    for r in results:
        assert moved(plugin_lines(r.log)), plugin_lines(r.log)
    xs, ys = (Container(c.name, net) for c in (x, y))
    for c, new in ((xs, "C"), (ys, "D")):
        c.inspect()
        assert c.state == "running" and (c.ipv4, c.ipv6) == (v4[new], v6[new])
    sx = status(cl, v4["C"], CTL)
    sy = status(cl, v4["D"], CTL)
    # while X waited, its one connection was locked in X's new namespace, by CRIU's rules
    locked = held["locked"]
    assert isinstance(locked, list) and len(locked) == 2, locked
    _, pid, ident = locked[0].split()
    assert ident.startswith("net:[") and pid.isdigit(), locked
    lport = sx["local"].split(":")[1]
    assert locked[1].split() == ["4", v4["C"], lport, v4["D"], str(STREAM)], (locked, sx)
    task = held["task"]
    assert isinstance(task, list)
    ours_in_x = naming(task, ours)  # (runc's criu also locks the whole namespace itself:
    # its CRIU chain, from post-setup-namespaces to the network unlock)
    assert sorted(r.split()[1] for r in ours_in_x) == ["INPUT", "OUTPUT"], task
    assert all(r.endswith("-j DROP") and f"--sport {lport} " in r or f"--dport {lport} " in r
               for r in ours_in_x), task
    # the barrier held X until Y's sockets existed; the lock went after that
    assert (barrier / "outcome").read_text().strip() == "released"
    t = {f.name: float(f.read_text().split("time=")[1].split()[0])
         for f in barrier.iterdir() if f.suffix in (".arrived", ".passed", ".unlocked")}
    assert t["X.arrived"] < t["Y.arrived"] <= t["X.passed"] <= t["X.unlocked"], t
    assert t["Y.passed"] <= t["Y.unlocked"], t
    # the one connection carries on, both ways, on the new addresses
    assert (sx["local"].split(":")[0], sx["peer"]) == (v4["C"], f"{v4['D']}:{STREAM}"), sx
    assert sy["local"] == f"{v4['D']}:{STREAM}" and sy["peer"] == sx["local"], sy
    for s in (sx, sy):
        assert (s["conn"], s["connects"], s["bad"], s["events"]) == ("open", "1", "0",
                                                                     "connected"), s
    wait_for(lambda: int(status(cl, v4["C"], CTL)["recv"]) > int(sx["recv"]) + 10
             and int(status(cl, v4["D"], CTL)["recv"]) > int(sy["recv"]) + 10,
             10, "numbers to keep arriving both ways")
    # nothing of the lock is left in either container's namespace, nor in the host's
    for c in (xs, ys):
        left = _rules(f"/proc/{c.pid}/ns/net")
        assert naming(left, ours) == [] and not any("CRIU" in r for r in left), left
    assert naming(_rules(None), ours) == []
    assert [sha256(a) for a in archives] == digests


def test_the_podman_group_docs_need_nothing_but_the_barrier():
    """docs/tcp.md's Podman group steps use barrier-script's script as the test above does:
    no --no-lock, no hand-written iptables lock."""
    doc = (ROOT / "docs" / "tcp.md").read_text()
    section = doc.split("## Groups through Podman", 1)[1].split("\n## ", 1)[0]
    shown = "".join(section.split("```")[1::2])  # what the fenced blocks hold
    assert "overlayfs-inetsk barrier-script /etc/criu/group-X.sh --dir" in shown
    assert "action-script /etc/criu/group-X.sh" in shown
    for gone in ("--no-lock", "iptables", "nsenter", "CRTOOLS_"):
        assert gone not in shown, gone
