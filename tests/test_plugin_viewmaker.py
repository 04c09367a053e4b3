"""The plugin's Python side without CRIU or root: the view maker (map precedence, options,
NONE / VIEW / ERR, relative links, no double rewrite), the agent's protocol, install and
remove, and the C plugin's build with -Werror."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.errors import MapError
from overlayfs_inetsk.plugin import install as inst
from overlayfs_inetsk.plugin.agent import RequestError, parse_request
from overlayfs_inetsk.plugin.viewmaker import (
    load_config,
    make_view,
    parse_options,
    remove_stale_views,
)
from overlayfs_inetsk.offline import VIEW_MARKER

ROOT = Path(__file__).resolve().parents[1]
A4, B4, C4 = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def checkpoint(d: Path, *entries: bytes) -> Path:
    d.mkdir()
    (d / "files.img").write_bytes(files_img(*entries))
    (d / "pages-1.img").write_bytes(b"\0" * 4096)
    (d / "core-1.img").write_bytes(b"core")
    return d


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return checkpoint(tmp_path / "images", reg_file_entry(1),
                      inet_file_entry(isk(2, A4, 7001)),
                      inet_file_entry(isk(3, A4, 7002, proto="udp")))


@pytest.fixture
def fds(images: Path):
    img = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    yield img, ns
    os.close(img)
    os.close(ns)


def srcs(path: Path) -> list[str]:
    from pycriu.images import fdinfo_pb2

    from overlayfs_inetsk.core.sockaddr import words_to_addr

    out = []
    for e in imagefile.parse(path.read_bytes(), str(path)).entries:
        fe = fdinfo_pb2.file_entry.FromString(bytes(e.payload))
        if fe.type == 4:
            out.append(str(words_to_addr(tuple(fe.isk.src_addr), fe.isk.family)))
    return out


# -- options and map precedence ------------------------------------------------------------
def test_parse_options() -> None:
    opts, iface = parse_options("--strict --tcp-outside=fail  # a comment\n--iface eth1", "F")
    assert (opts.strict, opts.tcp_outside, iface) == (True, "fail", "eth1")
    assert parse_options("", "F")[0].tcp_outside == "close"
    with pytest.raises(MapError, match=r"^F: unknown option '--map'"):
        parse_options("--map x=y", "F")
    with pytest.raises(MapError, match=r"^F: --tcp-outside must be close, keep or fail"):
        parse_options("--tcp-outside drop", "F")
    with pytest.raises(MapError, match=r"^F: --iface needs a value"):
        parse_options("--iface", "F")


def test_map_precedence(images: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    env = {"OVERLAYFS_INETSK_CONF_DIR": str(conf)}
    assert load_config(str(images), env).map_source == "the default local=auto"
    (conf / "plugin.map").write_text(f'rules = ["{A4}={C4}"]\n')
    (conf / "plugin.options").write_text("--strict\n")
    cfg = load_config(str(images), env)
    assert (cfg.map_source, cfg.options.strict) == (str(conf / "plugin.map"), True)
    (images / "overlayfs-inetsk.map").write_text(f'[map]\n"{A4}" = "{B4}"\n')
    (images / "overlayfs-inetsk.options").write_text("--tcp-outside keep\n")
    cfg = load_config(str(images), env)
    assert cfg.map_source == str(images / "overlayfs-inetsk.map")
    assert (cfg.options.strict, cfg.options.tcp_outside) == (False, "keep")
    cfg = load_config(str(images), {**env, "OVERLAYFS_INETSK_MAP": f"{A4}={C4}, fd00::1=fd00::2",
                                    "OVERLAYFS_INETSK_OPTIONS": "--tcp-outside fail"})
    assert cfg.map_source == f"CRIU's environment (OVERLAYFS_INETSK_MAP={A4}={C4}, fd00::1=fd00::2)"
    assert len(cfg.amap.rules) == 2 and cfg.options.tcp_outside == "fail"
    cfg = load_config(str(images), {**env, "INETSK_LOCAL_IPV4": B4})
    assert cfg.map_source == "CRIU's environment (INETSK_LOCAL_IPV4)"
    assert str(cfg.amap.local[4].new) == B4


def test_a_symlinked_map_file_in_the_checkpoint_is_refused(images: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("")
    (images / "overlayfs-inetsk.map").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MapError, match="overlayfs-inetsk.map: not a regular file"):
        load_config(str(images), {})


def test_map_and_options_swapped_for_a_symlink_are_never_read_through_it(
        images: Path, tmp_path: Path) -> None:
    """The checkpoint's map and options files, swapped back and forth between a regular
    file and a symlink to another file while the planner reads them (it used to lstat them
    and then open them following links): what is read is the regular file, or the load is
    refused; never the symlink's target."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "secret.map").write_text(f'rules = ["{A4}=10.66.66.66"]\n')
    (tmp_path / "secret.options").write_text("--iface leaked\n")
    env = {"OVERLAYFS_INETSK_CONF_DIR": str(conf)}
    targets = [(images / "overlayfs-inetsk.map", f'rules = ["{A4}={B4}"]\n', "secret.map"),
               (images / "overlayfs-inetsk.options", "--iface good\n", "secret.options")]
    for path, text, _ in targets:
        path.write_text(text)
    stop = threading.Event()

    def swap() -> None:
        tmp = images / ".swap"
        while not stop.is_set():
            for path, text, secret in targets:
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(tmp_path / secret)
                os.rename(tmp, path)
                tmp.write_text(text)
                os.rename(tmp, path)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=swap)
    t.start()
    loaded = refused = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and loaded + refused < 5000:
            try:
                cfg = load_config(str(images), env)
            except MapError as e:
                assert "not a regular file (a symlink is not followed)" in str(e)
                refused += 1
                continue
            assert [str(r.new) for r in cfg.amap.rules] in ([B4], []), "the map was read through a symlink"
            assert cfg.iface in ("good", None), "the options were read through a symlink"
            loaded += 1
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old_interval)
    assert loaded and refused, (loaded, refused)  # both outcomes came up


