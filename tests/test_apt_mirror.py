"""scripts/apt-mirror.sh: the deb-src entry for CRIU's source package takes its mirror from
the machine's own apt sources (deb822 and one-line formats); the project names no host."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "apt-mirror.sh"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def make_root(tmp_path: Path, files: dict[str, str], codename: str = "bookworm") -> Path:
    root = tmp_path / "root"
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'ID=debian\nVERSION_CODENAME={codename}\n')
    for name, text in files.items():
        (root / "etc/apt" / name).write_text(text)
    return root


def entry(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f'. "{SCRIPT}" && criu_src_entry "$1"', "-", str(root)],
                          capture_output=True, text=True, timeout=30)


def expected(uri: str) -> str:
    return (f"Types: deb-src\nURIs: {uri}\nSuites: sid\nComponents: main\n"
            f"Signed-By: {KEYRING}\n")


DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example.test/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.test/debian-security
Suites: bookworm-security
Components: main
"""

# a proxy in front of the archive (apt-cacher-ng style), an options block, a disabled
# entry before it, a third-party repo and the security archive around it
ONE_LINE = """\
# deb http://commented.example.test/debian bookworm main
deb-src http://src-only.example.test/debian bookworm main
deb [arch=amd64 signed-by=/etc/apt/keyrings/x.gpg] http://third.example.test/apt nodistro main
deb http://localhost:3142/security.example.test/debian-security bookworm-security main
deb [ arch=amd64 ] http://localhost:3142/deb.example.test/debian bookworm main contrib
"""


@pytest.mark.parametrize(("files", "uri"), [
    ({"sources.list.d/debian.sources": DEB822}, "http://mirror.example.test/debian"),
    ({"sources.list": ONE_LINE}, "http://localhost:3142/deb.example.test/debian"),
    # deb822 with a proxy URI, a disabled paragraph and a deb-src-only paragraph first
    ({"sources.list.d/a.sources":
      "Types: deb\nURIs: http://off.example.test/debian\nSuites: bookworm\nEnabled: no\n\n"
      "Types: deb-src\nURIs: http://src.example.test/debian\nSuites: bookworm\n\n"
      "types: deb deb-src\nuris: http://10.0.0.1:3142/debian http://second.example.test/x\n"
      "suites: bookworm\ncomponents: main\n",
      "sources.list.d/z.list": "deb http://later.example.test/debian bookworm main\n"},
     "http://10.0.0.1:3142/debian"),
    # sources.list comes before sources.list.d; an empty sources.list is fine
    ({"sources.list": "", "sources.list.d/debian.sources": DEB822},
     "http://mirror.example.test/debian"),
])
def test_entry_takes_the_machines_mirror(tmp_path, files, uri):
    cp = entry(make_root(tmp_path, files))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == expected(uri)


def test_no_mirror_for_this_release_is_one_clear_line(tmp_path):
    cp = entry(make_root(tmp_path, {"sources.list":
                                    "deb http://x.example.test/debian bullseye main\n"}))
    assert cp.returncode != 0 and cp.stdout == ""
    assert len(cp.stderr.strip().splitlines()) == 1
    assert "bookworm" in cp.stderr and "/etc/apt" in cp.stderr


def test_this_machines_sources_give_an_entry():
    cp = entry(Path("/"))
    assert cp.returncode == 0, cp.stderr
    assert re.fullmatch(r"Types: deb-src\nURIs: \S+\nSuites: sid\n.*", cp.stdout, re.S)


HOST = re.compile(r"[a-z][a-z0-9+.-]*://|\b(?:[a-z0-9-]+\.)+(?:org|com|net|io|de|test|local)\b",
                  re.I)


def test_scripts_and_dockerfile_name_no_host():
    files = sorted((ROOT / "scripts").iterdir()) + [ROOT / "Dockerfile"]
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
            for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
            if HOST.search(line)]
    assert hits == []


def test_dockerfile_writes_the_entry_from_the_script():
    text = (ROOT / "Dockerfile").read_text()
    assert "apt-mirror.sh" in text and "criu_src_entry" in text
