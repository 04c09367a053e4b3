"""fuse.ops.ViewOperations: handlers called directly, no mount."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.errors import RewriteError
from overlayfs_inetsk.fuse.ops import ViewOperations
from overlayfs_inetsk.core.decide import RewriteOptions
from overlayfs_inetsk.core.plan import rewrite_checkpoint
from overlayfs_inetsk.core.tree import ROOT_INODE
from overlayfs_inetsk.host.listing import build_tree


@dataclass
class FakeResult:
    data: bytes
    changed: int = 1


class FakeRewrite:
    """Upper-cases every image; counts calls; can be told to fail or to be slow."""

    def __init__(self) -> None:
        self.calls: list[dict[str, bytes]] = []
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None

    def __call__(self, images: Mapping[str, bytes]) -> dict[str, FakeResult]:
        self.calls.append(dict(images))
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail is not None:
            raise self.fail
        return {k: FakeResult(v.upper() + b"!") for k, v in images.items()}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "img"
    (root / "ck").mkdir(parents=True)
    (root / "ck" / "files.img").write_bytes(b"files")
    (root / "ck" / "inetsk.img").write_bytes(b"inetsk")
    (root / "ck" / "pages-1.img").write_bytes(bytes(range(256)) * 40)
    with open(os.path.join(os.fsencode(root), b"\xfe odd"), "wb") as f:
        f.write(b"odd bytes")
    return root


def ops_for(root: Path, gen: Callable[..., Any], serve: str = "symlink") -> ViewOperations:
    return ViewOperations(build_tree(root, serve=serve), gen)  # type: ignore[arg-type]


def run(fn: Callable[..., Any], *args: Any) -> Any:
    return trio.run(fn, *args)


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(fn, *args)
    return ei.value.errno


async def lookup_path(ops: ViewOperations, path: bytes) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attr = await ops.getattr(ino, None)
    for part in path.split(b"/"):
        attr = await ops.lookup(ino, part, None)
        ino = attr.st_ino
    return attr


async def read_all(ops: ViewOperations, path: bytes) -> tuple[bytes, pyfuse3.FileInfo]:
    attr = await lookup_path(ops, path)
    fi = await ops.open(attr.st_ino, os.O_RDONLY, None)
    chunks, off = [], 0
    while True:
        b = await ops.read(fi.fh, off, 7)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    await ops.release(fi.fh)
    return b"".join(chunks), fi


def test_lookup_getattr_readlink(tree: Path) -> None:
    ops = ops_for(tree, FakeRewrite())

    async def main() -> None:
        root = await ops.getattr(ROOT_INODE, None)
        assert stat.S_ISDIR(root.st_mode) and root.st_mode & 0o222 == 0
        ck = await ops.lookup(ROOT_INODE, b"ck", None)
        assert (await ops.lookup(ck.st_ino, b".", None)).st_ino == ck.st_ino
        assert (await ops.lookup(ck.st_ino, b"..", None)).st_ino == ROOT_INODE
        neg = await ops.lookup(ROOT_INODE, b"nope", None)
        assert neg.st_ino == 0  # negative entry
        pages = await ops.lookup(ck.st_ino, b"pages-1.img", None)
        assert stat.S_ISLNK(pages.st_mode)
        target = await ops.readlink(pages.st_ino, None)
        assert target == os.fsencode(os.path.realpath(tree / "ck" / "pages-1.img"))
        odd = await ops.lookup(ROOT_INODE, b"\xfe odd", None)
        assert (await ops.readlink(odd.st_ino, None)).endswith(b"/\xfe odd")
        fimg = await ops.lookup(ck.st_ino, b"files.img", None)
        assert stat.S_ISREG(fimg.st_mode) and fimg.attr_timeout == 0
        assert fimg.st_size == 5  # the original's size until generated
        assert (await ops.access(fimg.st_ino, os.R_OK, None)) is True

    run(main)
    assert errno_of(ops.getattr, 4242, None) == errno.ENOENT
    assert errno_of(ops.lookup, 4242, b"x", None) == errno.ENOENT
    assert errno_of(ops.readlink, ROOT_INODE, None) == errno.EINVAL


def test_readdir(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = ops_for(tree, FakeRewrite())
    got: list[tuple[bytes, int]] = []
    limit = {"n": 2}

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if limit["n"] == 0:
            return False
        limit["n"] -= 1
        got.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def main() -> None:
        ck = await ops.lookup(ROOT_INODE, b"ck", None)
        fh = await ops.opendir(ck.st_ino, None)
        await ops.readdir(fh, 0, None)  # buffer full after 2
        limit["n"] = 100
        await ops.readdir(fh, got[-1][1], None)  # resume where it stopped
        await ops.releasedir(fh)

    run(main)
    assert got == [(b"files.img", 1), (b"inetsk.img", 2), (b"pages-1.img", 3)]
    assert errno_of(ops.opendir, 4242, None) == errno.ENOENT


def test_socket_images_generated_once_per_dir(tree: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    gen = FakeRewrite()
    ops = ops_for(tree, gen)
    caplog.set_level(logging.INFO)

    async def main() -> None:
        data, fi = await read_all(ops, b"ck/files.img")
        assert data == b"FILES!"
        assert fi.direct_io and not fi.keep_cache
        data, _ = await read_all(ops, b"ck/inetsk.img")
        assert data == b"INETSK!"
        # after generation getattr reports the generated size
        attr = await lookup_path(ops, b"ck/files.img")
        assert attr.st_size == len(b"FILES!")

    run(main)
    assert len(gen.calls) == 1  # one call with BOTH images of the directory
    real = os.path.realpath(tree / "ck")
    assert gen.calls[0] == {f"{real}/files.img": b"files", f"{real}/inetsk.img": b"inetsk"}
    assert ops.generations == 1


def test_concurrent_opens_generate_once(tree: Path) -> None:
    gen = FakeRewrite()
    gen.gate = threading.Event()
    ops = ops_for(tree, gen)
    results: list[bytes] = []

    async def one(path: bytes) -> None:
        data, _ = await read_all(ops, path)
        results.append(data)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(one, b"ck/files.img")
                n.start_soon(one, b"ck/inetsk.img")
            await trio.sleep(0.1)
            gen.gate.set()  # type: ignore[union-attr]

    run(main)
    assert len(gen.calls) == 1
    assert sorted(results) == [b"FILES!"] * 5 + [b"INETSK!"] * 5


@pytest.mark.expect_log(logging.ERROR, r"^cannot generate ck/files\.img: files\.img: auto target")
def test_failed_generation_is_eio_logged_once_and_retried(
        tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    gen = FakeRewrite()
    gen.fail = RewriteError("files.img: auto target has no IPv4 address on this node")
    ops = ops_for(tree, gen)

    async def open_files() -> pyfuse3.FileInfo:
        attr = await lookup_path(ops, b"ck/files.img")
        return await ops.open(attr.st_ino, os.O_RDONLY, None)

    with caplog.at_level(logging.ERROR):
        assert errno_of(open_files) == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert "\n" not in line and "ck/files.img" in line and "no IPv4 address" in line
    assert errors[0].exc_info is None  # no traceback for a user-level failure
    # not cached: the next open retries and succeeds
    gen.fail = None
    data, _ = run(read_all, ops, b"ck/files.img")
    assert data == b"FILES!"
    assert len(gen.calls) == 2
    # other files keep being served meanwhile (symlinks need no generation)
    assert run(lookup_path, ops, b"ck/pages-1.img").st_ino > 0


@pytest.mark.expect_log(logging.ERROR, r"^internal error in open\(")
@pytest.mark.expect_log(logging.ERROR, r"^internal error in lookup\(")
def test_unexpected_exception_becomes_eio(tree: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    gen = FakeRewrite()
    gen.fail = ZeroDivisionError("bug")
    ops = ops_for(tree, gen)

    async def open_files() -> pyfuse3.FileInfo:
        attr = await lookup_path(ops, b"ck/files.img")
        return await ops.open(attr.st_ino, os.O_RDONLY, None)

    with caplog.at_level(logging.ERROR):
        assert errno_of(open_files) == errno.EIO
    assert any(r.exc_info for r in caplog.records)  # logged with its traceback
    # a broken view node can't escape either
    ops.tree.nodes[ROOT_INODE].children = None  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        assert errno_of(ops.lookup, ROOT_INODE, b"ck", None) == errno.EIO  # _guard


@pytest.mark.expect_log(logging.ERROR, r"^cannot generate ck/files\.img: .*inetsk\.img: cannot open")
def test_missing_original_is_eio(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    ops = ops_for(tree, FakeRewrite())
    os.unlink(tree / "ck" / "inetsk.img")

    async def open_files() -> pyfuse3.FileInfo:
        attr = await lookup_path(ops, b"ck/files.img")
        return await ops.open(attr.st_ino, os.O_RDONLY, None)

    with caplog.at_level(logging.ERROR):
        assert errno_of(open_files) == errno.EIO
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_read_mode_serves_bytes(tree: Path) -> None:
    ops = ops_for(tree, FakeRewrite(), serve="read")
    data, fi = run(read_all, ops, b"ck/pages-1.img")
    assert data == (tree / "ck" / "pages-1.img").read_bytes()
    assert not fi.direct_io
    data, _ = run(read_all, ops, b"\xfe odd")
    assert data == b"odd bytes"
    assert not ops._handles  # released


def test_everything_that_writes_is_erofs(tree: Path) -> None:
    ops = ops_for(tree, FakeRewrite())
    ck = run(lookup_path, ops, b"ck").st_ino
    f = run(lookup_path, ops, b"ck/files.img").st_ino
    E = errno.EROFS
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert errno_of(ops.open, f, flags, None) == E
    assert errno_of(ops.setattr, f, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(),
                    None, None) == E
    assert errno_of(ops.mknod, ck, b"n", 0o644, 0, None) == E
    assert errno_of(ops.mkdir, ck, b"d", 0o755, None) == E
    assert errno_of(ops.unlink, ck, b"files.img", None) == E
    assert errno_of(ops.rmdir, ROOT_INODE, b"ck", None) == E
    assert errno_of(ops.symlink, ck, b"s", b"t", None) == E
    assert errno_of(ops.rename, ck, b"files.img", ck, b"x", 0, None) == E
    assert errno_of(ops.link, f, ck, b"l", None) == E
    assert errno_of(ops.write, 1, 0, b"x") == E
    assert errno_of(ops.create, ck, b"c", 0o644, os.O_WRONLY, None) == E
    assert errno_of(ops.setxattr, f, b"user.x", b"1", None) == E
    assert errno_of(ops.removexattr, f, b"user.x", None) == E
    assert errno_of(ops.access, f, os.W_OK, None) == E
    assert errno_of(ops.getxattr, f, b"user.x", None) == pyfuse3.ENOATTR
    assert run(ops.listxattr, f, None) == []
    assert errno_of(ops.open, ck, os.O_RDONLY, None) == errno.EISDIR
    assert errno_of(ops.read, 999, 0, 10) == errno.EBADF


def test_real_rewrite_group(tree: Path) -> None:
    """With the core's rewrite_checkpoint: the served bytes carry the mapped address."""
    sk = isk(1, "10.0.1.5", 8080)
    original = files_img(inet_file_entry(sk), reg_file_entry(2))
    (tree / "ck" / "files.img").write_bytes(original)
    (tree / "ck" / "inetsk.img").unlink()
    amap = AddressMap.from_args(["10.0.1.5=10.9.0.7"])
    gen = functools.partial(rewrite_checkpoint, amap=amap, resolve=None, options=RewriteOptions())
    ops = ops_for(tree, gen)
    data, _ = run(read_all, ops, b"ck/files.img")
    # the expected bytes built with pycriu's classes, not by the production rewrite
    assert data == files_img(inet_file_entry(isk(1, "10.9.0.7", 8080)), reg_file_entry(2))
    from test_mount import served_src
    assert served_src(data) == ["10.9.0.7"]
