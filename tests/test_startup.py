"""What `inspect` and `rewrite` import: start-up is most of their time on small images
(docs/design.md, issue 12). They need neither FUSE, trio, netlink nor the node agent, and
of pycriu only the generated modules for files.img (not the pycriu.images package, which
loads every one of its ~100 modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = r"""
import json, sys
from overlayfs_inetsk.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, sorted(sys.modules)]))
"""
NOT_WANTED = ("pyfuse3", "trio", "pyroute2", "overlayfs_inetsk.host.rtnl", "pycriu.images",
              "pycriu.rpc_pb2",
              "overlayfs_inetsk.app.agent", "overlayfs_inetsk.app.plugin_view",
              "overlayfs_inetsk.fuse.ops", "overlayfs_inetsk.fuse.daemon", "tomllib",
              # what only other commands need: the barrier and `plugin install` (and the
              # subprocess module both load, ~1.5 ms)
              "overlayfs_inetsk.node.barrier", "overlayfs_inetsk.app.barrier",
              "overlayfs_inetsk.node.tcplock", "overlayfs_inetsk.plugin.install", "subprocess")
# the parser of every command is built at each start: it loads none of the work
PARSER_NOT_WANTED = NOT_WANTED + ("overlayfs_inetsk.core", "overlayfs_inetsk.node",
                                  "overlayfs_inetsk.fuse", "overlayfs_inetsk.host",
                                  "overlayfs_inetsk.planner", "overlayfs_inetsk.app",
                                  "dataclasses")
PARSER_PROBE = r"""
import json, sys
from overlayfs_inetsk.cli import make_parser
make_parser()
print(json.dumps(sorted(sys.modules)))
"""


def _unwanted(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def _protobuf(modules: list[str]) -> list[str]:
    """protobuf and pycriu's generated modules (loaded as pycriu.images.* or by top name)."""
    return [m for m in modules if m == "google" or m.startswith("google.")
            or m.endswith("_pb2") or m == "pycriu" or m.startswith("pycriu.")]


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    (d / "files.img").write_bytes(files_img(
        inet_file_entry(isk(1, "10.77.0.1", 8000)),
        inet_file_entry(isk(2, "10.77.0.1", 8000, "10.77.9.9", 40000)),
    ))
    (d / "inventory.img").write_bytes(b"inv")
    return d


@pytest.mark.parametrize("command", ["inspect", "inspect-json", "rewrite"])
def test_offline_commands_import_no_fuse_netlink_agent_or_all_of_pycriu(image_dir, tmp_path,
                                                                        command):
    args = {"inspect": ["inspect", str(image_dir), "--map", "local=10.77.0.2"],
            "inspect-json": ["inspect", str(image_dir), "--json"],
            "rewrite": ["rewrite", str(image_dir), str(tmp_path / "out"), "--map",
                        "local=10.77.0.2"]}[command]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE, *args], check=True, capture_output=True,
                         text=True, env=env).stdout
    code, modules = json.loads(out.splitlines()[-1])
    assert code == 0
    assert _unwanted(modules, NOT_WANTED) == []
    if command == "rewrite":  # the byte pass (core/bytepass.py): no protobuf at all
        assert _protobuf(modules) == []
    else:  # inspect's reports: the upb pass
        assert "fdinfo_pb2" in modules or "pycriu.images.fdinfo_pb2" in modules


def test_the_parser_of_every_command_loads_none_of_their_work():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PARSER_PROBE], check=True, capture_output=True,
                         text=True, env=env).stdout
    modules = json.loads(out.splitlines()[-1])
    assert "overlayfs_inetsk.cli.group" in modules  # every command's parser was built
    assert _unwanted(modules, PARSER_NOT_WANTED) == []


