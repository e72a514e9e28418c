"""AbMILP, Selective Aggregation, and the options of the paper's code: the `abmilp*` heads.

`abmilp`: a scorer gives each patch one logit, softmax over the patches, weighted sum of
the patch tokens. Depth 1 is a single `Linear(D, 1)`; depth k puts k-1 `Linear(D, D)` +
ReLU before it. The options of the paper code's AbMILP head are class attributes of the
same aggregator, one registered name per setting: `abmilp_tanh` (tanh hidden layers,
depth at least 2), `abmilp_sa` / `abmilp_sa_map` (a single-head self-attention before
scoring; pooling its output or the tokens), `abmilp_pe` (the scorer sees a 2-D sine-cosine
position embedding), `abmilp_all` (the class token is in the bag too).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.probe.heads.base import Aggregator, _linear_default, register_aggregator

__all__ = [
    "AbmilpPool",
    "ClsAbmilpPool",
    "PositionalAbmilpPool",
    "SelfAttentionAbmilpPool",
    "SelfAttentionMapAbmilpPool",
    "TanhAbmilpPool",
    "sincos_2d",
]


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """`(rows * cols, dim)` fixed 2-D sine-cosine position embedding of a patch grid in
    row-major order, as MAE's `get_2d_sincos_pos_embed`: the first half encodes a patch's
    column, the second its row, each as sin and cos at `dim / 4` frequencies 1/10000^(i/(dim/4))."""
    if dim % 4:
        raise AttnscopeError(f"a 2-D sine-cosine position embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def axis(pos: Tensor) -> Tensor:
        angle = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([axis(c.reshape(-1)), axis(r.reshape(-1))], dim=1).float()


@register_aggregator
class AbmilpPool(Aggregator):
    """Selective Aggregation: softmax over per-patch scores, weighted sum of patch tokens.

    Its options are those of the paper code's `ABMILPHead`; each registered subclass sets
    some. The bag is the patches, or with `with_cls` the class token and the patches (its
    `content="all"`). `self_attention`: one single-head self-attention layer (its
    `Attention(dim, num_heads=1)`: qkv without bias, an output projection with bias) over
    the bag, whose output the scorer reads (`"map"`), and which is also what is pooled
    (`"both"`). `positional`: the scorer reads the tokens plus a fixed 2-D sine-cosine
    position embedding (`cond="pe"`; zero for the class token). The scorer has
    `max(abmilp_depth, min_depth)` layers, hidden ones `Linear(D, D)` with `activation`.
    Every layer is initialised as `nn.Linear`.

    Without options (`plain`: `abmilp` itself) the logits are plain matrix products over
    the patches, and at depth 1 the bank pools this head with the other linear scorers in
    one pass (`linear_scores`). With options it is computed head by head: the
    self-attention's (H, B, N, N) maps make it the costliest head.
    """

    name = "abmilp"
    help = "Selective Aggregation, the paper's head: a softmax over one score per patch weights the patches"
    selective = True
    init_stream = 3
    activation: ClassVar[str] = "relu"
    self_attention: ClassVar[str] = "none"  # "none", "map" or "both"
    positional: ClassVar[bool] = False
    with_cls: ClassVar[bool] = False
    min_depth: ClassVar[int] = 1

    def __init__(
        self,
        num_heads: int,
        dim: int,
        depth: int = 1,
        *,
        generator: torch.Generator,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(num_heads, dim)
        if depth < 1:
            raise ConfigError("abmilp_depth", f"must be at least 1, got {depth}")
        self.depth = max(depth, self.min_depth)
        self.grid = grid
        if self.self_attention != "none":
            qkv_w, _ = _linear_default(num_heads, 3 * dim, dim, generator)
            self.qkv_w = qkv_w
            self.proj_w, self.proj_b = _linear_default(num_heads, dim, dim, generator)
        self.hidden_w = nn.ParameterList()
        self.hidden_b = nn.ParameterList()
        for _ in range(self.depth - 1):
            w, b = _linear_default(num_heads, dim, dim, generator)
            self.hidden_w.append(w)
            self.hidden_b.append(b)
        # (H, 1, D): per head exactly the weight of one Linear(D, 1), D + 1 parameters with the bias.
        self.score_w, self.score_b = _linear_default(num_heads, 1, dim, generator)

    @classmethod
    def create(
        cls,
        num_heads: int,
        dim: int,
        *,
        generator: torch.Generator,
        abmilp_depth: int = 1,
        grid: tuple[int, int] | None = None,
    ) -> AbmilpPool:
        return cls(num_heads, dim, abmilp_depth, generator=generator, grid=grid)

    @property
    def plain(self) -> bool:
        """No option set: ReLU hidden layers over the patches alone, nothing before the scorer."""
        return (
            self.activation == "relu"
            and self.self_attention == "none"
            and not self.positional
            and not self.with_cls
        )

    def scores(self, patches: Tensor) -> Tensor:
        """`(B, H, N)` logits of the `plain` head. Plain matrix products on a `(B*N, D)` view:
        einsum would copy the patch tensor (the largest one) in forward and backward."""
        b, n, d = patches.shape
        x = patches.reshape(b * n, d)
        if self.depth == 1:
            s = torch.addmm(self.score_b[:, 0], x, self.score_w[:, 0].t())  # (BN, H)
        else:
            h = F.relu(
                torch.matmul(x, self.hidden_w[0].transpose(1, 2)) + self.hidden_b[0][:, None]
            )  # (H, BN, D)
            for w, bias in zip(list(self.hidden_w)[1:], list(self.hidden_b)[1:], strict=True):
                h = F.relu(torch.baddbmm(bias[:, None], h, w.transpose(1, 2)))
            s = torch.baddbmm(self.score_b[:, None], h, self.score_w.transpose(1, 2))[..., 0].t()
        return s.reshape(b, n, self.num_heads).transpose(1, 2)

    def patch_weights(self, patches: Tensor, cls: Tensor | None = None) -> Tensor:
        if self.plain:
            return self.scores(patches).softmax(dim=-1).transpose(0, 1)
        weights, _ = self._weights(cls, patches)
        if self.with_cls:  # over the patches only, renormalised (the class token has no place on a map)
            weights = weights[..., 1:] / weights[..., 1:].sum(-1, keepdim=True)
        return weights

    def linear_scores(self) -> tuple[Tensor, Tensor | None] | None:
        return (self.score_w[:, 0], self.score_b[:, 0]) if self.plain and self.depth == 1 else None

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        if self.plain:
            return torch.bmm(self.scores(patches).softmax(dim=-1), patches)
        weights, content = self._weights(cls, patches)
        return torch.matmul(weights[..., None, :], content)[..., 0, :].transpose(0, 1)

    def _bag(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        if not self.with_cls:
            return patches
        if cls is None:
            raise AttnscopeError(f"the `{self.name}` aggregator needs a model with a class token")
        return torch.cat([cls[:, None], patches], dim=1)

    def _attend(self, bag: Tensor) -> Tensor:
        """`(H, B, N, D)`: each head's single-head self-attention over the bag."""
        b, n, d = bag.shape
        qkv = torch.matmul(bag.reshape(b * n, d), self.qkv_w.transpose(1, 2)).view(self.num_heads, b, n, 3, d)
        q, k, v = qkv.unbind(3)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, dim=-1)
        return (
            torch.matmul(torch.matmul(attn, v), self.proj_w.transpose(1, 2)[:, None])
            + self.proj_b[:, None, None]
        )

    def _position(self, bag: Tensor) -> Tensor:
        n = bag.shape[1] - (1 if self.with_cls else 0)
        grid = self.grid
        if grid is None or grid[0] * grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise AttnscopeError(f"`{self.name}` needs the patch grid; {n} patches are no square")
            grid = (side, side)
        pos = sincos_2d(self.dim, grid).to(bag.device, bag.dtype)
        return torch.cat([pos.new_zeros(1, self.dim), pos]) if self.with_cls else pos

    def _weights(self, cls: Tensor | None, patches: Tensor) -> tuple[Tensor, Tensor]:
        """(`(H, B, N)` softmax weights over the bag, `(H or 1, B, N, D)` what they pool)."""
        bag = self._bag(cls, patches)
        attended = self._attend(bag) if self.self_attention != "none" else None
        scored = attended if attended is not None else bag[None]
        if self.positional:
            scored = scored + self._position(bag)
        h = scored
        for w, bias in zip(self.hidden_w, self.hidden_b, strict=True):
            h = torch.matmul(h, w.transpose(1, 2)[:, None]) + bias[:, None, None]
            h = torch.tanh(h) if self.activation == "tanh" else F.relu(h)
        logits = (torch.matmul(h, self.score_w.transpose(1, 2)[:, None]) + self.score_b[:, None, None])[
            ..., 0
        ]
        content = attended if self.self_attention == "both" and attended is not None else bag[None]
        return torch.softmax(logits, dim=-1), content


