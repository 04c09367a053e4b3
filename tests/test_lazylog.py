"""lazylog.Logger: what logging.getLogger(name) would do with each record, without loading
logging for the records unconfigured logging drops (the plugin's CLI route)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from overlayfs_inetsk import lazylog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = r"""
import sys
from overlayfs_inetsk import lazylog
log = lazylog.getLogger("overlayfs_inetsk.probe")
log.debug("dropped %s", 1)
log.info("dropped %s", 2)
log.log(lazylog.INFO, "dropped %s", 3)
assert not log.isEnabledFor(lazylog.INFO)
print("before:", "logging" in sys.modules, flush=True)
log.warning("said %s", 4)
print("after:", "logging" in sys.modules, flush=True)
log.error("said %s", 5)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("said %s", 6)
"""


def test_records_below_warning_load_nothing_and_the_rest_go_where_logging_sends_them():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cp = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                        timeout=60, check=True)
    assert cp.stdout.splitlines() == ["before: False", "after: True"]
    err = cp.stderr.splitlines()
    assert err[:2] == ["said 4", "said 5"]  # logging's last resort handler, as unconfigured
    assert err[2] == "said 6" and "ZeroDivisionError: division by zero" in cp.stderr
    assert "dropped" not in cp.stderr


def test_once_logging_is_set_up_every_record_goes_to_its_logger(caplog, expect_log):
    expect_log(logging.WARNING, r"^w 3$")
    expect_log(logging.ERROR, r"^e 4$")
    log = lazylog.getLogger("overlayfs_inetsk.sample_lazy")
    caplog.set_level(logging.DEBUG, logger="overlayfs_inetsk.sample_lazy")
    assert log.isEnabledFor(lazylog.DEBUG)
    log.debug("d %d", 1)
    log.info("i %d", 2)
    log.log(lazylog.WARNING, "w %d", 3)
    log.error("e %d", 4)
    got = [(r.name, r.levelno, r.getMessage(), r.funcName) for r in caplog.records]
    assert got == [("overlayfs_inetsk.sample_lazy", level, msg, "test_once_logging_is_set_up_"
                    "every_record_goes_to_its_logger")
                   for level, msg in ((10, "d 1"), (20, "i 2"), (30, "w 3"), (40, "e 4"))]
    assert {r.filename for r in caplog.records} == {"test_lazylog.py"}  # the caller's line
    caplog.set_level(logging.WARNING, logger="overlayfs_inetsk.sample_lazy")
    assert not log.isEnabledFor(lazylog.INFO)


def test_its_levels_are_loggings():
    assert (lazylog.DEBUG, lazylog.INFO, lazylog.WARNING, lazylog.ERROR) == (
        logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
