import hashlib
import json
import logging
import os
import subprocess
import sys

import pytest

from overlayfs_inetsk.cli import main

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry

EXE = os.path.join(os.path.dirname(sys.executable), "overlayfs-inetsk")


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    (d / "files.img").write_bytes(files_img(
        reg_file_entry(1),
        inet_file_entry(isk(2, "10.0.1.5", 80)),
        inet_file_entry(isk(3, "fd00::5", 53, proto="udp")),
        inet_file_entry(isk(4, "127.0.0.1", 81)),
    ))
    (d / "pages-1.img").write_bytes(os.urandom(4096))
    (d / "inventory.img").write_bytes(b"inv")
    sub = d / "checkpoint-extra"
    sub.mkdir()
    (sub / "config.dump").write_text("{}")
    return d


def snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            st = os.lstat(p)
            out[p] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), st.st_mtime_ns)
    return out


def test_inspect_table(image_dir, capsys):
    assert main(["inspect", str(image_dir)]) == 0
    out = capsys.readouterr().out
    assert "10.0.1.5:80" in out and "[fd00::5]:53" in out and "127.0.0.1:81" in out
    assert "VERDICT" not in out
    assert out.strip().endswith("3 inet socket(s)")


def test_inspect_json_with_map(image_dir, capsys):
    assert main(["inspect", str(image_dir), "--json", "--map", "local=10.9.0.7"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == 1
    assert doc["files"] == ["files.img"]
    assert doc["summary"] == {"sockets": 3, "rewritten": 1, "closed": 0, "kept": 1,
                              "needs-address": 1, "refused": 0}
    s = {x["id"]: x for x in doc["sockets"]}
    assert set(s[2]) == {"file", "offset", "id", "ino", "family", "type", "proto", "state",
                         "class", "src", "src_port", "dst", "dst_port", "new_src", "new_dst",
                         "new_src_port", "new_dst_port", "verdict", "reason", "peer_nat"}
    assert (s[2]["proto"], s[2]["state"], s[2]["class"]) == ("tcp", "LISTEN", "listener")
    assert (s[2]["src"], s[2]["new_src"], s[2]["verdict"]) == ("10.0.1.5", "10.9.0.7", "rewritten")
    assert (s[3]["proto"], s[3]["family"], s[3]["verdict"]) == ("udp", "ipv6", "needs-address")
    assert s[4]["verdict"] == "kept"


def test_rewrite_writes_view_dir_and_never_touches_image(image_dir, tmp_path, capsys):
    before = snapshot(image_dir)
    out = tmp_path / "view"
    assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7",
                 "--map", "fd00::5=fd09::5"]) == 0
    # nothing needs attention: no rows, the summary and where the view is (docs/cli.md)
    assert capsys.readouterr().out == ("3 inet socket(s): 2 rewritten, 1 kept\n"
                                       f"view written to {out}\n")
    assert snapshot(image_dir) == before
    assert not os.path.islink(out / "files.img")
    assert (out / "files.img").read_bytes() != (image_dir / "files.img").read_bytes()
    for name in ("pages-1.img", "inventory.img", "checkpoint-extra/config.dump"):
        assert os.path.islink(out / name)
        assert os.readlink(out / name) == str((image_dir / name).resolve())
    assert (out / "checkpoint-extra").is_dir() and not os.path.islink(out / "checkpoint-extra")
    # inspecting the dir you will restore from: its links point at the image dir, outside
    # the dir inspected, so the tree leaves them out; inspect reads socket images only and
    # says nothing of them (DEBUG; the unexpected-log guard fails on any WARNING)
    assert main(["inspect", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    assert "10.9.0.7:80" in cap.out and "[fd09::5]:53" in cap.out and "127.0.0.1:81" in cap.out
    # they are still there for who asks (-v)
    assert main(["inspect", "-v", str(out)]) == 0
    left = sorted(ln.split(":")[0] for ln in capsys.readouterr().err.splitlines()
                  if ln.startswith("DEBUG left out "))
    assert left == ["DEBUG left out checkpoint-extra/config.dump", "DEBUG left out inventory.img",
                    "DEBUG left out pages-1.img"]
    # the view's files.img carries the new addresses
    assert main(["inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {x["src"] for x in doc["sockets"]} == {"10.9.0.7", "fd09::5", "127.0.0.1"}


def test_rewrite_table_lists_every_change(image_dir, tmp_path, capsys):
    out = tmp_path / "view"
    assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7",
                 "--map", "fd00::5=fd09::5", "--table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["FILE", "ID"]
    rows = {ln.split()[1]: ln for ln in lines[1:3]}
    assert set(rows) == {"2", "3"}  # only what changes is listed: not 127.0.0.1:81 (id 4)
    assert "10.9.0.7:80" in rows["2"] and "[fd09::5]:53" in rows["3"]
    assert lines[3:] == ["3 inet socket(s): 2 rewritten, 1 kept", f"view written to {out}"]


def test_rewrite_shows_the_sockets_needing_attention(image_dir, tmp_path, capsys, monkeypatch):
    """Without --table: a row for the needs-address socket (fd00::5: no rule covers it), none
    for the rewritten one; and the plan keeps no per-socket reports (what makes the default
    fast), with --table it does."""
    from overlayfs_inetsk import offline

    planned, write = [], offline.write_view_dir

    def spy(image_dir, out, tree, results):  # type: ignore[no-untyped-def]
        planned.append(results)  # what the planner made for the writer
        return write(image_dir, out, tree, results)

    monkeypatch.setattr(offline, "write_view_dir", spy)
    out = tmp_path / "view"
    assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["FILE", "ID"]
    assert lines[1].split()[:2] == ["files.img", "3"]
    assert "[fd00::5]:53" in lines[1] and "needs-address" in lines[1]
    assert lines[2:] == ["3 inet socket(s): 1 rewritten, 1 kept, 1 needs-address",
                         f"view written to {out}"]
    assert "10.9.0.7:80" not in "\n".join(lines)
    [res] = planned[0].values()
    assert res.reports == [] and [r.id for r in res.problems] == [3]
    assert main(["rewrite", str(image_dir), str(tmp_path / "v2"), "--map", "local=10.9.0.7",
                 "--table"]) == 0
    assert "10.9.0.7:80" in capsys.readouterr().out
    [res] = planned[1].values()
    assert sorted(r.id for r in res.reports) == [2, 3, 4]


@pytest.mark.expect_log(logging.WARNING, r"^left out elsewhere: symlink points outside")
def test_inspect_still_warns_of_a_left_out_dir(image_dir, tmp_path, capsys):
    """A directory left out may hold a checkpoint whose sockets inspect then does not show:
    that stays a WARNING; a plain file left out does not (DEBUG)."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    os.symlink(tmp_path / "other", image_dir / "elsewhere")
    os.symlink(tmp_path / "other" / "x", image_dir / "stray")
    assert main(["inspect", str(image_dir)]) == 0
    err = capsys.readouterr().err
    assert "left out elsewhere" in err and "stray" not in err


def test_rewrite_into_empty_dir_ok_nonempty_refused(image_dir, tmp_path, capsys):
    out = tmp_path / "view"
    out.mkdir()
    assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7"]) == 0
    assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7"]) == 1
    assert "must be new or empty" in capsys.readouterr().err


def test_rewrite_failure_leaves_no_out_dir(image_dir, tmp_path, capsys):
    out = tmp_path / "view"
    assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7", "--strict"]) == 5
    err = capsys.readouterr().err
    assert "needs-address" in err and "files.img" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".view")] == []


@pytest.mark.expect_log(logging.WARNING, r"^left out escape: symlink points outside")
def test_symlink_escaping_image_dir_left_out(image_dir, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.symlink(secret, image_dir / "escape")
    os.symlink("pages-1.img", image_dir / "alias")
    out = tmp_path / "view"
    assert main(["rewrite", str(image_dir), str(out)]) == 0
    assert not os.path.lexists(out / "escape")
    assert os.readlink(out / "alias") == str((image_dir / "pages-1.img").resolve())


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--map", "10.0.0.1=banana"], 3, "--map 10.0.0.1=banana"),
        (["--map-file", "/nonexistent.toml"], 3, "/nonexistent.toml"),
    ],
)
def test_user_errors_one_line_no_traceback(image_dir, args, code, fragment):
    p = subprocess.run([EXE, "inspect", str(image_dir), *args], capture_output=True, text=True)
    assert p.returncode == code
    assert p.stderr.count("\n") == 1 and fragment in p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_image_exit_4(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    (d / "files.img").write_bytes(files_img(b"\x08\x04\xff"))
    p = subprocess.run([EXE, "inspect", str(d)], capture_output=True, text=True)
    assert p.returncode == 4
    assert f"{d}/files.img: entry at offset 8: not a valid file_entry" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_image_dir_exit_1(tmp_path):
    p = subprocess.run([EXE, "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode == 1 and "cannot access image dir" in p.stderr


def test_socket_image_symlink_refused(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    real = tmp_path / "real.img"
    real.write_bytes(files_img())
    os.symlink(real, d / "files.img")
    p = subprocess.run([EXE, "inspect", str(d)], capture_output=True, text=True)
    assert p.returncode == 4 and "is a symlink" in p.stderr


# runs the CLI with `pycriu` (or another module) missing, as on an install that lacks it
_HIDE = """
import importlib.abc, runpy, sys
HIDE = sys.argv.pop(1)
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == HIDE or name.startswith(HIDE + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
sys.argv[0] = "overlayfs-inetsk"
runpy.run_module("overlayfs_inetsk.cli", run_name="__main__")
"""


@pytest.mark.parametrize("cmd", [["inspect"], ["rewrite", "--map", "local=10.9.0.7"]])
def test_missing_pycriu_is_one_line_naming_the_fix(image_dir, tmp_path, cmd):
    """inspect (its reports) and a rewrite that needs upb's pass (an entry the byte pass
    hands over: an unknown field in its tail) need pycriu."""
    if cmd[0] == "rewrite":
        odd = isk(9, "10.0.1.5", 82).SerializeToString() + b"\xaa\x06\x01z"
        with open(image_dir / "files.img", "ab") as f:
            f.write(len(odd).to_bytes(4, "little") + odd)
    argv = [cmd[0], str(image_dir), *([str(tmp_path / "out")] if cmd[0] == "rewrite" else []),
            *cmd[1:]]
    p = subprocess.run([sys.executable, "-c", _HIDE, "pycriu", *argv], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 69, p.stderr  # EX_UNAVAILABLE, docs/cli.md
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("overlayfs-inetsk: error: Python module pycriu is missing")
    assert "scripts/setup.sh" in p.stderr


def test_rewrite_of_protobuf_cs_layout_needs_no_pycriu(image_dir, tmp_path):
    """The byte pass (core/bytepass.py) rewrites what CRIU writes with no protobuf at all."""
    p = subprocess.run([sys.executable, "-c", _HIDE, "pycriu", "rewrite", str(image_dir),
                        str(tmp_path / "out"), "--map", "local=10.9.0.7"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "files.img").read_bytes() != (image_dir / "files.img").read_bytes()


def test_a_missing_module_of_our_own_is_still_a_bug(image_dir):
    p = subprocess.run([sys.executable, "-c", _HIDE, "overlayfs_inetsk.cli.render", "inspect",
                        str(image_dir)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 70 and "Traceback" in p.stderr


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_rewrite_keeps_the_originals_modes(image_dir, tmp_path, capsys, umask):
    """Issue 18: views were written 0644 (CRIU writes its images 0600). A socket image
    keeps its original's mode, a directory its original's without group/world write (plus
    the owner's rwx), whatever the umask."""
    sub = image_dir / "checkpoint-extra"
    (sub / "files.img").write_bytes((image_dir / "files.img").read_bytes())
    (image_dir / "files.img").chmod(0o600)
    (sub / "files.img").chmod(0o640)
    image_dir.chmod(0o750)
    sub.chmod(0o777)
    out = tmp_path / "view"
    old = os.umask(umask)
    try:
        assert main(["rewrite", str(image_dir), str(out), "--map", "local=10.9.0.7"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()

    def mode(p):
        return oct(os.lstat(p).st_mode & 0o7777)

    assert mode(out / "files.img") == oct(0o600)
    assert mode(out / "checkpoint-extra" / "files.img") == oct(0o640)
    assert mode(out) == oct(0o750)
    assert mode(out / "checkpoint-extra") == oct(0o755)  # never world-writable
    assert mode(out / ".overlayfs-inetsk-view") == oct(0o440)


@pytest.mark.parametrize("argv, command", [
    (["inspect", "IMG", "--mapp", "x"], "inspect"),
    (["restore", "IMG", "--netns", "/x", "--zz", "--", "-v4"], "restore"),
    (["plugin", "install", "--bogus"], "plugin install"),
])
def test_an_unknown_option_gets_its_commands_usage(argv, command, tmp_path, capsys):
    """A typo in an option is refused (exit 2) with the usage of the command it was given
    to, not the top level's (argparse's parse_args reports it from the top)."""
    argv = [str(tmp_path) if a == "IMG" else a for a in argv]
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: overlayfs-inetsk {command} "), err
    bad = " ".join(a for a in argv if a in ("--mapp", "x", "--zz", "--bogus"))
    assert err.rstrip().endswith(f"overlayfs-inetsk {command}: error: unrecognized arguments: "
                                 f"{bad}"), err
