"""The layout stays what docs/design.md says: a pure core, packages in layers with no import
cycle between them (every import counted, inside functions too), and no module over
MAX_LINES lines."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "overlayfs_inetsk"
FORBIDDEN_IN_CORE = ("pyfuse3", "trio", "pyroute2", "ctypes", "subprocess")
NETLINK = "overlayfs_inetsk.host.rtnl"  # the netlink reader: adapters only, never core
DROPPED = ("pyroute2",)  # no longer dependencies: no module may import them
MAX_LINES = 350  # a hard limit: every module, no exception


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


def imported(node: ast.Import | ast.ImportFrom, base: list[str], known: set[str]
             ) -> list[str]:
    """What one import statement names, as modules (`from .x import f`: x.f when it is a
    module, else x); base: the package the statement is in, as parts."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        pkg = ".".join(base[: len(base) - node.level + 1])
        mod = f"{pkg}.{node.module}" if node.module else pkg
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]


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
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for mod in imported(node, base, known):
                    add(mod)
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
                     and m not in ("overlayfs_inetsk.errors", "overlayfs_inetsk.record",
                                  "overlayfs_inetsk.lazylog"))
    assert outside == [], f"core imports adapters: {outside}"


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The cycles a depth-first walk of graph meets, each as the path that closes it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    return cycles


def test_no_import_cycle() -> None:
    mods = modules()
    known = set(mods)
    graph = {name: top_level_imports(name, path, known) for name, path in mods.items()}
    # sanity: the graph sees the imports it must see
    assert "overlayfs_inetsk.core.decide" in graph["overlayfs_inetsk.core.plan"]
    assert "overlayfs_inetsk.options" in graph["overlayfs_inetsk.fuse.spawn"]
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def all_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module `name` imports anywhere (at module level, inside functions,
    under TYPE_CHECKING): what it depends on."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        mods = imported(node, base, known) if isinstance(node, (ast.Import, ast.ImportFrom)) \
            else []
        for mod in mods:
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                found.add(mod)
    return found


def package_of(module: str) -> str:
    """overlayfs_inetsk.core.plan -> core; a top-level module (errors, options, offline,
    logsetup) is a package of its own; the package's __init__ is "overlayfs_inetsk"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


# The layers, bottom up (docs/design.md): a package may import its own layer's leaves and
# anything below it, never above. Leaves of the product: errors, options, logsetup, record,
# lazylog (and the package's __init__: the version).
LAYERS = [
    {"overlayfs_inetsk", "errors", "options", "logsetup", "record", "lazylog"},
    {"core"},
    {"host"},
    {"planner"},
    {"offline"},
    {"fuse", "node", "plugin"},
    {"app"},
    {"cli"},
]


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        src = package_of(name)
        for dep in all_imports(name, path, known):
            dst = package_of(dep)
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def test_packages_import_only_below_them() -> None:
    graph = package_graph()
    # sanity: the graph sees function-level imports (cli imports app inside its commands)
    assert "app" in graph["cli"] and "planner" in graph["app"]
    level = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    assert set(graph) <= set(level), f"packages not in LAYERS: {set(graph) - set(level)}"
    bad = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                 if level[b] > level[a] or (level[b] == level[a] and level[a] != 0))
    assert bad == [], "imports against the layers: " + ", ".join(bad)


def test_no_package_level_import_cycle() -> None:
    """Between packages, counting every import (a lazy one too): no cycle."""
    graph = package_graph()
    cycles = find_cycles(graph)
    assert cycles == [], "package cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_is_long() -> None:
    """No module of the product or the testbed has more than MAX_LINES lines: no
    exception."""
    files = dict(modules())
    files.update((str(p.relative_to(ROOT)), p) for p in (ROOT / "testbed").rglob("*.py"))
    long = [f"{name} ({path.read_text().count(chr(10))} lines)" for name, path in files.items()
            if path.read_text().count("\n") > MAX_LINES]
    assert long == [], f"over {MAX_LINES} lines: " + ", ".join(sorted(long))


# what the pure core may not call: file system, terminal, processes (reading and writing
# files, walking trees, printing belong to adapters)
IMPURE_CALLS = {"open", "print", "input"}
IMPURE_ATTRS = {("os", a) for a in ("walk", "scandir", "listdir", "open", "read", "write",
                                    "stat", "lstat", "fstat", "readlink", "mkdir", "unlink",
                                    "rename", "symlink", "chmod", "system", "popen",
                                    "getcwd", "access")} | {
    ("os.path", a) for a in ("realpath", "exists", "lexists", "isdir", "isfile", "islink",
                             "ismount", "getsize")} | {("sys", "stdout"), ("sys", "stderr")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_core_is_pure_by_its_code() -> None:
    """core/ calls no open(), print(), os.walk/scandir/stat/..., no sys.stdout: checked on
    the code itself (the import check above cannot see those)."""
    found = []
    for path in sorted((PKG / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in IMPURE_CALLS:
                found.append(f"{path.name}:{node.lineno}: {node.func.id}()")
            elif isinstance(node, ast.Attribute):
                owner = _dotted(node.value)
                if (owner, node.attr) in IMPURE_ATTRS:
                    found.append(f"{path.name}:{node.lineno}: {owner}.{node.attr}")
    assert found == [], "impure calls in core: " + ", ".join(found)


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
