"""Podman's archives and checkpoint images as the tests handle them (podman.py): an image's
state, an archive repacked with new addresses, and the sweep of what a crashed run left."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .podmanrun import LABEL, _IMAGE_RE, podman, sha256


def _sh(arg: str) -> str:
    return shlex.quote(arg)


def image_state(image: str) -> dict[str, Any]:
    """What a checkpoint image is, to show it unchanged: podman's image id and digest,
    and a sha256 over its one layer's whole tree (every path with its type and mode, each
    file's bytes, each link's target), read from the layer's dir in podman's storage."""
    out: dict[str, Any] = json.loads(podman(["image", "inspect", image]).stdout)[0]
    layers = out["RootFS"]["Layers"]
    diff = Path(out["GraphDriver"]["Data"]["UpperDir"])
    h = hashlib.sha256()
    files: list[str] = []
    for root, dirs, names in os.walk(diff):
        dirs.sort()
        for n in sorted([*dirs, *names]):
            path = Path(root) / n
            rel = str(path.relative_to(diff))
            st = path.lstat()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if stat.S_ISREG(st.st_mode):
                files.append(rel)
                h.update(sha256(path).encode())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
    return {"id": out["Id"], "digest": out["Digest"], "layers": layers,
            "tree": h.hexdigest(), "files": files}


def repack_archive(src: Path, dest: Path, *, add: dict[str, str] | None = None,
                   addresses: Sequence[str] = ()) -> Path:
    """A copy of a Podman checkpoint archive (a zstd tar) with files added (``add``:
    path in the archive -> text, e.g. ``checkpoint/overlayfs-inetsk.map``) and, given
    ``addresses`` (the new IPv4 and/or IPv6 address), the container's fixed addresses
    changed to them: in ``network.status`` (each interface's subnets), which is where
    Podman 4.3 takes a restored container's address from unless --ignore-static-ip
    (measured: an edit of config.dump alone changed nothing), and in ``config.dump`` (its
    networks' ``static_ips``), so that the two agree. Podman has no restore option that
    names an address; a group's map needs the members' new addresses before the restore."""
    tree = dest.with_name(dest.name + ".d")
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(src)], check=True, timeout=60)
    for rel, text in (add or {}).items():
        (tree / rel).write_text(text)
    if addresses:
        new = {ipaddress.ip_address(a).version: a for a in addresses}
        status = json.loads((tree / "network.status").read_text())
        for net in status.values():
            for iface in net["interfaces"].values():
                for sub in iface["subnets"]:
                    addr, _, plen = sub["ipnet"].partition("/")
                    v = ipaddress.ip_address(addr).version
                    if v in new:
                        sub["ipnet"] = f"{new[v]}/{plen}"
        (tree / "network.status").write_text(json.dumps(status))
        config = json.loads((tree / "config.dump").read_text())
        for opts in (config.get("newNetworks") or {}).values():
            opts["static_ips"] = [new.get(ipaddress.ip_address(a).version, a)
                                  for a in opts.get("static_ips") or []]
        (tree / "config.dump").write_text(json.dumps(config))
    subprocess.run(["tar", "--zstd", "-C", str(tree), "-cf", str(dest), "."], check=True,
                   timeout=60)
    shutil.rmtree(tree)
    return dest


def _taken_subnets() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Subnets of the existing podman networks and of the root namespace's routes."""
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    cp = podman(["network", "ls", "--format", "{{.Name}}"], check=False)
    names = cp.stdout.split()
    if names:
        cp = podman(["network", "inspect", *names], check=False)
        with contextlib.suppress(ValueError):
            for n in json.loads(cp.stdout or "[]"):
                for s in n.get("subnets") or []:
                    out.append(ipaddress.ip_network(s["subnet"], strict=False))
    cp2 = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                         text=True)
    for line in cp2.stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if "/" in word:
                out.append(ipaddress.ip_network(word, strict=False))
    return out


def cleanup_stale() -> list[str]:
    """Remove containers and networks of earlier runs whose owner process is gone."""
    removed = []
    cp = podman(["ps", "-a", "--filter", f"label={LABEL}",
                 "--format", "{{.Names}} {{index .Labels \"" + LABEL + "\"}}"], check=False)
    dead_runs = set()
    for line in cp.stdout.splitlines():
        name, _, val = line.partition(" ")
        _, _, pid = val.partition(":")
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            podman(["rm", "-f", "-t", "0", name], check=False)
            removed.append(name)
            dead_runs.add(val.partition(":")[0])
    cp = podman(["images", "--format", "{{.Repository}}:{{.Tag}}"], check=False)
    for image in cp.stdout.split():
        m = _IMAGE_RE.match(image)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            podman(["rmi", "-f", image], check=False)
            removed.append(image)
    cp = podman(["network", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}"],
                check=False)
    for name in cp.stdout.split():
        ins = podman(["network", "inspect", name], check=False)
        with contextlib.suppress(ValueError, IndexError, KeyError):
            val = json.loads(ins.stdout)[0]["labels"][LABEL]
            pid = val.partition(":")[2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                podman(["network", "rm", "-f", name], check=False)
                removed.append(name)
    return removed
