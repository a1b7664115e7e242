"""The import graph of medseg's own modules (read with ast, nothing imported): no cycles, and no import
upward across the stage layers that CONTRIBUTING.md draws."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"
# lowest first; a module may import its own layer and the layers below it, never above
LAYERS = [
    ["medseg.errors", "medseg.registry", "medseg.atomic", "medseg.text", "medseg.machine"],
    ["medseg.data", "medseg.rundir", "medseg.scores"],
    ["medseg.models", "medseg.losses"],
    ["medseg.bundle", "medseg.config"],
    ["medseg.training", "medseg.inference"],
    ["medseg.evaluation"],
    ["medseg.cli", "medseg"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "medseg").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medseg"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medseg")]
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def _layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to CONTRIBUTING.md"
    return best[0]


def test_no_import_cycles():
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_upward_imports_across_layers():
    upward = sorted(f"{a} -> {b}" for a, bs in _graph().items() for b in bs if _layer(b) > _layer(a))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_training_and_inference_do_not_import_each_other():
    def stage(m: str) -> str:
        return (m.split(".") + [""])[1]

    crossing = sorted(f"{a} -> {b}" for a, bs in _graph().items() for b in bs
                      if {stage(a), stage(b)} == {"training", "inference"})
    assert not crossing, crossing


def test_no_module_over_450_lines():
    long = {str(f.relative_to(SRC)): n for f in (SRC / "medseg").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 450}
    assert not long, f"split these by job: {long}"
