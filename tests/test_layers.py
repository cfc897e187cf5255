"""The layer order core <- backends <- jobs, read from the source: every import (top-level,
function-level, under TYPE_CHECKING) of the project's own modules is an edge, and no edge may
close a cycle. A package's `__init__` is its own node; `from pkg import mod` names the module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "backends")
# what the backends stand on; none of these may import a backend or a job module
CORE = {"errors", "choices", "precision", "heads", "bundle", "fsutil", "env", "progress", "contention", "modelcheck", "models", "inputs",
        "capture", "calibration", "compare", "bench", "manifest", "decoding", "generate"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods}
                found.update(subs)
                if len(subs) < len(node.names):  # names defined by the module itself
                    found.add(module)
        edges[name] = {m for m in found if m in mods and m != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_reader_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    edges = _edges(_modules())
    assert "backends.base" in edges and "pipeline.manifest" in edges["backends.base"]  # the reader sees imports
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(
        " ".join(f"{m} -> {sorted(edges[m] & set(c))}" for m in c) for c in cycles)


def test_core_stands_below_backends_and_jobs() -> None:
    edges = _edges(_modules())
    core = {f"pipeline.{m}" for m in CORE}
    assert core <= set(edges), sorted(core - set(edges))
    up = {m: sorted(e for e in edges[m] if e not in core) for m in core}
    assert not any(up.values()), {m: e for m, e in up.items() if e}
