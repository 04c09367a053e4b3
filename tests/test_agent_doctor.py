"""doctor's report of the agent and the route restores take (issue 20): answering (checked
with the protocol's check request, not a bare connect), socket-activated and not started
yet (not asked: a connection would start it), not running, frozen (not answering within
the deadline); the route: agent, CLI fallback, waiting for an agent, failing. Text and
--json, with a real agent, a real `systemd-socket-activate`, and a stand-in criu."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from inetsk_testbed.agentproc import AgentProc, tree_env
from overlayfs_inetsk.app.doctor import render_json, render_text, run_checks
from overlayfs_inetsk.plugin import agentstate
from overlayfs_inetsk.plugin import install as inst
from overlayfs_inetsk.plugin.check import check

GOOD_CRIU = """#!/bin/sh
case "$1" in
  --version) echo "Version: 4.2.1"; exit 0;;
  check) echo "Looks good."; exit 0;;
esac
exit 1
"""
SSA = "/usr/bin/systemd-socket-activate"


class Node:
    def __init__(self, tmp: Path, cli: str = "none"):
        self.tmp, self.lib, self.sock = tmp, tmp / "lib", tmp / "agent.sock"
        so = tmp / "plugin.so"
        so.write_bytes(b"\x7fELF stand-in")
        self.criu = tmp / "criu"
        self.criu.write_text(GOOD_CRIU)
        self.criu.chmod(0o755)
        self.env = {"CRIU_LIBS_DIR": str(self.lib), "PATH": os.defpath, inst.ENV_SO: str(so),
                    "CRIU": str(self.criu)}
        self.install(cli)

    def install(self, cli: str) -> None:
        inst.install(str(self.lib), self.env[inst.ENV_SO], inst.PluginConf(cli, str(self.sock),
                                                                           1500))

    def found(self) -> dict[str, agentstate.Found]:
        return {f.name: f for f in agentstate.doctor_checks(str(self.criu), self.env)}

    def agent(self, prefix: tuple[str, ...] = ()) -> AgentProc:
        return AgentProc(self.sock, self.tmp / "views", self.tmp / "agent.log", prefix=prefix)


def states(f: dict[str, agentstate.Found]) -> tuple[str | None, str, str | None, str]:
    return f["agent"].state, f["agent"].status, f["route"].state, f["route"].status


def test_no_agent_and_no_cli_restores_wait_then_fail(tmp_path: Path) -> None:
    n = Node(tmp_path)
    f = n.found()
    assert states(f) == ("not-running", "warn", "wait", "warn")
    assert f["agent"].detail == f"no agent at {n.sock}"
    assert f["route"].detail == ("restores wait for an agent up to timeout-ms 1500, then fail "
                                 "(no CLI fallback (cli none))")
    assert f["plugin"].status == "ok", f["plugin"]
    n.install(str(tmp_path / "cli"))
    f = n.found()
    assert f["plugin"].detail.endswith(f"no CLI fallback: {tmp_path / 'cli'} is not "
                                       "executable here")
    (tmp_path / "cli").write_text("#!/bin/sh\n")
    (tmp_path / "cli").chmod(0o755)
    f = n.found()
    assert states(f) == ("not-running", "warn", "cli", "warn")
    assert f"restores run the CLI, one per restore (CLI fallback: {tmp_path / 'cli'})" in \
        f["route"].detail


def test_an_answering_agent_is_the_route_and_a_frozen_one_fails_restores(tmp_path: Path
                                                                         ) -> None:
    n = Node(tmp_path)
    a = n.agent().wait_listening()
    try:
        f = n.found()
        assert states(f) == ("answering", "ok", "agent", "ok")
        assert f["agent"].detail.startswith(f"the agent at {n.sock} answers: overlayfs-inetsk "
                                            f"0.1.0, protocol 2, pid {a.pid}")
        os.kill(a.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            f = n.found()
            assert time.monotonic() - t0 < 10
        finally:
            os.kill(a.pid, signal.SIGCONT)
        # before: a connect was taken for an answer, and doctor said "the agent answers"
        assert states(f) == ("not-answering", "warn", "fail", "warn")
        assert "gave no answer within 2000 ms" in f["agent"].detail
        assert f["route"].detail.startswith("restores that need a change fail")
    finally:
        a.stop()


def test_a_socket_activated_agent_is_reported_and_not_started(tmp_path: Path) -> None:
    n = Node(tmp_path)
    a = n.agent(prefix=(SSA, "--seqpacket", "-l", str(n.sock)))
    try:
        end = time.monotonic() + 20
        while "Listening on" not in a.text():
            assert a.proc.poll() is None and time.monotonic() < end, a.text()
            time.sleep(0.02)
        for _ in range(2):  # asking twice: still not started
            f = n.found()
            assert states(f) == ("socket-activated", "ok", "agent", "ok"), f
        assert "started at the first restore" in f["agent"].detail
        assert f["route"].detail == "restores ask the agent (systemd starts it for the first)"
        assert "Communication attempt" not in a.text()  # doctor did not start it
        assert check(str(n.sock)).ok  # the first connection starts it
        assert states(n.found())[:3] == ("answering", "ok", "agent")
    finally:
        a.stop()


def test_doctor_text_and_json_carry_the_agent_and_the_route(tmp_path: Path) -> None:
    n = Node(tmp_path)
    env = {**os.environ, **n.env, "PATH": os.environ["PATH"]}
    checks = {c.name: c for c in run_checks(env=env, dev_fuse="/dev/null")}
    assert checks["agent"].state == "not-running" and checks["route"].state == "wait"
    text = render_text(list(checks.values()))
    assert f"WARN  agent             no agent at {n.sock}\n" in text, text
    assert "WARN  route             restores wait for an agent up to timeout-ms 1500" in text
    cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "doctor", "--json"],
                        capture_output=True, text=True, timeout=120, env=tree_env(env))
    doc = json.loads(cp.stdout)
    by = {c["name"]: c for c in doc["checks"]}
    assert by["agent"]["state"] == "not-running" and by["route"]["state"] == "wait"
    assert "state" not in by["criu"]  # only the agent and the route have one
    assert json.loads(render_json(list(checks.values())))["checks"][-1]["name"] == "route"
