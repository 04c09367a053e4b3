"""The layout stays what docs/design.md says: a pure core, no import cycle, and every long
module says at its top why it is long."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "overlayfs_inetsk"
FORBIDDEN_IN_CORE = ("pyfuse3", "trio", "pyroute2", "ctypes", "subprocess")
NETLINK = "overlayfs_inetsk.host.rtnl"  # the netlink reader: adapters only, never core
DROPPED = ("pyroute2",)  # no longer dependencies: no module may import them
MAX_LINES = 350


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports at module level (not inside functions): what an
    import of it loads."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def add(mod: str) -> None:
        while mod and mod not in known:  # `from .x import f` where f is not a module
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            found.add(mod)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = ".".join(base[: len(base) - node.level + 1])
                    mod = f"{pkg}.{node.module}" if node.module else pkg
                else:
                    mod = node.module or ""
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    add(full if full in known else mod)
            elif isinstance(node, (ast.If, ast.Try)):  # module-level `if`/`try` still run
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    # importing a.b.c imports its packages a and a.b first
    for mod in list(found):
        parts = mod.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known)
    found.discard(name)
    return found


def test_core_imports_no_adapter_module() -> None:
    code = ("import importlib, json, pkgutil, sys\n"
            "import overlayfs_inetsk.core as core\n"
            "for m in pkgutil.iter_modules(core.__path__):\n"
            "    importlib.import_module('overlayfs_inetsk.core.' + m.name)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ), timeout=60)
    assert cp.returncode == 0, cp.stderr
    loaded = json.loads(cp.stdout)
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN_IN_CORE or m == NETLINK)
    assert bad == [], f"importing core loads {bad}"
    outside = sorted(m for m in loaded if m.startswith("overlayfs_inetsk.")
                     and not m.startswith("overlayfs_inetsk.core")
                     and m != "overlayfs_inetsk.errors")
    assert outside == [], f"core imports adapters: {outside}"


def test_no_import_cycle() -> None:
    mods = modules()
    known = set(mods)
    graph = {name: top_level_imports(name, path, known) for name, path in mods.items()}
    # sanity: the graph sees the imports it must see
    assert "overlayfs_inetsk.core.decide" in graph["overlayfs_inetsk.core.plan"]
    assert "overlayfs_inetsk.cli.options" in graph["overlayfs_inetsk.fuse.spawn"]
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_long_modules_say_why() -> None:
    """A module (of the product or the testbed) over MAX_LINES lines has a line `Long:
    <reason>` among its docstring's first lines."""
    unexplained = []
    files = dict(modules())
    files.update((str(p.relative_to(ROOT)), p) for p in (ROOT / "testbed").rglob("*.py"))
    for name, path in files.items():
        text = path.read_text()
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        head = doc.splitlines()[:6]
        if not any(line.startswith("Long: ") and len(line) > 12 for line in head):
            unexplained.append(f"{name} ({text.count(chr(10))} lines)")
    assert unexplained == [], "over 350 lines without a `Long: ` reason: " + ", ".join(unexplained)


def test_no_module_imports_a_dropped_dependency() -> None:
    """pyroute2 is gone from pyproject.toml (host/rtnl.py reads netlink): an import of it,
    even inside a function, would fail on a fresh install."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                    else [])
            found += [f"{name}: {m}" for m in mods if m.split(".")[0] in DROPPED]
    assert found == [], f"imports of dropped dependencies: {found}"
