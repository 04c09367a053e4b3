"""A Kubernetes DaemonSet's pod template run as Pods with ``podman kube play``.

Podman 4.3 plays Pods and Deployments, not DaemonSets, and its init containers fail here
("failed to remove once init container ... as it is running": ../shared/FACTS.md), so a
DaemonSet's template becomes two Pods: its init containers as a pod of their own
(``restartPolicy: Never``), played first and waited for, then its containers. Everything
else of the template is kept as it is (containers, commands, securityContext, resources,
volumes, mounts); what a test must change is passed in, in one place: the image, and the
hostPath of named volumes.

    ds = <the DaemonSet, a dict>
    init, agent = pods_from_daemonset(ds, "oitdsX", image=img, host_paths={...})
    with KubePod(init, workdir, conf) as p:
        p.wait_exit("install-plugin")           # (exit code, logs)
    with KubePod(agent, workdir, conf) as p:
        pid = p.host_pid("agent")

The pods carry the label ``overlayfs-inetsk.testrun=<run id>:<owner pid>`` (as
:mod:`.podman`'s containers), so :func:`cleanup_stale_pods` removes what a crashed run left.
Podman's pods get JSON: it is YAML too, and no YAML library is needed here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .podman import LABEL, PodmanError, podman

CONTAINERS_CONF = """\
# podman kube play here (../shared/FACTS.md): no CAP_SYS_RESOURCE, so the pods' containers
# need these limits as defaults (kube play has no --ulimit), and Debian's crun cannot start
# containers on this host: runc
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""


def write_containers_conf(path: Path) -> Path:
    """A containers.conf for ``CONTAINERS_CONF`` (the machine's /etc stays as it is)."""
    path.write_text(CONTAINERS_CONF)
    return path


def _rewrite_containers(containers: Iterable[dict[str, Any]], image: str,
                        drop: Sequence[str] = ()) -> list[dict[str, Any]]:
    out = []
    for c in containers:
        c = copy.deepcopy(c)
        c["image"] = image
        for key in drop:
            c.pop(key, None)
        out.append(c)
    return out


def _volumes_for(spec_volumes: Sequence[dict[str, Any]], containers: Sequence[dict[str, Any]],
                 host_paths: Mapping[str, str]) -> list[dict[str, Any]]:
    used = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    unknown = set(host_paths) - {v["name"] for v in spec_volumes if "hostPath" in v}
    if unknown:
        raise ValueError(f"host_paths names no hostPath volume of the template: {sorted(unknown)}")
    out = []
    for v in spec_volumes:
        if v["name"] not in used:
            continue
        v = copy.deepcopy(v)
        if v["name"] in host_paths:
            v["hostPath"]["path"] = host_paths[v["name"]]
        out.append(v)
    return out


def pods_from_daemonset(ds: Mapping[str, Any], name: str, *, image: str,
                        host_paths: Mapping[str, str], label: str,
                        init_args: Sequence[str] = (), drop: Sequence[str] = ()
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(init pod, main pod) from a DaemonSet: ``name-init`` runs the init containers once,
    ``name`` the containers. ``image`` replaces every container's image, ``host_paths``
    (volume name -> path) the hostPath of those volumes; ``init_args`` is appended to each
    init container's command; ``drop`` names container fields left out (e.g. ``ports``).
    ``label`` is ``KEY=VALUE``, added to both pods."""
    if ds.get("kind") != "DaemonSet":
        raise ValueError(f"not a DaemonSet: {ds.get('kind')!r}")
    template = ds["spec"]["template"]
    spec = template["spec"]
    key, _, value = label.partition("=")
    labels = {**template.get("metadata", {}).get("labels", {}), key: value}
    pod_fields = {k: copy.deepcopy(v) for k, v in spec.items()
                  if k not in ("initContainers", "containers", "volumes")}

    def pod(pod_name: str, containers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "labels": labels},
                "spec": {**pod_fields, **extra, "containers": containers,
                         "volumes": _volumes_for(spec.get("volumes", []), containers,
                                                 host_paths)}}

    inits = _rewrite_containers(spec.get("initContainers", []), image)
    for c in inits:
        c["command"] = [*c["command"], *init_args]
    mains = _rewrite_containers(spec["containers"], image, drop)
    return (pod(f"{name}-init", inits, restartPolicy="Never"), pod(name, mains))


class KubePod:
    """One Pod played with ``podman kube play`` (network ``--network`` given, default none:
    loopback only) and removed on exit, whatever happened."""

    def __init__(self, pod: Mapping[str, Any], workdir: Path, containers_conf: Path,
                 network: str = "none"):
        self.pod = pod
        self.name: str = pod["metadata"]["name"]
        self.yaml = workdir / f"{self.name}.json"
        self.env = {**os.environ, "CONTAINERS_CONF": str(containers_conf)}
        self.network = network

    def podman(self, args: Sequence[str], *, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return podman(args, check=check, timeout=timeout, env=self.env)

    def __enter__(self) -> KubePod:
        self.yaml.write_text(json.dumps(self.pod, indent=1))
        try:
            self.podman(["kube", "play", "--network", self.network, str(self.yaml)])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, stop_timeout: int = 10) -> None:
        """Stop (SIGTERM, then SIGKILL after stop_timeout s) and remove the pod."""
        self.podman(["pod", "stop", "-t", str(stop_timeout), self.name], check=False,
                    timeout=stop_timeout + 60)
        cp = self.podman(["pod", "rm", "-f", self.name], check=False)
        with contextlib.suppress(FileNotFoundError):
            self.yaml.unlink()
        if cp.returncode != 0 and "no pod with name" not in cp.stderr.lower():
            raise PodmanError(f"pod rm {self.name}: {cp.stderr.strip()}")

    def container(self, cname: str) -> str:
        """Podman's name of the pod's container ``cname``."""
        return f"{self.name}-{cname}"

    def inspect(self, cname: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            self.podman(["container", "inspect", self.container(cname)]).stdout)[0]
        return out

    def host_pid(self, cname: str) -> int:
        return int(self.inspect(cname)["State"]["Pid"])

    def logs(self, cname: str) -> str:
        cp = self.podman(["logs", self.container(cname)], check=False)
        return cp.stdout + cp.stderr

    def wait_exit(self, cname: str, timeout: float = 60) -> tuple[int, str]:
        """(exit code, logs) of a container that runs to its end."""
        end = time.monotonic() + timeout
        while True:
            state = self.inspect(cname)["State"]
            if state["Status"] in ("exited", "stopped") and not state.get("Running"):
                return int(state["ExitCode"]), self.logs(cname)
            if time.monotonic() > end:
                raise PodmanError(f"{self.container(cname)} still {state['Status']} after "
                                  f"{timeout} s: {self.logs(cname)[-1000:]}")
            time.sleep(0.1)

    def stop(self, timeout: int = 10) -> None:
        self.podman(["pod", "stop", "-t", str(timeout), self.name], timeout=timeout + 60)

    def start(self) -> None:
        self.podman(["pod", "start", self.name])


def cleanup_stale_pods() -> list[str]:
    """Remove pods of earlier runs whose owner process is gone (label as in :mod:`.podman`)."""
    removed = []
    cp = podman(["pod", "ps", "--filter", f"label={LABEL}", "--format",
                 "{{.Name}} {{index .Labels \"" + LABEL + "\"}}"], check=False)
    for line in cp.stdout.splitlines():
        name, _, val = line.partition(" ")
        pid = val.partition(":")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            podman(["pod", "rm", "-f", name], check=False)
            removed.append(name)
    return removed
