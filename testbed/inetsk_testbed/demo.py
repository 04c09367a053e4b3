"""The main job on its built-in default scenario: move a checkpointed service to another
host through the per-node view, printing each step.

    python -m inetsk_testbed.demo      (as root; scripts/demo.sh sets up first)

1. make two test hosts, A (10.77.0.1, fd77::1) and B (10.77.0.2, fd77::2), in network
   namespaces on a private bridge;
2. start a sample service on A: a TCP listener on A's IPv4 and one on its IPv6, a UDP
   socket on A's IPv4, and a TCP connection to itself over A's address;
3. checkpoint it with CRIU into a "shared" dir, then make that dir read-only (a read-only
   bind mount, as shared storage would be);
4. `overlayfs-inetsk mount` the view for host B with `--map local=auto --netns B`;
5. `criu restore -D <mountpoint>` inside B;
6. show the service answering on B's addresses, from A;
7. show the shared image's checksums unchanged; clean up everything.
Exit status 0 only if every check held.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import criu, probe
from .mount import BIN, mounted
from .net import TestNet

A4, A6 = "10.77.0.1", "fd77::1"
_t0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _t0:5.1f}s] {msg}", flush=True)


def show(argv: list[str]) -> None:
    print("    $ " + " ".join(shlex.quote(a) for a in argv), flush=True)


def indent(text: str) -> None:
    print("\n".join("    " + line for line in text.rstrip().splitlines()), flush=True)


def checksums(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.is_file()}


def run_cli(*args: str) -> str:
    argv = [BIN, *args]
    show(["overlayfs-inetsk", *args])
    cp = subprocess.run(argv, capture_output=True, text=True, check=True)
    return cp.stdout


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it makes network namespaces and mounts)", file=sys.stderr)
        return 2
    top = Path(tempfile.mkdtemp(prefix="overlayfs-inetsk-demo-"))
    dump_dir, shared = top / "dump", top / "shared"
    ok = True
    try:
        with TestNet() as net:
            say("1. two test hosts on a private bridge")
            a, b = net.add_host("A"), net.add_host("B")
            for h in (a, b):
                print(f"    host {h.name}: {h.ipv4}, {h.ipv6} (netns {h.netns_path})")

            say("2. a sample service on host A")
            args = ["--tcp-listen", f"web@{A4}:8080", "--tcp-listen", f"web6@[{A6}]:8080",
                    "--udp-bind", f"dns@{A4}:5353", "--tcp-self", f"self@{A4}:9000"]
            pid = criu.start_workload(a, args)
            print(f"    pid {pid}: TCP {A4}:8080, TCP [{A6}]:8080, UDP {A4}:5353, "
                  f"a TCP connection to itself over {A4}:9000")
            print("    answers from B:", probe.tcp_hello(b, A4, 8080))

            say("3. checkpoint into the shared dir, then make it read-only")
            show(["criu", "dump", "-t", str(pid), "-D", str(dump_dir), "--tcp-established"])
            criu.dump(a, pid, dump_dir, tcp_established=True)
            shared.mkdir()
            subprocess.run(["mount", "--bind", str(dump_dir), str(shared)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(shared)], check=True)
            before = checksums(shared)
            print(f"    {shared}: {len(before)} files, read-only bind mount")
            indent(run_cli("inspect", str(shared)))

            say("4. mount the view for host B (auto: B's address, read at first open)")
            mnt = top / "view-B"
            opts = ["--map", "local=auto", "--netns", b.netns_path]
            show(["overlayfs-inetsk", "mount", str(shared), str(mnt), *opts])
            with mounted(shared, mnt, opts):
                indent(run_cli("inspect", str(mnt)))

                say("5. restore inside B from the mountpoint")
                work = top / "work-B"
                show(["nsenter", f"--net={b.netns_path}", "criu", "restore", "-D", str(mnt),
                      "-W", str(work), "--tcp-established", "-d"])
                rpid = criu.restore(b, mnt, work, tcp_established=True)
                print(f"    restored, pid {rpid}")
                show(["overlayfs-inetsk", "umount", str(mnt)])

            say("6. the service answers on B's addresses (asked from A)")
            checks: list[tuple[str, Callable[[], object], str]] = [
                ("TCP", lambda: probe.tcp_hello(a, b.ipv4, 8080), f"web {b.ipv4} 8080"),
                ("TCP6", lambda: probe.tcp_hello(a, b.ipv6, 8080), f"web6 {b.ipv6} 8080"),
                ("UDP", lambda: probe.udp_echo(a, b.ipv4, 5353, "hello"), "dns hello"),
                ("self", lambda: probe.self_check(a, b.ipv4, 8080)["self"], "OK"),
            ]
            for name, fn, want in checks:
                try:
                    got = fn()
                except probe.ProbeError as e:
                    got = f"failed: {e}"
                good = got == want
                ok &= good
                print(f"    {name:<5} {got!r:<40} {'ok' if good else 'WRONG, expected ' + want}")

            say("7. the shared image is unchanged")
            same = checksums(shared) == before
            ok &= same
            print(f"    sha256 of {len(before)} files: {'unchanged' if same else 'CHANGED'}")
            say("cleaning up: processes, namespaces, mounts")
    finally:
        subprocess.run(["umount", str(shared)], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(top, ignore_errors=True)
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
