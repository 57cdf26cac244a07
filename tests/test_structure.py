"""The package's import structure: no import cycles between cryoace modules, and no module reaching
into another module's private (underscore) names.

Both are read from the source with :mod:`ast`, so nothing is imported. Cycles count **module-level**
imports only (statements at the top of a module, inside top-level ``if``/``try`` blocks too, but not
under ``if TYPE_CHECKING``): those run at import time, and a cycle among them makes the import order
matter. Imports inside functions run later and are how the CLI stays fast to start; they are left out.
Private names are checked in every ``from X import _name`` anywhere in src/, tests/ and bench/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "cryoace"


def module_name(path: Path, root: Path) -> str:
    """``root/a/b.py`` → ``a.b``; ``root/a/__init__.py`` → ``a`` (root's parent is the import root)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` reads from (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def module_level_imports(body: list[ast.stmt]):
    """Import statements executed when the module is imported (TYPE_CHECKING blocks excluded)."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(stmt.test):
                yield from module_level_imports(stmt.body)
                yield from module_level_imports(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody, *(h.body for h in stmt.handlers)):
                yield from module_level_imports(block)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports at module level} for every module under ``root``."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = imported_base(name, is_package, node)
                # `from pkg import mod` imports the submodule pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            graph[name].update(t for t in targets if t in paths and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def private_imports(root: Path, top: Path) -> list[str]:
    """``file:line: from X import _name`` for every import of another cryoace (or test) module's
    underscore name under ``root`` (``top`` = the import root the module names are relative to)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, top)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = imported_base(name, path.name == "__init__.py", node)
            ours = (base.split(".")[0] == "cryoace" or node.level > 0
                    or (REPO / "tests" / base.replace(".", "/")).with_suffix(".py").is_file())
            if not ours or base == name:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: from {base} import {alias.name}")
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import x\n")
    (pkg / "sub" / "x.py").write_text("from ..y import thing\nimport typing\nif typing.TYPE_CHECKING:\n"
                                      "    from .z import T\n")
    (pkg / "sub" / "z.py").write_text("def f():\n    from .x import g\n")
    (pkg / "y.py").write_text("from .sub.x import other\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub"] == {"pkg.sub.x"}
    assert graph["pkg.sub.x"] == {"pkg.y"}  # not z: TYPE_CHECKING only
    assert graph["pkg.sub.z"] == set()  # a function-level import does not count
    assert cycles(graph) == [["pkg.sub.x", "pkg.y"]]


def test_no_import_cycles_between_cryoace_modules():
    graph = import_graph(PACKAGE)
    assert "cryoace.models.decoders" in graph and "cryoace.models.hermitian" in graph["cryoace.models.voxel"]
    assert cycles(graph) == []


def test_the_private_name_finder_finds_one(tmp_path):
    pkg = tmp_path / "cryoace"
    pkg.mkdir()
    (pkg / "a.py").write_text("def _hidden():\n    pass\n")
    (pkg / "b.py").write_text("from .a import _hidden\nfrom os import _exit\nfrom .a import __doc__\n")
    found = private_imports(pkg, pkg)
    assert len(found) == 1 and found[0].endswith("from cryoace.a import _hidden")


@pytest.mark.parametrize("tree", ["src", "tests", "bench"])
def test_no_module_imports_another_modules_private_names(tree):
    top = REPO / "src" if tree == "src" else REPO / tree
    assert private_imports(REPO / tree, top) == []


def test_the_torch_free_name_lists_match_their_owners():
    """cryoace.defaults lists the names --help offers; each must be exactly what its module implements."""
    from cryoace import defaults
    from cryoace.models.decoders import DECODERS

    assert set(defaults.DECODER_NAMES) == set(DECODERS)
