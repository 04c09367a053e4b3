"""The DaemonSet as it runs (issue 18): its image, its pod, and Podman restores through it.

The node image is built from this tree's Dockerfile by the project's set-up
(scripts/build-node-image.sh, which scripts/setup-containers.sh calls; podman's layer cache
makes it a few seconds when setup ran). deploy/kubernetes/daemonset.yaml's pod template is
played with `podman kube play` as two Pods (inetsk_testbed.kube: Podman 4.3 plays no
DaemonSet, and its init containers fail here): the init container's `plugin install` first,
then the agent, in a pid namespace of its own (no hostPID), privileged, with the manifest's
hostPath mounts, listening on the node's real /run/overlayfs-inetsk/agent.sock. Podman
containers are then restored on this host through that agent, with the plugin the init
container installed: their CRIU config (the org.criu.config annotation, inetsk_testbed.podman)
names the install dir as CRIU's plugin dir.

What differs from the manifest here is in HERE below, with the reason for each.
The agent runs on the default socket only while this module runs (other tests use their
own sockets); its pod is stopped at the end, whatever happened.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inetsk_testbed.kube import KubePod, cleanup_stale_pods, pods_from_daemonset, \
    write_containers_conf
from inetsk_testbed.podman import LABEL, PodmanNet, RestoreResult, podman, sha256

from .runtimes import ROOT, base_image  # noqa: F401  (fixture)
from .test_podman import assert_answers, bound_service, plugin_lines

yaml = pytest.importorskip("yaml")

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.podman]

MANIFEST = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
BUILD = ROOT / "scripts" / "build-node-image.sh"
AGENT_SOCK = "/run/overlayfs-inetsk/agent.sock"  # the manifest's (and the code's default)
VIEW_ROOT = Path("/run/overlayfs-inetsk/plugin")
VIEW_LINE = re.compile(r"overlayfs-inetsk: CRIU reads the per-node view (\S+)")
PLUGIN_ERROR = re.compile(r"Error \((?:overlayfs_inetsk_plugin|inetsk_\w+)\.c:\d+\): overlayfs-inetsk: (.*)")
FROZEN_TIMEOUT_MS = 3000


def here(tmp: Path) -> dict[str, Any]:
    """What the pods get here instead of the manifest's values, and why. Everything else of
    the pod template (containers, commands, securityContext, resources, the other hostPath
    volumes and every mount) is the manifest's own."""
    return {
        # the manifest's `overlayfs-inetsk:0.1.0` is a placeholder for the user's registry:
        # the image this tree built (node_image below)
        "image": None,
        "host_paths": {
            # this machine's /usr/lib/criu stays untouched (every criu here would load what
            # is put there); the restores below name this dir in their CRIU config instead
            "criu-lib": str(tmp / "usr-lib-criu"),
            # /etc stays as it is; an empty dir: the plugin's default map (local=auto)
            "node-conf": str(tmp / "etc-overlayfs-inetsk"),
            # not used by a Podman restore, and absent here: DirectoryOrCreate would make
            # /var/lib/containerd on this machine
            "containerd-lib": str(tmp / "var-lib-containerd"),
        },
        # the agent needs no network (a unix socket and the fds it is sent): loopback only,
        # instead of an address on podman's default bridge outside the test ranges; its
        # metrics are scraped on the pod's loopback (test_daemonset_rollout.py)
        "network": "none",
        # Podman 4.3 makes a port mapping of every containerPort, and refuses one with
        # --network none; the agent listens on its metrics port all the same (the field
        # only declares it, for a PodMonitor)
        "drop": ("ports",),
    }


