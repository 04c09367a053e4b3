"""The plugin's fast path (plugin/inetsk_scan.c) in real `criu restore` runs with hostile
or odd files.img: a symlink to /dev/zero, a FIFO, a `type` that only protobuf-c's 32-bit
truncation makes an inet socket. Both routes to the planner (agent, CLI)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from overlayfs_inetsk.core import imagefile
from inetsk_testbed import criu

from .test_plugin import (  # noqa: F401  (fixtures)
    Plugin,
    assert_answers,
    built_so,
    plugin,
    plugin_lines,
    restore,
    service,
    views_left,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]

AS_LIMIT = 2 << 30  # address space for criu and its CLI child: a runaway read stops there


def restore_measured(host, images: Path, work: Path, route: Plugin, deadline: float = 20
                     ) -> tuple[int, float, int]:
    """`criu restore` of images on host with the plugin, as criu.restore runs it, under
    RLIMIT_AS (so that a reader that eats memory cannot take the machine): (exit status,
    seconds, peak RSS in bytes of criu and the children it waited for). Killed, with its
    process group, at the deadline (then AssertionError)."""
    log = work / "restore.log"
    argv = host.cmd([criu.CRIU, "restore", "-D", str(images), "-W", str(work), "-o", str(log),
                     "-v4", "-d", "--pidfile", str(work / "restore.pid"),
                     "-L", str(route.libdir)])

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    criu.become_subreaper()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, preexec_fn=limit, start_new_session=True, cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                return p.returncode, time.monotonic() - t0, ru.ru_maxrss * 1024
            if time.monotonic() - t0 > deadline:
                raise AssertionError(f"criu restore still running after {deadline} s")
            time.sleep(0.02)
    finally:
        if p.returncode is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def error_lines(work: Path) -> list[str]:
    return [ln for ln in plugin_lines(work) if "Error (" in ln]


def test_files_img_a_symlink_to_dev_zero(service, plugin):
    """Before: the plugin read /dev/zero until memory ran out (2.1 GB in 3.7 s). Now it
    opens nothing but a regular file: the planner names the symlink, the restore fails at
    once, criu's RSS stays small, nothing is left."""
    net, dirs = service
    b = net.add_host("B")
    files = dirs.images / "files.img"
    files.unlink()
    files.symlink_to("/dev/zero")
    work = dirs.work_for("B")
    rc, took, rss = restore_measured(b, dirs.images, work, plugin)
    assert rc != 0
    lines = plugin_lines(work)
    assert any("files.img: not read by the fast path (a symlink (not followed), not a "
               "regular file): the planner reads it" in ln for ln in lines), lines
    [err] = error_lines(work)
    assert f"{files}: socket image is a symlink; refusing to follow it" in err, lines
    assert took < 10, took
    assert rss < 300 << 20, f"criu's peak RSS {rss >> 20} MiB"
    assert views_left(lines) == [] and b.pids() == []


def test_files_img_a_fifo(service, plugin):
    """Before: criu hung in the plugin's open of the FIFO (no writer), for good. Now: not
    opened; the planner names it; the restore fails at once."""
    net, dirs = service
    b = net.add_host("B")
    files = dirs.images / "files.img"
    files.unlink()
    os.mkfifo(files)
    work = dirs.work_for("B")
    rc, took, _ = restore_measured(b, dirs.images, work, plugin)
    assert rc != 0 and took < 10, (rc, took)
    lines = plugin_lines(work)
    assert any("files.img: not read by the fast path (a FIFO, not a regular file)" in ln
               for ln in lines), lines
    [err] = error_lines(work)
    assert f"{files}: socket image is not a regular file" in err, lines


def test_a_type_of_2_to_the_32_plus_4_is_an_inet_socket(service, plugin):
    """Every inet socket's `type` written as 2^32 + 4 (five bytes): protobuf-c keeps an
    enum's low 32 bits, so CRIU reads INETSK. Before, the fast path compared all 64 bits,
    said "no inet socket" and CRIU bound A's address on B (the restore failed). Now the
    planner moves them and the service answers on B."""
    net, dirs = service
    b, c = net.add_host("B"), net.add_host("C")
    path = dirs.images / "files.img"
    img = imagefile.parse(path.read_bytes(), str(path))
    payloads, changed = [], 0
    for e in img.entries:
        p = e.payload
        if p.startswith(b"\x08\x04"):
            p = b"\x08\x84\x80\x80\x80\x10" + p[2:]
            changed += 1
        payloads.append(p)
    assert changed == 3  # tcp4, udp4, tcp6
    path.write_bytes(imagefile.encode(img.magic, payloads))
    work = dirs.work_for("B")
    rpid = restore(b, dirs.images, work, plugin)
    lines = plugin_lines(work)
    assert any("files.img: entry at offset" in ln and "is an inet socket" in ln
               for ln in lines), lines
    assert any("CRIU reads the per-node view" in ln for ln in lines), lines
    assert_answers(c, str(b.ipv4), str(b.ipv6))
    criu.kill_tree(rpid)
