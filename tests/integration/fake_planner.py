"""A hostile planner for the C plugin, and a private /run/overlayfs-inetsk to be hostile in.

    unshare --mount --propagation private python fake_planner.py SPEC.json

runs, inside a mount namespace of its own: a tmpfs on /run/overlayfs-inetsk (so whatever a
plugin deletes there is private to this run: the machine's own view root and agent socket
are never at risk, even from an old plugin that trusted any reply), decoys in it (views
held by a restore, an agent socket, a file), a fake agent on SPEC's private socket that
answers SPEC's reply, then one `criu restore` with the plugin, and prints a JSON report:
criu's exit code, the plugin's log lines, and what under /run/overlayfs-inetsk is gone.

SPEC: {"case": ..., "criu": path, "netns": path, "images": dir, "work": dir, "libdir": dir,
"sock": path, "timeout_ms": n}. Cases: see reply().
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

RUN = "/run/overlayfs-inetsk"
ROOT = f"{RUN}/plugin"


def tree(top: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(d, n), top))
    return sorted(out)


def make_dir(path: str, mode: int = 0o755) -> int:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    with open(os.path.join(path, "files.img"), "wb") as f:
        f.write(b"decoy")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def setup(root_mode: int) -> list[int]:
    """The private run dir: a view held by another restore, an agent socket, a file."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "inetsk-test", RUN], check=True)
    os.mkdir(ROOT)
    os.chmod(ROOT, root_mode)
    held = make_dir(f"{ROOT}/view-{'a' * 32}")
    fcntl.flock(held, fcntl.LOCK_SH)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(f"{RUN}/agent.sock")
    with open(f"{RUN}/keep", "w") as f:
        f.write("keep")
    return [held, s.detach()]


def prepare(case: str) -> dict[str, int]:
    """The dirs the fake agent's reply names or sends, made before the snapshot."""
    fds = {"good": make_dir(f"{ROOT}/view-{'b' * 32}"),
           "other": make_dir(f"{ROOT}/view-{'c' * 32}"),
           "outside": make_dir(f"{RUN}/outside")}
    if case == "symlink":
        os.symlink(f"{RUN}/outside", f"{ROOT}/view-{'d' * 32}")
    return fds


def reply(case: str, v1: bool, d: dict[str, int]) -> tuple[bytes, list[int]]:
    """What the fake agent answers. Names are entries of the view root; to a plugin of
    protocol 1 (an older release, which took absolute paths) the same entry as a path."""
    def name(n: str) -> str:
        return f"{ROOT}/{n}" if v1 else n

    good, fd = f"view-{'b' * 32}", d["good"]
    if case == "root-slash":
        return f"VIEW {ROOT}/".encode(), [os.open(ROOT, os.O_RDONLY)]
    if case == "trailing-dot":
        return f"VIEW {ROOT}/{good}/.".encode(), [fd]
    if case == "relative-dot":
        return f"VIEW {name('.')}".encode(), [os.open(ROOT, os.O_RDONLY)]
    if case == "dotdot":
        return f"VIEW {name('..')}".encode(), [os.open(RUN, os.O_RDONLY)]
    if case == "outside":
        return f"VIEW {RUN}/outside".encode(), [d["outside"]]
    if case == "symlink":
        return f"VIEW {name('view-' + 'd' * 32)}".encode(), [d["outside"]]
    if case == "empty":
        return b"VIEW ", [fd]
    if case == "no-fd":
        return f"VIEW {name(good)}".encode(), []
    if case == "two-fds":
        return f"VIEW {name(good)}".encode(), [fd, os.dup(fd)]
    if case == "wrong-fd":
        return f"VIEW {name(good)}".encode(), [d["other"]]
    if case == "second-entry":
        return f"VIEW {name(good)}\nVIEW {name('view-' + 'c' * 32)}".encode(), [fd]
    if case in ("valid", "not-root"):
        return f"VIEW {name(good)}".encode(), [fd]
    if case == "none":
        return b"NONE the fake planner changes nothing", []
    raise ValueError(case)


def serve_once(listener: socket.socket, case: str, dirs: dict[str, int],
               got: dict[str, Any]) -> None:
    conn, _ = listener.accept()
    with conn:
        data, _anc, _flags, _addr = conn.recvmsg(1 << 17, socket.CMSG_SPACE(16))
        got["request"] = data.split(b"\0")[0].decode(errors="replace")
        text, fds = reply(case, data.startswith(b"OVERLAYFS-INETSK-VIEW 1 "), dirs)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        conn.sendmsg([text], anc)
        conn.recv(1)  # until the plugin is done with it


def listen_as(path: str, uid: int | None, dirs: dict[str, int]) -> socket.socket | int:
    """A listening socket at path; as uid (a child that drops to it before it listens):
    returns the child's pid then."""
    if uid is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(path)
        s.listen(4)
        return s
    d = os.path.dirname(path)
    os.chown(d, uid, uid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(path)
            s.listen(4)
            os.write(w, b"1")
            conn, _ = s.accept()
            data, _anc, _flags, _addr = conn.recvmsg(1 << 17, socket.CMSG_SPACE(16))
            text, fds = reply("valid", data.startswith(b"OVERLAYFS-INETSK-VIEW 1 "), dirs)
            conn.sendmsg([text], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds).tobytes())])
            conn.recv(1)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    return pid


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    case = spec["case"]
    keep = setup(0o777 if case == "root-0777" else 0o711)
    dirs = prepare(case)
    before = tree(RUN)
    got: dict[str, Any] = {}
    if case == "not-root":  # a path nobody may reach (the test's tmp dir is root's only)
        os.mkdir(f"{RUN}/nobody")
        spec["sock"] = f"{RUN}/nobody/agent.sock"
    served = listen_as(spec["sock"], 65534 if case == "not-root" else None, dirs)
    if isinstance(served, socket.socket):
        threading.Thread(target=serve_once, args=(served, "valid" if case == "root-0777"
                                                  else case, dirs, got), daemon=True).start()
    from inetsk_testbed.criu import kill_tree
    from inetsk_testbed.procs import become_subreaper

    become_subreaper()
    work = spec["work"]
    pidfile = os.path.join(work, "restore.pid")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYFS_INETSK_",
                                                                    "INETSK_"))}
    env["OVERLAYFS_INETSK_AGENT_SOCK"] = spec["sock"]
    env["OVERLAYFS_INETSK_TIMEOUT_MS"] = str(spec.get("timeout_ms", 10000))
    env["OVERLAYFS_INETSK_CLI"] = "none"
    cp = subprocess.run(["nsenter", f"--net={spec['netns']}", "--", spec["criu"], "restore",
                         "-D", spec["images"], "-W", work, "-o", "restore.log", "-v4", "-d",
                         "--pidfile", pidfile, "-L", spec["libdir"]],
                        env=env, capture_output=True, text=True, timeout=60, cwd="/")
    if os.path.exists(pidfile):
        kill_tree(int(open(pidfile).read()))
    if not isinstance(served, socket.socket):
        os.waitpid(served, 0)
    with open(os.path.join(work, "restore.log"), errors="replace") as f:
        lines = [ln for ln in f.read().splitlines() if "overlayfs-inetsk: " in ln]
    after = tree(RUN)
    print(json.dumps({"rc": cp.returncode, "lines": lines, "request": got.get("request"),
                      "gone": sorted(set(before) - set(after)), "before": before,
                      "after": after}))
    for fd in keep:
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
