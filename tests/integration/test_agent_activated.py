"""The first restore after boot goes through a socket-activated agent (issue 20): the agent
under systemd's `systemd-socket-activate --seqpacket` (it hands the socket over as systemd
does: these machines have no systemd as pid 1), not started; a real `criu restore` with the
plugin (installed with --no-cli: nothing else could answer) connects, which starts the
agent; the agent takes systemd's socket, serves that very request, and the service answers
on the new host's addresses. The units themselves: tests/test_agent_units.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from inetsk_testbed import criu
from inetsk_testbed.agentproc import AgentProc

from .test_plugin import (  # noqa: F401  (fixtures)
    Plugin,
    assert_answers,
    built_so,
    criu_pid,
    plugin_lines,
    restore,
    service,
    view_of,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]

SSA = "/usr/bin/systemd-socket-activate"


def test_the_first_restore_starts_the_socket_activated_agent(service, built_so, tmp_path,
                                                             monkeypatch):
    net, dirs = service
    p = Plugin(tmp_path, built_so, "none", install=("--no-cli", "--timeout-ms", "20000"))
    p.env(monkeypatch)
    a = AgentProc(p.sock, Path("/run/overlayfs-inetsk/plugin"), tmp_path / "agent.log",
                  prefix=(SSA, "--seqpacket", "-l", str(p.sock)))
    try:
        end = time.monotonic() + 20
        while "Listening on" not in a.text():
            assert a.proc.poll() is None and time.monotonic() < end, a.text()
            time.sleep(0.02)
        comm = Path(f"/proc/{a.pid}/comm")
        assert comm.read_text().strip() == "systemd-socket-"  # no agent runs yet
        b = net.add_host("B")
        work = dirs.work_for("B")
        rpid = restore(b, dirs.images, work, p)
        lines = plugin_lines(work)
        assert view_of(lines) is not None, lines
        assert not any("no agent at" in ln or "waiting for the agent" in ln for ln in lines)
        log = a.text()
        assert "Communication attempt on fd 3" in log and "(systemd's socket)" in log, log
        assert comm.read_text().strip() != "systemd-socket-"  # the same pid, the agent now
        pid = criu_pid(lines)
        served = re.findall(rf"^INFO criu pid {pid}: VIEW view-\w+ \((\d+) ms\)$", log, re.M)
        assert len(served) == 1, log
        ready = [int(m.group(1)) for ln in lines
                 if (m := re.search(r"view ready \((\d+) ms", ln))]
        print(f"first restore through the activated agent: plugin init {ready} ms, "
              f"request {served[0]} ms")
        assert_answers(net.add_host("C"), str(b.ipv4), str(b.ipv6))
        criu.kill_tree(rpid)
        # the second restore: the agent is there already
        b2 = net.add_host("D")
        rpid = restore(b2, dirs.images, dirs.work_for("D"), p)
        assert a.text().count(": VIEW view-") == 2
        criu.kill_tree(rpid)
    finally:
        a.stop()
