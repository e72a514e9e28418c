"""The aggregator registry as the CLI's help text sees it, without importing torch.

The modules of probe/heads/ register each aggregator with `@register_aggregator` on a
class whose `name`, `help` and `init_stream` are literals. Those classes are torch
modules, and the CLI's help must not load torch, so `registered_aggregators` reads those
attributes from the package's source instead of importing it, and orders them as the
registry does (by `init_stream`). tests/test_probe_heads.py checks that this view and the
imported registry agree.
"""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["registered_aggregators"]

_HEADS = Path(__file__).with_name("heads")


def registered_aggregators() -> list[tuple[str, str]]:
    """(name, one-line help) of every registered aggregator, in registry order."""
    found = []
    for path in sorted(_HEADS.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
                attrs = {
                    target.id: stmt.value.value
                    for stmt in node.body
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                    for target in stmt.targets
                    if isinstance(target, ast.Name)
                }
                stream = attrs["init_stream"]
                if not isinstance(stream, int):
                    raise TypeError(f"{path.name}:{node.name}: init_stream must be an int literal")
                found.append((stream, str(attrs["name"]), str(attrs["help"])))
    return [(name, help_) for _, name, help_ in sorted(found)]


def _is_register(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Name) and decorator.id == "register_aggregator"
