"""logsetup: levels from -v/-q (before and after COMMAND), terminal vs journald format, and
the per-socket DEBUG decision lines of the rewrite."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk
from overlayfs_inetsk import logsetup
from overlayfs_inetsk.core.addrmap import AddressMap
from overlayfs_inetsk.cli import make_parser
from overlayfs_inetsk.core.plan import plan_checkpoint


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("argv, level", [
    (["inspect", "x"], logging.INFO),
    (["-v", "inspect", "x"], logging.DEBUG),
    (["inspect", "x", "-v"], logging.DEBUG),
    (["-q", "inspect", "x"], logging.WARNING),
    (["doctor", "--quiet"], logging.WARNING),
    (["restore", "img", "-v", "--", "-v0"], logging.DEBUG),
    (["mount", "a", "b", "-v"], logging.DEBUG),  # mount's own -v
])
def test_levels_from_the_command_line(argv, level):
    args = make_parser().parse_args(argv)
    logsetup.setup_from_args(args)
    assert logging.getLogger().level == level


def test_global_verbose_reaches_the_mount_daemon():
    args = make_parser().parse_args(["-v", "mount", "a", "b"])
    logsetup.setup_from_args(args)
    assert args.verbose is True  # MountConfig.verbose: the daemon logs debug too


def test_restore_keeps_criu_options_after_dash_dash():
    args = make_parser().parse_args(["restore", "img", "--netns", "/n", "--", "-d", "-v4", "--",
                                     "x"])
    assert args.criu_args == ["-d", "-v4", "--", "x"] and args.image_dir == "img"
    assert args.verbosity == 0  # criu's -v4 is not ours


def test_terminal_format_is_level_then_message():
    buf = io.StringIO()
    logsetup.setup(0, stream=buf, env={})
    logging.getLogger("overlayfs_inetsk.x").info("hello %s", "there")
    logging.getLogger("overlayfs_inetsk.x").debug("hidden")
    assert buf.getvalue() == "INFO hello there\n"


@pytest.mark.expect_log(logging.WARNING, "^two\nlines$")
@pytest.mark.expect_log(logging.ERROR, "^e$")
def test_journal_format_when_stderr_is_the_journal_stream():
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        logsetup.setup(1, stream=f, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log = logging.getLogger("overlayfs_inetsk.x")
        log.debug("d")
        log.info("i")
        log.warning("two\nlines")
        log.error("e")
        f.seek(0)
        assert f.read() == "<7>d\n<6>i\n<4>two\n<4>lines\n<3>e\n"
        # another stream's JOURNAL_STREAM (inherited by a child with other stderr): plain
        buf = io.StringIO()
        assert not logsetup.stream_is_journal(buf, {"JOURNAL_STREAM": "1:2"})
        logsetup.setup(0, stream=open(os.devnull, "w"),
                       env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        h = logging.getLogger().handlers[-1]
        assert not isinstance(h.formatter, logsetup.JournalFormatter)


def test_setup_twice_keeps_one_handler():
    logsetup.setup(0, stream=io.StringIO())
    logsetup.setup(0, stream=io.StringIO())
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "overlayfs-inetsk-cli"]
    assert len(ours) == 1


def test_one_debug_line_per_socket_decision(caplog):
    data = files_img(inet_file_entry(isk(1, "10.77.0.1", 80)),
                     inet_file_entry(isk(2, "10.77.0.1", 81)),
                     inet_file_entry(isk(3, "127.0.0.1", 82)))
    amap = AddressMap.from_args(["10.77.0.1=10.77.0.2"])
    with caplog.at_level(logging.INFO, logger="overlayfs_inetsk.core.decide"):
        plan_checkpoint({"files.img": data}, amap)
    assert caplog.records == []  # nothing below DEBUG
    with caplog.at_level(logging.DEBUG, logger="overlayfs_inetsk.core.decide"):
        plan_checkpoint({"files.img": data}, amap)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "socket id 1 tcp4 LISTEN 10.77.0.1:80" in lines[0]
    assert "rewritten => 10.77.0.2:80" in lines[0] and "(src by --map 10.77.0.1=10.77.0.2)" in lines[0]
    assert "socket id 2" in lines[1] and "10.77.0.2:81" in lines[1]
    assert "socket id 3" in lines[2] and ": kept (" in lines[2]


def test_cli_verbose_prints_decisions_to_stderr(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "files.img").write_bytes(files_img(inet_file_entry(isk(1, "10.77.0.1", 80))))
    cmd = [sys.executable, "-m", "overlayfs_inetsk.cli"]
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    cp = subprocess.run([*cmd, "-v", "inspect", str(img), "--map", "local=10.77.0.2"],
                        capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr.startswith("DEBUG ") and "socket id 1 tcp4 LISTEN" in cp.stderr
    cp = subprocess.run([*cmd, "inspect", str(img), "--map", "local=10.77.0.2"],
                        capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0 and cp.stderr == ""


def test_cli_error_line_carries_err_priority_on_the_journal(tmp_path):
    """The one-line error of a failed command (e.g. a --foreground mount refused under
    systemd) is priority 3 on the journal, plain on a terminal or file."""
    with open(tmp_path / "journal", "w+") as journal:
        st = os.fstat(journal.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        cp = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "inspect",
                             str(tmp_path / "nope")], stderr=journal, stdout=subprocess.PIPE,
                            env=env, timeout=60)
        journal.seek(0)
        text = journal.read()
    assert cp.returncode != 0
    assert text.startswith("<3>overlayfs-inetsk: error: ") and text.count("\n") == 1, text
    cp2 = subprocess.run([sys.executable, "-m", "overlayfs_inetsk.cli", "inspect",
                          str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert cp2.stderr == text[3:]
