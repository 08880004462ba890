"""No import cycle in aimkp, between modules or between its top-level packages.

Every module under ``aimkp/`` is parsed with ``ast``; every import counts, at module level and
inside functions (a function-level import is a dependency too: it only moves the cycle to run
time). Between modules, imports under ``if TYPE_CHECKING:`` never run and are left out; between
packages they count too (the layering: ``aimkp.runs`` never names ``aimkp.train``). Packages are
``aimkp.<name>`` (``aimkp.method``, ``aimkp.train``, ...; a module directly under ``aimkp/`` is its
own node); a package's ``__init__`` importing its own submodules is not a cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aimkp"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, typing: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth; the bodies of ``if TYPE_CHECKING:`` only with
    ``typing``."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if not typing and isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str, path: pathlib.Path, known: set[str], typing: bool = False) -> set[str]:
    """The aimkp modules ``name`` imports: ``from pkg import x`` is ``pkg.x`` when that is a
    module, else ``pkg``."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), typing):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1
            pkg = name.split(".") if is_pkg else name.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in known:
                out.add(sub)
            elif base in known:
                out.add(base)
    out.discard(name)
    return out


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def module_graph(typing: bool = False) -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {m: imports_of(m, p, known, typing) for m, p in mods.items()}
    # a package importing its own submodules (its __init__ re-exporting them) is no cycle
    for m, deps in graph.items():
        if mods[m].name == "__init__.py":
            deps -= {d for d in deps if d.startswith(m + ".")}
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        if m == "aimkp":
            continue  # the root package: its lazy attributes are strings, not imports
        p = package_of(m)
        out.setdefault(p, set()).update(package_of(d) for d in deps if package_of(d) != p)
    out = {p: {d for d in deps if d != "aimkp"} for p, deps in out.items()}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component of > 1 node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle(graph, set(c)) for c in comps]


def _a_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A path ``a -> b -> ... -> a`` inside one strongly connected component (BFS back to a)."""
    start = min(comp)
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def _show(found: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in found)


def test_the_graph_sees_function_level_imports() -> None:
    graph = module_graph()
    assert len(graph) > 50
    # aimkp/cli/train.py imports the training loop inside run() (start-up time)
    assert "aimkp.train.loop" in graph["aimkp.cli.train"] or any(
        d.startswith("aimkp.train") for d in graph["aimkp.cli.train"]
    )


def test_cycle_finder_names_a_cycle() -> None:
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycle(level: str) -> None:
    graph = module_graph()
    if level == "package":
        graph = package_graph(module_graph(typing=True))
    found = cycles(graph)
    assert not found, f"import cycles between {level}s: {_show(found)}"
