"""A directory that is not a CRIU image dir, as a user gives one by mistake (a server's config
dir, the parent of the image dir, an empty dir): every command that reads IMAGE_DIR refuses it
with one line naming it, exit 1 (as `restore` always did), and writes nothing. Before, inspect,
rewrite, mount and nat-rules said "0 inet socket(s)" and exited 0 (rewrite wrote a view of the
config dir, mount mounted it): a typo went unnoticed until criu failed on the node."""

import os
import subprocess
import sys

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk

EXE = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(params=["config-dir", "empty"])
def not_an_image(request, tmp_path):
    d = tmp_path / "nginx"
    d.mkdir()
    if request.param == "config-dir":  # what `ls` of a server's config dir shows
        (d / "nginx.conf").write_text("daemon off;\n")
        (d / "logs").mkdir()
    return d


@pytest.mark.parametrize("cmd", [
    ["inspect"], ["inspect", "--json"], ["inspect", "--map", "local=10.77.0.2"],
    ["nat-rules", "--map", "local=10.77.0.2"],
])
def test_reading_commands_refuse_a_dir_that_is_no_image(not_an_image, cmd):
    p = run(cmd[0], str(not_an_image), *cmd[1:])
    assert p.returncode == 1, p
    assert p.stdout == ""
    assert p.stderr == (f"overlayfs-inetsk: error: {not_an_image}: not a CRIU image dir "
                        "(no inventory.img, files.img or inetsk.img in it or below it)\n")


def test_rewrite_refuses_it_and_writes_nothing(not_an_image, tmp_path):
    before = sorted(os.listdir(tmp_path))
    p = run("rewrite", str(not_an_image), str(tmp_path / "out"), "--map", "local=10.77.0.2")
    assert p.returncode == 1, p
    assert p.stderr.count("\n") == 1 and "not a CRIU image dir" in p.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no OUT_DIR, no temporary beside it


def test_mount_refuses_it_before_mounting(not_an_image, tmp_path):
    mp = tmp_path / "view"
    mp.mkdir()
    mounted = False
    try:
        p = run("mount", str(not_an_image), str(mp), "--map", "local=10.77.0.2")
    finally:  # the code before mounted it: never leave that behind
        with open("/proc/self/mountinfo") as f:
            mounted = f" {mp} " in f.read()
        if mounted:
            run("umount", str(mp))
    assert not mounted
    assert p.returncode == 1, p
    assert p.stderr.count("\n") == 1 and "not a CRIU image dir" in p.stderr


def test_an_image_without_sockets_is_still_one(tmp_path):
    """inventory.img alone (a dump of a process without inet sockets): inspected as before,
    and rewrite's summary has no dangling ': '."""
    d = tmp_path / "img"
    d.mkdir()
    (d / "inventory.img").write_bytes(b"inv")
    p = run("inspect", str(d))
    assert (p.returncode, p.stdout) == (0, "0 inet socket(s)\n"), p
    p = run("rewrite", str(d), str(tmp_path / "out"), "--map", "local=10.77.0.2")
    assert p.returncode == 0, p
    assert p.stdout.splitlines()[0] == "0 inet socket(s)"


def test_socket_images_below_the_dir_make_it_one(tmp_path):
    """A tree of checkpoints (files.img one level down, no inventory.img at the top) is an
    image dir, as the view has always shown it."""
    d = tmp_path / "tree"
    (d / "web").mkdir(parents=True)
    (d / "web" / "files.img").write_bytes(files_img(inet_file_entry(isk(2, "10.0.1.5", 80))))
    p = run("inspect", str(d))
    assert p.returncode == 0 and "web/files.img" in p.stdout, p
