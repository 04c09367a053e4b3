"""tests/conftest.py: under CI=true a skipped test is a failed test (CI has root, FUSE and
CRIU: a skip there is a missing install step), with the skip's reason in the summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


def test_runs():
    pass


def test_skips():
    pytest.skip("no frobnicator installed")


@pytest.mark.skipif(True, reason="skipif says the widget is missing")
def test_skipif():
    pass


@pytest.mark.ci_may_skip("documented: needs a second NIC")
def test_may_skip():
    pytest.skip("no second NIC")


@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False
'''

MODULE_SKIP = '''
import pytest

pytest.skip("whole module: no gadget", allow_module_level=True)


def test_never():
    pass
'''


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_modskip.py").write_text(MODULE_SKIP)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -ra\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-q", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_skips_fail_under_ci(tmp_path):
    cp = run(tmp_path, "true")
    out = cp.stdout
    assert cp.returncode == 1, out
    assert "1 failed, 1 passed, 2 skipped, 1 xfailed, 1 error" in out, out
    assert "FAILED test_sample.py::test_skips - skipped under CI=true: no frobnicator installed" in out
    # a skip at setup (as the root/fuse/criu gating does) is an error
    assert "ERROR test_sample.py::test_skipif - skipped under CI=true: skipif says the widget is missing" in out
    assert "FAILED test_modskip.py - skipped under CI=true: whole module: no gadget" in out
    assert "documented: needs a second NIC" in out  # the opt-out's skip stays a skip


def test_skips_stay_skips_elsewhere(tmp_path):
    cp = run(tmp_path, None)
    assert cp.returncode == 0, cp.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in cp.stdout, cp.stdout
