"""Malformed and hostile input: one clear error naming the file, the entry offset and what is
wrong; `inspect`/`rewrite` exit 4 with one line; a mount answers EIO, logs one line and
keeps serving. Also odd trees (symlink loops, escaping links, odd-byte names, FIFOs) and an
image dir that vanishes under a mount."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from pycriu.images import fdinfo_pb2

from inetsk_testbed.imagefactory import files_img, inet_file_entry, inetsk_img, isk, reg_file_entry
from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.cli import main
from overlayfs_inetsk.errors import ImageError
from overlayfs_inetsk.host.files import read_socket_image
from overlayfs_inetsk.core.plan import plan_checkpoint
from inetsk_testbed.mount import BIN, mounted
from overlayfs_inetsk.host.listing import build_tree

U32 = struct.Struct("=I")
MAP = AddressMap.from_args(["10.0.1.0/24=10.77.1.0/24", "fd00::/64=fd77::/64"])
MAP_ARGS = ["--map", "10.0.1.0/24=10.77.1.0/24", "--map", "fd00::/64=fd77::/64"]

GOOD_ENTRIES = [reg_file_entry(1), inet_file_entry(isk(2, "10.0.1.5", 80))]
GOOD = files_img(*GOOD_ENTRIES)
END = len(GOOD)  # offset of an entry appended to GOOD
LAST = 8 + 4 + len(GOOD_ENTRIES[0])  # offset of GOOD's last entry


def _fe(sk: object, id_: int | None = None) -> bytes:
    fid = sk.id if id_ is None else id_  # type: ignore[attr-defined]
    fe = fdinfo_pb2.file_entry(type=fdinfo_pb2.INETSK, id=fid)
    fe.isk.CopyFrom(sk)
    return fe.SerializePartialToString()


def _words(sk: object, src: list[int]) -> object:
    del sk.src_addr[:]  # type: ignore[attr-defined]
    sk.src_addr.extend(src)  # type: ignore[attr-defined]
    return sk


def _type_again(first: int) -> bytes:
    """An INETSK entry whose first field says another type: protobuf keeps the LAST value of
    a repeated scalar, so CRIU restores it as an inet socket (here one with a bad address,
    which only decoding it finds)."""
    sk = _words(isk(8, "10.0.1.5", 80), [])
    payload = _fe(sk)
    assert payload[:2] == b"\x08\x04"
    return files_img(reg_file_entry(1), bytes([0x08, first]) + payload[2:] + b"\x08\x04")


def _head(payload: bytes) -> bytes:
    return files_img(reg_file_entry(1), payload)


def _missing_required() -> bytes:
    sk = isk(7, "10.0.1.5", 80)
    sk.ClearField("type")
    return files_img(_fe(sk))


def _legacy_missing_required() -> bytes:
    sk = isk(7, "10.0.1.5", 80)
    sk.ClearField("state")
    return imagefile.encode(imagefile.INETSK_MAGIC, [sk.SerializePartialToString()])


# name, file name, bytes, words the message must hold, entry offset (None: the whole file)
CASES: list[tuple[str, str, bytes, str, int | None]] = [
    ("empty", "files.img", b"", "empty file", None),
    ("short-magic", "files.img", b"\x19\x43\x56", "shorter than the 8-byte image magic", None),
    ("not-criu-magic", "files.img", b"\0" * 8 + GOOD[8:], "not a CRIU image: magic 0x00000000",
     None),
    ("wrong-type-magic", "files.img", GOOD[:4] + U32.pack(imagefile.INETSK_MAGIC) + GOOD[8:],
     "wrong image type: magic 0x56443851, expected 0x56303138", None),
    ("inetsk-with-files-magic", "inetsk.img", GOOD, "wrong image type", None),
    ("truncated-entry", "files.img", GOOD[:-5], "runs past the end of the file", LAST),
    ("length-past-end", "files.img", GOOD + U32.pack(1000) + b"abc",
     "entry length 1000 runs past the end of the file (3 bytes left)", END),
    ("huge-length", "files.img", GOOD + U32.pack(0xFFFF_FFFF) + b"x" * 16,
     "entry length 4294967295 runs past the end", END),
    ("not-protobuf", "files.img", GOOD + U32.pack(5) + b"\xff" * 5, "not a valid file_entry",
     END),
    ("corrupt-isk", "files.img", GOOD + U32.pack(6) + b"\x08\x04\x22\x02\xff\xff",
     "not a valid file_entry", END),
    ("inetsk-not-protobuf", "inetsk.img", inetsk_img(isk(1, "10.0.1.5", 80)) + U32.pack(2)
     + b"\xff\xff", "not a valid inet_sk_entry", 8 + 4 + len(isk(1, "10.0.1.5", 80)
                                                            .SerializeToString())),
    ("v4-no-words", "files.img", files_img(_fe(_words(isk(3, "10.0.1.5", 80), []))),
     "inet socket id 3: src_addr: AF_INET address with no words", 8),
    ("v6-one-word", "files.img", files_img(_fe(_words(isk(4, "fd00::5", 80), [5]))),
     "inet socket id 4: src_addr: AF_INET6 address with 1 words, expected 4", 8),
    ("v6-five-words", "files.img", files_img(_fe(_words(isk(4, "fd00::5", 80), [1] * 5))),
     "AF_INET6 address with 5 words, expected 4", 8),
    ("family-address-mismatch", "files.img",
     files_img(_fe(isk(5, "10.0.1.5", 80, family=10))), "AF_INET6 address with 1 words", 8),
    ("unknown-family", "files.img", files_img(_fe(isk(5, "10.0.1.5", 80, family=99))),
     "inet socket id 5 has family 99, not AF_INET/AF_INET6", 8),
    ("id-mismatch", "files.img", files_img(_fe(isk(5, "10.0.1.5", 80), 6)),
     "file_entry.id 6 != isk.id 5", 8),
    ("inetsk-entry-without-isk", "files.img",
     files_img(fdinfo_pb2.file_entry(type=fdinfo_pb2.INETSK, id=9).SerializePartialToString()),
     "INETSK file_entry id 9 has no isk", 8),
    ("missing-required-field", "files.img", _missing_required(),
     "inet socket id 7: Message file_entry is missing required fields: isk.type", 8),
    # the fast path must not skip an entry it has not proven to be something else
    ("type-again-after-reg", "files.img", _type_again(fdinfo_pb2.REG),
     "inet socket id 8: src_addr: AF_INET address with no words", LAST),
    ("type-again-after-0", "files.img", _type_again(0),
     "inet socket id 8: src_addr: AF_INET address with no words", LAST),
    ("zero-length-entry", "files.img", _head(b""),
     "empty entry: CRIU rejects a file_entry without its required fields type and id", LAST),
    ("entry-without-id", "files.img", _head(b"\x08\x01"),
     "file_entry lacks required field id: CRIU would reject it", LAST),
    ("entry-without-type", "files.img", _head(b"\x10\x05"),
     "file_entry lacks required field type: CRIU would reject it", LAST),
    ("inetsk-missing-required-field", "inetsk.img", _legacy_missing_required(),
     "inet socket id 7: Message inet_sk_entry is missing required fields: state", 8),
    ("trailing-2-bytes", "files.img", GOOD + b"\x01\x02", "2 trailing bytes", END),
    ("trailing-garbage", "files.img", GOOD + b"garbage!", "runs past the end", END),
]
IDS = [c[0] for c in CASES]


def _expect(e: BaseException, path: str, words: str, offset: int | None) -> None:
    msg = str(e)
    assert "\n" not in msg
    where = path if offset is None else f"{path}: entry at offset {offset}"
    assert msg.startswith(where + ": "), (msg, where)
    assert words in msg, msg


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_core_raises_image_error(case: tuple[str, str, bytes, str, int | None]) -> None:
    _, name, data, words, offset = case
    path = f"/img/{name}"
    with pytest.raises(ImageError) as ei:
        plan_checkpoint({path: data}, MAP)
    assert ei.value.exit_code == 4 and ei.value.offset == offset
    _expect(ei.value, path, words, offset)


def test_huge_length_prefix_allocates_nothing_big() -> None:
    data = GOOD + U32.pack(0xFFFF_FFFF) + b"x" * 16
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ImageError):
            plan_checkpoint({"/img/files.img": data}, MAP)
        took = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # a 4 GiB length must not become a 4 GiB buffer
    assert took < 1.0


def _image_dir(tmp: Path, name: str, data: bytes) -> Path:
    d = tmp / "img"
    shutil.rmtree(d, ignore_errors=True)
    (d / "checkpoint").mkdir(parents=True)
    (d / "checkpoint" / name).write_bytes(data)
    (d / "pages-1.img").write_bytes(b"p" * 100)
    return d


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli_inspect_and_rewrite_one_line_exit_4(
        case: tuple[str, str, bytes, str, int | None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    what, name, data, words, offset = case
    d = _image_dir(tmp_path, name, data)
    path = str(d / "checkpoint" / name)
    argvs = [["inspect", str(d), *MAP_ARGS], ["inspect", str(d), "--json"],
             ["rewrite", str(d), str(tmp_path / "out"), *MAP_ARGS]]
    for argv in argvs:
        assert main(argv) == 4, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, (argv, err)
        prefix = "overlayfs-inetsk: error: "
        assert err.startswith(prefix)
        _expect(Exception(err[len(prefix):].rstrip("\n")), path, words, offset)
    assert not (tmp_path / "out").exists()  # rewrite leaves nothing behind


def test_cli_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    d = _image_dir(tmp_path, "files.img", GOOD + U32.pack(0xFFFF_FFFF))
    for cmd in (["inspect", str(d)], ["rewrite", str(d), str(tmp_path / "out"), *MAP_ARGS]):
        cp = subprocess.run([BIN, *cmd], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 4 and "Traceback" not in cp.stderr
        assert cp.stderr.count("\n") == 1 and f"offset {END}" in cp.stderr


def test_socket_image_that_is_a_symlink(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "img"
    d.mkdir()
    (d / "real.img").write_bytes(GOOD)
    os.symlink("real.img", d / "files.img")
    for argv in (["inspect", str(d)], ["rewrite", str(d), str(tmp_path / "out")]):
        assert main(argv) == 4
        err = capsys.readouterr().err
        assert err == (f"overlayfs-inetsk: error: {d}/files.img: socket image is a symlink; "
                       "refusing to follow it\n")
    # the view never follows one either, in the tree or out of it: it keeps the link
    # itself, which the mount's validation (and any open) refuses by name
    for target in ("real.img", "/etc/shadow"):
        os.unlink(d / "files.img")
        os.symlink(target, d / "files.img")
        node = build_tree(d).lookup(1, b"files.img")
        assert node is not None and node.real_path == os.fsencode(str(d / "files.img"))
        with pytest.raises(ImageError, match="socket image is a symlink; refusing to follow"):
            read_socket_image(os.fsdecode(node.real_path))


def _odd_tree(tmp_path: Path) -> Path:
    d = tmp_path / "odd"
    d.mkdir()
    (d / "files.img").write_bytes(GOOD)
    os.symlink("loop-b", d / "loop-a")
    os.symlink("loop-a", d / "loop-b")
    os.symlink(".", d / "self")
    os.symlink("..", d / "up")
    os.symlink("/etc/passwd", d / "escape")
    os.symlink("../../../../../../../../etc", d / "escape-rel")
    raw = os.fsencode(d)
    with open(os.path.join(raw, b"odd\xff\n name\x01"), "wb") as f:
        f.write(b"odd")
    os.mkdir(os.path.join(raw, b"dir\xfe"))
    with open(os.path.join(raw, b"dir\xfe", b"files.img"), "wb") as f:
        f.write(GOOD)
    os.mkfifo(d / "fifo")
    return d


@pytest.mark.expect_log(logging.WARNING, r"^left out (loop-a|loop-b|self|fifo|up|escape|"
                        r"escape-rel|checkpoint/up): ")
def test_symlink_loops_escapes_and_odd_names(
        tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    d = _odd_tree(tmp_path)
    assert main(["inspect", str(d), *MAP_ARGS]) == 0
    out = capsysbinary.readouterr().out
    assert out.strip().endswith(b"2 inet socket(s): 2 rewritten")
    assert b"\ndir\xfe/files.img " in out  # the name's own bytes, whatever the locale
    out_dir = tmp_path / "out"
    assert main(["rewrite", str(d), str(out_dir), *MAP_ARGS]) == 0
    capsysbinary.readouterr()
    names = set(os.listdir(os.fsencode(out_dir)))
    assert {b"files.img", b"odd\xff\n name\x01", b"dir\xfe"} <= names
    assert not names & {b"loop-a", b"loop-b", b"self", b"up", b"escape", b"escape-rel"}
    view = build_tree(d)
    shown = {n.name for n in view.children(1)}
    assert shown == {b"files.img", b"odd\xff\n name\x01", b"dir\xfe"}
    reasons = dict(view.left_out)
    assert reasons[b"loop-a"] == "symlink loops" and "outside" in reasons[b"escape"]
    assert "outside" in reasons[b"escape-rel"] and "outside" in reasons[b"up"]
    assert "not a regular file" in reasons[b"fifo"]


# -- through a real mount ----------------------------------------------------------------
def _error_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if " ERROR " in ln]


def _eio(fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as ei:
        fn()
    assert ei.value.errno == errno.EIO


@pytest.mark.root
@pytest.mark.fuse
def test_mount_eio_one_log_line_and_keeps_serving(tmp_path: Path) -> None:
    """Each hostile files.img, put in place after the mount validated the good one: the
    open gets EIO, the log one line naming the file, the offset and the fault; the daemon
    keeps serving, and once the file is good again the view serves it."""
    d = _image_dir(tmp_path, "files.img", GOOD)
    real = d / "checkpoint" / "files.img"
    log = tmp_path / "daemon.log"
    with mounted(d, tmp_path / "mnt", [*MAP_ARGS, "--log-file", str(log)]) as mp:
        served = Path(mp) / "checkpoint" / "files.img"
        for _, name, data, words, offset in CASES:
            if name != "files.img":
                continue
            real.write_bytes(data)
            before = len(_error_lines(log))
            _eio(served.read_bytes)
            lines = _error_lines(log)[before:]
            assert len(lines) == 1, lines
            msg = lines[0].split("cannot generate checkpoint/files.img: ", 1)[1]
            _expect(Exception(msg), str(real), words, offset)
            assert (Path(mp) / "pages-1.img").read_bytes() == b"p" * 100
        # a socket image swapped for a symlink, a FIFO (no hang), a directory
        for make, words in ((lambda: os.symlink("/etc/passwd", real), "is a symlink"),
                            (lambda: os.mkfifo(real), "is not a regular file"),
                            (lambda: os.mkdir(real), "is not a regular file")):
            if real.is_dir() and not real.is_symlink():
                real.rmdir()
            else:
                real.unlink()
            make()
            before = len(_error_lines(log))
            t0 = time.monotonic()
            _eio(served.read_bytes)
            assert time.monotonic() - t0 < 5
            [line] = _error_lines(log)[before:]
            assert f"{real}: socket image {words}" in line
        real.rmdir()
        real.write_bytes(GOOD)
        # GOOD with MAP applied, built with pycriu's classes (not by the production rewrite)
        assert served.read_bytes() == files_img(reg_file_entry(1),
                                                inet_file_entry(isk(2, "10.77.1.5", 80)))
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.root
@pytest.mark.fuse
def test_mount_refuses_hostile_image_before_mounting(tmp_path: Path) -> None:
    d = _image_dir(tmp_path, "files.img", GOOD + U32.pack(0xFFFF_FFFF))
    mp = tmp_path / "mnt"
    mp.mkdir()
    cp = subprocess.run([BIN, "mount", str(d), str(mp), *MAP_ARGS], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 4, cp.stderr
    assert cp.stderr.count("\n") == 1 and f"files.img: entry at offset {END}" in cp.stderr
    assert not os.path.ismount(mp)


@pytest.mark.root
@pytest.mark.fuse
def test_image_dir_vanishes_while_mounted(tmp_path: Path) -> None:
    d = _image_dir(tmp_path, "files.img", GOOD)
    log = tmp_path / "daemon.log"
    with mounted(d, tmp_path / "mnt", [*MAP_ARGS, "--log-file", str(log)]) as mp:
        m = Path(mp)
        shutil.rmtree(d)
        assert sorted(os.listdir(m)) == ["checkpoint", "pages-1.img"]  # the static table
        _eio((m / "checkpoint" / "files.img").read_bytes)
        [line] = _error_lines(log)
        assert "checkpoint/files.img" in line and "No such file or directory" in line
        with pytest.raises(FileNotFoundError):  # the symlink's target went with it
            (m / "pages-1.img").read_bytes()
        os.stat(m)  # still serving
    assert not os.path.ismount(tmp_path / "mnt")
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.root
@pytest.mark.fuse
def test_short_soak_is_flat() -> None:
    """The soak (inetsk_testbed.soak, bench/soak.py) in small (the full one: 200 cycles,
    10,000 opens): nothing left behind after each mount/read/umount cycle, no fd growth,
    daemon RSS flat over the opens."""
    cp = subprocess.run([sys.executable, "-m", "inetsk_testbed.soak", "--cycles", "8",
                         "--opens", "1000"],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "flat: nothing left behind" in cp.stdout and "LEAK" not in cp.stdout


def test_fields_in_any_order_are_read_as_criu_reads_them() -> None:
    """The fast path proves an entry is not an inet socket only for protobuf-c's layout;
    other layouts are decoded: a REG entry written id first is skipped, an INETSK entry
    written id first (or with its type after its socket) is planned."""
    reg = fdinfo_pb2.file_entry.FromString(reg_file_entry(1))
    reg_id_first = b"\x10\x01" + reg_file_entry(1).replace(b"\x10\x01", b"", 1)
    assert fdinfo_pb2.file_entry.FromString(reg_id_first) == reg
    sk = _fe(isk(2, "10.0.1.5", 80))
    inet_type_last = sk[2:] + b"\x08\x04"
    data = files_img(reg_id_first, inet_type_last, b"\x08\x01" + reg_file_entry(3)[2:] + b"\x10\x03")
    res = plan_checkpoint({"/img/files.img": data}, MAP)["/img/files.img"]
    assert [(r.id, r.verdict) for r in res.reports] == [(2, "rewritten")]
