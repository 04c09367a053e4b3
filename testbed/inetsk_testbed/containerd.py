"""A private containerd (Debian 12's 1.6, runc v2 shim) for tests: its own root, state and
socket under one temp dir, the CRI plugin off, the base image imported from Podman's
storage (``podman save --format oci-archive``); ``ctr`` commands against it.

    with Containerd(tmp_path / "containerd") as cd:
        cd.import_image(BASE_IMAGE)
        cd.ctr("run", "-d", "--null-io", "--with-ns", f"network:{host.netns_path}", ...)

Containers, tasks and images made through it go away with the daemon (its root is
removed); no file of the system containerd (/var/lib/containerd, /run/containerd) is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

NAMESPACE = "oitrt"


class ContainerdError(RuntimeError):
    pass


class Containerd:
    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.state = Path("/run") / f"oitrt-containerd-{os.getpid()}-{id(self):x}"
        self.sock = self.state / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        # containerd's client makes a ctrd-checkpoint* dir of the images in $TMPDIR at
        # every checkpoint and leaves it: here, under base, not in /tmp
        self.tmp = base / "tmp"
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        conf = self.base / "config.toml"
        conf.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.sock}"\n'
            "[ttrpc]\n"
            f'  address = "{self.sock}.ttrpc"\n')
        log = open(self.base / "containerd.log", "wb")
        self.proc = subprocess.Popen(["containerd", "--config", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        log.close()
        end = time.monotonic() + 20
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise ContainerdError("containerd did not start: "
                                      + (self.base / "containerd.log").read_text()[-2000:])
            time.sleep(0.1)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "-a", str(self.sock), "-n", NAMESPACE, *args]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=self.env)
        if check and cp.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)}: exit {cp.returncode}: "
                                  f"{cp.stderr.strip()[-2000:]}")
        return cp

    def import_image(self, podman_image: str) -> str:
        """The Podman image, imported under the same name."""
        archive = self.base / "image.tar"
        subprocess.run(["podman", "save", "-q", "--format", "oci-archive", "-o", str(archive),
                        podman_image], check=True, capture_output=True, timeout=300)
        name, _, _tag = podman_image.rpartition(":")
        self.ctr("images", "import", "--base-name", name, str(archive), timeout=300)
        archive.unlink()
        return podman_image

    def remove_container(self, name: str) -> None:
        """Kill and delete a container's task, then the container (no error if absent)."""
        if self.ctr("tasks", "kill", "-s", "KILL", name, check=False).returncode == 0:
            end = time.monotonic() + 10
            while time.monotonic() < end:
                out = self.ctr("tasks", "ls", check=False).stdout
                if not any(ln.split()[:1] == [name] and "RUNNING" in ln
                           for ln in out.splitlines()):
                    break
                time.sleep(0.1)
        self.ctr("tasks", "rm", "-f", name, check=False)
        self.ctr("containers", "rm", name, check=False)

    def stop(self) -> None:
        if self.sock.exists() and self.proc is not None and self.proc.poll() is None:
            for name in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.remove_container(name)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # shims outlive containerd only while a task runs; none does now
        for where in (self.root, self.state):
            for mp in reversed(_mounts_under(where)):
                subprocess.run(["umount", "-l", mp], capture_output=True)
            if not _mounts_under(where):
                subprocess.run(["rm", "-rf", "--one-file-system", str(where)],
                               capture_output=True)


def _mounts_under(path: Path) -> list[str]:
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f
                if ln.split()[4] == str(path) or ln.split()[4].startswith(f"{path}/")]
    return []
