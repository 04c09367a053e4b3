"""CRIU's own GPU plugins (CUDA, AMD) loaded beside ours, with real CRIU and no GPU (issue 20).

A GPU node has CRIU's CUDA plugin (and maybe the AMD one) in the same plugin dir as ours.
scripts/build-gpu-plugins.sh (run by scripts/setup.sh) builds both from the same CRIU 4.2.1
tree. Each restore here loads all three from one `-L` dir, ours first or last: CRIU loads
the `*.so` files in readdir() order, so the GPU plugins' file names are chosen until
readdir() gives the wanted order, and CRIU's own log (`Plugin "NAME" (version ...)`, one
line per plugin as it loads it) shows the order it used. The service uses no GPU; it
is restored on another host, through the view (stock CRIU 4.2.1) and through the
UPDATE_INETSK hook (the test-only patched CRIU, docs/upstream-hook.md). A checkpoint
whose inventory lists the CUDA plugin (as a dump of a CUDA process does) cannot be
restored without it (docs/gpu.md).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from inetsk_testbed import criu
from inetsk_testbed.criu import CriuError

from .test_criu_hook import HOOK_CRIU
from .test_plugin import (  # noqa: F401  (fixture)
    A4,
    A6,
    ENV_KEYS,
    built_so,
    cli_wrapper,
    views_left,
)
from .test_plugin_hook import HOOK_LINE, SERVICE, VIEW_LINE, assert_answers

pytestmark = [pytest.mark.root, pytest.mark.criu]

CACHE = Path(os.environ.get("OVERLAYFS_INETSK_CACHE", "/var/cache/overlayfs-inetsk"))
GPU_DIR = CACHE / "gpu-plugins"
GPU = {"cuda_plugin": "cuda_plugin.so", "amdgpu_plugin": "amdgpu_plugin.so"}  # name: file
OURS, OUR_SO = "overlayfs-inetsk", "overlayfs_inetsk_plugin.so"
LOADED = re.compile(r'Plugin "([^"]+)" \(version')
MISSING_CUDA = "Missing required plugin: cuda_plugin"
CUDA_NO_GPU = "cuda_plugin: No GPU device found; CUDA plugin is disabled"


@pytest.fixture(scope="module")
def gpu_plugins() -> dict[str, Path]:
    got = {name: GPU_DIR / f for name, f in GPU.items()}
    missing = [str(p) for p in got.values() if not p.is_file()]
    if missing:
        pytest.skip(f"CRIU's GPU plugins not built ({', '.join(missing)}): run "
                    "scripts/build-gpu-plugins.sh (scripts/setup.sh does)")
    return got


@pytest.fixture
def cli_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This tree's CLI, which the plugin runs (plugin_dir names an agent socket where none
    listens); none of our variables in CRIU's environment."""
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return cli_wrapper(tmp_path / "overlayfs-inetsk")


def plugin_dir(root: Path, so: Path, cli: Path, gpu: dict[str, Path] | None,
               ours_first: bool) -> tuple[Path, list[str]]:
    """One CRIU plugin dir: ours (by `plugin install --libdir`) and, unless gpu is None,
    every GPU plugin, named so that readdir() lists ours first (or last). Returns the dir
    and the plugins' names in the order readdir() gives, the order CRIU loads them in."""
    from inetsk_testbed.mount import overlayfs_inetsk

    lib = root / f"lib-{'ours-first' if ours_first else 'ours-last'}"
    overlayfs_inetsk("plugin", "install", "--libdir", str(lib), "--so", str(so),
                     "--cli", str(cli), "--agent-socket", str(root / "no-agent.sock"))
    by_file = {OUR_SO: OURS}
    for attempt in range(200):
        for name, src in (gpu or {}).items():
            dest = f"{attempt:03d}-{name}.so"
            shutil.copyfile(src, lib / dest)
            (lib / dest).chmod(0o755)
            by_file[dest] = name
        order = [n for n in os.listdir(lib) if n.endswith(".so")]  # readdir() order
        if not gpu or order.index(OUR_SO) == (0 if ours_first else len(order) - 1):
            return lib, [by_file[n] for n in order]
        for n in order:
            if n != OUR_SO:
                (lib / n).unlink()
                del by_file[n]
    raise AssertionError(f"no file names found that readdir() lists in order in {lib}")


def loaded(log: str) -> list[str]:
    """The plugins CRIU loaded, in the order it loaded them (its -v4 log)."""
    return LOADED.findall(log)


def plugin_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "overlayfs-inetsk: " in ln]


def gpu_errors(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ("cuda_plugin" in ln or "amdgpu" in ln)
            and ("Error" in ln or "Warn" in ln)]


@pytest.fixture
def dumped(testnet, image_dirs, gpu_plugins, built_so, cli_route):  # noqa: F811
    """The service (listeners, bound UDP, a dual-stack listener and a TCP connection to
    itself, no GPU) on host A, dumped with the GPU plugins and ours loaded, as on a GPU
    node: no GPU plugin records itself in the inventory (no GPU process)."""
    a = testnet.add_host("A")
    assert (str(a.ipv4), str(a.ipv6)) == (A4, A6)
    lib, _ = plugin_dir(image_dirs.root / "dump", built_so, cli_route, gpu_plugins, True)
    pid = criu.start_workload(a, SERVICE)
    log = criu.dump(a, pid, image_dirs.images, tcp_established=True, extra=["-L", str(lib)])
    text = log.read_text(errors="replace")
    assert sorted(loaded(text)) == sorted([OURS, *GPU]), loaded(text)
    assert CUDA_NO_GPU in text
    assert inventory_plugins(image_dirs.images) == []
    return testnet, image_dirs


