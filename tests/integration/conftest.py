"""Fixtures for integration tests on real network namespaces and CRIU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from inetsk_testbed import TestNet, cleanup_stale


@pytest.fixture(scope="session", autouse=True)
def _stale_testnets() -> None:
    """Remove namespaces left by earlier testbed runs that crashed (owner process gone)."""
    if os.geteuid() == 0:
        cleanup_stale()


@pytest.fixture
def testnet() -> Iterator[TestNet]:
    """A fresh private test network; every process in it is killed and every namespace
    deleted at the end, whatever the test did."""
    with TestNet() as net:
        yield net


class ImageDirs(NamedTuple):
    images: Path  # criu dump -D (dump.log lands here too)
    work: Path  # a restore's -W (restore.log, restore.pid)
    root: Path  # tmp_path itself, for more

    def work_for(self, name: str) -> Path:
        """A separate work dir per restore (e.g. one per host)."""
        p = self.root / f"work-{name}"
        p.mkdir(exist_ok=True)
        return p


@pytest.fixture
def image_dirs(tmp_path: Path) -> ImageDirs:
    images = tmp_path / "images"
    work = tmp_path / "work"
    images.mkdir()
    work.mkdir()
    return ImageDirs(images, work, tmp_path)
