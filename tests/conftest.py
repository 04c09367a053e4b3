"""Marker gating: tests marked root / fuse / criu / podman skip, with a reason, where they cannot run.

Under CI=true a skip is a failure (CI has root, FUSE and CRIU: a skip there is a missing
install step): every skipped test, and every module skipped at collection, is reported as
failed with its skip reason. The only way out is `@pytest.mark.ci_may_skip("why")` on a test
whose skip is genuinely environmental, with the reason documented there (none today).

Every test fails on a WARNING or ERROR (or worse) log record it did not declare, from any
logger in this process: declare one with the `expect_log(level, pattern)` fixture or
`@pytest.mark.expect_log(level, pattern)` (pattern: a regex searched in the message; the
level must match exactly). A declared record that never came fails the test too.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

CRIU = "/usr/local/sbin/criu"


@functools.cache
def _missing(marker: str) -> str | None:
    if marker == "root":
        return None if os.geteuid() == 0 else "needs root (euid 0)"
    if marker == "fuse":
        if not os.path.exists("/dev/fuse"):
            return "needs /dev/fuse"
        return None if shutil.which("fusermount3") else "needs fusermount3 (package fuse3)"
    if marker == "criu":
        try:
            cp = subprocess.run([CRIU, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"needs {CRIU} (scripts/setup.sh builds it): {e}"
        if cp.returncode != 0:
            return f"{CRIU} --version failed: {cp.stderr.strip()[:200]}"
        return None if shutil.which("ip") else "needs ip (iproute2) for network namespaces"
    if marker == "podman":
        for prog, pkg in (("podman", "podman"), ("runc", "runc"), ("nsenter", "util-linux")):
            if not shutil.which(prog):
                return f"needs {prog} (package {pkg}; scripts/setup-containers.sh installs it)"
        return None
    return None


CI_MAY_SKIP = "ci_may_skip"


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{CI_MAY_SKIP}(reason): this test may skip under "
                            "CI=true (a documented, genuinely environmental skip)")
    config.addinivalue_line("markers", "expect_log(level, pattern): the test logs a "
                            "record of that level whose message matches the regex")


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        return reason.removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    allowed = item.get_closest_marker(CI_MAY_SKIP)
    if allowed is None:
        _fail_skip(report)
    elif isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        why = allowed.args[0] if allowed.args else allowed.kwargs.get("reason", "?")
        path, line, reason = report.longrepr
        report.longrepr = (path, line, f"{reason} (may skip under CI: {why})")


_skipped_modules = pytest.StashKey[list[str]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    """A module skipped at collection fails the run at its end (as a collection error it
    would stop every other test from running)."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if _ci() and report.skipped:
        collector.config.stash.setdefault(_skipped_modules, []).append(
            f"{report.nodeid} - skipped under CI=true: {_skip_reason(report.longrepr)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash.get(_skipped_modules, []) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    lines = config.stash.get(_skipped_modules, [])
    if lines:
        terminalreporter.section("modules skipped under CI=true (a failure)", red=True)
        for line in lines:
            terminalreporter.line(f"FAILED {line}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("root", "fuse", "criu", "podman"):
        if item.get_closest_marker(marker) is not None and (why := _missing(marker)):
            pytest.skip(f"[{marker}] {why}")


# ------------------------------------------------------------- unexpected log records
class _LogGuard(logging.Handler):
    """Collects every WARNING+ record; at the end, each must match a declared expectation
    and each expectation must have matched a record."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.expected: list[tuple[int, re.Pattern[str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def expect(self, level: int, pattern: str) -> None:
        self.expected.append((level, re.compile(pattern)))

    def problems(self) -> list[str]:
        out, met = [], set()
        for r in self.records:
            msg = r.getMessage()
            hits = [k for k, (lvl, pat) in enumerate(self.expected)
                    if r.levelno == lvl and pat.search(msg)]
            if hits:
                met.update(hits)
            else:
                out.append(f"unexpected log: {r.levelname} {r.name}: {msg}")
        out += [f"expected log never came: {logging.getLevelName(lvl)} {pat.pattern!r}"
                for k, (lvl, pat) in enumerate(self.expected) if k not in met]
        return out


@pytest.fixture(autouse=True)
def _log_guard(request: pytest.FixtureRequest) -> Iterator[_LogGuard]:
    guard = _LogGuard()
    for m in request.node.iter_markers("expect_log"):
        guard.expect(*m.args, **m.kwargs)
    root = logging.getLogger()
    root.addHandler(guard)
    try:
        yield guard
    finally:
        root.removeHandler(guard)
    if problems := guard.problems():
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def expect_log(_log_guard: _LogGuard):  # type: ignore[no-untyped-def]
    """expect_log(level, pattern): declare a WARNING/ERROR record this test logs."""
    return _log_guard.expect


@pytest.fixture(autouse=True, scope="session")
def _kept_mount_logs() -> Iterator[None]:
    """Mounts that fail keep their default log in /run/overlayfs-inetsk (fuse/daemon.py,
    worth reading then); the suite makes many on purpose. Remove the ones this session
    added when it ends, so runs do not pile them up."""
    run_dir = "/run/overlayfs-inetsk"

    def logs() -> set[str]:
        try:
            return {n for n in os.listdir(run_dir) if n.endswith(".log")}
        except OSError:
            return set()

    before = logs()
    yield
    for name in logs() - before:
        try:
            os.unlink(os.path.join(run_dir, name))
        except OSError:
            pass
