"""core.tree.ImageTree: the static tree model, no FUSE."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from overlayfs_inetsk.errors import ImageError
from overlayfs_inetsk.host.files import read_socket_image

from overlayfs_inetsk.core.tree import ROOT_INODE, UNREAD, ImageTree, Kind
from overlayfs_inetsk.host.listing import build_tree
from overlayfs_inetsk.errors import TreeError

ODD = b"odd \xff\x01name"


# what the `tree` fixture holds that a view leaves out, each logged as a WARNING
TREE_LEFT_OUT = r"^left out (fifo|link-dangling|link-out|loop-a|loop-b|checkpoint/up): "


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """An extracted Podman-style checkpoint: checkpoint/ with CRIU images beside other
    files, plus a flat socket image at the top and symlinks of every kind."""
    root = tmp_path / "img"
    (root / "checkpoint").mkdir(parents=True)
    (root / "checkpoint" / "files.img").write_bytes(b"F" * 10)
    (root / "checkpoint" / "inetsk.img").write_bytes(b"I" * 5)
    (root / "checkpoint" / "pages-1.img").write_bytes(b"P" * 100)
    (root / "spec.dump").write_bytes(b"{}")
    (root / "files.img").write_bytes(b"top")
    (root / "empty").mkdir()
    rb = os.fsencode(root)
    with open(os.path.join(rb, ODD), "wb") as f:
        f.write(b"odd")
    os.symlink("checkpoint/pages-1.img", root / "link-in")
    os.symlink("/etc/hostname", root / "link-out")
    os.symlink("nowhere", root / "link-dangling")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("checkpoint", root / "dirlink")
    os.symlink("..", root / "checkpoint" / "up")
    os.symlink("../spec.dump", root / "checkpoint" / "files-link.img")
    os.mkfifo(root / "fifo")
    return root


def by_path(view: ImageTree) -> dict[bytes, int]:
    return {view.path(i): i for i in view.nodes}


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
def test_tree_kinds_and_groups(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        view = build_tree(str(tree))
    real = os.fsencode(os.path.realpath(tree))
    assert view.image_dir == real
    paths = by_path(view)
    node = view.node
    assert node(ROOT_INODE).kind is Kind.DIR
    assert node(paths[b"checkpoint"]).kind is Kind.DIR
    assert node(paths[b"empty"]).kind is Kind.DIR
    assert node(paths[b"checkpoint/files.img"]).kind is Kind.SOCKET_IMAGE
    assert node(paths[b"checkpoint/inetsk.img"]).kind is Kind.SOCKET_IMAGE
    assert node(paths[b"files.img"]).kind is Kind.SOCKET_IMAGE
    # every other file: a symlink to the original's absolute real path
    pages = node(paths[b"checkpoint/pages-1.img"])
    assert pages.kind is Kind.LINK
    assert pages.link_target == real + b"/checkpoint/pages-1.img"
    assert node(paths[b"spec.dump"]).link_target == real + b"/spec.dump"
    assert node(paths[ODD]).link_target == real + b"/" + ODD
    # in-tree symlinks point at the resolved real path; named like a socket image or not
    assert node(paths[b"link-in"]).link_target == real + b"/checkpoint/pages-1.img"
    assert node(paths[b"checkpoint/files-link.img"]).link_target == real + b"/spec.dump"
    # a directory symlink stays inside the view (its socket images are rewritten there)
    assert node(paths[b"dirlink"]).kind is Kind.LINK
    assert node(paths[b"dirlink"]).link_target == b"checkpoint"
    # left out, one WARNING each
    for name in (b"link-out", b"link-dangling", b"loop-a", b"loop-b", b"fifo",
                 b"checkpoint/up"):
        assert name not in paths, name
    left = dict(view.left_out)
    assert "outside" in left[b"link-out"]
    assert "dangling" in left[b"link-dangling"]
    assert "loops" in left[b"loop-a"] and "loops" in left[b"loop-b"]
    assert "loops" in left[b"checkpoint/up"]
    assert "regular" in left[b"fifo"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(left) == 6
    # groups: every socket image of one directory together, name -> original
    groups = {view.path(d): dict(g) for d, g in view.iter_socket_groups()}
    assert groups == {
        b"checkpoint": {"files.img": real + b"/checkpoint/files.img",
                        "inetsk.img": real + b"/checkpoint/inetsk.img"},
        b".": {"files.img": real + b"/files.img"},
    }


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
def test_lookup_children_and_modes(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    view = build_tree(os.fsencode(tree))
    ck = view.lookup(ROOT_INODE, b"checkpoint")
    assert ck is not None and ck.kind is Kind.DIR
    assert view.lookup(ck.inode, b".") is ck
    assert view.lookup(ck.inode, b"..") is view.root
    assert view.lookup(ROOT_INODE, b"..") is view.root
    assert view.lookup(ROOT_INODE, b"missing") is None
    assert view.lookup(999999, b"x") is None
    odd = view.lookup(ROOT_INODE, ODD)
    assert odd is not None and odd.name == ODD
    names = [n.name for n in view.children(ROOT_INODE)]
    assert names == sorted(names)
    assert names == sorted([b"checkpoint", b"dirlink", b"empty", b"files.img", b"link-in",
                            ODD, b"spec.dump"])
    assert view.children(ck.inode)[0].parent == ck.inode
    # no write bits anywhere; symlinks 0777 with their target's length as size
    for n in view.nodes.values():
        assert n.mode & 0o222 == 0 or n.kind is Kind.LINK
    fimg = view.lookup(ck.inode, b"files.img")
    assert fimg is not None
    assert stat.S_ISREG(fimg.mode) and fimg.size == 10
    link = view.lookup(ROOT_INODE, b"spec.dump")
    assert link is not None
    assert stat.S_ISLNK(link.mode) and link.size == len(link.link_target or b"")
    assert stat.S_ISDIR(ck.mode)
    assert view.display(fimg.inode) == "checkpoint/files.img"
    assert view.path(ROOT_INODE) == b"."


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
def test_serve_read_mode(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    view = build_tree(str(tree), serve="read")
    paths = by_path(view)
    real = os.fsencode(os.path.realpath(tree))
    pages = view.node(paths[b"checkpoint/pages-1.img"])
    assert pages.kind is Kind.FILE and pages.real_path == real + b"/checkpoint/pages-1.img"
    assert view.node(paths[b"link-in"]).kind is Kind.FILE
    assert view.node(paths[b"link-in"]).real_path == pages.real_path
    assert view.node(paths[b"checkpoint/files.img"]).kind is Kind.SOCKET_IMAGE
    assert view.node(paths[b"dirlink"]).kind is Kind.LINK  # still inside the view


def test_socket_image_symlink_in_tree(tmp_path: Path) -> None:
    """files.img that is a symlink (even inside the tree) is kept as the link itself, so
    reading it is refused by name, as inspect and rewrite refuse it."""
    root = tmp_path / "img"
    (root / "store").mkdir(parents=True)
    (root / "ck").mkdir()
    (root / "store" / "orig").write_bytes(b"x")
    os.symlink("../store/orig", root / "ck" / "files.img")
    view = build_tree(root)
    ck = view.lookup(ROOT_INODE, b"ck")
    assert ck is not None
    f = view.lookup(ck.inode, b"files.img")
    assert f is not None and f.kind is Kind.SOCKET_IMAGE
    link = os.fsencode(str(root / "ck" / "files.img"))
    assert dict(view.socket_group(ck.inode)) == {"files.img": link}
    with pytest.raises(ImageError, match="socket image is a symlink; refusing to follow it"):
        read_socket_image(os.fsdecode(link))


def test_image_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(TreeError, match="No such file"):
        build_tree(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(TreeError, match="not a directory"):
        build_tree(tmp_path / "file")
    with pytest.raises(TreeError, match="serve mode"):
        build_tree(tmp_path, serve="copy")  # type: ignore[arg-type]


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
def test_root_through_symlink_and_inodes_stable(tree: Path, tmp_path: Path) -> None:
    os.symlink(tree, tmp_path / "alias")
    a = build_tree(tmp_path / "alias")
    b = build_tree(tree)
    assert a.image_dir == b.image_dir
    assert by_path(a) == by_path(b)  # same walk, same inode numbers


def _shown(view: ImageTree) -> dict[bytes, tuple[Kind, bytes | None, bytes]]:
    return {view.path(i): (n.kind, n.link_target, n.real_path) for i, n in view.nodes.items()}


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
def test_a_tree_without_attributes_shows_the_same_and_stats_no_plain_file(tree: Path) -> None:
    """attrs=False (a view written as links: rewrite, the plugin): the same nodes, inodes,
    links and left-out entries; a plain file's stat is UNREAD (not lstat()ed), everything
    else, which the writer or the checks read, is stat'ed as before."""
    full = build_tree(tree)
    bare = build_tree(tree, attrs=False)
    assert full.attrs and not bare.attrs
    assert _shown(bare) == _shown(full) and by_path(bare) == by_path(full)
    assert bare.left_out == full.left_out
    paths = by_path(bare)
    for p in (b"spec.dump", b"checkpoint/pages-1.img", ODD):
        assert bare.node(paths[p]).st is UNREAD
        assert full.node(paths[p]).st == os.stat(os.path.join(os.fsencode(tree), p))
    # a symlink's target, a directory, a socket image: their stat is read either way
    for p in (b"link-in", b"checkpoint", b"checkpoint/files.img", b"files.img"):
        assert bare.node(paths[p]).st is not UNREAD
        assert bare.node(paths[p]).st == full.node(paths[p]).st, p
    # a tree served through read() always has the attributes
    assert build_tree(tree, serve="read", attrs=False).attrs


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
def test_only_a_mount_stats_plain_files(tree: Path) -> None:
    from overlayfs_inetsk.core.addrmap import AddressMap
    from overlayfs_inetsk.planner.planner import Planner

    planner = Planner(AddressMap.from_args(["10.0.1.5=10.9.0.7"]))
    for purpose in ("mount", "rewrite", "plugin", "inspect", "restore"):
        view = planner.tree(str(tree), purpose)
        spec = view.node(by_path(view)[b"spec.dump"])
        assert view.attrs is (purpose == "mount"), purpose
        assert (spec.st is UNREAD) is (purpose != "mount"), purpose