# -- make_view ------------------------------------------------------------------------------
def test_view_with_relative_links_and_the_images_untouched(images, fds, tmp_path) -> None:
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    root = tmp_path / "views"
    reply = make_view(*fds, {"INETSK_LOCAL_IPV4": B4}, 4242, str(root))
    assert reply.startswith(f"VIEW {root}/view-4242-")
    view = Path(reply.split(" ", 1)[1])
    assert srcs(view / "files.img") == [B4, B4]
    assert not (view / "files.img").is_symlink()
    for name in ("pages-1.img", "core-1.img"):
        target = os.readlink(view / name)
        assert not os.path.isabs(target) and target.startswith("../")
        assert (view / name).read_bytes() == before[name]
    assert (view / VIEW_MARKER).is_file()
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert [p.name for p in root.iterdir()] == [view.name]  # no temporary dir left


def test_a_view_keeps_the_images_modes(images, fds, tmp_path) -> None:
    """Issue 18: plugin views were written 0644 in a 0755 dir; CRIU writes its images
    0600. The view keeps the images' modes (its dir: the images dir's, no wider)."""
    (images / "files.img").chmod(0o600)
    images.chmod(0o700)
    old = os.umask(0)
    try:
        reply = make_view(*fds, {"INETSK_LOCAL_IPV4": B4}, 4243, str(tmp_path / "views"))
    finally:
        os.umask(old)
    view = Path(reply.split(" ", 1)[1])
    assert reply.startswith("VIEW ") and srcs(view / "files.img") == [B4, B4]
    assert oct(os.lstat(view / "files.img").st_mode & 0o7777) == oct(0o600)
    assert oct(os.lstat(view).st_mode & 0o7777) == oct(0o700)


def test_none_when_nothing_changes(tmp_path) -> None:
    d = checkpoint(tmp_path / "img", inet_file_entry(isk(1, "0.0.0.0", 7006)),
                   inet_file_entry(isk(2, "127.0.0.1", 7007)))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reply = make_view(fd, fd, {"INETSK_LOCAL_IPV4": B4}, 1, str(tmp_path / "views"))
    finally:
        os.close(fd)
    assert reply == "NONE no socket to change (map: CRIU's environment (INETSK_LOCAL_IPV4))"
    assert not (tmp_path / "views").exists()


def test_no_double_rewrite_of_a_view(images, fds, tmp_path) -> None:
    root = tmp_path / "views"
    env = {"OVERLAYFS_INETSK_MAP": f"{A4}={B4},{B4}={C4}"}
    view = Path(make_view(*fds, env, 1, str(root)).split(" ", 1)[1])
    assert srcs(view / "files.img") == [B4, B4]
    fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert make_view(fd, fds[1], env, 2, str(root)) == (
            f"NONE the images dir is a per-node view already ({VIEW_MARKER})")
    finally:
        os.close(fd)


