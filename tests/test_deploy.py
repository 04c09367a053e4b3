"""deploy/kubernetes/*.yaml: valid against the Kubernetes schemas (kubernetes-validate's
bundled ones, strict: an unknown field is an error; offline), and consistent with the code:
the commands parse, the plugin dir and the agent's socket are the code's defaults, and the
agent sees the node's paths at the node's paths."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (test extras)")
yaml = pytest.importorskip("yaml")

from overlayfs_inetsk.cli import make_parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSIONS = ["1.27.0", "1.30.0", kv.latest_version()]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_is_a_daemonset():
    kinds = [(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in docs(p)]
    assert ("DaemonSet", "overlayfs-inetsk") in kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_valid_against_the_schemas(path: Path, version: str):
    for d in docs(path):
        kv.validate(d, version, strict=True)


def test_the_check_catches_a_bad_field():
    ds = next(d for p in MANIFESTS for d in docs(p) if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, "1.30.0", strict=True)


def _daemonset() -> dict:
    return next(d for p in MANIFESTS for d in docs(p) if d["kind"] == "DaemonSet")


def test_commands_parse_and_use_the_codes_defaults():
    pytest.importorskip("overlayfs_inetsk.plugin", reason="the plugin package is not here yet")
    from overlayfs_inetsk.app.agent import DEFAULT_SOCKET
    from overlayfs_inetsk.plugin.install import DEFAULT_LIBDIR

    spec = _daemonset()["spec"]["template"]["spec"]
    cmds = {c["name"]: c["command"] for c in spec["initContainers"] + spec["containers"]}
    # the image's own path to the CLI (its ENTRYPOINT's), not a name looked up on PATH
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"', (ROOT / "Dockerfile").read_text(), re.M)
    assert entry and entry.group(1).endswith("/bin/overlayfs-inetsk"), entry
    for name, cmd in cmds.items():
        assert cmd[0] == entry.group(1), name
        make_parser().parse_args(cmd[1:])  # exits (fails the test) on a bad command line
    install = cmds["install-plugin"]
    assert install[1:3] == ["plugin", "install"]
    assert install[install.index("--libdir") + 1] == DEFAULT_LIBDIR
    assert "--no-cli" in install  # the CLI is inside the image, not on the node
    agent = cmds["agent"]
    assert agent[1] == "agent" and agent[agent.index("--socket") + 1] == DEFAULT_SOCKET, \
        shlex.join(agent)


def test_host_paths_are_mounted_where_the_node_has_them():
    """The plugin runs in the node's criu and passes node paths and fds: the agent and the
    installer must see every hostPath at the node's own path."""
    spec = _daemonset()["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounted = set()
    for c in spec["initContainers"] + spec["containers"]:
        for m in c.get("volumeMounts", []):
            if m["name"] in host:
                assert m["mountPath"] == host[m["name"]], (c["name"], m)
                mounted.add(m["mountPath"])
    for need in ("/usr/lib/criu", "/run/overlayfs-inetsk", "/etc/overlayfs-inetsk",
                 "/var/lib/containers", "/var/lib/containerd", "/run/containerd"):
        assert need in mounted, need
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    assert agent["securityContext"]["privileged"] is True  # setns into the restore's netns


def test_the_daemonset_as_pods_changes_only_what_it_is_told():
    """inetsk_testbed.kube turns the template into the Pods tests/integration/test_daemonset.py
    plays: every field kept but the image and the named hostPaths; the init containers in a
    pod of their own that runs once, with only the volumes they mount."""
    from inetsk_testbed.kube import pods_from_daemonset

    ds = _daemonset()
    spec = ds["spec"]["template"]["spec"]
    init, main = pods_from_daemonset(ds, "x", image="img:1", label="k=v",
                                     host_paths={"criu-lib": "/tmp/lib"},
                                     init_args=["--timeout-ms", "5"])
    assert init["metadata"]["name"] == "x-init" and main["metadata"]["name"] == "x"
    assert init["spec"]["restartPolicy"] == "Never" and "restartPolicy" not in main["spec"]
    assert main["metadata"]["labels"]["k"] == "v"
    for pod, want in ((init, spec["initContainers"]), (main, spec["containers"])):
        assert "initContainers" not in pod["spec"]
        got = pod["spec"]["containers"]
        assert [c["image"] for c in got] == ["img:1"] * len(want)
        for g, w in zip(got, want, strict=True):
            extra = ["--timeout-ms", "5"] if pod is init else []
            assert {**g, "image": w["image"], "command": w["command"]} == w
            assert g["command"] == w["command"] + extra
        used = {m["name"] for c in want for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert set(vols) == used
        for v in spec["volumes"]:
            if v["name"] not in used:
                continue
            if v["name"] == "criu-lib":
                assert vols[v["name"]]["hostPath"] == {**v["hostPath"], "path": "/tmp/lib"}
            else:
                assert vols[v["name"]] == v
    for key in ("priorityClassName", "tolerations", "nodeSelector"):
        assert main["spec"][key] == spec[key]
    assert spec["volumes"][0]["hostPath"]["path"] == "/usr/lib/criu"  # the manifest untouched
    with pytest.raises(ValueError, match="no hostPath volume"):
        pods_from_daemonset(ds, "x", image="i", label="k=v", host_paths={"tmp": "/x"})


def test_probes_rollout_and_metrics_hold_together():
    """Issue 20: the probes are `agent --check` (an answer, not a connect) within their
    timeouts, readiness asks for this pod's own agent, the rollout surges (never a node
    without an agent), the grace period covers the drain, the metrics port is one number."""
    from overlayfs_inetsk.plugin import drain
    from overlayfs_inetsk.plugin.metrics import parse_addr

    ds = _daemonset()
    strategy = ds["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    tpl = ds["spec"]["template"]
    spec = tpl["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["terminationGracePeriodSeconds"] > drain.DRAIN_S
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    cmd = agent["command"]
    assert "--take-over" in cmd
    for kind in ("readinessProbe", "livenessProbe"):
        probe = agent[kind]
        pcmd = probe["exec"]["command"]
        args = make_parser().parse_args(pcmd[1:])
        assert pcmd[0] == cmd[0] and args.check and args.socket == DEFAULT_SOCKET_PATH
        assert args.timeout_ms < probe["timeoutSeconds"] * 1000, kind
        assert args.same_pidns is (kind == "readinessProbe"), kind
    addr, port = parse_addr(cmd[cmd.index("--metrics") + 1])
    assert [p["containerPort"] for p in agent["ports"] if p["name"] == "metrics"] == [port]
    ann = tpl["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/scrape"] == "true"
    init = spec["initContainers"][0]["command"]
    assert "--no-agent" in init  # the agent is the DaemonSet's, not a unit of the node


DEFAULT_SOCKET_PATH = "/run/overlayfs-inetsk/agent.sock"
