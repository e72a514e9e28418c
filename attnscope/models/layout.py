"""Where each kind of token sits: `[cls?] [registers R] [patches P]`, from the model itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in the sequence: `[cls?] [registers R] [patches P]`.

    Built from the model's own attributes and the real input size, because the papers'
    reference code that assumed `sqrt(N)` grids or a class token at index 0 breaks on
    non-square inputs, registers and I-JEPA.
    """

    has_cls: bool
    num_registers: int
    num_prefix: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def cls_index(self) -> int | None:
        return 0 if self.has_cls else None

    @property
    def register_slice(self) -> slice:
        start = 1 if self.has_cls else 0
        return slice(start, start + self.num_registers)

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_patches)

    def as_dict(self) -> dict[str, Any]:
        return {
            "has_cls": self.has_cls,
            "num_registers": self.num_registers,
            "num_prefix_tokens": self.num_prefix,
            "grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "num_patches": self.num_patches,
            "num_tokens": self.num_tokens,
        }


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def token_layout(model: nn.Module, input_hw: tuple[int, int]) -> TokenLayout:
    """Token layout of `model` for an input of `input_hw` pixels."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "patch_size"):
        raise AttnscopeError(f"{type(model).__name__} has no patch embedding attnscope understands")
    patch = _pair(patch_embed.patch_size)
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid = _pair(patch_embed.dynamic_feat_size(tuple(input_hw)))
    else:
        grid = (input_hw[0] // patch[0], input_hw[1] // patch[1])
    has_cls = getattr(model, "cls_token", None) is not None
    num_prefix = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))
    num_registers = num_prefix - (1 if has_cls else 0)
    if num_registers < 0:
        raise AttnscopeError(
            f"{type(model).__name__}: inconsistent prefix tokens ({num_prefix}) and class token"
        )
    return TokenLayout(has_cls, num_registers, num_prefix, grid, patch)
