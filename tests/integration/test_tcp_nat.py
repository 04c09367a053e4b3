"""Fate nat (issue 22): an outside client keeps its established connection across the move,
with real CRIU in namespaces made here.

A client on host C streams numbered lines to and from a server on host A over one TCP
connection (testbed/stream.py: each side sends its counter every 20 ms and checks what it
gets). C has a stateful firewall table of its own (`ct state established accept`), so its
conntrack holds the connection's entry before any NAT rule exists. The server is dumped
with --tcp-established and restored on host B by the one-line
`overlayfs-inetsk restore --map A=B --tcp-outside nat --nat-peer-netns C`: the client's
same socket goes on counting, the server sees it from B's address, and `nat-rules
--remove` leaves C's ruleset as it was. A refused or killed restore leaves no rule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from inetsk_testbed import criu
from inetsk_testbed.mount import BIN, overlayfs_inetsk, remove_kept_restore_dirs
from inetsk_testbed.natclient import client_stream, ep
from inetsk_testbed.procs import netns_pids
from inetsk_testbed.probe import wait_for
from inetsk_testbed.stream import status

from .test_plugin import Plugin, build_plugin

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.fuse]

PORT, CTL, CCTL = 7800, 7801, 7802
def ruleset(host) -> str:
    return host.run(["nft", "list", "ruleset"]).stdout


@pytest.fixture(params=["ipv4", "ipv6"])
def moved(request, testnet, image_dirs):
    """Hosts A (the server's old node), B (its new one), C (the client, which stays); the
    server dumped from A while the client streams with it. Yields a dict."""
    a, b, c = (testnet.add_host(n) for n in "ABC")
    v6 = request.param == "ipv6"
    A, B, C = (str(h.ipv6 if v6 else h.ipv4) for h in (a, b, c))
    srv, cport = client_stream(a, c, A, C, (PORT, CTL, CCTL))
    ct = c.run(["conntrack", "-L", "-p", "tcp", "--sport", str(cport)]).stdout
    assert "ESTABLISHED" in ct and A in ct, ct  # the entry made without NAT
    before = ruleset(c)
    criu.dump(a, srv, image_dirs.images, tcp_established=True)
    yield {"A": a, "B": b, "C": c, "a": A, "b": B, "c": C, "cport": cport,
           "dirs": image_dirs, "before": before}


RAN: list[int] = []  # pids of the restores run here


@pytest.fixture(autouse=True)
def _remove_kept_work_dirs():
    """A restore whose criu failed or was killed keeps its work dir (docs/cli.md); these
    tests read none of them: removed, so that runs do not pile them up in RESTORE_DIR."""
    yield
    remove_kept_restore_dirs(RAN)


def restore(m, *extra: str, timeout: float = 60, **kw) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [BIN, "restore", str(m["dirs"].images), "--netns", m["B"].netns_path,
         "--map", f"{m['a']}={m['b']}", "--tcp-outside", "nat",
         "--nat-peer-netns", m["C"].netns_path, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    RAN.append(p.pid)
    return p


def adopt_all(host) -> None:
    for pid in netns_pids(host.netns_path):
        host.adopt(pid)


def lock_rules(host) -> list[str]:
    out = []
    for cmd in ("iptables", "ip6tables"):
        out += [ln for ln in host.run([cmd, "-S"]).stdout.splitlines() if "DROP" in ln]
    return out


def test_the_client_goes_on_counting_on_the_same_socket(moved):
    m = moved
    p = restore(m, "--json")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    adopt_all(m["B"])
    doc = json.loads(out)
    assert doc["restore"]["nat_kept"] is True
    assert doc["nat"]["connections"] == [{
        "family": "ipv6" if ":" in m["c"] else "ipv4", "peer": m["c"], "peer_port": m["cport"],
        "old": m["a"], "old_port": PORT, "new": m["b"], "new_port": PORT}]
    [sk] = [s for s in doc["sockets"] if s["state"] == "ESTABLISHED"]
    assert (sk["class"], sk["verdict"], sk["peer_nat"]) == ("tcp-peer-outside", "rewritten",
                                                           True)
    c0 = status(m["C"], m["c"], CCTL)
    time.sleep(1.0)
    c1 = status(m["C"], m["c"], CCTL)
    # the same socket (same local port, one connect, no event) received ~50 more numbers,
    # each the next one
    assert c1["local"] == ep(m["c"], m["cport"]) and c1["peer"] == ep(m["a"], PORT), c1
    assert (c1["connects"], c1["events"], c1["bad"], c1["conn"]) == ("1", "connected", "0",
                                                                   "open"), c1
    assert int(c1["recv"]) - int(c0["recv"]) >= 25, (c0, c1)
    # the server, restored on B, sees the client at its own address, from B's
    s1 = status(m["B"], m["b"], CTL)
    assert s1["local"] == ep(m["b"], PORT) and s1["peer"] == ep(m["c"], m["cport"]), s1
    assert (s1["events"], s1["bad"], s1["conn"]) == ("connected", "0", "open"), s1
    assert int(s1["recv"]) > int(c0["sent"]) - 60, (s1, c0)  # nothing lost for long
    # B's lock rules were deleted by CRIU's network unlock
    assert lock_rules(m["B"]) == []
    # nat-rules for peers elsewhere prints the very table applied in C
    printed = overlayfs_inetsk("nat-rules", str(m["dirs"].images), "--map",
                               f"{m['a']}={m['b']}").stdout
    table = doc["nat"]["table"]
    assert f"table inet {table} {{" in printed
    assert (f"\t\t\t{m['c']} . {m['cport']} . {m['a']} . {PORT} : {m['b']},\n"
            in printed), printed  # the connection, an element of the map to_new4/6
    assert (f"\t\t\t{m['b']} . {PORT} . {m['c']} . {m['cport']} : {m['a']},\n"
            in printed), printed  # its replies, of from_old4/6
    assert table in ruleset(m["C"])
    # --remove takes away exactly what was added
    rm = overlayfs_inetsk("nat-rules", str(m["dirs"].images), "--map", f"{m['a']}={m['b']}",
                          "--remove", "--peer-netns", m["C"].netns_path).stdout
    assert rm.strip() == f"table inet {table}: removed in {m['C'].netns_path}"
    assert ruleset(m["C"]) == m["before"]


def test_a_connection_the_map_does_not_move_gets_no_rule(moved):
    m = moved
    other = "fd77::9" if "." in m["a"] else "10.77.0.9"  # moves the other family only
    out = overlayfs_inetsk("nat-rules", str(m["dirs"].images), "--map",
                           f"{other}={other[:-1]}8").stdout
    assert "no connection of fate nat" in out and "table" not in out.replace("# ", "")
    doc = json.loads(overlayfs_inetsk("inspect", str(m["dirs"].images), "--json",
                                      "--tcp-outside", "nat", "--map",
                                      f"{other}={other[:-1]}8").stdout)
    assert doc["nat"] == {"table": None, "connections": []}
    assert not any(s["peer_nat"] for s in doc["sockets"])
    got = overlayfs_inetsk("nat-rules", str(m["dirs"].images), "--map", f"{other}={other}",
                           "--apply", "--peer-netns", m["C"].netns_path).stdout
    assert got.strip() == "no connection of fate nat: nothing to apply"
    assert ruleset(m["C"]) == m["before"]


def _script(path, body: str) -> str:
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-restore ] || exit 0\n{body}\n")
    os.chmod(path, 0o755)
    return str(path)


def test_a_refused_restore_leaves_no_rule(moved):
    """Another action script fails at post-restore, after ours applied the table: CRIU
    aborts the restore, and the table and the lock are gone."""
    m = moved
    fail = _script(m["dirs"].root / "fail.sh", f"nft list ruleset > {m['dirs'].root}/seen\n"
                   "exit 3")
    p = restore(m, "--", "--action-script", fail)
    _, err = p.communicate(timeout=60)
    adopt_all(m["B"])
    assert p.returncode != 0, err
    seen = (m["dirs"].root / "seen").read_text()  # run in B: B's ruleset, with the lock
    assert "overlayfs_inetsk_nat_" not in seen
    assert "NAT table removed from" in err or "removed" in err, err
    assert ruleset(m["C"]) == m["before"]
    assert lock_rules(m["B"]) == []
    wait_for(lambda: m["B"].pids() == [], what="the aborted restore's tasks to go")


def _criu_child(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    [criu_pid] = [k for k in kids if open(f"/proc/{k}/comm").read().strip() == "criu"]
    return criu_pid


def _held(m, tag: str):
    """A restore held at post-restore (after ours applied the table) by another action
    script; returns (Popen, criu's pid)."""
    flag = m["dirs"].root / f"at-post-restore-{tag}"
    hold = _script(m["dirs"].root / f"hold-{tag}.sh", f"touch {flag}\nsleep 20")
    p = restore(m, "--", "--action-script", hold)
    wait_for(flag.exists, timeout=30, what="criu to reach post-restore")
    assert "overlayfs_inetsk_nat_" in ruleset(m["C"])  # applied before the hold
    assert lock_rules(m["B"]) != []
    criu_pid = _criu_child(p.pid)  # nsenter exec'ed criu
    return p, criu_pid


def test_a_killed_restore_leaves_no_rule(moved):
    """criu killed (SIGKILL) while it waits at post-restore with the table applied in C:
    the restore exits 137 and removes the table and the lock."""
    m = moved
    p, criu_pid = _held(m, "k")
    try:
        os.kill(criu_pid, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    adopt_all(m["B"])
    assert p.returncode == 128 + signal.SIGKILL, err
    assert "NAT table removed from" in err, err
    assert ruleset(m["C"]) == m["before"]
    assert lock_rules(m["B"]) == []


def test_a_restore_killed_with_sigkill_is_swept(moved):
    """The restore itself and its criu killed with SIGKILL (nobody left to clean): the next
    `umount` of its view (as the next restore) clears the view, the table and the lock."""
    m = moved
    p, criu_pid = _held(m, "s")
    os.kill(p.pid, signal.SIGKILL)
    os.kill(criu_pid, signal.SIGKILL)
    _, err = p.communicate(timeout=30)
    m["B"].kill_all()  # the tasks criu left, and the holding script (it runs in the work dir)
    view = err.split(" on ", 1)[1].split(" (daemon", 1)[0]
    assert "overlayfs_inetsk_nat_" in ruleset(m["C"])  # left behind, for now
    cp = overlayfs_inetsk("umount", view, check=False)
    if cp.returncode == 6 and "not mounted" in cp.stderr:
        # another restore on this machine (any run's: the sweep is machine-wide, by design)
        # cleared it first: then that sweep removed the table, as ours would have
        wait_for(lambda: ruleset(m["C"]) == m["before"], timeout=10,
                 what="the concurrent sweep to remove the table")
    else:
        assert cp.returncode == 0, cp.stderr
        assert "removed the NAT table of a killed restore" in cp.stderr, cp.stderr
    assert ruleset(m["C"]) == m["before"]
    assert lock_rules(m["B"]) == []


@pytest.fixture(scope="module")
def plugin_so(tmp_path_factory):
    return build_plugin(tmp_path_factory.mktemp("plugin-build"))


@pytest.fixture
def agent_plugin(tmp_path, plugin_so, monkeypatch):
    """The CRIU plugin, asking the node agent (test_plugin.py's Plugin)."""
    p = Plugin(tmp_path, plugin_so, "agent")
    p.env(monkeypatch)
    yield p
    p.close()


def test_through_the_plugin_fate_nat_from_the_node_options_file(moved, agent_plugin,
                                                                  monkeypatch):
    """The route a container runtime takes: plain `criu restore -L PLUGIN_DIR`, the fate
    from the node's options file, the map from the environment. The plugin's plan keeps
    the connection established at B's address (as `inspect --tcp-outside nat` says), and
    the table `nat-rules` prints for that plan, applied at post-restore with B locked
    (action scripts: the barrier of one member locks at pre-restore; nat-rules --apply),
    keeps the client counting."""
    m = moved
    conf = m["dirs"].root / "conf"
    conf.mkdir()
    (conf / "plugin.options").write_text("--tcp-outside nat\n")
    monkeypatch.setenv("OVERLAYFS_INETSK_CONF_DIR", str(conf))
    monkeypatch.setenv("OVERLAYFS_INETSK_MAP", f"{m['a']}={m['b']}")
    root = m["dirs"].root
    lock = overlayfs_inetsk("barrier-script", str(root / "lock.sh"), "--dir", str(root),
                            "--members", "1", "--name", "B").stdout.strip()
    apply = _script(root / "apply.sh", f"exec {BIN} nat-rules {m['dirs'].images} --map "
                    f"{m['a']}={m['b']} --apply --peer-netns {m['C'].netns_path}")
    work = m["dirs"].work_for("B")
    criu.restore(m["B"], m["dirs"].images, work,
                 extra=["-L", str(agent_plugin.libdir), "--action-script", lock,
                        "--action-script", apply])
    adopt_all(m["B"])
    c0 = status(m["C"], m["c"], CCTL)
    time.sleep(1.0)
    c1 = status(m["C"], m["c"], CCTL)
    assert (c1["local"], c1["connects"], c1["events"], c1["bad"]) == (
        ep(m["c"], m["cport"]), "1", "connected", "0"), c1
    assert int(c1["recv"]) - int(c0["recv"]) >= 25, (c0, c1)
    s1 = status(m["B"], m["b"], CTL)
    assert s1["local"] == ep(m["b"], PORT) and s1["peer"] == ep(m["c"], m["cport"]), s1
    overlayfs_inetsk("nat-rules", str(m["dirs"].images), "--map", f"{m['a']}={m['b']}",
                     "--remove", "--peer-netns", m["C"].netns_path)
    assert ruleset(m["C"]) == m["before"]