def test_umount_loads_nothing_of_the_planner(tmp_path):
    """`umount` (run at every cycle of a mount, and by every restore's caller) clears what
    killed restores left and unmounts: it needs neither the planner nor the codec (on this
    branch it once loaded both, through the restore module: 65 ms a call)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE, "umount", str(tmp_path)],
                         capture_output=True, text=True, env=env).stdout
    code, modules = json.loads(out.splitlines()[-1])
    assert code == 6  # not mounted: MountError
    assert _unwanted(modules, ("overlayfs_inetsk.core", "overlayfs_inetsk.planner",
                               "overlayfs_inetsk.app.restore", "google.protobuf")) == []


# The CRIU plugin's CLI route (`plugin-view --socket-fd 3`, one process per restore when no
# agent runs): what it may not load. The old route loaded argparse (and through it gettext,
# shutil and the compression modules), secrets and hashlib (a view's name), subprocess
# (host/mounts), shlex (an options file it does not have), tempfile, the hook table and the
# port check: about 11 % of its instructions (docs/design.md, "The plugin's CLI route").
LEAN_NOT_WANTED = (
    "argparse", "gettext", "subprocess", "shutil", "tempfile", "secrets", "hashlib", "shlex",
    "tomllib", "prometheus_client", "pyfuse3", "trio", "pycriu.images",
    "overlayfs_inetsk.core.hooktable", "overlayfs_inetsk.core.portcheck",
    "overlayfs_inetsk.planner.ports", "overlayfs_inetsk.cli.plugin", "overlayfs_inetsk.cli.group",
    "overlayfs_inetsk.cli.images", "overlayfs_inetsk.cli.mount", "overlayfs_inetsk.cli.restore",
    "overlayfs_inetsk.cli.nat", "overlayfs_inetsk.cli.doctor", "overlayfs_inetsk.cli.render",
    "overlayfs_inetsk.plugin.install", "overlayfs_inetsk.plugin.units",
    "overlayfs_inetsk.fuse", "overlayfs_inetsk.node", "overlayfs_inetsk.app.restore",
    "overlayfs_inetsk.app.mount", "overlayfs_inetsk.app.doctor",
    # the byte pass takes a protobuf-c image: no protobuf, no pycriu (core/isktail.py checks
    # the tails)
    "google", "pycriu",
    # nor ctypes (setns) when the restore's namespace is this one (host/netns.in_netns)
    "ctypes",
    # nor logging (lazylog.py: its records there are below WARNING), typing (record.py) and
    # what they load, nor threading (only to enter another namespace): ~20 % of its start-up
    "logging", "traceback", "linecache", "tokenize", "textwrap", "string", "typing",
    "warnings", "threading",
    # nor the socket module (and selectors, select, math with it): _socket has all the route
    # uses (the agent's request path, sockaddr, rules, boundmap, rtnl): ~3 ms
    "socket", "selectors")
# nor dataclasses (and inspect, ast, dis with it): ~5 ms; record.py instead. core/tree.py
# and host/listing.py are being moved off them on another branch: while either still
# imports dataclasses it may bring it in, and no other module on the route may
LATE_DATACLASSES = ("overlayfs_inetsk.core.tree", "overlayfs_inetsk.host.listing")


def _imports_dataclasses(module: str) -> bool:
    import ast

    path = os.path.join(ROOT, *module.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    with open(path) as f:
        tree = ast.parse(f.read())
    return any(isinstance(n, ast.ImportFrom) and n.module == "dataclasses"
               or isinstance(n, ast.Import) and any(a.name == "dataclasses" for a in n.names)
               for n in ast.walk(tree))
# sys.modules when plugin-view exits (it leaves with os._exit, right after its reply); no
# json here, which would load modules of its own
LEAN_PROBE = r"""
import os, sys
_exit = os._exit
def exit_(code):
    os.write(1, repr(sorted(sys.modules)).encode())
    _exit(code)
