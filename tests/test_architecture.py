"""The package's shape, checked: no import cycle among tfa_ray's modules and no module over
500 lines. The import graph is read from the source with ``ast``, every import counted:
module level, inside functions and under ``if TYPE_CHECKING:`` (a cycle hidden there is
still a cycle for its reader). The layers themselves are import-linter's contracts in
pyproject.toml (``lint-imports`` in .ci/run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tfa_ray"
MAX_LINES = 500


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> its file, for every module and package of ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement imports: ``a.b`` for ``import a.b``; for
    ``from a import b``, ``a.b`` (a module, or a name that resolves to ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``root`` it imports, anywhere in its source. Importing
    ``a.b.c`` from outside ``a.b`` also runs ``a.b``'s ``__init__``: that edge counts too."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(node, module, is_package):
                while name and name not in files:  # a name inside a module: that module
                    name = name.rpartition(".")[0]
                if not name:
                    continue
                edges.add(name)
                parent = name.rpartition(".")[0]
                while parent and not (module == parent or module.startswith(parent + ".")):
                    edges.add(parent)  # the package __init__ runs on the way in
                    parent = parent.rpartition(".")[0]
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_tfa_ray():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_sees_every_kind_of_import(tmp_path):
    """The checker itself: a cycle through a TYPE_CHECKING import, one through an import in
    a function and one through a package's __init__ are all found; a clean tree is clean."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "high.py").write_text("from pkg.low import X\nfrom . import low\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.top import run\n")
    (pkg / "sub" / "top.py").write_text("from pkg.sub import base\n\ndef run():\n    pass\n")
    (pkg / "sub" / "base.py").write_text("from pkg import low\n")
    assert find_cycle(import_graph(pkg)) is None

    (pkg / "low.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.high import Y\n"
    )
    assert find_cycle(import_graph(pkg)) == ["pkg.high", "pkg.low", "pkg.high"]

    (pkg / "low.py").write_text("def f():\n    from .high import Y\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.high", "pkg.low", "pkg.high"]

    (pkg / "low.py").write_text("def f():\n    from pkg.sub.base import Z\n")
    cycle = find_cycle(import_graph(pkg))  # low -> sub/__init__ -> sub.top -> sub.base -> low
    assert cycle is not None and "pkg.sub" in cycle and "pkg.low" in cycle


@pytest.mark.parametrize("module", sorted(module_files()), ids=str)
def test_module_is_at_most_500_lines(module):
    lines = len(module_files()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it"
