"""Soak: no leaks across mounts, opens and restores (needs root and /dev/fuse).

    .venv/bin/python bench/soak.py                      # 200 cycles, 10,000 opens
    .venv/bin/python bench/soak.py --cycles 20 --opens 1000
    .venv/bin/python bench/soak.py --restores 30        # + restore speed (needs CRIU)

(bench/soak.py runs this module's main; so does `python -m inetsk_testbed.soak`.)

1. CYCLES times: `overlayfs-inetsk mount`, open and read every file of the view, `umount`.
   Sampled each cycle: this process's open fds, the daemon's fds and RSS just before its
   umount, and what is left afterwards (FUSE mounts, read-only binds, bind directories,
   daemon processes).
2. One mount, OPENS opens of files.img (open, read to the end, close): the daemon's fds and
   RSS every OPENS/10 opens.
3. (--restores N, needs CRIU and the testbed) N restores of a real dump straight from the
   image dir and N through a view; median and spread of each.

Prints the figures and exits 1 if anything grows: a leftover after a cycle, more fds at the
end than at the start, daemon RSS growing more than --rss-slack-kb after the first tenth.
The CLI runs as `python -m overlayfs_inetsk.cli`, which puts the current directory first on
the path: to measure another tree, cd into it and set PYTHONPATH to it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .mount import mount_daemons

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]


def make_image(root: Path, sockets: int = 1000) -> Path:
    """A checkpoint-like tree: files.img with `sockets` inet sockets, pages, other files."""
    from .imagefactory import files_img, inet_file_entry, isk, reg_file_entry

    d = root / "img"
    (d / "checkpoint").mkdir(parents=True)
    entries = [reg_file_entry(1)]
    for i in range(sockets):
        entries.append(inet_file_entry(isk(10 + i, "10.0.1.5", 1024 + i, proto="udp")))
    (d / "checkpoint" / "files.img").write_bytes(files_img(*entries))
    (d / "checkpoint" / "pages-1.img").write_bytes(os.urandom(1 << 20))
    for i in range(20):
        (d / "checkpoint" / f"core-{i}.img").write_bytes(os.urandom(2048))
    (d / "spec.dump").write_text("{}")
    (d / "config.dump").write_text("{}")
    return d


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def mount(image: Path, mp: Path, log: Path) -> int:
    cp = run("mount", str(image), str(mp), "--map", "10.0.1.0/24=10.77.1.0/24",
             "--log-file", str(log))
    if cp.returncode != 0:
        raise SystemExit(f"mount failed: {cp.stderr.strip()}")
    m = re.search(r"daemon pid (\d+)", cp.stdout)
    if not m:
        raise SystemExit(f"no daemon pid in {cp.stdout!r}")
    return int(m.group(1))


def umount(mp: Path) -> None:
    cp = run("umount", str(mp))
    if cp.returncode != 0:
        raise SystemExit(f"umount failed: {cp.stderr.strip()}")


def fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def leftovers(tmp: Path) -> dict[str, int]:
    """What is left of our mounts (other views on this machine are not counted)."""
    from overlayfs_inetsk.host.mounts import ro_bind_path

    key = str(tmp)
    with open("/proc/self/mountinfo") as f:  # the view, and the bind (its root is our image)
        lines = [ln for ln in f if key in ln]
    daemons = len(mount_daemons(key))
    binds = int(os.path.lexists(ro_bind_path(os.path.realpath(tmp / "mnt"))))
    return {"mounts": len(lines), "bind dirs": binds, "daemons": daemons}


def read_all(mp: Path) -> int:
    n = 0
    for root, dirs, files in os.walk(mp):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                n += len(f.read())
    return n


def soak_cycles(image: Path, tmp: Path, cycles: int) -> list[str]:
    problems = []
    mp = tmp / "mnt"
    mp.mkdir(exist_ok=True)
    own0 = fds()
    rows = []
    marks = sorted({1, max(1, cycles // 4), max(1, cycles // 2), cycles})
    t0 = time.monotonic()
    for i in range(1, cycles + 1):
        pid = mount(image, mp, tmp / "daemon.log")
        nbytes = read_all(mp)
        dfds, drss = fds(pid), rss_kb(pid)
        umount(mp)
        left = leftovers(tmp)
        if any(left.values()):
            time.sleep(0.5)  # a daemon may still be on its way out
            left = leftovers(tmp)
            if any(left.values()):
                problems.append(f"cycle {i}: left behind {left}")
        if i in marks:
            rows.append((i, fds(), dfds, drss, nbytes, left))
    took = time.monotonic() - t0
    print(f"\n{cycles} cycles of mount, read every file, umount: {took:.1f} s "
          f"({took / cycles * 1000:.0f} ms per cycle)")
    print(f"{'cycle':>6} {'our fds':>8} {'daemon fds':>11} {'daemon RSS':>11} "
          f"{'bytes read':>11}  left after umount")
    for i, own, dfds, drss, nbytes, left in rows:
        print(f"{i:>6} {own:>8} {dfds:>11} {drss:>8} kB {nbytes:>11}  {left}")
    if fds() != own0:
        problems.append(f"our fds: {own0} before, {fds()} after")
    if len({r[2] for r in rows}) > 1:
        problems.append(f"daemon fds differ between cycles: {[r[2] for r in rows]}")
    return problems


def soak_opens(image: Path, tmp: Path, opens: int, slack_kb: int) -> list[str]:
    problems = []
    mp = tmp / "mnt"
    mp.mkdir(exist_ok=True)
    pid = mount(image, mp, tmp / "daemon.log")
    target = mp / "checkpoint" / "files.img"
    step = max(1, opens // 10)
    samples = [(0, fds(pid), rss_kb(pid))]
    size = 0
    t0 = time.monotonic()
    try:
        for i in range(1, opens + 1):
            with open(target, "rb") as f:
                size = len(f.read())
            if i % step == 0:
                samples.append((i, fds(pid), rss_kb(pid)))
        took = time.monotonic() - t0
    finally:
        umount(mp)
    print(f"\n{opens} opens of files.img ({size} bytes) in one mount: {took:.1f} s "
          f"({opens / took:.0f} opens/s)")
    print(f"{'opens':>6} {'daemon fds':>11} {'daemon RSS':>11}")
    for i, dfds, drss in samples:
        print(f"{i:>6} {dfds:>11} {drss:>8} kB")
    if samples[-1][1] != samples[1][1]:
        problems.append(f"daemon fds grew: {samples[1][1]} -> {samples[-1][1]}")
    if samples[-1][2] - samples[1][2] > slack_kb:
        problems.append(f"daemon RSS grew {samples[-1][2] - samples[1][2]} kB after the first "
                        f"{step} opens (slack {slack_kb} kB)")
    return problems


def restore_speed(tmp: Path, n: int) -> None:
    """n restores straight from a real dump's image dir and n through a view (symlink
    mode: every file but files.img is read through the read-only bind), alternated."""
    from . import TestNet, criu
    from .mount import mounted

    a4 = "10.77.0.1"
    direct: list[float] = []
    view: list[float] = []
    with TestNet() as net:
        a, b = net.add_host("A"), net.add_host("B")
        pid = criu.start_workload(a, ["--tcp-listen", f"tcp4@{a4}:7001",
                                      "--udp-bind", f"udp4@{a4}:7002"])
        images = tmp / "dump"
        criu.dump(a, pid, images)
        net.remove_host(a)
        b.add_addr(f"{a4}/24")  # B holds A's address too: the direct restore binds it
        with mounted(images, tmp / "view", ["--map", f"{a4}={b.ipv4}"]) as mp:
            for i in range(n):  # alternate, so both see the same cache and load
                for where, times in ((str(images), direct), (mp, view)):
                    t0 = time.monotonic()
                    rpid = criu.restore(b, where, tmp / "work")
                    times.append(time.monotonic() - t0)
                    criu.kill_tree(rpid)
    for name, times in (("image dir", direct), ("view", view)):
        times.sort()
        print(f"restore from the {name:<9}: median {statistics.median(times) * 1000:.1f} ms, "
              f"min {times[0] * 1000:.1f}, max {times[-1] * 1000:.1f} (n={len(times)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--opens", type=int, default=10_000)
    ap.add_argument("--sockets", type=int, default=1000, help="inet sockets in files.img")
    ap.add_argument("--rss-slack-kb", type=int, default=4096)
    ap.add_argument("--restores", type=int, default=0, help="also time N restores (CRIU)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (FUSE mounts, the read-only bind)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="oit-soak-"))
    try:
        image = make_image(tmp, args.sockets)
        problems = soak_cycles(image, tmp, args.cycles) if args.cycles else []
        if args.opens:
            problems += soak_opens(image, tmp, args.opens, args.rss_slack_kb)
        if args.restores:
            restore_speed(tmp, args.restores)
    finally:
        mp = tmp / "mnt"
        if mp.exists() and os.path.ismount(mp):
            run("umount", str(mp))
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    if problems:
        for p in problems:
            print(f"LEAK: {p}")
        return 1
    print("flat: nothing left behind, no fd growth, RSS within the slack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
