"""What a family converter is: how to recognise its release files, which architecture
settings they need, how their keys map onto the model, and the family's eval preprocessing."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnscope.models.checkpoints import Conversion, RawCheckpoint, generic_conversion
from attnscope.models.preprocessing import DataConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


def _no_kwargs(raw: RawCheckpoint) -> dict[str, Any]:
    return {}


def _generic(raw: RawCheckpoint, model: nn.Module) -> Conversion:
    return generic_conversion(raw)


@dataclass(frozen=True)
class Converter:
    """One checkpoint layout (a family's official release format).

    `recognise(raw)` says whether a file has this layout; `arch_kwargs(raw)` are the
    architecture settings the weights need (heads, pooling, LayerScale, position terms)
    that weight shapes alone cannot tell; `convert(raw, model)` renames the keys into the
    model's and lists every key it did not use. `build`, when set, builds the model itself
    (an architecture timm does not have).
    """

    name: str
    label: str
    family: str
    data_config: DataConfig | None
    recognise: Callable[[RawCheckpoint], bool]
    convert: Callable[[RawCheckpoint, nn.Module], Conversion] = _generic
    arch_kwargs: Callable[[RawCheckpoint], dict[str, Any]] = _no_kwargs
    build: Callable[[Mapping[str, Any]], nn.Module] | None = None
    aliases: Mapping[int, str] = field(default_factory=dict)  # embed dim -> alias to suggest
    preprocessing: Callable[[RawCheckpoint], DataConfig | None] | None = None  # per file, if it says
    positions: str | None = None  # the family's position resize (`attnscope.models.positions.RULES`)

    def data_config_of(self, raw: RawCheckpoint) -> DataConfig | None:
        """The file's own eval preprocessing when it states one, else the family's."""
        own = self.preprocessing(raw) if self.preprocessing is not None else None
        return own or self.data_config

    def hint(self, width: int | None = None) -> str:
        alias = self.aliases.get(width) if width is not None else None
        alias = alias or next(iter(self.aliases.values()), None)
        return f"; load it as the model {alias}" if alias else ""


def width_of(state: Mapping[str, torch.Tensor]) -> int | None:
    """The embedding width, from the class token or the patch projection."""
    for key in ("cls_token", "patch_embed.proj.weight", "patch_embed.weight"):
        if key in state:
            return int(state[key].shape[-1] if key == "cls_token" else state[key].shape[0])
    return None


def sincos_2d(dim: int, grid: tuple[int, int], rows_first: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position terms, (1 + H*W, dim) with a zero row for the class token.

    Per axis the frequencies are 10000^(-k/(dim/4)), k < dim/4, and each axis gives
    [sin, cos]. MoCo v3 puts the row axis first, MAE the column axis first; recognising
    either tells a fixed (untrained) embedding from a learned one.
    """
    import torch

    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    first, second = (rows, cols) if rows_first else (cols, rows)
    a = first.reshape(-1, 1) * omega
    b = second.reshape(-1, 1) * omega
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])


def sincos_order(pos_embed: torch.Tensor) -> str | None:
    """'rows' (MoCo v3) or 'cols' (MAE) if `pos_embed` is a fixed 2-D sin-cos table on a
    square grid with a class-token row, else None."""
    if pos_embed.ndim != 3 or pos_embed.shape[-1] % 4:
        return None
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n or side == 0:
        return None
    table = pos_embed[0].double()
    for order, rows_first in (("rows", True), ("cols", False)):
        if (table - sincos_2d(pos_embed.shape[-1], (side, side), rows_first)).abs().max() < 1e-4:
            return order
    return None