# ------------------------------------------------------------------ fixtures ----------
@dataclass
class Node:
    image: str
    tmp: Path
    conf: Path  # containers.conf for kube play
    daemonset: dict[str, Any]
    label: str
    run_id: str

    def pods(self, suffix: str = "", init_args: tuple[str, ...] = (),
             host_paths: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        h = here(self.tmp)
        paths = {**h["host_paths"], **(host_paths or {})}
        for p in paths.values():
            os.makedirs(p, exist_ok=True)
        return pods_from_daemonset(self.daemonset, f"oitds{self.run_id}{suffix}",
                                   image=self.image, host_paths=paths, label=self.label,
                                   init_args=init_args, drop=h["drop"])

    def install(self, suffix: str = "", init_args: tuple[str, ...] = (),
                host_paths: dict[str, str] | None = None) -> str:
        """Run the init container's pod to its end; its logs."""
        init, _ = self.pods(suffix, init_args, host_paths)
        with KubePod(init, self.tmp, self.conf, network=here(self.tmp)["network"]) as p:
            code, logs = p.wait_exit("install-plugin", timeout=120)
        assert code == 0, f"the init container's plugin install failed (exit {code}): {logs}"
        return logs


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    cleanup_stale_pods()
    cp = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=1800,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"{BUILD}: exit {cp.returncode}: {cp.stderr[-3000:]}"
    image_id = cp.stdout.split()[-1]
    tmp = tmp_path_factory.mktemp("daemonset")
    ds = next(d for d in yaml.safe_load_all(MANIFEST.read_text())
              if d and d["kind"] == "DaemonSet")
    run_id = os.urandom(3).hex()
    return Node(image_id, tmp, write_containers_conf(tmp / "containers.conf"), ds,
                f"{LABEL}={run_id}:{os.getpid()}", run_id)


@pytest.fixture(scope="module")
def plugin_dir(node: Node) -> Path:
    logs = node.install()
    lib = Path(here(node.tmp)["host_paths"]["criu-lib"])
    assert (lib / "overlayfs_inetsk_plugin.so").is_file(), logs
    return lib


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


@dataclass
class Agent:
    pod: KubePod
    sock_ino: int

    @property
    def pid(self) -> int:
        return self.pod.host_pid("agent")

    def wait_listening(self, timeout: float = 60) -> float:
        end = time.monotonic() + timeout
        while not _answers(AGENT_SOCK):
            if time.monotonic() > end:
                raise AssertionError(f"no agent on {AGENT_SOCK} within {timeout} s: "
                                     f"{self.pod.logs('agent')[-2000:]}")
            time.sleep(0.05)
        self.sock_ino = os.stat(AGENT_SOCK).st_ino
        return time.monotonic()


@pytest.fixture(scope="module")
def agent(node: Node, plugin_dir: Path) -> Iterator[Agent]:
    assert not _answers(AGENT_SOCK), f"another agent listens on {AGENT_SOCK}: stop it first"
    _, pod = node.pods()
    with KubePod(pod, node.tmp, node.conf, network=here(node.tmp)["network"]) as p:
        a = Agent(p, 0)
        try:
            a.wait_listening()
            yield a
        finally:
            with_sock = os.path.exists(AGENT_SOCK)
            p.close()
            # SIGTERM makes the agent remove its socket; one it left (killed) is removed
            # here only when it is still the one this agent made
            if os.path.exists(AGENT_SOCK) and os.stat(AGENT_SOCK).st_ino == a.sock_ino:
                os.unlink(AGENT_SOCK)
                pytest.fail(f"the agent's pod stopped but {AGENT_SOCK} stayed (removed now)")
            assert not with_sock or not _answers(AGENT_SOCK)


@dataclass
class Checkpoint:
    net: PodmanNet
    archive: Path


@pytest.fixture(scope="module")
def checkpoint(node: Node, plugin_dir: Path, base_image: str) -> Iterator[Checkpoint]:  # noqa: F811
    archive = node.tmp / "ck.tar.gz"
    try:
        with PodmanNet(criu_lib=plugin_dir, workdir=node.tmp, image=base_image) as net:
            # high: IPAM gives the restores the lowest free addresses, and one on the
            # original's (freed when it stopped) would need no change
            a4, a6 = net.ipv4(200), net.ipv6(200)
            orig = net.run("srv", 200, bound_service(a4, a6))
            net.checkpoint(orig, archive)  # the original stops
            yield Checkpoint(net, archive)
    finally:
        archive.unlink(missing_ok=True)


def restore(ck: Checkpoint, name: str) -> tuple[RestoreResult, float, float]:
    t0 = time.monotonic()
    r = ck.net.restore(ck.archive, name, ignore_static_ip=True, keep=True, check=False)
    return r, t0, time.monotonic()


class Lanes:
    """Restores of one checkpoint one after another in n_lanes threads, named
    PREFIX<lane><i>: `with Lanes(...) as lanes:` starts them, lanes.wait_started(n) returns
    once n restores have begun, leaving the block waits for all (up to `timeout` each).
    runs: (result, start, end) of each, in the order they ended."""

    def __init__(self, ck: Checkpoint, prefix: str, n_lanes: int, per_lane: int,
                 timeout: float) -> None:
        self.ck, self.prefix, self.n_lanes, self.per_lane = ck, prefix, n_lanes, per_lane
        self.timeout = timeout
        self.runs: list[tuple[RestoreResult, float, float]] = []
        self._lock = threading.Lock()
        self._started = threading.Semaphore(0)
        self._ex = ThreadPoolExecutor(n_lanes)

    def _lane(self, k: int) -> None:
        for i in range(self.per_lane):
            self._started.release()
            out = restore(self.ck, f"{self.prefix}{k}{i}")
            with self._lock:
                self.runs.append(out)

    def __enter__(self) -> Lanes:
        self._futs = [self._ex.submit(self._lane, k) for k in range(self.n_lanes)]
        return self

    def wait_started(self, n: int) -> None:
        for _ in range(n):
            assert self._started.acquire(timeout=self.timeout), "a restore did not begin"

    def __exit__(self, *exc: object) -> None:
        try:
            for f in self._futs:
                f.result(timeout=self.timeout * self.per_lane)
        finally:
            self._ex.shutdown(wait=True)

    @property
    def results(self) -> list[RestoreResult]:
        return [r for r, _, _ in self.runs]


def why_failed(r: RestoreResult) -> str:
    errs = [ln for ln in r.log.splitlines() if "Error (" in ln or "Warn (" in ln
            and "overlayfs" in ln]
    return f"{r.container.name}: exit {r.returncode}: {r.stderr.strip()[-300:]}\n  " + \
        "\n  ".join(errs[-6:])


def check_up(ck: Checkpoint, results: list[RestoreResult]) -> None:
    """Every restore came up, each on an address of its own, every socket answering there,
    through a view the plugin removed again."""
    failed = [r for r in results if r.returncode != 0]
    if failed:
        pytest.fail(f"{len(failed)} of {len(results)} restores failed:\n"
                    + "\n".join(why_failed(r) for r in failed), pytrace=False)
    addrs = set()
    for r in results:
        c = r.container
        c.inspect()
        assert c.state == "running", why_failed(r)
        addrs.add((c.ipv4, c.ipv6))
    assert len(addrs) == len(results), addrs
    ck.net.client  # made once, before the threads that probe from it
    with ThreadPoolExecutor(len(results)) as ex:
        list(ex.map(lambda a: assert_answers(ck.net, *a), addrs))
    for r in results:
        views = VIEW_LINE.findall(r.log)
        assert len(views) == 1, (r.container.name, plugin_lines(r.log))
        assert not os.path.lexists(views[0]), f"{views[0]} left after the restore"
        assert any(ln.startswith("removed the view") for ln in plugin_lines(r.log))


def remove(results: list[RestoreResult]) -> None:
    names = [r.container.name for r in results if r.container.name]
    if names:
        podman(["rm", "-f", "-t", "0", *names], check=False)


# ------------------------------------------------------------------ tests -------------
def test_the_agent_runs_in_a_pid_namespace_of_its_own(agent: Agent, node: Node):
    """No hostPID: the agent is pid 1 of its own pid namespace, privileged, with the node's
    /run/overlayfs-inetsk (its socket is the one the host sees)."""
    pid = agent.pid
    status = Path(f"/proc/{pid}/status").read_text()
    nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
    assert nspid and nspid.group(1).split() == [str(pid), "1"], nspid
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    want = next(c for c in node.daemonset["spec"]["template"]["spec"]["containers"]
                if c["name"] == "agent")["command"]
    assert [os.fsdecode(w) for w in cmd[1:]] == want, cmd  # python3 SCRIPT ARGS
    cap_eff = int(re.search(r"^CapEff:\s+(\w+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    assert cap_eff & (1 << 21), "no CAP_SYS_ADMIN: not privileged"  # setns() into a netns
    assert os.stat(AGENT_SOCK).st_ino == agent.sock_ino
    host = agent.pod.inspect("agent")["HostConfig"]
    assert host["Privileged"] is True and host["ReadonlyRootfs"] is True, host
    assert host["Memory"] == 256 << 20, host["Memory"]  # resources.limits.memory: 256Mi
    # the image's PATH (the base made by `podman import` has none; buildah expands the
    # Dockerfile's $PATH with its default): the system dirs, for doctor and fusermount3
    env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
               if b"=" in e)
    assert {b"/usr/bin", b"/usr/sbin", b"/usr/local/sbin"} <= set(env[b"PATH"].split(b":")), env


def test_eight_restores_of_one_archive_at_once(agent: Agent, checkpoint: Checkpoint):
    digest = sha256(checkpoint.archive)
    with ThreadPoolExecutor(8) as ex:
        runs = list(ex.map(lambda i: restore(checkpoint, f"c{i}"), range(8)))
    results = [r for r, _, _ in runs]
    try:
        check_up(checkpoint, results)
        assert sha256(checkpoint.archive) == digest
    finally:
        remove(results)


def test_the_agents_pod_restarted_in_a_stream_of_restores(agent: Agent,
                                                          checkpoint: Checkpoint):
    """Restores one after another in two lanes; after the first few, the agent's pod is
    stopped (SIGTERM) and started again. No restore is lost: those that came while no agent
    listened waited for the new one."""
    old_pid = agent.pid
    with Lanes(checkpoint, "s", n_lanes=2, per_lane=4, timeout=150) as lanes:
        lanes.wait_started(3)  # the first restores of each lane are under way
        t_stop = time.monotonic()
        agent.pod.stop(timeout=10)
        assert not _answers(AGENT_SOCK)
        time.sleep(1.5)  # restores come while nothing listens
        agent.pod.start()
        t_back = agent.wait_listening()
    runs, results = lanes.runs, lanes.results
    try:
        check_up(checkpoint, results)
        assert agent.pid != old_pid
        # some restore started while no agent listened and ended after the new one did
        waited = [r for r, t0, t1 in runs if t_stop < t0 < t_back < t1]
        assert waited, [(round(t0 - t_stop, 2), round(t1 - t_stop, 2), round(t_back - t_stop, 2))
                        for _, t0, t1 in runs]
    finally:
        remove(results)


def _our_views(container_ids: list[str]) -> list[str]:
    """Views under the view root whose links lead into these containers' dirs."""
    found = []
    for name in os.listdir(VIEW_ROOT) if VIEW_ROOT.is_dir() else []:
        d = VIEW_ROOT / name
        try:
            targets = [os.readlink(d / e) for e in os.listdir(d) if (d / e).is_symlink()]
        except OSError:
            continue
        if any(cid in t for t in targets for cid in container_ids):
            found.append(name)
    return found


def test_a_frozen_agent_fails_restores_within_the_timeout(agent: Agent, node: Node,
                                                          checkpoint: Checkpoint):
    """kill -STOP of the agent: restores fail with the plugin's one line within the timeout
    the init container installed (--timeout-ms), none hangs; thawed, the agent leaves no view
    of the requests it was sent while stopped, and serves again."""
    lib = node.tmp / "usr-lib-criu-short"
    node.install("-short", ("--timeout-ms", str(FROZEN_TIMEOUT_MS)), {"criu-lib": str(lib)})
    conf = checkpoint.net.criu_conf
    assert conf is not None
    normal = conf.read_text()
    conf.write_text(f"lib {lib}\n")  # the archive's spec names this file
    results: list[RestoreResult] = []
    pid = agent.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(2) as ex:
                runs = list(ex.map(lambda i: restore(checkpoint, f"f{i}"), range(2)))
        finally:
            os.kill(pid, signal.SIGCONT)
        results = [r for r, _, _ in runs]
        for r, t0, t1 in runs:
            assert r.returncode != 0, f"{r.container.name} came up with the agent stopped"
            errors = PLUGIN_ERROR.findall(r.log)
            assert len(errors) == 1, r.log[-3000:]
            assert f"{FROZEN_TIMEOUT_MS} ms" in errors[0], errors
            assert t1 - t0 < FROZEN_TIMEOUT_MS / 1000 + 20, f"took {t1 - t0:.1f} s"
        ids = [r.container.info.get("Id", "") for r in results]
        assert all(ids), ids
        # thawed, the agent reads the requests it was sent while stopped: their deadline has
        # passed, so it makes no view for them (or removes the one whose reply cannot go)
        pids = [m.group(1) for r in results
                if (m := re.search(r"overlayfs-inetsk: criu pid (\d+): asking", r.log))]
        assert len(pids) == len(results), [plugin_lines(r.log) for r in results]
        late = re.compile(r"criu pid (\d+): (the request's deadline had passed before it was "
                          r"read: dropped|the request's deadline passed before the reply|"
                          r"the reply could not be sent)")
        probe_wait = time.monotonic() + 30
        while {m.group(1) for m in late.finditer(agent.pod.logs("agent"))} < set(pids):
            assert time.monotonic() < probe_wait, agent.pod.logs("agent")[-3000:]
            time.sleep(0.1)
        assert _our_views(ids) == []
        after, _, _ = restore(checkpoint, "f-after")
        results.append(after)
        check_up(checkpoint, [after])
    finally:
        conf.write_text(normal)
        remove(results)