def test_err_lines(images, fds, tmp_path) -> None:
    root = tmp_path / "views"
    (images / "overlayfs-inetsk.map").write_text("map = 3\n")
    reply = make_view(*fds, {}, 1, str(root))
    assert reply == f"ERR {images}/overlayfs-inetsk.map: `map` must be a table of OLD = NEW"
    (images / "overlayfs-inetsk.map").unlink()
    # a connection to a peer outside the map, fate fail
    d = checkpoint(tmp_path / "tcp", inet_file_entry(isk(1, A4, 40000, "10.9.9.9", 80,
                                                          state=1)))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reply = make_view(fd, fds[1], {"INETSK_LOCAL_IPV4": B4,
                                        "OVERLAYFS_INETSK_OPTIONS": "--tcp-outside fail"},
                          1, str(root))
    finally:
        os.close(fd)
    assert reply.startswith(f"ERR {d}/files.img: socket id 1 tcp {A4}:40000 -> 10.9.9.9:80: "
                            "refused: peer 10.9.9.9:80 is outside the map"), reply
    assert reply.endswith("(map: CRIU's environment (INETSK_LOCAL_IPV4); options: "
                          "$OVERLAYFS_INETSK_OPTIONS)")
    assert "\n" not in reply
    # a broken image: named with its offset
    bad = checkpoint(tmp_path / "bad", b"\x08\x04\x12\x03xyz")
    fd = os.open(bad, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reply = make_view(fd, fds[1], {"INETSK_LOCAL_IPV4": B4}, 1, str(root))
    finally:
        os.close(fd)
    assert reply.startswith(f"ERR {bad}/files.img: entry at offset 8: "), reply
    assert not root.exists() or os.listdir(root) == []


def test_stale_views_of_dead_criu_are_removed(tmp_path) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    for name in (f"view-{p.pid}-aa", f".view-{p.pid}-bb.x", f"view-{os.getpid()}-cc", "other"):
        (tmp_path / name).mkdir()
    assert sorted(remove_stale_views(str(tmp_path))) == [f".view-{p.pid}-bb.x",
                                                         f"view-{p.pid}-aa"]
    assert sorted(os.listdir(tmp_path)) == ["other", f"view-{os.getpid()}-cc"]


# -- the agent ------------------------------------------------------------------------------
def test_parse_request() -> None:
    pid, env, hook = parse_request(b"OVERLAYFS-INETSK-VIEW 1 pid=77\0INETSK_LOCAL_IPV4=10.0.0.2\0"
                                   b"PATH=/bin\0OVERLAYFS_INETSK_MAP=a=b\0")
    assert (pid, env, hook) == (77, {"INETSK_LOCAL_IPV4": "10.0.0.2",
                                     "OVERLAYFS_INETSK_MAP": "a=b"}, False)
    assert parse_request(b"OVERLAYFS-INETSK-VIEW 1 pid=78 hook=1\0")[2] is True
    with pytest.raises(RequestError):
        parse_request(b"GET / HTTP/1.0")


def test_agent_over_its_socket(images, fds, tmp_path) -> None:
    sock, root = tmp_path / "agent.sock", tmp_path / "views"
    agent = subprocess.Popen([sys.executable, "-m", "overlayfs_inetsk.cli", "agent",
                              "--socket", str(sock), "--view-root", str(root)],
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 20
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < end
            time.sleep(0.02)
        assert sock.stat().st_mode & 0o777 == 0o600

        def ask(data: bytes, fdl: list[int]) -> str:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(sock))
                socket.send_fds(s, [data], fdl)
                return s.recv(4096).decode()

        reply = ask(b"OVERLAYFS-INETSK-VIEW 1 pid=9\0INETSK_LOCAL_IPV4=10.0.0.2\0", list(fds))
        assert reply.startswith(f"VIEW {root}/view-9-"), reply
        assert srcs(Path(reply[5:]) / "files.img") == [B4, B4]
        assert ask(b"hello", list(fds)).startswith("ERR not a plugin request")
        assert ask(b"OVERLAYFS-INETSK-VIEW 1 pid=9\0", [fds[0]]) == (
            "ERR the agent needs 2 fds (images dir, netns), got 1")
    finally:
        agent.terminate()
        agent.wait(10)
    assert not sock.exists()


# -- install / remove and the C build -------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    src = os.environ.get("CRIU_SRC", "/var/cache/overlayfs-inetsk/criu-4.2.1")
    if not os.path.isfile(f"{src}/criu/include/criu-plugin.h") or not shutil.which("make"):
        pytest.skip("needs CRIU's source tree (scripts/setup.sh) and make")
    out = tmp_path_factory.mktemp("build")
    cp = subprocess.run(["make", "-C", str(ROOT / "plugin"), f"OUT={out}", f"CRIU_SRC={src}"],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "-Wall -Wextra -Werror" in cp.stdout
    return out / "overlayfs_inetsk_plugin.so"


def test_the_plugin_builds_with_werror_and_exports_its_descriptor(built: Path) -> None:
    nm = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True,
                        text=True, check=True).stdout.split()
    assert "CR_PLUGIN_DESC" in nm
    assert b"overlayfs-inetsk" in built.read_bytes()


def test_install_and_remove_are_idempotent(built: Path, tmp_path: Path) -> None:
    libdir = tmp_path / "lib" / "criu"
    cli = "/usr/local/bin/overlayfs-inetsk"
    done = inst.install(str(libdir), str(built), cli)
    assert done == [f"made {libdir}", f"installed {libdir}/{inst.SO_NAME}",
                    f"wrote {libdir}/{inst.CLI_CONF} ({cli})"]
    assert (libdir / inst.SO_NAME).read_bytes() == built.read_bytes()
    assert (libdir / inst.SO_NAME).stat().st_mode & 0o777 == 0o755
    assert inst.install(str(libdir), str(built), cli) == []
    assert inst.install(str(libdir), str(built), "/opt/x") == [
        f"wrote {libdir}/{inst.CLI_CONF} (/opt/x)"]
    assert sorted(os.listdir(libdir)) == sorted([inst.SO_NAME, inst.CLI_CONF])
    assert len(inst.remove(str(libdir))) == 2
    assert inst.remove(str(libdir)) == []
    assert os.listdir(libdir) == []
