"""The package's layers, read from the source alone (AST, nothing imported): every import of a kdfast unit — at
module level or inside a function; `if TYPE_CHECKING:` blocks excepted — goes to the same unit or one below it,
so no import runs upward and none closes a cycle. A unit is a top-level module or a subpackage of kdfast."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kdfast"

# Bottom to top. A unit may import only units that stand before it.
LAYERS = (
    "_version", "errors",
    "runtime",      # dispatch, devices and precisions, distributed, progress, argument checks
    "data",         # data sets, identity below them, batch pipelines, loaders
    "models",
    "io",           # atomic writes, chunk stores, the job record (which names the data identity's differences)
    "losses",       # kd_loss: op, Triton kernels, reference
    "grad_norms",
    "hessian",
    "scoring",
    "pruning",
    "distill",
    "training",
    "pipelines",
    "cli",
    "jobs",         # the former name of kdfast.io, kept as a public namespace
    "__init__",     # the public API
)
RANK = {unit: i for i, unit in enumerate(LAYERS)}


def _unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: pathlib.Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
    is_package = rel[-1] == "__init__"
    return ".".join(rel[:-1] if is_package else rel), is_package


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skipped


def imports_of(path: pathlib.Path):
    """(imported kdfast module, line) for every import in the file; `from kdfast.x import name` yields kdfast.x,
    `from kdfast import name` yields kdfast.name (a unit when name is a module, else the API in __init__)."""
    module, is_package = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "kdfast")
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            if target == "kdfast":
                yield from ((f"kdfast.{a.name}", node.lineno) for a in node.names)
            elif target.split(".")[0] == "kdfast":
                yield target, node.lineno


def unit_edges():
    """{(from unit, to unit): [where, ...]} over every source file of the package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit_of(_module_name(path)[0])
        for target, line in imports_of(path):
            to = _unit_of(target)
            if to == "_C":  # the compiled extension: a leaf
                continue
            if not ((PACKAGE / f"{to}.py").exists() or (PACKAGE / to / "__init__.py").exists()):
                to = "__init__"  # `from kdfast import some_api_name`
            if to != unit:
                edges.setdefault((unit, to), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units - set(RANK) == set(), "declare the new unit's place in LAYERS"


def test_no_import_runs_upward():
    upward = [f"{a} -> {b} at {', '.join(where)}" for (a, b), where in unit_edges().items()
              if RANK[b] > RANK[a]]
    assert upward == [], "imports that run upward (or close a cycle):\n" + "\n".join(upward)


def test_no_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for a, b in unit_edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in graph.get(u, ()):
            if state.get(v) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(v):] + [v]))
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    # a check that cannot fail proves nothing: feed it an upward import hidden inside a function
    pkg = tmp_path / "kdfast"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "x.py").write_text("def f():\n    from ..training import fit\n")
    (pkg / "training").mkdir()
    (pkg / "training" / "__init__.py").write_text("from typing import TYPE_CHECKING\n"
                                                  "if TYPE_CHECKING:\n    from kdfast.cli import main\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    edges = unit_edges()
    assert ("runtime", "training") in edges
    assert ("training", "cli") not in edges
