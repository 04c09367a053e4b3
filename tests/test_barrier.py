"""The group-restore barrier (overlayfs_inetsk/barrier.py) without CRIU: threads as members,
a tmp dir as the barrier dir. The lock rules are checked as text (no netfilter here)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from overlayfs_inetsk.app import barrier as group
from overlayfs_inetsk.node import barrier, tcplock
from overlayfs_inetsk.errors import BarrierError
from overlayfs_inetsk.cli import main
from inetsk_testbed.netns import scratch_netns


def run_members(d, names, members, timeout=5.0):
    results: dict[str, object] = {}

    def one(name):
        try:
            results[name] = barrier.wait(str(d), name, members, timeout, poll=0.005)
        except BarrierError as exc:
            results[name] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_all_members_pass_together(tmp_path):
    res = run_members(tmp_path, ["C", "D", "E"], 3)
    assert all(isinstance(r, barrier.Passed) for r in res.values()), res
    assert (tmp_path / "outcome").read_text() == "released\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "C.arrived", "C.passed", "D.arrived", "D.passed", "E.arrived", "E.passed", "outcome"]


def test_first_member_waits_for_the_last(tmp_path):
    res: dict[str, object] = {}
    t = threading.Thread(target=lambda: res.setdefault(
        "C", barrier.wait(str(tmp_path), "C", 2, 5, poll=0.005)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and (tmp_path / "C.arrived").exists()
    assert not (tmp_path / "outcome").exists()
    barrier.wait(str(tmp_path), "D", 2, 5)
    t.join(5)
    assert isinstance(res["C"], barrier.Passed) and res["C"].waited >= 0.3


def test_timeout_aborts_the_group_for_everyone(tmp_path):
    with pytest.raises(BarrierError, match=r"C gave up after 0.2 s with 1 of 2 members "
                                           r"arrived \(C\)"):
        barrier.wait(str(tmp_path), "C", 2, timeout=0.2, poll=0.01)
    assert (tmp_path / "outcome").read_text().startswith("aborted: C gave up")
    with pytest.raises(BarrierError, match="group already aborted"):
        barrier.wait(str(tmp_path), "D", 2, timeout=5)  # late: fails at once
    assert not (tmp_path / "D.arrived").exists()


def test_a_stale_dir_is_refused(tmp_path):
    barrier.wait(str(tmp_path), "C", 1, 1)
    with pytest.raises(BarrierError, match="group already released"):
        barrier.wait(str(tmp_path), "C", 1, 1)
    os.unlink(tmp_path / "outcome")
    with pytest.raises(BarrierError, match="already arrived"):
        barrier.wait(str(tmp_path), "C", 1, 1)


def test_more_members_than_declared_abort(tmp_path):
    (tmp_path / "X.arrived").write_text("")
    (tmp_path / "Y.arrived").write_text("")
    with pytest.raises(BarrierError, match=r"3 members arrived \(C, X, Y\), more than "
                                           r"--members 2"):
        barrier.wait(str(tmp_path), "C", 2, 1)


@pytest.mark.parametrize("name", ["", "a/b", ".x", "outcome"])
def test_bad_names(tmp_path, name):
    with pytest.raises(BarrierError, match="bad member name"):
        barrier.wait(str(tmp_path), name, 1, 1)


def test_missing_dir(tmp_path):
    with pytest.raises(BarrierError, match="does not exist"):
        barrier.wait(str(tmp_path / "nope"), "C", 1, 1)


def test_action_filter(tmp_path):
    env = {"CRTOOLS_SCRIPT_ACTION": "post-resume"}
    assert group.run_action(str(tmp_path), "C", 2, 0.1, env=env) == []
    for action in ("pre-restore", "post-setup-namespaces", "network-unlock"):
        env = {"CRTOOLS_SCRIPT_ACTION": action}
        assert group.run_action(str(tmp_path), "C", 2, 0.1, env=env,
                                lock_connections=False) == []
    assert list(tmp_path.iterdir()) == []
    got = group.run_action(str(tmp_path), "C", 1, 1,
                           env={"CRTOOLS_SCRIPT_ACTION": "post-restore"})
    assert len(got) == 1 and isinstance(got[0], barrier.Passed)


def test_lock_rules_are_criu_s_own():
    """netfilter.c: "%s %s -t filter %s %s --protocol tcp -m mark ! --mark 0xC114 --source %s
    --sport %d --destination %s --dport %d -j DROP", INPUT with (dst, dport, src, sport)
    and OUTPUT with (src, sport, dst, dport): CRIU's unlock deletes exactly these."""
    inp, out = tcplock.lock_rules((4, "10.77.0.3", 40000, "10.77.0.4", 7400))
    assert " ".join(inp) == ("-t filter INPUT --protocol tcp -m mark ! --mark 0xC114 "
                             "--source 10.77.0.4 --sport 7400 --destination 10.77.0.3 "
                             "--dport 40000 -j DROP")
    assert " ".join(out) == ("-t filter OUTPUT --protocol tcp -m mark ! --mark 0xC114 "
                             "--source 10.77.0.3 --sport 40000 --destination 10.77.0.4 "
                             "--dport 7400 -j DROP")


