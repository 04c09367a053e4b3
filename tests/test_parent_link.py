"""Incremental dumps (issue 14): the `parent` link CRIU writes for `--prev-images-dir`
(`2/parent -> ../1`). Inside the mounted tree it is served as a relative link into the view
(so the parent's socket images are the rewritten ones too); pointing outside it, a view
(mount, rewrite) is refused naming the link: CRIU cannot restore the chain without it
("No parent for snapshot pagemap", late, in the restorer). Pre-dumps need memory
tracking, which these kernels lack: the chain is made by the test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from inetsk_testbed.mount import ismount, mounted, overlayfs_inetsk
from overlayfs_inetsk.cli import main
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.core.plan import plan_checkpoint
from overlayfs_inetsk.core.tree import Kind
from overlayfs_inetsk.host.listing import build_tree
from overlayfs_inetsk.planner.planner import check_parents
from overlayfs_inetsk.errors import TreeError

MAP = ["--map", "10.0.1.5=10.77.1.5"]
OLD = files_img(inet_file_entry(isk(1, "10.0.1.5", 80)))
NEW = plan_checkpoint({"files.img": OLD}, AddressMap.from_args([MAP[1]]))["files.img"].data


def _chain(tmp: Path) -> Path:
    """ckpt/1 (the parent dump) and ckpt/2 (dumped with --prev-images-dir ../1)."""
    ckpt = tmp / "ckpt"
    for d in ("1", "2"):
        (ckpt / d).mkdir(parents=True)
        (ckpt / d / "files.img").write_bytes(OLD)
        (ckpt / d / "pages-1.img").write_bytes(b"p" * 64)
    os.symlink("../1", ckpt / "2" / "parent")
    return ckpt


def test_tree_of_the_whole_chain_shows_parent_as_a_relative_link(tmp_path, caplog):
    tree = build_tree(_chain(tmp_path))
    d2 = tree.lookup(1, b"2")
    node = tree.lookup(d2.inode, b"parent")
    assert (node.kind, node.link_target) == (Kind.LINK, b"../1")
    assert tree.left_out == [] and not caplog.records
    check_parents(tree)  # nothing to refuse


def test_tree_of_one_dump_names_its_parent_link(tmp_path, caplog):
    tree = build_tree(_chain(tmp_path) / "2")
    assert [p for p, _ in tree.left_out] == [b"parent"]
    assert not caplog.records  # reported once, by what uses the tree (below)
    with pytest.raises(TreeError) as ei:
        check_parents(tree)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path}/ckpt/2/parent: the link to the previous dump "
                          f"(--prev-images-dir) points outside IMAGE_DIR ({tmp_path}/ckpt/1)")
    assert f"use the directory holding the whole chain ({tmp_path}/ckpt)" in msg


def test_rewrite_of_the_chain_keeps_the_link_and_rewrites_the_parent(tmp_path):
    out = tmp_path / "out"
    assert main(["rewrite", str(_chain(tmp_path)), str(out), *MAP]) == 0
    assert os.readlink(out / "2" / "parent") == "../1"
    assert (out / "2" / "parent" / "files.img").read_bytes() == NEW  # the view's, rewritten
    assert (out / "2" / "files.img").read_bytes() == NEW


def test_rewrite_of_one_dump_with_an_outside_parent_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["rewrite", str(_chain(tmp_path) / "2"), str(out), *MAP]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ckpt/2/parent: the link to the previous dump" in err
    assert not out.exists()


@pytest.mark.expect_log(logging.WARNING, r"ckpt/2/parent: the link to the previous dump")
def test_inspect_of_one_dump_still_works_with_one_warning(tmp_path, capsys, caplog):
    assert main(["inspect", str(_chain(tmp_path) / "2"), *MAP]) == 0
    assert "rewritten" in capsys.readouterr().out
    [rec] = caplog.records
    assert rec.levelname == "WARNING" and "ckpt/2/parent: the link to the previous dump" in (
        rec.getMessage())


@pytest.mark.root
@pytest.mark.fuse
def test_mount_serves_the_chain_and_refuses_one_dump(tmp_path):
    ckpt = _chain(tmp_path)
    with mounted(ckpt, tmp_path / "mnt", MAP) as mp:
        assert os.readlink(f"{mp}/2/parent") == "../1"
        assert Path(f"{mp}/2/parent/files.img").read_bytes() == NEW
        assert Path(f"{mp}/2/files.img").read_bytes() == NEW
        assert Path(f"{mp}/2/parent/pages-1.img").read_bytes() == b"p" * 64
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    try:
        cp = overlayfs_inetsk("mount", str(ckpt / "2"), str(mnt2), *MAP, check=False)
        assert cp.returncode == 1, cp
        assert cp.stderr.count("\n") == 1, cp.stderr
        assert "ckpt/2/parent: the link to the previous dump" in cp.stderr
        assert not ismount(mnt2)
    finally:
        if ismount(mnt2):  # a regression must not leave a mount behind
            overlayfs_inetsk("umount", str(mnt2), check=False)
