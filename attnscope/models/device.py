"""Which torch device a `device` setting (auto, cpu, cuda, cuda:N, mps) means here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnscope.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit choice must exist."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but CUDA is not available here; use auto or cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device", "mps requested but Apple MPS is not available here; use auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError("device", f"{device!r} is unknown; use auto, cpu, cuda, cuda:N or mps") from exc