@pytest.mark.expect_log(logging.WARNING, TREE_LEFT_OUT)
@pytest.mark.parametrize("link_root,link_from", [
    (None, "/srv/views/b"),  # the plugin: relative to OUT_DIR
    ("/run/oi/ro/x", "/mnt/view"),  # a mount: into the read-only bind, from the mountpoint
    ("/run/oi/ro/x/", "/mnt/../mnt/view/"),  # the same, not normalized
    ("/run/oi/ro/x", "/run/oi/ro/x/inside"),  # the view seen from inside the link root
    ("/run/oi/ro/x", "/run/oi/ro/x"),  # ... at the link root itself
    ("/", "/"),
    ("/run/oi/ro/x", None),  # absolute, re-rooted
])
def test_file_links_are_what_relpath_makes_from_their_own_dir(
        tree: Path, link_root: str | None, link_from: str | None) -> None:
    """The links are made once a directory (a prefix and the file's path below IMAGE_DIR),
    not by os.path.relpath for each file: the same targets, in every directory."""
    for attrs in (True, False):
        view = build_tree(tree, link_root=link_root, link_from=link_from, attrs=attrs)
        real = view.image_dir
        root = os.fsencode(link_root) if link_root else real
        checked = 0
        for ino, n in view.nodes.items():
            if n.kind is not Kind.LINK or n.name in (b"dirlink",):
                continue
            target = os.path.join(root, os.path.relpath(n.real_path, real))
            if link_from is not None:
                here = os.path.normpath(os.path.join(os.fsencode(link_from),
                                                     view.path(n.parent)))
                target = os.path.relpath(target, here)
            assert n.link_target == target, (view.path(ino), link_root, link_from)
            checked += 1
        assert checked == 5  # spec.dump, ODD, link-in, pages-1.img, files-link.img
