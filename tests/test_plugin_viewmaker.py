"""The plugin's Python side without CRIU or root: the view maker (map precedence, options,
NONE / VIEW / ERR, relative links, no double rewrite), install and remove with the config
file, doctor's plugin check, the generated C header, and the C plugin's build with -Werror.
The protocol, the agent and the view root: test_plugin_agent.py."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.errors import InetskError, MapError
from overlayfs_inetsk.plugin import install as inst
from overlayfs_inetsk.app import plugin_view as viewmaker
from overlayfs_inetsk.plugin import imagesdir, wire
from overlayfs_inetsk.app.plugin_view import make_view
from overlayfs_inetsk.planner.sources import parse_options
from overlayfs_inetsk.planner.sources import plugin_config as load_config
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
    with pytest.raises(MapError, match=r"^F: --tcp-outside must be close, keep, nat or fail"):
        parse_options("--tcp-outside drop", "F")
    # fate nat through the plugin's options file (issue 22)
    assert parse_options("--tcp-outside nat", "F")[0].tcp_outside == "nat"
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
def view_path(reply: viewmaker.Reply, root: Path) -> Path:
    assert reply.text.startswith("VIEW view-"), reply.text
    name = reply.text[5:]
    assert wire.VIEW_NAME.fullmatch(name) and reply.view is not None
    assert reply.view.name == name
    return root / name


def test_view_with_relative_links_and_the_images_untouched(images, fds, tmp_path) -> None:
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    root = tmp_path / "views"
    reply = make_view(*fds, {"INETSK_LOCAL_IPV4": B4}, 4242, str(root))
    view = view_path(reply, root)
    assert os.path.samestat(os.fstat(reply.view.fd), os.stat(view))
    assert srcs(view / "files.img") == [B4, B4]
    assert not (view / "files.img").is_symlink()
    for name in ("pages-1.img", "core-1.img"):
        target = os.readlink(view / name)
        assert not os.path.isabs(target) and target.startswith("../")
        assert (view / name).read_bytes() == before[name]
    assert (view / VIEW_MARKER).is_file()
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert [p.name for p in root.iterdir()] == [view.name]  # no temporary dir left
    assert root.stat().st_mode & 0o777 == 0o711
    # the planner holds a shared lock on the view: an exclusive one cannot be had
    other = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        reply.close()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ... until it closes its fd
    finally:
        os.close(other)


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
    try:
        view = view_path(reply, tmp_path / "views")
        assert srcs(view / "files.img") == [B4, B4]
        assert oct(os.lstat(view / "files.img").st_mode & 0o7777) == oct(0o600)
        assert oct(os.lstat(view).st_mode & 0o7777) == oct(0o700)
    finally:
        reply.close()


def test_none_when_nothing_changes(tmp_path) -> None:
    d = checkpoint(tmp_path / "img", inet_file_entry(isk(1, "0.0.0.0", 7006)),
                   inet_file_entry(isk(2, "127.0.0.1", 7007)))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reply = make_view(fd, fd, {"INETSK_LOCAL_IPV4": B4}, 1, str(tmp_path / "views"))
    finally:
        os.close(fd)
    assert reply.text == "NONE no socket to change (map: CRIU's environment (INETSK_LOCAL_IPV4))"
    assert reply.view is None
    assert not (tmp_path / "views").exists()


def test_no_double_rewrite_of_a_view(images, fds, tmp_path) -> None:
    root = tmp_path / "views"
    env = {"OVERLAYFS_INETSK_MAP": f"{A4}={B4},{B4}={C4}"}
    reply = make_view(*fds, env, 1, str(root))
    view = view_path(reply, root)
    assert srcs(view / "files.img") == [B4, B4]
    fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert make_view(fd, fds[1], env, 2, str(root)).text == (
            "NONE the images dir is a view the plugin made")
    finally:
        os.close(fd)
        reply.close()
    copy = tmp_path / "copy"  # elsewhere, the marker says it
    shutil.copytree(view, copy, symlinks=True)
    fd = os.open(copy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert make_view(fd, fds[1], env, 2, str(root)).text == (
            f"NONE the images dir is a per-node view already ({VIEW_MARKER})")
    finally:
        os.close(fd)


def test_a_file_system_type_that_cannot_be_told_is_an_error(images, fds, tmp_path,
                                                            monkeypatch) -> None:
    """Before: a failed lookup meant "not a FUSE view", and the view was made (a FUSE view
    would be rewritten twice). Now the restore fails, saying why."""
    def broken() -> list[object]:
        raise OSError(13, "Permission denied", "/proc/self/mountinfo")

    monkeypatch.setattr(imagesdir, "mounts", broken)
    reply = make_view(*fds, {"INETSK_LOCAL_IPV4": B4}, 1, str(tmp_path / "views"))
    assert reply.text == (f"ERR images dir {images}: cannot tell which file system it is on: "
                          "[Errno 13] Permission denied: '/proc/self/mountinfo'")
    assert reply.view is None
    monkeypatch.setattr(imagesdir, "mounts", lambda: [])
    reply = make_view(*fds, {"INETSK_LOCAL_IPV4": B4}, 1, str(tmp_path / "views"))
    assert reply.text.startswith(f"ERR images dir {images}: cannot tell which file system it "
                                 "is on: mount "), reply.text
    assert reply.text.endswith(" is not in /proc/self/mountinfo")
    assert not (tmp_path / "views").exists() or not os.listdir(tmp_path / "views")


def test_err_lines(images, fds, tmp_path) -> None:
    root = tmp_path / "views"
    (images / "overlayfs-inetsk.map").write_text("map = 3\n")
    reply = make_view(*fds, {}, 1, str(root)).text
    assert reply == f"ERR {images}/overlayfs-inetsk.map: `map` must be a table of OLD = NEW"
    (images / "overlayfs-inetsk.map").unlink()
    # a connection to a peer outside the map, fate fail
    d = checkpoint(tmp_path / "tcp", inet_file_entry(isk(1, A4, 40000, "10.9.9.9", 80,
                                                          state=1)))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reply = make_view(fd, fds[1], {"INETSK_LOCAL_IPV4": B4,
                                        "OVERLAYFS_INETSK_OPTIONS": "--tcp-outside fail"},
                          1, str(root)).text
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
        reply = make_view(fd, fds[1], {"INETSK_LOCAL_IPV4": B4}, 1, str(root)).text
    finally:
        os.close(fd)
    assert reply.startswith(f"ERR {bad}/files.img: entry at offset 8: "), reply
    assert not root.exists()  # every refusal comes before the view root is opened


def test_no_view_is_written_after_the_deadline(images, fds, tmp_path) -> None:
    import time

    root = tmp_path / "views"
    reply = make_view(*fds, {"INETSK_LOCAL_IPV4": B4}, 1, str(root),
                      deadline=time.monotonic())
    assert reply.text == "ERR the request's deadline passed while planning: no view written"
    assert not root.exists()  # the deadline is checked before the view root is opened


# -- install / remove, the config file, doctor, and the C build -----------------------------
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


def test_the_c_header_is_what_wire_py_generates() -> None:
    """plugin/inetsk_wire.h holds the protocol's limits and names for the C side; it is
    generated from wire.py (one definition) and must not drift."""
    have = (ROOT / "plugin" / "inetsk_wire.h").read_text()
    cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.plugin.wire_h"],
                        capture_output=True, text=True, check=True, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cp.stderr == ""
    assert have == cp.stdout == wire.header(), \
        "plugin/inetsk_wire.h is stale: make -C plugin wire-header"
    for name in ("REQUEST_MAX", "REPLY_MAX", "TABLE_MAX", "TIMEOUT_MS", "PROTOCOL"):
        assert f"#define INETSK_WIRE_{name} {getattr(wire, name)}\n" in have
    # the pure hook_plan keeps a default of its own (core imports nothing of the plugin's);
    # the planner passes wire.TABLE_MAX, and the two must not drift apart
    from overlayfs_inetsk.core.hooktable import MAX_ENTRIES
    assert MAX_ENTRIES == wire.TABLE_MAX
    sources = {p.name: p.read_text() for p in (ROOT / "plugin").glob("*.[ch]")
               if p.name != "inetsk_wire.h"}
    assert "#define TABLE_MAX INETSK_WIRE_TABLE_MAX" in sources["inetsk_hook.c"]
    for text in sources.values():  # no second definition of a limit on the C side
        for stale in ("REQ_MAX", "REPLY_MAX (", "DEFAULT_TIMEOUT_MS", '"/run/overlayfs-inetsk',
                      "16384", "30000"):
            assert stale not in text, stale


def test_install_and_remove_are_idempotent(built: Path, tmp_path: Path) -> None:
    libdir = tmp_path / "lib" / "criu"
    cli = "/usr/local/bin/overlayfs-inetsk"
    conf = inst.PluginConf(cli=cli)
    done = inst.install(str(libdir), str(built), conf)
    assert done == [f"made {libdir}", f"installed {libdir}/{inst.SO_NAME}",
                    f"wrote {libdir}/{inst.CLI_CONF} (cli {cli}, agent-socket "
                    f"{wire.AGENT_SOCKET}, timeout-ms 30000)"]
    assert (libdir / inst.SO_NAME).read_bytes() == built.read_bytes()
    assert (libdir / inst.SO_NAME).stat().st_mode & 0o777 == 0o755
    assert inst.read_conf(str(libdir / inst.CLI_CONF)) == conf
    assert inst.install(str(libdir), str(built), conf) == []
    none = inst.PluginConf(cli="none", agent_socket="/run/x/a.sock", timeout_ms=5000)
    assert inst.install(str(libdir), str(built), none) == [
        f"wrote {libdir}/{inst.CLI_CONF} (cli none, agent-socket /run/x/a.sock, "
        "timeout-ms 5000)"]
    assert inst.read_conf(str(libdir / inst.CLI_CONF)) == none
    (libdir / inst.OLD_CLI_CONF).write_text("/old\n")
    assert inst.install(str(libdir), str(built), none) == [
        f"removed {libdir}/{inst.OLD_CLI_CONF} (replaced by {inst.CLI_CONF})"]
    assert sorted(os.listdir(libdir)) == sorted([inst.SO_NAME, inst.CLI_CONF])
    (libdir / inst.OLD_CLI_CONF).write_text("/old\n")
    assert len(inst.remove(str(libdir))) == 3
    assert inst.remove(str(libdir)) == []
    assert os.listdir(libdir) == []


def test_install_flags(tmp_path: Path, built: Path) -> None:
    base = [sys.executable, "-m", "overlayfs_inetsk.cli", "plugin", "install", "--libdir",
            str(tmp_path / "lib"), "--so", str(built)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cp = subprocess.run([*base, "--no-cli", "--agent-socket", "/run/a/agent.sock",
                         "--timeout-ms", "4000"], capture_output=True, text=True, env=env)
    assert cp.returncode == 0, cp.stderr
    assert inst.read_conf(str(tmp_path / "lib" / inst.CLI_CONF)) == inst.PluginConf(
        "none", "/run/a/agent.sock", 4000)
    for bad, why in ((["--timeout-ms", "0"], "must be 1 to 600000 ms, not 0"),
                     (["--timeout-ms", "x"], "not a number of milliseconds: 'x'"),
                     (["--no-cli", "--cli", "/x"], "not allowed with argument")):
        cp = subprocess.run([*base, *bad], capture_output=True, text=True, env=env)
        assert cp.returncode == 2 and why in cp.stderr, cp.stderr
    cp = subprocess.run([*base, "--agent-socket", "relative.sock"], capture_output=True,
                        text=True, env=env)
    assert cp.returncode != 0 and "agent-socket must be an absolute path" in cp.stderr


@pytest.mark.parametrize("text, why", [
    ("cli relative/path\n", ":1: cli must be an absolute path or none, not 'relative/path'"),
    ("timeout-ms 0\n", ":1: timeout-ms must be 1 to 600000, not '0'"),
    ("# c\n\nfoo 1\n", ":3: unknown setting 'foo' (cli, agent-socket, timeout-ms)"),
    ("cli none\ncli /x\n", ":2: cli is set twice"),
    ("agent-socket\n", ":1: agent-socket needs a value"),
    (f"agent-socket /{'a' * 120}\n", ":1: agent-socket must be an absolute path shorter"),
])
def test_config_file_errors_name_the_file_and_line(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / inst.CLI_CONF
    path.write_text(text)
    with pytest.raises(InetskError) as e:
        inst.read_conf(str(path))
    assert str(e.value).startswith(f"{path}{why}"), str(e.value)


@pytest.mark.root
def test_config_file_must_be_roots_and_not_writable_by_others(tmp_path: Path) -> None:
    path = tmp_path / inst.CLI_CONF
    path.write_text("cli none\n")
    assert inst.read_conf(str(path)) == inst.PluginConf("none")
    path.chmod(0o664)
    with pytest.raises(InetskError, match="must be owned by root and not writable by group"):
        inst.read_conf(str(path))
    path.chmod(0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(InetskError, match=r"\(uid 65534, mode 0644\)"):
        inst.read_conf(str(path))
    os.chown(path, 0, 0)
    link = tmp_path / "link.conf"
    link.symlink_to(path)
    with pytest.raises(InetskError, match="a symlink is not followed"):
        inst.read_conf(str(link))
    assert inst.read_conf(str(tmp_path / "absent")) is None
