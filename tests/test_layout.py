"""The package's layering, read from the source: no import circle among paser's modules and the
repository's flows/, counting imports made inside functions and for type hints (circles all the same,
only deferred); the library never imports the repository's ``flows/`` (the deployments there import
paser); ``paser.flows`` is reached only when a command runs through Prefect, and importing it
changes nothing in the environment."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("paser", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


# paser's phases, lowest first: a module may import its own phase and those below, never one above.
# The helpers every phase uses (errors, progress, config, devices, cache, ledger, seeds) import no phase;
# paser.flows orchestrate the library, the faces (the CLI and the API) sit on top of both, and the
# repository's flows/ (deployments, not installed) on top of everything.
PHASES = ["helpers", "data", "models", "selection", "recovery", "evaluation", "comparison", "flows", "faces",
          "deployments"]
HELPERS = {"paser.errors", "paser.progress", "paser.config", "paser.devices", "paser.cache", "paser.ledger",
           "paser.seeds", "paser.lazy"}


def phase(module: str) -> str:
    if module.split(".")[0] == "flows":
        return "deployments"
    if module in HELPERS:
        return "helpers"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in PHASES:
        return parts[1]
    return "faces"  # paser (its __init__), paser.api, paser.cli and its modules


def _imports(tree: ast.Module, deferred: bool):
    """Import statements of a module: at module level, or (``deferred``) anywhere, inside functions
    and under ``if TYPE_CHECKING:`` too (an import for type hints alone still ties the two modules:
    a circle through one is a circle of the design)."""
    if not deferred:
        yield from tree.body
        return
    pending = list(tree.body)
    while pending:
        node = pending.pop()
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
    assert "paser.selection.scoring" in graph["paser.selection.pipeline"]  # the graph is read, not empty
    assert "paser.selection.settings" in graph["paser.selection.report"]  # an import inside a function is counted
    assert cycle(graph) is None


def test_the_graph_counts_imports_for_type_hints_alone(tmp_path):
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import paser.b\n")
    (tmp_path / "b.py").write_text("import paser.a\n")
    graph = import_graph({"paser.a": tmp_path / "a.py", "paser.b": tmp_path / "b.py"}, deferred=True)
    assert graph == {"paser.a": {"paser.b"}, "paser.b": {"paser.a"}}
    assert cycle(graph) == ["paser.a", "paser.b", "paser.a"]


def test_the_library_never_imports_the_repositorys_flows():
    modules = _modules()
    assert "flows.deployments" in modules  # the folder is read
    graph = import_graph(modules, deferred=True)
    upward = sorted((m, d) for m, deps in graph.items() if m.startswith("paser") for d in deps
                    if d.startswith("flows"))
    assert upward == []
    named = sorted(name for name, path in modules.items() if name.startswith("paser")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom | ast.Import)
                   and any((n or "").split(".")[0] == "flows" for n in
                           ([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])))
    assert named == []


def test_no_flows_package_is_installed():
    import tomllib
    from setuptools import find_packages

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=found["include"])
    assert "paser.flows" in packages and not [p for p in packages if p.split(".")[0] != "paser"]


def test_importing_the_flows_changes_no_environment_variable():
    code = ("import os, json; before = dict(os.environ); import paser.flows.selection, paser.flows.pipeline, "
            "paser.flows.compare; print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# The one upward import: ``paser run``'s deployable flow wraps the recipe of its verb (paser.api.run,
# which runs each step's own flow and never imports this one, so no circle).
UPWARD = {("paser.flows.pipeline", "paser.api")}


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, what it imports) for every import that runs upward between phases, but ``UPWARD``."""
    rank = {p: i for i, p in enumerate(PHASES)}
    return sorted((m, d) for m, deps in graph.items() for d in deps
                  if rank[phase(d)] > rank[phase(m)] and (m, d) not in UPWARD)


def test_the_layering_check_sees_an_upward_import():
    graph = {"paser.data.pools": {"paser.selection.scoring"}, "paser.selection.scoring": {"paser.data.pools"},
             "paser.ledger": {"paser.models.load"}}
    assert upward_imports(graph) == [("paser.data.pools", "paser.selection.scoring"),
                                     ("paser.ledger", "paser.models.load")]


def test_imports_run_only_downward_between_phases():
    graph = import_graph(_modules(), deferred=True)
    assert {phase(m) for m in graph} == set(PHASES)  # every phase is a folder (or the helpers) and is read
    assert upward_imports(graph) == []


