"""Processes of the testbed's namespaces: which live in one (netns_pids), reaping what we
started (try_reap, become_subreaper), a process's start time (to tell a pid reused)."""

from __future__ import annotations

import os


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def netns_pids(netns_path: str) -> list[int]:
    """Pids of live (non-zombie) processes whose network namespace is ``netns_path``.

    The same test as ``ip netns pids``, without the subprocess.
    """
    key = _ns_key(netns_path)
    if key is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if _ns_key(f"/proc/{entry}/ns/net") == key:
            pids.append(int(entry))
    return pids


def _proc_starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()[19]


def try_reap(pid: int) -> bool:
    """waitpid() ``pid`` without blocking if it is our child; True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not (or no longer) our child: nothing we can reap
    return done == pid


def _is_zombie(pid: int) -> bool | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return None


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make this process a child subreaper: orphans of processes we start (a workload whose
    ``unshare`` parent died first, a tree detached by ``criu restore -d``) become our
    children and are reaped by us, not left as zombies under a pid 1 that does not reap."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
