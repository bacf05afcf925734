"""The package's layering, read from the source: no import circle among paser's and the flows'
modules, counting imports made inside functions (they are circles all the same, only deferred),
and the library never imports the flows when it is imported (the flows call the library;
``paser.select`` reaches its flow only when called with ``use_flow``, and the CLI runs flows)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("paser", "flows"):
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found[name] = path
    return found


def _imports(tree: ast.Module, deferred: bool):
    """Import statements of a module: at module level, or (``deferred``) anywhere but under an
    ``if TYPE_CHECKING:`` block, which never runs."""
    if not deferred:
        yield from tree.body
        return
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        pending.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path], deferred: bool) -> dict[str, set[str]]:
    """Module -> the modules it imports (``from paser import x`` counts as ``paser.x`` when x is a
    module); ``deferred`` counts the imports inside functions too."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in _imports(ast.parse(path.read_text()), deferred):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                found |= subs or ({node.module} & set(modules))
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names} & set(modules)
        graph[name] = found - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_sees_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    graph = import_graph(_modules(), deferred=True)
    assert "paser.scoring" in graph["paser.pipeline"]  # the graph is read, not empty
    assert "paser.settings" in graph["paser.report"]  # an import inside a function is counted
    assert cycle(graph) is None


def test_the_library_does_not_import_the_flows_when_imported():
    graph = import_graph(_modules(), deferred=False)
    upward = sorted((m, d) for m, deps in graph.items() if m.startswith("paser") for d in deps
                    if d.startswith("flows"))
    assert upward == []
