"""The tree is free of pyflakes errors (unused imports and names, undefined names, ...) and
pycodestyle's error classes, and the product and the testbed type-check (mypy, strict), as
configured in pyproject.toml."""

import importlib.util
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


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (scripts/setup.sh installs it)")
def test_mypy_is_clean():
    """[tool.mypy] names the files (overlayfs_inetsk, testbed/inetsk_testbed) and the
    strictness; a stale `type: ignore` fails too. The cache is .mypy_cache in the tree
    (git ignores it): about 1.5 s cold, 0.1 s warm here."""
    cp = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
                        cwd=ROOT, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
