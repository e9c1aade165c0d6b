"""The package layout: no import cycles, one-way layers (runtime on top of the compiler, passes
independent of each other).  Lazy imports inside functions count: a cycle that only bites at run
time is still a cycle."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Every module of the ``lowbit`` package, from pyproject's package-dir mapping."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mods = {}
    for pkg, folder in cfg["package-dir"].items():
        for path in (ROOT / folder).glob("*.py"):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            mods[name] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "lowbit")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "lowbit":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        g.add_edges_from((name, dep) for dep in _imports(name, path, set(mods)))
    return g


def test_layout_finds_the_package(graph):
    for expected in ("lowbit.api.driver", "lowbit.ir.analysis", "lowbit.quant.gptq", "lowbit.passes.calibrate",
                     "lowbit.mixed.bitplan", "lowbit.ops.registry", "lowbit.runtime.llm"):
        assert expected in graph, expected
    assert graph.number_of_edges() > 100


def test_no_import_cycles(graph):
    cycles = [c for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_only_the_api_layer_imports_runtime(graph):
    bad = [(a, b) for a, b in graph.edges
           if b.startswith("lowbit.runtime") and not a.startswith(("lowbit.runtime", "lowbit.api"))]
    assert not bad, f"compiler modules importing the runtime: {bad}"


def test_passes_do_not_import_each_other(graph):
    bad = [(a, b) for a, b in graph.edges
           if a.startswith("lowbit.passes.") and b.startswith("lowbit.passes.")]
    assert not bad, f"passes importing passes (share code through lowbit.quant / lowbit.ir): {bad}"


def test_compiler_core_does_not_import_the_api(graph):
    bad = [(a, b) for a, b in graph.edges
           if b.startswith("lowbit.api") and a != "lowbit" and not a.startswith(("lowbit.api", "lowbit.runtime"))]
    assert not bad, f"core modules importing lowbit.api: {bad}"


def test_a_planted_cycle_is_found(tmp_path):
    """The checker itself: two modules importing each other lazily form a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from lowbit.x import b\n")
    (tmp_path / "b.py").write_text("from lowbit.x import a\n")
    known = {"lowbit.x.a", "lowbit.x.b"}
    g = nx.DiGraph()
    for n in ("a", "b"):
        g.add_edges_from((f"lowbit.x.{n}", d) for d in _imports(f"lowbit.x.{n}", tmp_path / f"{n}.py", known))
    assert any(len(c) > 1 for c in nx.strongly_connected_components(g))
