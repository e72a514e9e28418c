"""Versions of everything that can change a number (recorded in run.json, hashed for reuse)."""

from __future__ import annotations

import platform
from importlib import metadata

_VERSIONED = (
    "attnscope",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "matplotlib",
    "seaborn",
    "pillow",
)


def package_versions() -> dict[str, str | None]:
    """Versions of everything that can change a number, for run.json."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover
        pass
    return out
