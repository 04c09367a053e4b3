"""tests/conftest.py: a test fails on any WARNING or ERROR log record it did not declare
(`expect_log(level, pattern)` fixture or `@pytest.mark.expect_log(level, pattern)`), and a
declared one that never came fails too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import logging

import pytest

log = logging.getLogger("overlayfs_inetsk.sample")


def test_quiet():
    log.info("fine")
    log.debug("fine too")


def test_unexpected_warning():
    log.warning("disk on fire: %s", "sda")


def test_unexpected_error_from_another_logger():
    logging.getLogger("somelib").error("boom")


def test_expected_by_fixture(expect_log):
    expect_log(logging.WARNING, r"disk on fire: sd[a-z]")
    log.warning("disk on fire: %s", "sdb")


@pytest.mark.expect_log(logging.ERROR, "boom")
def test_expected_by_marker():
    log.error("boom here")


def test_level_must_match(expect_log):
    expect_log(logging.WARNING, "boom")
    log.error("boom")


def test_declared_but_never_logged(expect_log):
    expect_log(logging.WARNING, "never")
'''


def test_unexpected_logs_fail(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -ra\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    cp = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                         str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)
    out = cp.stdout
    assert cp.returncode == 1, out
    assert "7 passed, 4 errors" in out, out  # the errors are at teardown
    for name, text in [
        ("test_unexpected_warning", "unexpected log: WARNING overlayfs_inetsk.sample: "
                                    "disk on fire: sda"),
        ("test_unexpected_error_from_another_logger", "unexpected log: ERROR somelib: boom"),
        ("test_level_must_match", "unexpected log: ERROR overlayfs_inetsk.sample: boom"),
        ("test_declared_but_never_logged", "expected log never came: WARNING 'never'"),
    ]:
        assert f"ERROR test_sample.py::{name} - " in out, (name, out)
        assert text in out, (text, out)
