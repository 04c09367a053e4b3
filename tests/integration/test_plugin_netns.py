"""Which network namespace the plugin resolves `auto` in (open_target_netns), with real
criu restores that hold more than one: the one criu's command line names extRootNetNS,
else the only one besides criu's own, else a refusal naming them (never a guess)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from inetsk_testbed import criu

from .test_plugin import (  # noqa: F401  (fixtures)
    assert_answers,
    built_so,
    dump_external_netns,
    plugin,
    plugin_lines,
    service,
    views_left,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]


def run_criu(argv: list[str], fds: list[int]) -> subprocess.CompletedProcess[str]:
    criu.become_subreaper()
    try:
        return subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, cwd="/")
    finally:
        for fd in fds:
            os.close(fd)


def test_the_netns_named_on_the_command_line_wins_over_a_leaked_one(testnet, image_dirs,
                                                                    plugin):
    """As runc drives it (criu in the host's namespace, the new one inherited as
    extRootNetNS), with host C's namespace leaked into criu on a LOWER fd: before, the
    first foreign netns fd found became the target, `auto` resolved to C's address and
    the restore failed in B. Now the named one is used."""
    a, b, c = testnet.add_host("A"), testnet.add_host("B"), testnet.add_host("C")
    dirs = image_dirs
    dump_external_netns(a, dirs)
    work = dirs.work_for("B")
    leaked = os.open(c.netns_path, os.O_RDONLY)
    fd = os.open(b.netns_path, os.O_RDONLY)
    assert leaked < fd
    cp = run_criu([criu.CRIU, "restore", "-D", str(dirs.images), "-W", str(work), "-o",
                   "restore.log", "-v4", "-d", "--pidfile", str(work / "pid"), "-L",
                   str(plugin.libdir), f"--inherit-fd=fd[{fd}]:extRootNetNS"], [leaked, fd])
    lines = plugin_lines(work)
    assert cp.returncode == 0, lines
    rpid = int((work / "pid").read_text())
    b.adopt(rpid)
    b_ino = os.stat(b.netns_path).st_ino
    assert any(f"target network namespace: fd {fd} (net:[{b_ino}]), named extRootNetNS on "
               "criu's command line" in ln for ln in lines), lines
    assert_answers(c, str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)


def test_two_foreign_netns_and_none_named_is_refused(service, plugin):
    """criu restore in B holding fds of A's and C's namespaces, its command line naming
    none: the restore fails with one line naming both (before: A's, the first found, was
    taken and `auto` resolved there)."""
    net, dirs = service
    a, b, c = net.hosts["A"], net.add_host("B"), net.add_host("C")
    work = dirs.work_for("B")
    fds = [os.open(a.netns_path, os.O_RDONLY), os.open(c.netns_path, os.O_RDONLY)]
    want = [(os.stat(h.netns_path).st_ino, fd) for h, fd in zip((a, c), fds)]
    cp = run_criu(b.cmd([criu.CRIU, "restore", "-D", str(dirs.images), "-W", str(work), "-o",
                         "restore.log", "-v4", "-d", "-L", str(plugin.libdir)]), fds)
    assert cp.returncode != 0
    lines = plugin_lines(work)
    errors = [ln for ln in lines if "Error (" in ln]
    assert len(errors) == 1, lines
    named = ", ".join(f"net:[{i}] on fd {fd}" for i, fd in want)
    assert (f"criu holds 2 network namespaces besides its own ({named}) and its command line "
            "names none with --inherit-fd fd[N]:extRootNetNS: not guessing which one is the "
            "restore's") in errors[0], errors
    assert not any("asking the planner" in ln for ln in lines), lines
    assert b.pids() == []


def test_the_named_fd_must_be_a_network_namespace(service, plugin):
    net, dirs = service
    b = net.add_host("B")
    work = dirs.work_for("B")
    fd = os.open("/dev/null", os.O_RDONLY)
    cp = run_criu(b.cmd([criu.CRIU, "restore", "-D", str(dirs.images), "-W", str(work), "-o",
                         "restore.log", "-v4", "-d", "-L", str(plugin.libdir),
                         "--inherit-fd", f"fd[{fd}]:extRootNetNS"]), [fd])
    assert cp.returncode != 0
    errors = [ln for ln in plugin_lines(work) if "Error (" in ln]
    assert len(errors) == 1 and re.search(
        rf"criu's command line names fd {fd} as extRootNetNS, but it is not a network "
        "namespace", errors[0]), errors
