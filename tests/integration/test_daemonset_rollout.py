"""The DaemonSet's rolling update and probes as they run (issue 20), through `podman kube play`
as test_daemonset.py plays the pod template (same image, same `here()` differences).

A rolling update with `maxSurge: 1, maxUnavailable: 0` is, on one node: the new pod starts
beside the old one, its agent takes the node's socket path over (`--take-over`), the pod
turns Ready when its readiness probe (`agent --check --same-pidns`) passes, then the old pod
is stopped (SIGTERM: it drains). Here that sequence is played by hand (no kubelet) under a
stream of Podman restores, which must lose none and wait for nothing. The probes are run
as the kubelet runs them, the manifest's own exec commands in the agent's container
(`podman exec`); Podman also turns the livenessProbe into a healthcheck, run with
`podman healthcheck run`. The agent frozen (SIGSTOP from the host): both probes fail within
their deadline. The agent's metrics are scraped on the pod's loopback (its network
namespace; the manifest's port).

The agents listen on the node's real /run/overlayfs-inetsk/agent.sock while this runs;
every pod is stopped at the end.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inetsk_testbed.kube import KubePod

from .runtimes import base_image  # noqa: F401  (fixture)
from .test_daemonset import (  # noqa: F401  (fixtures)
    AGENT_SOCK,
    Checkpoint,
    Lanes,
    Node,
    _answers,
    check_up,
    checkpoint,
    here,
    node,
    plugin_dir,
    remove,
    restore,
)
from .test_podman import plugin_lines

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.podman]


def agent_spec(node: Node) -> dict[str, Any]:
    spec: dict[str, Any] = next(c for c in node.daemonset["spec"]["template"]["spec"]
                                ["containers"] if c["name"] == "agent")
    return spec


def probe(pod: KubePod, node: Node, kind: str) -> tuple[int, str, float]:
    """Run the manifest's probe `kind` in the pod's agent container as the kubelet does:
    (exit code, stderr + stdout, seconds)."""
    p = agent_spec(node)[kind]
    t0 = time.monotonic()
    cp = pod.podman(["exec", pod.container("agent"), *p["exec"]["command"]], check=False,
                    timeout=p["timeoutSeconds"] + 60)
    return cp.returncode, (cp.stderr + cp.stdout).strip(), time.monotonic() - t0


def wait_ready(pod: KubePod, node: Node, timeout: float = 90) -> float:
    """Until the readiness probe passes, at its period; when it did."""
    period = agent_spec(node)["readinessProbe"]["periodSeconds"]
    end = time.monotonic() + timeout
    while True:
        rc, out, _ = probe(pod, node, "readinessProbe")
        if rc == 0:
            return time.monotonic()
        assert time.monotonic() < end, f"{pod.name} never ready: {out}\n{pod.logs('agent')}"
        time.sleep(period)


def scrape(pid: int, port: int) -> str:
    """GET /metrics on 127.0.0.1:port inside the network namespace of pid (the pod's)."""
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/metrics', timeout=10).read().decode())")
    cp = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no {name} in the scrape"
    return float(m.group(1))


@pytest.fixture
def pods(node: Node, plugin_dir: Path) -> Iterator[list[KubePod]]:
    """Pods played here, each stopped and removed at the end, whatever happened."""
    assert not _answers(AGENT_SOCK), f"another agent listens on {AGENT_SOCK}: stop it first"
    played: list[KubePod] = []
    try:
        yield played
    finally:
        for p in played:
            p.close(stop_timeout=45)
        assert not _answers(AGENT_SOCK), "an agent still answers after its pod went"


def play(node: Node, pods: list[KubePod], suffix: str) -> KubePod:
    _, spec = node.pods(suffix)
    p = KubePod(spec, node.tmp, node.conf, network=here(node.tmp)["network"])
    pods.append(p)
    return p.__enter__()


def test_a_rolling_update_hands_the_socket_over_and_loses_no_restore(
        node: Node, pods: list[KubePod], checkpoint: Checkpoint) -> None:
    old = play(node, pods, "old")
    wait_ready(old, node)
    assert probe(old, node, "livenessProbe")[0] == 0
    with Lanes(checkpoint, "r", n_lanes=2, per_lane=5, timeout=180) as lanes:
        lanes.wait_started(3)  # the first restores of each lane are under way
        t_new = time.monotonic()
        new = play(node, pods, "new")
        t_ready = wait_ready(new, node)
        # the old pod is no longer the node's agent (not Ready), still live
        rc, out, _ = probe(old, node, "readinessProbe")
        assert rc == 1 and "not this pid namespace's agent" in out, out
        assert probe(old, node, "livenessProbe")[0] == 0
        t_stop = time.monotonic()
        old.stop(timeout=45)  # SIGTERM: the old agent drains
        t_gone = time.monotonic()
    results = lanes.results
    try:
        check_up(checkpoint, results)  # every restore up, on its own address, no view left
        # none waited for an agent: each found one at once, and its view came fast
        waits = []
        for r in results:
            lines = plugin_lines(r.log)
            assert not [ln for ln in lines if "no agent at" in ln or "waiting" in ln], lines
            ready = [int(m.group(1)) for ln in lines
                     if (m := re.search(r"view ready \((\d+) ms", ln))]
            assert len(ready) == 1 and ready[0] < 5000, lines
            waits += ready
        old_log, new_log = old.logs("agent"), new.logs("agent")
        pids = [m.group(1) for r in results
                if (m := re.search(r"overlayfs-inetsk: criu pid (\d+): asking", r.log))]
        assert len(pids) == len(results)
        served_by = {p: [who for who, log in (("old", old_log), ("new", new_log))
                         if re.search(rf"criu pid {p}: VIEW view-", log)] for p in pids}
        assert all(len(w) == 1 for w in served_by.values()), served_by
        by = [w[0] for w in served_by.values()]
        assert "old" in by and "new" in by, (by, old_log[-2000:], new_log[-2000:])
        assert "(took it over from another agent)" in new_log, new_log
        assert f"left {AGENT_SOCK} (another agent's socket now)" in old_log, old_log
        assert _answers(AGENT_SOCK)  # the new agent's, after the old one went
        print(f"rollout: new pod ready {t_ready - t_new:.1f} s after it was played, old pod "
              f"stopped in {t_gone - t_stop:.1f} s; {by.count('old')} restores served by the "
              f"old agent, {by.count('new')} by the new one; the plugin's init took "
              f"{min(waits)} to {max(waits)} ms")
        # the new agent's counters, scraped on the pod's loopback
        port = int(agent_spec(node)["ports"][0]["containerPort"])
        text = scrape(new.host_pid("agent"), port)
        p = "overlayfs_inetsk_agent_"
        assert metric(text, f"{p}views_total") == by.count("new")
        assert metric(text, f'{p}requests_total{{outcome="view"}}') == by.count("new")
        assert metric(text, f"{p}checks_total") >= 1  # the probes
        assert metric(text, f"{p}request_duration_seconds_count") == by.count("new")
    finally:
        remove(results)


def test_the_probes_run_in_the_pod_and_fail_for_a_frozen_agent_within_their_deadline(
        node: Node, pods: list[KubePod]) -> None:
    pod = play(node, pods, "probe")
    wait_ready(pod, node)
    rc, out, _ = probe(pod, node, "livenessProbe")
    assert rc == 0 and out.startswith(f"the agent at {AGENT_SOCK} answers: overlayfs-inetsk ")
    health = pod.inspect("agent")["Config"].get("Healthcheck") or {}
    want = agent_spec(node)["livenessProbe"]["exec"]["command"]
    # Podman's own form of the probe: CMD-SHELL, the command, `|| exit 1`
    assert health.get("Test", [])[1:len(want) + 1] == want, health
    cp = pod.podman(["healthcheck", "run", pod.container("agent")], check=False, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    pid = pod.host_pid("agent")
    os.kill(pid, signal.SIGSTOP)
    try:
        for kind in ("livenessProbe", "readinessProbe"):
            spec = agent_spec(node)[kind]
            ms = spec["exec"]["command"][spec["exec"]["command"].index("--timeout-ms") + 1]
            rc, out, took = probe(pod, node, kind)
            assert rc == 1, out
            assert out.splitlines() == [
                f"overlayfs-inetsk: error: the agent at {AGENT_SOCK} took the connection but "
                f"gave no answer within {ms} ms (stopped or overloaded?)"], out
            print(f"{kind} with the agent frozen: failed in {took:.2f} s (podman exec and "
                  f"all; the check's deadline {ms} ms, the probe's timeout "
                  f"{spec['timeoutSeconds']} s)")
            assert took < spec["timeoutSeconds"] + 5, took
        cp = pod.podman(["healthcheck", "run", pod.container("agent")], check=False,
                        timeout=60)
        assert cp.returncode != 0 and "unhealthy" in cp.stdout + cp.stderr, cp.stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    assert probe(pod, node, "livenessProbe")[0] == 0  # thawed: live again
