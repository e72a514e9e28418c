"""The aggregator registry and base class, and the stacked-weight initialisers every head uses.

Aggregators are registered by name (`@register_aggregator`, like timm's `@register_model`):
each class says what it needs (`needs_cls`), whether it weights the patches (`selective`),
its one-line `help` and the random stream its initialisation draws from. `AGGREGATORS`,
`parse_aggregators`, the CLI help and every "which aggregators exist" list come from that
registry, so adding an aggregator is its class, in its family's module (and its test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

from attnscope.errors import AttnscopeError, ConfigError

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "aggregator_class",
    "build_aggregator",
    "parse_aggregators",
    "register_aggregator",
]


def _uniform(shape: Sequence[int], bound: float, g: torch.Generator) -> Tensor:
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


def _trunc_normal(shape: Sequence[int], std: float, g: torch.Generator) -> Tensor:
    """N(0, std) truncated at 2 std by resampling (the timm/MAE init, with our generator)."""
    x = torch.randn(*shape, generator=g)
    bad = x.abs() > 2
    while bad.any():
        x[bad] = torch.randn(int(bad.sum()), generator=g)
        bad = x.abs() > 2
    return x * std


def _linear_default(
    num_heads: int, out_f: int, in_f: int, g: torch.Generator
) -> tuple[nn.Parameter, nn.Parameter]:
    """Stacked weights initialised like `nn.Linear` (kaiming-uniform a=sqrt(5) -> U(±1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(in_f)
    return nn.Parameter(_uniform((num_heads, out_f, in_f), bound, g)), nn.Parameter(
        _uniform((num_heads, out_f), bound, g)
    )


class Aggregator(nn.Module):
    """Pools `(B, N, D)` patch tokens (and the class token) for `num_heads` heads at once.

    `forward` returns `(B, H, F)`, or `(B, 1, F)` when the aggregator has no parameters
    (`shared`): then one pooled tensor serves every head of the bank. Batch-major, so the
    pooling is one `bmm` over the batch and the result feeds BatchNorm without a copy.

    A concrete aggregator sets the registry's class attributes and is decorated with
    `@register_aggregator`.
    """

    name: ClassVar[str] = ""  # its name in a probe config and in results.csv
    help: ClassVar[str] = ""  # one line: what it pools
    needs_cls: ClassVar[bool] = False  # only for models with a class token
    selective: ClassVar[bool] = False  # weights the patches (`patch_weights`): drawn in the probe's maps
    # Its heads' initialisation draws from generator seed * 1000 + init_stream: fixed per
    # aggregator (never renumber one), so adding an aggregator leaves every other's init unchanged.
    init_stream: ClassVar[int] = -1
    shared: ClassVar[bool] = False
    uses_mean: ClassVar[bool] = False  # pools from the patch mean (`from_mean`), which HeadBank computes once

    def __init__(self, num_heads: int, dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim

    @classmethod
    def create(
        cls,
        num_heads: int,
        dim: int,
        *,
        generator: torch.Generator,
        abmilp_depth: int = 1,
        grid: tuple[int, int] | None = None,
    ) -> Aggregator:
        """The bank's constructor: aggregators with parameters draw them from `generator`.
        `grid`: the patch grid (rows, columns), for aggregators that know where a patch is."""
        if cls.shared:
            return cls(num_heads, dim)
        # an aggregator with parameters takes the generator, which the base signature cannot say
        return cls(num_heads, dim, generator=generator)  # type: ignore[call-arg]

    @property
    def out_dim(self) -> int:
        return self.dim

    def params_per_head(self) -> int:
        return sum(p.numel() for p in self.parameters()) // max(1, self.num_heads)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def patch_weights(self, patches: Tensor, cls: Tensor | None = None) -> Tensor | None:
        """`(H, B, N)` weights over the patches that sum to 1, for selective aggregators."""
        return None

    def linear_scores(self) -> tuple[Tensor, Tensor | None] | None:
        """`(W (K, D), bias (K,) or None)` when this aggregator is "softmax over the patches
        of `patches @ W.T + bias`, column by column, then the weighted sums of the patches,
        then `from_pooled`". `HeadBank` then computes the logits and the weighted sums of
        every such aggregator in one matrix product each, over one read of the patches."""
        return None

    def from_pooled(self, pooled: Tensor) -> Tensor:
        """`(B, K, D)` softmax-weighted sums of the patches -> this aggregator's `(B, H, F)`."""
        return pooled

    def from_mean(self, cls: Tensor | None, mean: Tensor) -> Tensor:
        """`(B, D)` patch mean (and the class token) -> `(B, H, F)`, when `uses_mean`."""
        raise NotImplementedError


AGGREGATORS: dict[str, type[Aggregator]] = {}  # the registry, in init_stream order
_A = TypeVar("_A", bound=type[Aggregator])


def register_aggregator(cls: _A) -> _A:
    """Class decorator: add an aggregator to `AGGREGATORS` under `cls.name`."""
    streams = {c.init_stream: c.name for c in AGGREGATORS.values()}
    if not cls.name or not cls.help or cls.init_stream < 0:
        raise TypeError(f"{cls.__name__} must set name, help and init_stream to be registered")
    if cls.name in AGGREGATORS or cls.init_stream in streams:
        raise TypeError(f"{cls.__name__}: name {cls.name!r} or init_stream {cls.init_stream} is taken")
    AGGREGATORS[cls.name] = cls
    # in init_stream order, the order aggregators were added in, whatever order their
    # family modules are imported in: the CLI lists them so and the maps draw the first selective one
    ordered = sorted(AGGREGATORS.values(), key=lambda c: c.init_stream)
    AGGREGATORS.clear()
    AGGREGATORS.update((c.name, c) for c in ordered)
    return cls


def aggregator_class(name: str) -> type[Aggregator]:
    """The registered aggregator called `name`."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise AttnscopeError(f"unknown aggregator {name!r}; choose from: {', '.join(AGGREGATORS)}") from None


def parse_aggregators(text: str | Sequence[str]) -> list[str]:
    """'cls, mean,abmilp' -> ['cls', 'mean', 'abmilp']; unknown names fail with the choices."""
    items = text.split(",") if isinstance(text, str) else [s for t in text for s in t.split(",")]
    names = list(dict.fromkeys(s.strip().lower() for s in items if s.strip()))
    if not names:
        raise ConfigError("aggregators", f"needs at least one of: {', '.join(AGGREGATORS)}")
    bad = [n for n in names if n not in AGGREGATORS]
    if bad:
        raise ConfigError(
            "aggregators",
            f"names an unknown aggregator {', '.join(bad)}; choose from: {', '.join(AGGREGATORS)}",
        )
    return names


def build_aggregator(
    name: str,
    num_heads: int,
    dim: int,
    *,
    abmilp_depth: int = 1,
    generator: torch.Generator,
    grid: tuple[int, int] | None = None,
) -> Aggregator:
    """`num_heads` heads of the registered aggregator `name`, initialised from `generator`."""
    return aggregator_class(name).create(
        num_heads, dim, generator=generator, abmilp_depth=abmilp_depth, grid=grid
    )