def inventory_plugins(images: Path) -> list[str]:
    from pycriu import images as pycriu_images

    with open(images / "inventory.img", "rb") as f:
        entry = pycriu_images.load(f)["entries"][0]
    return list(entry.get("plugins_entry", {}).get("plugins", []))


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours-first", "ours-last"])
@pytest.mark.parametrize("which", ["stock", "hook"])
def test_restored_on_a_new_address_beside_the_gpu_plugins(
        dumped, gpu_plugins, built_so, cli_route, monkeypatch, which, ours_first):  # noqa: F811
    net, dirs = dumped
    if which == "hook":
        if not os.access(HOOK_CRIU, os.X_OK):
            pytest.skip(f"patched CRIU not built ({HOOK_CRIU}): run tests/criu-hook/build.sh")
        monkeypatch.setattr(criu, "CRIU", str(HOOK_CRIU))
    b, c = net.add_host("B"), net.add_host("C")
    lib, order = plugin_dir(dirs.root, built_so, cli_route, gpu_plugins, ours_first)
    assert (order[0] == OURS) is ours_first and (order[-1] == OURS) is not ours_first
    work = dirs.work_for("B")
    rpid = criu.restore(b, dirs.images, work, extra=["-L", str(lib)])
    try:
        log = (work / "restore.log").read_text(errors="replace")
        assert loaded(log) == order  # CRIU loaded them in readdir() order
        lines = plugin_lines(log)
        if which == "hook":
            assert any(HOOK_LINE in ln for ln in lines), lines
            # listeners tcp4, tcp6, dual, bound udp4, both ends of the self-connection:
            # the GPU plugins have no UPDATE_INETSK hook, so ours got every socket
            assert log.count("Plugin updated the addresses of inet socket") == 6, lines
        else:
            assert any(VIEW_LINE in ln for ln in lines), lines
            assert "Plugin updated the addresses" not in log
        assert gpu_errors(log) == []
        assert CUDA_NO_GPU not in log  # not in the inventory: the CUDA plugin stood aside
        assert_answers(c, str(b.ipv4), str(b.ipv6))
    finally:
        criu.kill_tree(rpid)
    assert views_left(lines) == []


def test_a_checkpoint_that_lists_the_cuda_plugin_needs_it(
        dumped, gpu_plugins, built_so, cli_route):  # noqa: F811
    """The inventory of a CUDA process's dump lists `cuda_plugin`: CRIU refuses to restore
    it without that plugin, after every plugin's init (ours made a view: it is removed);
    with it, the CUDA plugin finds its name, finds no GPU here and stands aside, and ours
    moves the service."""
    from pycriu import images as pycriu_images

    net, dirs = dumped
    b, c = net.add_host("B"), net.add_host("C")
    listed = dirs.root / "images-cuda"
    shutil.copytree(dirs.images, listed)
    inv = listed / "inventory.img"
    with open(inv, "rb") as f:
        img = pycriu_images.load(f)
    img["entries"][0]["plugins_entry"] = {"plugins": ["cuda_plugin"]}
    with open(inv, "wb") as f:
        pycriu_images.dump(img, f)
    assert inventory_plugins(listed) == ["cuda_plugin"]
    digest = {p.name: p.read_bytes() for p in listed.iterdir() if p.is_file()}

    only_ours = {"amdgpu_plugin": gpu_plugins["amdgpu_plugin"]}
    lib, order = plugin_dir(dirs.root / "no-cuda", built_so, cli_route, only_ours, True)
    work = dirs.work_for("no-cuda")
    with pytest.raises(CriuError) as err:
        criu.restore(b, listed, work, extra=["-L", str(lib)])
    log = err.value.log
    assert loaded(log) == order
    assert MISSING_CUDA in log
    errors = [ln for ln in log.splitlines() if "Error (" in ln and "RLIMIT_NOFILE" not in ln]
    assert len(errors) == 1 and MISSING_CUDA in errors[0], errors
    assert any(VIEW_LINE in ln for ln in plugin_lines(log)), plugin_lines(log)
    assert views_left(plugin_lines(log)) == []
    assert "Restore: family" not in log  # no socket was restored: CRIU stopped at plugin init

    lib2, order2 = plugin_dir(dirs.root / "with-cuda", built_so, cli_route, gpu_plugins, False)
    work2 = dirs.work_for("with-cuda")
    rpid = criu.restore(b, listed, work2, extra=["-L", str(lib2)])
    try:
        log2 = (work2 / "restore.log").read_text(errors="replace")
        assert loaded(log2) == order2
        assert CUDA_NO_GPU in log2
        assert_answers(c, str(b.ipv4), str(b.ipv6))
    finally:
        criu.kill_tree(rpid)
    assert views_left(plugin_lines(log2)) == []
    assert {p.name: p.read_bytes() for p in listed.iterdir() if p.is_file()} == digest
