"""The tree is free of pyflakes errors (unused imports and names, undefined names, ...) and
pycodestyle's error classes, as configured in pyproject.toml."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (scripts/setup.sh installs it)")
def test_ruff_check_is_clean():
    cp = subprocess.run([RUFF, "check", "overlayfs_inetsk", "tests", "bench", "testbed"], cwd=ROOT,
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
