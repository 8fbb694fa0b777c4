"""The sandboxd package's import graph has no cycles, between modules or between packages,
and no module is over 450 lines.

Every module is parsed (never imported); an import anywhere in a module counts, even
inside a function, except under ``if TYPE_CHECKING:``, which never runs.  A package's
edges are its modules' edges into other packages (``sandboxd.jail.workers`` importing
``sandboxd.jail.net.network`` is jail.workers -> jail.net), so the layers of the
folders are checked as well as the modules: no two folders use each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
PACKAGE_DIR = TESTS_DIR.parent / "sandboxd"
# What marks a test as needing root or a daemon: it belongs to the daemon tier (tests/), not here.
DAEMON_TIER = ("require_root", "make_daemon", "DaemonProcess", "test_users", "call_as")


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The dotted names a module imports, ``from`` imports as (base, names)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, list[str]]] = []  # (module, level, imported names)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # only the else branch runs
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, 0, []))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node.module or "", node.level, [a.name for a in node.names]))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for target, level, names in visitor.found:
            if level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = package[:len(package) - (level - 1)]
                base = ".".join([*base_parts, target] if target else base_parts)
            else:
                base = target
            candidates = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if len(candidates) < len(names) or not names:
                # a name that is not a submodule comes from the module itself; `import a.b.c` runs a.b.c
                candidates.append(base)
            for candidate in candidates:
                # `import sandboxd.x.y` where sandboxd.x.y is not a module: its longest module prefix
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:  # (a package's __init__ importing its own names)
                    graph[name].add(candidate)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that starts and ends at the same module, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color[nxt] == GREY:
                return [*stack[stack.index(nxt):], nxt]
            if color[nxt] == WHITE and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        color[node] = BLACK
        return None

    for start in sorted(graph):
        if color[start] == WHITE and (cycle := visit(start)):
            return cycle
    return None


def test_the_checker_sees_relative_imports_function_imports_and_skips_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                              "thing = 1\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"}, "pkg.c": set()}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def package_graph(graph: dict[str, set[str]], root: Path) -> dict[str, set[str]]:
    """Package -> the other packages its modules import (a package's ``__init__`` is its own)."""
    modules = module_names(root)

    def package(module: str) -> str:
        return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]

    out: dict[str, set[str]] = {package(m): set() for m in graph}
    for module, targets in graph.items():
        out[package(module)] |= {package(t) for t in targets if package(t) != package(module)}
    return out


def test_the_checker_sees_package_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "a.py").write_text("from ..low import b\n")
    (pkg / "low" / "b.py").write_text("x = 1\n")
    (pkg / "low" / "c.py").write_text("from ..high import a\n")  # no module cycle: a -> b, c -> a
    modules = import_graph(pkg)
    assert find_cycle(modules) is None
    assert find_cycle(package_graph(modules, pkg)) == ["pkg.high", "pkg.low", "pkg.high"]


def test_the_sandboxd_import_graph_has_no_cycles() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 20 and "sandboxd.jail.child.contract" in graph
    assert "sandboxd.common.protocol" in graph["sandboxd.jail.child.contract"]  # relative imports resolve
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_sandboxd_packages_have_no_cycles() -> None:
    packages = package_graph(import_graph(PACKAGE_DIR), PACKAGE_DIR)
    assert "sandboxd.jail.workers" in packages and "sandboxd.jail" in packages["sandboxd"]
    cycle = find_cycle(packages)
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


def test_every_test_file_is_in_one_tier() -> None:
    """tests/unit/ needs neither root nor a daemon (``make unit``); every other test file is
    the daemon tier's (``make system``); none is both."""
    unit = sorted((TESTS_DIR / "unit").glob("test_*.py"))
    assert len(unit) >= 10
    for path in unit:
        if path.name == Path(__file__).name:
            continue  # (this file names them)
        text = path.read_text()
        used = [name for name in DAEMON_TIER if name in text]
        assert not used, f"{path.name} is a unit test file but uses {used}: it belongs in tests/"
    system = sorted(TESTS_DIR.glob("test_*.py"))
    assert {p.name for p in unit}.isdisjoint({p.name for p in system})
    for path in system:
        text = path.read_text()
        assert any(name in text for name in (*DAEMON_TIER, "daemon")), \
            f"{path.name} needs neither root nor a daemon: it belongs in tests/unit/"


MAX_MODULE_LINES = 450  # past this a module has more than one job: split it by concern


def test_no_module_is_over_its_size() -> None:
    over = {name: n for name, path in module_names(PACKAGE_DIR).items()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
