"""doctor: each check finds what is wrong and says how to fix it; the exit status says
whether the node is ready. Stand-in criu binaries (shell scripts via $CRIU) play the broken
cases; the real node plays the ready one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlayfs_inetsk.app.doctor import parse_criu_version, ready, render_text, run_checks

CLI = [sys.executable, "-m", "overlayfs_inetsk.cli"]
DEBIAN12_CRIU = """#!/bin/sh
case "$1" in
  --version) echo "Version: 3.17.1"; exit 0;;
  check) echo "Error (criu/vdso.c:203): vdso: Unexpected rt vDSO area bounds" >&2
         echo "Error (criu/cr-check.c:1581): Can't get vdso" >&2; exit 1;;
esac
exit 1
"""
GOOD_CRIU = """#!/bin/sh
case "$1" in
  --version) echo "Version: 4.2.1"; exit 0;;
  check) if [ "$2" = --all ]; then
           echo "Warn  (criu/cr-check.c:824): Dirty tracking is OFF." >&2; exit 1
         fi
         echo "Looks good."; exit 0;;
esac
exit 1
"""


def script(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    p.chmod(0o755)
    return str(p)


def by_name(checks):
    return {c.name: c for c in checks}


def test_version_parse():
    assert parse_criu_version("Version: 4.2.1\nGitID: x") == (4, 2, 1)
    assert parse_criu_version("Version: 3.17") == (3, 17)
    assert parse_criu_version("criu 4") is None


def test_debian12_criu_is_not_ready(tmp_path):
    env = dict(os.environ, CRIU=script(tmp_path, "criu", DEBIAN12_CRIU))
    c = by_name(run_checks(env=env, euid=0))
    assert c["criu-version"].status == "fail" and "3.17.1" in c["criu-version"].detail
    assert "scripts/setup.sh" in c["criu-version"].fix
    assert c["criu-check"].status == "fail"
    assert "vdso: Unexpected rt vDSO area bounds" in c["criu-check"].detail
    assert "criu/vdso.c" not in c["criu-check"].detail  # source positions dropped
    assert not ready(list(c.values()))


def test_good_criu_missing_features_only_warn(tmp_path):
    env = dict(os.environ, CRIU=script(tmp_path, "criu", GOOD_CRIU))
    c = by_name(run_checks(env=env, euid=0))
    assert c["criu-version"].status == "ok" and c["criu-check"].status == "ok"
    assert c["kernel-features"].status == "warn"
    assert "Dirty tracking is OFF" in c["kernel-features"].detail


def test_no_criu_and_no_tools_on_path(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"PATH": str(empty)}
    checks = run_checks(env=env, euid=0, dev_fuse=str(tmp_path / "fuse"))
    c = by_name(checks)
    if os.access("/usr/local/sbin/criu", os.X_OK):
        assert c["criu"].status == "ok"  # the fallback path, not on $PATH
    else:
        assert c["criu"].status == "fail" and c["criu-check"].status == "skip"
    for name, fix in (("fusermount3", "apt-get install fuse3"),
                      ("nsenter", "apt-get install util-linux"),
                      ("iptables-restore", "apt-get install iptables"),
                      ("dev-fuse", "modprobe fuse")):
        assert c[name].status == "fail", name
        assert fix in c[name].fix
    text = render_text(checks)
    assert "fix: modprobe fuse" in text
    assert text.rstrip().splitlines()[-1].startswith("not ready: ")


def test_criu_missing(tmp_path):
    env = {"PATH": str(tmp_path), "CRIU": str(tmp_path / "nope")}
    c = by_name(run_checks(env=env, euid=0))
    assert c["criu"].status == "fail" and "$CRIU" in c["criu"].detail
    assert {c[n].status for n in ("criu-version", "criu-check", "kernel-features")} == {"skip"}


def test_not_root(tmp_path):
    env = dict(os.environ, CRIU=script(tmp_path, "criu", GOOD_CRIU))
    c = by_name(run_checks(env=env, euid=1000))
    assert c["root"].status == "fail" and "run as root" in c["root"].fix
    assert c["criu-check"].status == "skip"


def test_cli_exit_status_and_json_when_not_ready(tmp_path):
    env = dict(os.environ, CRIU=script(tmp_path, "criu", DEBIAN12_CRIU))
    cp = subprocess.run([*CLI, "doctor", "--json"], capture_output=True, text=True, env=env,
                        timeout=60)
    assert cp.returncode == 1, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["schema"] == 1 and doc["ready"] is False
    failed = {c["name"] for c in doc["checks"] if c["status"] == "fail"}
    assert {"criu-version", "criu-check"} <= failed


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.criu
def test_this_node_is_ready():
    cp = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.rstrip().splitlines()[-1] == "ready"
    assert "OK    criu-check" in cp.stdout