@register_aggregator
class TanhAbmilpPool(AbmilpPool):
    name = "abmilp_tanh"
    help = "AbMILP whose scorer has tanh hidden layers (at least one: the paper code's default depth 2)"
    init_stream = 6
    activation = "tanh"
    min_depth = 2


@register_aggregator
class SelfAttentionAbmilpPool(AbmilpPool):
    name = "abmilp_sa"
    help = "AbMILP after a single-head self-attention over the patches, which it scores and pools (sa both)"
    init_stream = 7
    self_attention = "both"


@register_aggregator
class SelfAttentionMapAbmilpPool(AbmilpPool):
    name = "abmilp_sa_map"
    help = "AbMILP scoring the output of a self-attention over the patches but pooling the patches (sa map)"
    init_stream = 8
    self_attention = "map"


@register_aggregator
class PositionalAbmilpPool(AbmilpPool):
    name = "abmilp_pe"
    help = "AbMILP whose scorer also sees a fixed 2-D sine-cosine position embedding (cond pe)"
    init_stream = 9
    positional = True


@register_aggregator
class ClsAbmilpPool(AbmilpPool):
    name = "abmilp_all"
    help = "AbMILP over the class token and the patches together (content all)"
    init_stream = 10
    needs_cls = True
    with_cls = True
