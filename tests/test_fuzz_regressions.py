"""Replays of the fuzz corpus, and the time-boxed fuzz run itself (marker `fuzz`).

tests/fuzz_corpus/seeds/   seeds: a files.img from a real CRIU dump (testbed service)
tests/fuzz_corpus/crashes/ inputs that once crashed the codec or rewrite, kept for good

The fuzz run lasts FUZZ_SECONDS (default 60 s when CI=true, else 10 s) and prints the
number of inputs it tried to the real stderr (visible in CI logs without -s).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fuzz_rewrite import CORPUS, MAPS, OPTIONS, run_one
from fuzz_rewrite import run_budget
from overlayfs_inetsk.errors import ImageError
from overlayfs_inetsk.core.plan import plan_checkpoint

CRASHES = sorted((CORPUS / "crashes").glob("*"))
ALL = sorted(p for p in CORPUS.rglob("*") if p.is_file())


def _kind(p: Path) -> str:
    return "inetsk.img" if "inetsk" in p.name else "files.img"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_corpus_input_keeps_the_properties(path: Path) -> None:
    data = path.read_bytes()
    for map_i, opt_i in itertools.product(range(len(MAPS)), range(len(OPTIONS))):
        run_one(_kind(path), data, map_i, opt_i)


def test_there_are_crash_regressions() -> None:
    assert CRASHES, "tests/fuzz_corpus/crashes/ is empty"


@pytest.mark.parametrize("path", CRASHES, ids=lambda p: p.name)
def test_crash_is_an_image_error_naming_file_and_offset(path: Path) -> None:
    """These once raised protobuf's EncodeError (an inet socket entry lacking proto2
    required fields decodes, then fails to re-serialize once its address changed)."""
    name = f"/x/{_kind(path)}"
    with pytest.raises(ImageError) as ei:
        plan_checkpoint({name: path.read_bytes()}, MAPS[0])
    e = ei.value
    assert e.path == name and e.offset is not None and e.offset >= 8
    assert "missing required fields" in str(e) and "\n" not in str(e)


@pytest.mark.fuzz
def test_fuzz_rewrite(capsys: pytest.CaptureFixture[str]) -> None:
    line = run_budget()
    with capsys.disabled():  # straight to the terminal / CI log, whatever -s says
        print(f"\n{line}")
