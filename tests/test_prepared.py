"""Mount's validation plans every checkpoint with the map; without `auto` in the map those
bytes are what the first open would generate, so the view serves them from the start and
the first open of a 10,000-socket files.img costs no rewrite (docs/design.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from inetsk_testbed.mount import read_in_process
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.entries import inet_entries
from overlayfs_inetsk.core.sockaddr import words_to_addr
from overlayfs_inetsk.planner.planner import Planner
from overlayfs_inetsk.host.listing import build_tree
from overlayfs_inetsk.app.mount import validate
from overlayfs_inetsk.fuse.daemon import MountConfig
from overlayfs_inetsk.fuse.ops import ViewOperations
from overlayfs_inetsk.host.nodeaddr import narrow
from inetsk_testbed.netns import scratch_netns, veth_with_route

MAP = ["local=10.77.0.99"]
# what MAP makes of image_dir's socket images, written out by hand: the listener moves, the
# connection to a peer outside the map is restored closed (fate close: state CLOSE, no
# ports, no addresses, shut down both ways)
WANT = [(1, 10, "10.77.0.99", 8000, "0.0.0.0", 0, 0), (2, 7, "0.0.0.0", 0, "0.0.0.0", 0, 3)]


def table(data: bytes) -> list[tuple[object, ...]]:
    """(id, state, src, sport, dst, dport, shutdown) of each inet socket of a files.img."""
    return [(k.id, k.state, str(words_to_addr(k.src_addr, k.family)), k.src_port,
             str(words_to_addr(k.dst_addr, k.family)), k.dst_port, k.shutdown)
            for *_x, k in inet_entries(data, "files.img")]


def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "img" / "ck"
    d.mkdir(parents=True)
    (d / "files.img").write_bytes(files_img(
        inet_file_entry(isk(1, "10.77.0.1", 8000)),
        inet_file_entry(isk(2, "10.77.0.1", 8000, "10.77.9.9", 40000))))
    (d / "pages-1.img").write_bytes(b"pages")
    return tmp_path / "img"


async def read_files_img(ops: ViewOperations) -> bytes:
    return await read_in_process(ops, b"ck", b"files.img")


def test_validation_keeps_the_bytes_the_first_open_would_generate(tmp_path: Path) -> None:
    root = image_dir(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prep = validate(MountConfig(str(root), str(mnt), maps=MAP, no_port_check=True, env={}))
    [(key, got)] = [(key, data) for _stamp, key, data in prep.generated.values()]
    assert key is None and list(got) == ["files.img"] and table(got["files.img"]) == WANT
    want = got["files.img"]

    def never(*_a: object) -> None:
        raise AssertionError("generated again")

    ops = ViewOperations(prep.tree, never, generated=prep.generated)  # type: ignore[arg-type]
    assert trio.run(read_files_img, ops) == want
    assert ops.generations == 0


def test_a_file_changed_after_validation_is_generated_at_open(tmp_path: Path) -> None:
    root = image_dir(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prep = validate(MountConfig(str(root), str(mnt), maps=MAP, no_port_check=True, env={}))
    changed = files_img(inet_file_entry(isk(5, "10.77.0.1", 9000)))
    (root / "ck" / "files.img").write_bytes(changed)
    ops = ViewOperations(prep.tree, Planner(AddressMap.from_args(MAP)).generator(None),
                         generated=prep.generated)
    assert table(trio.run(read_files_img, ops)) == [(5, 10, "10.77.0.99", 9000, "0.0.0.0", 0, 0)]
    assert ops.generations == 1


@pytest.fixture
def netns() -> Iterator[str]:  # needs root (the test using it is marked)
    """A namespace with 10.77.32.7/24 on a veth holding the default route."""
    with scratch_netns(*veth_with_route("10.77.32.7/24", "10.77.32.1")) as ns:
        yield ns


@pytest.mark.root
def test_an_auto_map_keeps_them_for_the_addresses_it_found(tmp_path: Path,
                                                          netns: str) -> None:
    """With `auto`, the bytes depend on the node's address: kept with its description, and
    used by the first open only if `current` still describes the same."""
    root = image_dir(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prep = validate(MountConfig(str(root), str(mnt), maps=["local=auto"], netns=netns,
                                no_port_check=True, env={}))
    assert prep.current is not None
    [(_stamp, key, data)] = prep.generated.values()
    now, _gen, _asked = prep.current()
    # what the bytes depend on: the node's IPv4 address (the image has only IPv4 sockets)
    assert key == narrow(now, [4]) == ((4, "10.77.32.7"),), (key, now)

    def never(*_a: object) -> None:
        raise AssertionError("generated again")

    ops = ViewOperations(prep.tree, never, current=lambda: (now, never, set()),  # type: ignore[arg-type]
                         generated=prep.generated)
    assert trio.run(read_files_img, ops) == data["files.img"]
    calls = []

    def gen(images):  # type: ignore[no-untyped-def]
        calls.append(1)
        return {}

    ops = ViewOperations(prep.tree, never, current=lambda: (((4, "10.77.32.8"),), gen, set()),  # type: ignore[arg-type]
                         generated=prep.generated)
    trio.run(read_files_img, ops)
    assert calls == [1]


def test_ops_without_prepared_bytes_generate_on_first_open(tmp_path: Path) -> None:
    root = image_dir(tmp_path)
    calls = []

    def gen(images):  # type: ignore[no-untyped-def]
        calls.append(sorted(images))
        return {}

    ops = ViewOperations(build_tree(str(root)), gen)  # type: ignore[arg-type]
    data = trio.run(read_files_img, ops)
    assert data == (root / "ck" / "files.img").read_bytes()  # the generator left it out
    assert len(calls) == 1 and ops.generations == 1
