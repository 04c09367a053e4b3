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