def test_no_module_of_the_library_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "paser").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module's own": another module of the library or the flows
    that imports it reaches into a room that is not its."""
    found = []
    for name, path in _modules().items():
        for node in _imports(ast.parse(path.read_text()), deferred=True):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("paser", "flows")):
                found += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_import_paser_loads_no_model_library_and_every_top_level_name_resolves():
    import subprocess
    import sys

    import paser

    loaded = subprocess.run([sys.executable, "-c", "import sys, paser; print(sorted({'torch', 'sklearn', 'prefect', "
                             "'transformers'} & set(sys.modules)))"], capture_output=True, text=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    assert all(callable(getattr(paser, name)) for name in paser.__all__ if name != "__version__")
    assert {"select", "prune", "recover", "evaluate", "compare"} <= set(dir(paser))
    with pytest.raises(AttributeError, match="nothing_here"):
        paser.nothing_here  # noqa: B018


def _compares_the_method(node: ast.AST) -> bool:
    """Whether ``node`` compares ``<...>.select.method`` or a ``["method"]`` subscript with something."""
    def names_method(part):
        return ((isinstance(part, ast.Attribute) and part.attr == "method" and isinstance(part.value, ast.Attribute)
                 and part.value.attr == "select")
                or (isinstance(part, ast.Subscript) and isinstance(part.slice, ast.Constant)
                    and part.slice.value == "method"))
    return isinstance(node, ast.Compare) and any(names_method(p) for p in [node.left, *node.comparators])


def test_selection_method_names_are_compared_in_one_module():
    """The pipeline, report and settings ask the registered method object (paser.selection.methods)."""
    found = sorted(f"{name}:{node.lineno}" for name, path in _modules().items() if name.startswith("paser")
                   for node in ast.walk(ast.parse(path.read_text())) if _compares_the_method(node))
    assert found == []
    assert _compares_the_method(ast.parse("settings.select.method == 'strat'").body[0].value)
    assert _compares_the_method(ast.parse("summary['method'] != 'full'").body[0].value)


ALGORITHM_LIBRARIES = ("torch", "transformers", "sklearn", "scipy", "pandas", "prefect", "lm_eval",
                       "sentence_transformers", "peft")


def test_the_cli_and_the_configs_load_no_algorithm_library():
    """Building every command's options and printing help (``paser select --help``), and importing
    the configs, load none of the libraries the stages need: a command starts in a fraction of a
    second (bench/startup.py), and a config can be read where torch is not installed."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom paser.cli import app\n"
            "import paser.selection.configs, paser.recovery.config, paser.evaluation.config, paser.comparison.config\n"
            "import paser.models.config\n"
            "assert CliRunner().invoke(app, ['select', '--help']).exit_code == 0\n"
            f"print(sorted(m for m in {ALGORITHM_LIBRARIES!r} if m in sys.modules))")
    env = dict(os.environ, TERM="dumb")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# What a deferred import may be waiting for: the libraries that take seconds or hundreds of MB to load
HEAVY = {*ALGORITHM_LIBRARIES, "matplotlib", "datasets", "numpy", "pyarrow", "typer", "yaml", "psutil", "umap",
         "faiss", "safetensors"}


def _lazy_homes(tree: ast.Module) -> dict[str, str]:
    """A lazy package's ``_HOMES`` (paser.lazy): the module each of its names comes from."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_HOMES" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return {}
    return {}


def _targets(node: ast.AST, modules: dict[str, Path], trees: dict[str, ast.Module]) -> set[str]:
    """What an import statement loads: paser's modules (a lazy package's name, from its home) and
    other libraries by their top-level name."""
    if isinstance(node, ast.Import):
        return {a.name if a.name in modules else a.name.split(".")[0] for a in node.names}
    if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
        return set()
    if node.module not in modules:
        return {node.module.split(".")[0]}
    found = set()
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in modules else _lazy_homes(trees[node.module]).get(alias.name, node.module))
    return found


def deferred_imports_without_a_reason(modules: dict[str, Path]) -> list[str]:
    """Imports of paser's own modules made inside functions that would load no heavy library the
    module does not load already (read from the source: module-level imports, transitively): those
    belong at the top of the module, where the layering tests see them."""
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}

    def top(m: str) -> set[str]:
        found = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)} & set(modules)  # its packages
        for node in trees[m].body:
            for stmt in (node.body if isinstance(node, ast.Try) else [node]):
                found |= _targets(stmt, modules, trees)
        return found

    heavy: dict[str, set[str]] = {}

    def loads(m: str, seen: frozenset = frozenset()) -> set[str]:
        if m not in modules:
            return {m} & HEAVY
        if m not in heavy:
            heavy[m] = set().union(*(loads(t, seen | {m}) for t in top(m) if t not in seen))
        return heavy[m]

    found = []
    for m in modules:
        for fn in ast.walk(trees[m]):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paser"):
                        if not set().union(*(loads(t) for t in _targets(node, modules, trees))) - loads(m):
                            found.append(f"{m}:{node.lineno} {node.module}")
    return sorted(set(found))


def test_an_import_inside_a_function_waits_for_a_heavy_library(tmp_path):
    paser_modules = {m: p for m, p in _modules().items() if m.startswith("paser")}
    assert deferred_imports_without_a_reason(paser_modules) == []
    (tmp_path / "a.py").write_text("import torch\ndef f():\n    from paser.b import x\n    from paser.c import y\n")
    (tmp_path / "b.py").write_text("import numpy\nx = 1\n")
    (tmp_path / "c.py").write_text("import sklearn\ny = 1\n")
    toy = {"paser.a": tmp_path / "a.py", "paser.b": tmp_path / "b.py", "paser.c": tmp_path / "c.py"}
    assert deferred_imports_without_a_reason(toy) == []  # b loads numpy, which a does not: a reason to wait
    (tmp_path / "a.py").write_text("import numpy\ndef f():\n    from paser.b import x\n    from paser.c import y\n")
    assert deferred_imports_without_a_reason(toy) == ["paser.a:3 paser.b"]
