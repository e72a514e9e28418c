"""The package's shape: one-way layers, no import cycles, short functions, a light CLI.

Imports are read from the source (module-level and lazy ones alike, and "attnscope.x"
strings handed to importlib), so a cycle hidden inside a function body counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnscope"

# Lower layers never import higher ones: cli -> commands -> output -> science -> engine.
LAYERS: dict[str, int] = {
    "attnscope.errors": 0,
    "attnscope.config": 0,
    "attnscope.versions": 0,
    "attnscope.files": 0,
    "attnscope.distributed": 0,
    "attnscope.data": 0,
    "attnscope.capture": 0,
    "attnscope.models": 0,
    "attnscope.metrics": 1,
    "attnscope.measure": 1,
    "attnscope.analysis": 1,
    "attnscope.maps": 1,
    "attnscope.compare": 1,
    "attnscope.inputs": 1,
    "attnscope.cka": 1,
    "attnscope.embedding": 1,
    "attnscope.probe": 1,
    "attnscope.results": 2,
    "attnscope.plots": 2,
    "attnscope.report": 2,
    "attnscope.commands": 3,
    "attnscope.cli": 4,
    "attnscope": 5,
    "attnscope.__main__": 5,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its source."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("attnscope.")
        ):
            targets = [node.value.split(":")[0]]
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target not in (name, "attnscope"):
                deps.add(target)
    return deps


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS in {__file__}"
    return LAYERS[best]


def test_no_module_imports_from_a_layer_above_it():
    graph = _graph()
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert upward == []


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep) :] + [dep] if dep in trail else [node, dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_a_known_cycle_is_detected(tmp_path):
    """The checker itself: two modules importing each other inside functions are a cycle."""
    mods = {"attnscope.a": tmp_path / "a.py", "attnscope.b": tmp_path / "b.py"}
    mods["attnscope.a"].write_text("def f():\n    from attnscope.b import g\n")
    mods["attnscope.b"].write_text("import importlib\nM = 'attnscope.a'\n")
    assert _imports("attnscope.a", mods["attnscope.a"], mods) == {"attnscope.b"}
    assert _imports("attnscope.b", mods["attnscope.b"], mods) == {"attnscope.a"}


def test_no_function_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.name} ({lines} lines)")
    assert long == []


def test_package_imports_without_torch():
    """`import attnscope` (like `attnscope --help`, tested in test_cli.py) must not pay for torch."""
    heavy = ("torch", "timm", "seaborn", "pandas")
    code = f"import sys, attnscope; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