os._exit = exit_
from overlayfs_inetsk.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _plugin_view(image_dir: object, tmp_path: object) -> tuple[bytes, list[str]]:
    """A real plugin-view request (the C plugin's, on a socketpair) of image_dir: the reply
    and sys.modules when the process left."""
    import ast
    import socket

    from inetsk_testbed.agentproc import request

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    img = os.open(str(image_dir), os.O_RDONLY | os.O_DIRECTORY)
    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        p = subprocess.Popen([sys.executable, "-c", LEAN_PROBE, "plugin-view", "--socket-fd",
                              str(b.fileno()), "--view-root", os.path.join(str(tmp_path),
                                                                           "views")],
                             pass_fds=(b.fileno(),), env=env, cwd="/",
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        b.close()
        socket.send_fds(a, [request({"INETSK_LOCAL_IPV4": "10.77.0.2"})], [img, ns])
        msg, got, _f, _a = socket.recv_fds(a, 4096, 4)
        for fd in got:
            os.close(fd)
        out, _err = p.communicate(timeout=60)
    finally:
        a.close()
        os.close(img)
        os.close(ns)
    return msg, ast.literal_eval(out.decode())


def test_the_plugins_cli_route_loads_no_parser_nor_what_it_does_not_use(image_dir, tmp_path):
    msg, modules = _plugin_view(image_dir, tmp_path)
    assert msg.startswith(b"VIEW view-"), msg  # a view was planned and written
    assert "overlayfs_inetsk.app.plugin_view" in modules and "overlayfs_inetsk.core.plan" in modules
    assert _unwanted(modules, LEAN_NOT_WANTED) == []
    assert _protobuf(modules) == []
    ours = [m for m in modules if m.startswith("overlayfs_inetsk")]
    late = [m for m in LATE_DATACLASSES if _imports_dataclasses(m)]
    assert [m for m in ours if m not in late and _imports_dataclasses(m)] == []
    if not late:
        assert _unwanted(modules, ("dataclasses", "inspect")) == []


def test_the_plugins_cli_route_falls_back_to_upb_when_the_bytes_say_so(tmp_path):
    """An entry the byte pass hands to upb (an unknown field in its tail: core/isktail.py
    says no): the same request loads protobuf and pycriu's modules, and the view is made."""
    d = tmp_path / "img"
    d.mkdir()
    odd = isk(2, "10.77.0.1", 8001).SerializeToString() + b"\xaa\x06\x01z"
    (d / "files.img").write_bytes(files_img(
        inet_file_entry(isk(1, "10.77.0.1", 8000)),
        b"\x08\x04\x10\x02\x22" + bytes((len(odd),)) + odd))
    (d / "inventory.img").write_bytes(b"inv")
    msg, modules = _plugin_view(d, tmp_path)
    assert msg.startswith(b"VIEW view-"), msg
    assert "google.protobuf" in modules
    assert "fdinfo_pb2" in modules or "pycriu.images.fdinfo_pb2" in modules
    view = tmp_path / "views" / msg.decode().split()[1]
    data = (view / "files.img").read_bytes()
    assert b"\xaa\x06\x01z" in data  # upb kept the unknown field
    from overlayfs_inetsk.core.entries import inet_entries
    from overlayfs_inetsk.core.sockaddr import words_to_addr

    srcs = [str(words_to_addr(tuple(e[4].src_addr), e[4].family))
            for e in inet_entries(data, "files.img")]
    assert srcs == ["10.77.0.2", "10.77.0.2"]  # both sockets moved


@pytest.mark.parametrize("argv", [
    ["--socket-fd", "3"], ["--socket-fd=3"], ["--socket-fd", "17", "--view-root", "/v"],
    ["--view-root=/v/w", "--socket-fd", "3"], ["--socket-fd", "0003"],
])
def test_plugin_view_reads_its_plain_command_line_as_argparse_does(argv):
    from overlayfs_inetsk.cli.plugin_view import parser, quick_args

    args = parser().parse_args(argv)
    assert quick_args(argv) == (args.socket_fd, args.view_root)


@pytest.mark.parametrize("argv", [
    [], ["--socket-fd"], ["--socket-fd", "x"], ["--socket-fd", "-3"], ["--socket", "3"],
    ["--socket-fd", "3", "--socket-fd", "4"], ["-h"], ["--socket-fd", "3", "extra"],
    ["--view-root", "/v"], ["--socket-fd", "٣"], ["--socket-fd", " 3"], ["--socket-fd="],
])
def test_plugin_view_leaves_every_other_command_line_to_argparse(argv):
    from overlayfs_inetsk.cli.plugin_view import quick_args

    assert quick_args(argv) is None


def test_plugin_view_errors_are_argparses(tmp_path):
    """A bad --socket-fd: usage and exit 2, as before (argparse's error)."""
    import socket

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    stream, _other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = str(stream.fileno())
    for argv, want in ((["--socket-fd", "x"], "invalid int value: 'x'"),
                       (["--socket-fd", "99"], "--socket-fd 99: Bad file descriptor"),
                       (["--socket-fd", "0"], "--socket-fd 0: Socket operation on non-socket"),
                       (["--socket-fd", fd], f"--socket-fd {fd}: not a unix SOCK_SEQPACKET")):
        cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "plugin-view", *argv],
                            env=env, cwd="/", capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, pass_fds=(stream.fileno(),))
        assert cp.returncode == 2, cp
        assert cp.stderr.startswith("usage: overlayfs-inetsk plugin-view"), cp.stderr
        assert want in cp.stderr, cp.stderr
    stream.close()
    _other.close()


def test_options_suppress_is_argparses():
    import argparse

    from overlayfs_inetsk.options import SUPPRESS

    assert SUPPRESS == argparse.SUPPRESS


def test_plugin_view_turns_the_gc_on_again_whatever_happens(capsys):
    """cli.main pauses the cyclic GC for plugin-view's imports: a caller in process whose
    command line is refused gets it back (before: left off)."""
    import gc

    from overlayfs_inetsk.cli import main

    assert gc.isenabled()
    with pytest.raises(SystemExit) as exc:
        main(["plugin-view", "--socket-fd", "x"])
    assert exc.value.code == 2 and "invalid int value" in capsys.readouterr().err
    assert gc.isenabled()