def test_image_connections(tmp_path):
    (tmp_path / "files.img").write_bytes(files_img(
        reg_file_entry(1),
        inet_file_entry(isk(2, "10.77.0.3", 7400)),  # listener
        inet_file_entry(isk(3, "10.77.0.3", 7400, "10.77.0.4", 40000)),
        inet_file_entry(isk(4, "10.77.0.3", 7401, "10.77.0.4", 40001, state=8)),  # CLOSE_WAIT
        inet_file_entry(isk(5, "0.0.0.0", 0, "0.0.0.0", 0, state=7)),  # closed by the rewrite
        inet_file_entry(isk(6, "::ffff:10.77.0.3", 7402, "::ffff:10.77.0.4", 9)),
        inet_file_entry(isk(7, "fd77::3", 7403, "fd77::4", 9)),
        inet_file_entry(isk(8, "10.77.0.3", 5353, "10.77.0.4", 53, proto="udp")),
    ))
    assert group.image_connections(str(tmp_path)) == [
        (4, "10.77.0.3", 7400, "10.77.0.4", 40000),
        (4, "10.77.0.3", 7401, "10.77.0.4", 40001),
        (4, "10.77.0.3", 7402, "10.77.0.4", 9),
        (6, "fd77::3", 7403, "fd77::4", 9),
    ]


def test_image_connections_warn_of_a_parent_link_outside(tmp_path, expect_log):
    """The barrier reads the view CRIU restores from, as the planner's purpose "barrier":
    a `parent` link out of it is named in one warning (it was not looked at), and the
    connections are listed all the same."""
    img = tmp_path / "img"
    img.mkdir()
    (tmp_path / "prev").mkdir()
    os.symlink(tmp_path / "prev", img / "parent")
    (img / "files.img").write_bytes(files_img(
        inet_file_entry(isk(3, "10.77.0.3", 7400, "10.77.0.4", 40000))))
    expect_log(logging.WARNING, r"img/parent: the link to the previous dump")
    assert group.image_connections(str(img)) == [(4, "10.77.0.3", 7400, "10.77.0.4", 40000)]


def test_barrier_script_runs_without_arguments(tmp_path):
    bdir = tmp_path / "b"
    bdir.mkdir()
    script = tmp_path / "s.sh"
    assert main(["barrier-script", str(script), "--dir", str(bdir), "--members", "1",
                 "--name", "C", "--timeout", "3"]) == 0
    assert os.access(script, os.X_OK)
    env = dict(os.environ, CRTOOLS_SCRIPT_ACTION="pre-dump")
    cp = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and list(bdir.iterdir()) == []
    env["CRTOOLS_SCRIPT_ACTION"] = "post-restore"
    cp = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "C: all 1 members arrived" in cp.stderr
    cp = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 7
    assert cp.stderr.startswith("overlayfs-inetsk: error: member C: group already released")


@pytest.fixture
def bare_netns():
    """A fresh network namespace (its own, empty netfilter tables), always removed."""
    with scratch_netns(prefix="oitb") as ns:
        yield ns


def _in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={ns}", *argv], capture_output=True, text=True,
                          timeout=60)


_LOCK_SNIPPET = """
import sys
from overlayfs_inetsk.node import tcplock as barrier
conns = [(4, "10.77.0.3", 40000, "10.77.0.4", 7400), (4, "10.77.0.3", 40001, "10.77.0.4", 7400),
         (6, "fd77::3", 40002, "fd77::4", 7400)]
if sys.argv[1] == "lock":
    print(len(barrier.lock(conns)))
else:
    try:
        barrier.unlock(conns)
    except barrier.BarrierError as exc:
        print(exc)
        sys.exit(7)
"""


def _drops(ns: str) -> list[str]:
    out = _in_ns(ns, "iptables-save").stdout + _in_ns(ns, "ip6tables-save").stdout
    return [line for line in out.splitlines() if line.endswith("-j DROP")]


@pytest.mark.root
def test_unlock_removes_every_rule_left_and_reports_a_missing_one(bare_netns):
    """Real netfilter in a test-made netns: one rule of a locked connection was removed by
    hand; unlock still removes all the others (IPv4 and IPv6) and says which was missing."""
    py = [sys.executable, "-c", _LOCK_SNIPPET]
    cp = _in_ns(bare_netns, *py, "lock")
    assert cp.returncode == 0 and cp.stdout == "3\n", cp.stderr
    assert len(_drops(bare_netns)) == 6
    gone = tcplock.lock_rules((4, "10.77.0.3", 40000, "10.77.0.4", 7400))[1]  # OUTPUT
    assert _in_ns(bare_netns, "iptables", "-w", *gone[:2], "-D", *gone[2:]).returncode == 0
    cp = _in_ns(bare_netns, *py, "unlock")
    assert _drops(bare_netns) == []
    assert cp.returncode == 7, (cp.stdout, cp.stderr)
    assert cp.stdout.count("\n") == 1, cp.stdout
    assert "not present" in cp.stdout and "10.77.0.3:40000 -> 10.77.0.4:7400" in cp.stdout
    assert "40001" not in cp.stdout and "fd77" not in cp.stdout


@pytest.mark.root
def test_unlock_is_one_restore_batch_per_family(bare_netns):
    """Every rule of a family goes in one atomic `iptables-restore --noflush` run."""
    conns = [(4, "10.77.0.3", 1, "10.77.0.4", 2), (4, "10.77.0.3", 3, "10.77.0.4", 4),
             (6, "fd77::3", 5, "fd77::4", 6)]
    script = ("import sys, subprocess\nfrom overlayfs_inetsk.node import tcplock as barrier\n"
              f"conns = {conns!r}\nbarrier.lock(conns)\nlog = []\nreal = subprocess.run\n"
              "def spy(argv, *a, **kw):\n    log.append(argv[0])\n    return real(argv, *a, **kw)\n"
              "subprocess.run = spy\nbarrier.unlock(conns)\nprint(' '.join(log))\n")
    cp = _in_ns(bare_netns, sys.executable, "-c", script)
    assert cp.returncode == 0, cp.stderr
    ran = cp.stdout.split()
    assert ran.count("iptables-restore") == 1 and ran.count("ip6tables-restore") == 1
    assert "-D" not in ran and _drops(bare_netns) == []
