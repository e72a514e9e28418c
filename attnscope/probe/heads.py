"""Probe heads: aggregators over last-block tokens, each + BatchNorm1d(affine=False) + Linear.

A probing run trains a *bank*: every aggregator at every (learning rate, weight decay)
point of a grid. Heads of one aggregator type are stored stacked, with a leading head
dimension `H` on every parameter, and computed with batched products over that dimension,
so every head of the bank steps on a batch of tokens read once.

The patch bag is `tokens[:, num_prefix:]`: the class token *and* any registers are kept out
of it (registers are prefix tokens too; treating only index 0 as special would let a
pooled head attend to registers).

Aggregators are registered by name (`@register_aggregator`, like timm's `@register_model`):
each class says what it needs (`needs_cls`), whether it weights the patches (`selective`),
its one-line `help` and the random stream its initialisation draws from. `AGGREGATORS`,
`parse_aggregators`, the CLI help and every "which aggregators exist" list come from that
registry, so adding an aggregator is its class (and its test):

- `cls`: the class token.
- `mean`: the mean of the patch tokens.
- `cls_mean`: both, concatenated (width 2D).
- `abmilp`: Selective Aggregation; a scorer gives each patch one logit, softmax over the
  patches, weighted sum of the patch tokens. Depth 1 is a single `Linear(D, 1)`; depth k
  puts k-1 `Linear(D, D)` + ReLU before it.
- `abmilp_gated`: Ilse et al. 2018, logit = w^T [tanh(V h) * sigmoid(U h)], hidden 128.
- `attentive`: one learnable query, key/value projection `Linear(D, 2D)`, D/64 heads,
  scaled-dot-product cross-attention over the patches, no MLP and no output projection.
- The options of the paper code's AbMILP head (`_AbmilpOptions`): `abmilp_tanh` (tanh
  hidden layers, depth at least 2), `abmilp_sa` / `abmilp_sa_map` (a single-head
  self-attention before scoring; pooling its output or the tokens), `abmilp_pe` (the
  scorer sees a 2-D sine-cosine position embedding), `abmilp_all` (the class token is in
  the bag too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnscope.errors import AttnscopeError, ConfigError

__all__ = [
    "AGGREGATORS",
    "CLASSIFIER_INITS",
    "AbmilpPool",
    "Aggregator",
    "AttentivePool",
    "ClsMeanPool",
    "ClsPool",
    "GatedAbmilpPool",
    "HeadBank",
    "MeanPool",
    "ProbeHeads",
    "aggregator_class",
    "sincos_2d",
    "build_aggregator",
    "parse_aggregators",
    "register_aggregator",
    "synced_batch_norm",
]

# The classifier's initialisation: MAE's trunc_normal(std 0.01) weights and zero bias (the
# default recipe), or what `nn.Linear` draws, U(+-1/sqrt(fan_in)) for weights and bias
# (the paper recipe: "Beyond [cls]"'s code replaces the head with a fresh nn.Linear).
CLASSIFIER_INITS = ("trunc_normal", "linear_default")
GATED_HIDDEN = 128
ATTENTIVE_HEAD_DIM = 64
BN_EPS = 1e-6  # as MAE's linear-probe BatchNorm
SumFn = Callable[[Tensor], Tensor]  # a differentiable sum of a 1-D tensor over every process


# --------------------------------------------------------------------------- init


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


# --------------------------------------------------------------------------- aggregators


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


AGGREGATORS: dict[str, type[Aggregator]] = {}  # the registry, in registration order
_A = TypeVar("_A", bound=type[Aggregator])


def register_aggregator(cls: _A) -> _A:
    """Class decorator: add an aggregator to `AGGREGATORS` under `cls.name`."""
    streams = {c.init_stream: c.name for c in AGGREGATORS.values()}
    if not cls.name or not cls.help or cls.init_stream < 0:
        raise TypeError(f"{cls.__name__} must set name, help and init_stream to be registered")
    if cls.name in AGGREGATORS or cls.init_stream in streams:
        raise TypeError(f"{cls.__name__}: name {cls.name!r} or init_stream {cls.init_stream} is taken")
    AGGREGATORS[cls.name] = cls
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


@register_aggregator
class ClsPool(Aggregator):
    name = "cls"
    help = "the class token"
    needs_cls = True
    init_stream = 0
    shared = True

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        if cls is None:
            raise AttnscopeError("the `cls` aggregator needs a model with a class token")
        return cls.unsqueeze(1)


@register_aggregator
class MeanPool(Aggregator):
    name = "mean"
    help = "the mean of the patch tokens"
    init_stream = 1
    shared = True
    uses_mean = True

    def from_mean(self, cls: Tensor | None, mean: Tensor) -> Tensor:
        return mean.unsqueeze(1)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return self.from_mean(cls, patches.mean(dim=1))


@register_aggregator
class ClsMeanPool(Aggregator):
    name = "cls_mean"
    help = "the class token and the patch mean, concatenated"
    needs_cls = True
    init_stream = 2
    shared = True
    uses_mean = True

    @property
    def out_dim(self) -> int:
        return 2 * self.dim

    def from_mean(self, cls: Tensor | None, mean: Tensor) -> Tensor:
        if cls is None:
            raise AttnscopeError("the `cls_mean` aggregator needs a model with a class token")
        return torch.cat([cls, mean], dim=-1).unsqueeze(1)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return self.from_mean(cls, patches.mean(dim=1))


@register_aggregator
class AbmilpPool(Aggregator):
    """Selective Aggregation: softmax over per-patch scores, weighted sum of patch tokens."""

    name = "abmilp"
    help = "Selective Aggregation, the paper's head: a softmax over one score per patch weights the patches"
    selective = True
    init_stream = 3

    def __init__(self, num_heads: int, dim: int, depth: int = 1, *, generator: torch.Generator) -> None:
        super().__init__(num_heads, dim)
        if depth < 1:
            raise ConfigError("abmilp_depth", f"must be at least 1, got {depth}")
        self.depth = depth
        self.hidden_w = nn.ParameterList()
        self.hidden_b = nn.ParameterList()
        for _ in range(depth - 1):
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
        return cls(num_heads, dim, abmilp_depth, generator=generator)

    def scores(self, patches: Tensor) -> Tensor:
        """`(B, H, N)` logits. Plain matrix products on a `(B*N, D)` view: einsum would copy
        the patch tensor (the largest one) in forward and backward."""
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
        return self.scores(patches).softmax(dim=-1).transpose(0, 1)

    def linear_scores(self) -> tuple[Tensor, Tensor | None] | None:
        return (self.score_w[:, 0], self.score_b[:, 0]) if self.depth == 1 else None

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return torch.bmm(self.scores(patches).softmax(dim=-1), patches)


@register_aggregator
class GatedAbmilpPool(Aggregator):
    """Gated attention MIL pooling (Ilse, Tomczak & Welling 2018)."""

    name = "abmilp_gated"
    help = "gated attention MIL pooling, Ilse et al. 2018"
    selective = True
    init_stream = 4

    def __init__(
        self, num_heads: int, dim: int, hidden: int = GATED_HIDDEN, *, generator: torch.Generator
    ) -> None:
        super().__init__(num_heads, dim)
        self.hidden = hidden
        v_w, v_b = _linear_default(num_heads, hidden, dim, generator)
        u_w, u_b = _linear_default(num_heads, hidden, dim, generator)
        # V and U of every head in one weight, so all heads' hidden units are one GEMM.
        self.vu_w = nn.Parameter(torch.cat([v_w.data, u_w.data], dim=1))
        self.vu_b = nn.Parameter(torch.cat([v_b.data, u_b.data], dim=1))
        self.w, self.w_b = _linear_default(num_heads, 1, hidden, generator)

    def scores(self, patches: Tensor) -> Tensor:
        b, n, d = patches.shape
        logits = _GatedScores.apply(
            patches.reshape(b * n, d), self.vu_w, self.vu_b, self.w[:, 0], self.w_b[:, 0], self.hidden
        )
        return logits.view(b, n, self.num_heads).transpose(1, 2)

    def scores_reference(self, patches: Tensor) -> Tensor:
        """Plain autograd version of `scores` (for tests)."""
        b, n, d = patches.shape
        hid = torch.einsum("bnd,hed->bnhe", patches, self.vu_w) + self.vu_b
        gated = torch.tanh(hid[..., : self.hidden]) * torch.sigmoid(hid[..., self.hidden :])
        return torch.einsum("bnhl,hl->bhn", gated, self.w[:, 0]) + self.w_b[:, 0, None]

    def patch_weights(self, patches: Tensor, cls: Tensor | None = None) -> Tensor:
        return self.scores(patches).softmax(dim=-1).transpose(0, 1)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return torch.bmm(self.scores(patches).softmax(dim=-1), patches)


_GATED_CHUNK_BYTES = 8 * 2**20


class _GatedScores(torch.autograd.Function):
    """Gated-attention logits of all heads, computed in row chunks.

    The hidden activations (tokens x heads x 2 x 128) are the largest tensors of the bank.
    Only tanh(Vh) and sigmoid(Uh) are kept for backward, in chunks of at most
    `_GATED_CHUNK_BYTES`, and backward is written out, so no other tensor of that size is
    alive at once (plain autograd keeps five per head group). Equals `scores_reference`
    (tested); benchmarks/README.md has the timings.
    """

    @staticmethod
    def _chunks(rows: int, width: int) -> list[slice]:
        step = max(1, _GATED_CHUNK_BYTES // (4 * width))
        return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]

    @staticmethod
    def forward(ctx, x: Tensor, vu_w: Tensor, vu_b: Tensor, w: Tensor, w_b: Tensor, hidden: int) -> Tensor:
        heads = vu_w.shape[0]
        out = x.new_empty(len(x), heads)
        w_flat, b_flat = vu_w.reshape(-1, x.shape[1]), vu_b.reshape(-1)
        saved: list[tuple[Tensor, Tensor]] = []
        for sl in _GatedScores._chunks(len(x), heads * 2 * hidden):
            hid = torch.addmm(b_flat, x[sl], w_flat.t()).view(-1, heads, 2, hidden)
            t, s = torch.tanh(hid[:, :, 0]), torch.sigmoid(hid[:, :, 1])
            out[sl] = torch.einsum("mhl,hl->mh", t * s, w)
            saved.append((t, s))
        ctx.save_for_backward(x, vu_w, w)
        ctx.chunks = saved
        return out + w_b

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, vu_w, w = ctx.saved_tensors
        heads, d = vu_w.shape[0], x.shape[1]
        g_vu_w = torch.zeros(vu_w.numel() // d, d, dtype=x.dtype, device=x.device)
        g_vu_b = torch.zeros(vu_w.numel() // d, dtype=x.dtype, device=x.device)
        g_w = torch.zeros_like(w)
        g_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        w_flat = vu_w.reshape(-1, d)
        start = 0
        for t, s in ctx.chunks:
            sl = slice(start, start + len(t))
            start += len(t)
            gc = grad[sl].unsqueeze(-1)  # (m, H, 1)
            g_w += (gc * t * s).sum(0)
            dg = gc * w  # (m, H, L)
            d_hid = torch.stack([dg * s * (1 - t * t), dg * t * s * (1 - s)], dim=2).reshape(len(t), -1)
            g_vu_w.addmm_(d_hid.t(), x[sl])
            g_vu_b += d_hid.sum(0)
            if g_x is not None:
                g_x[sl] = d_hid @ w_flat
        return g_x, g_vu_w.view_as(vu_w), g_vu_b.view(heads, -1), g_w, grad.sum(0), None


class Scratch:
    """Named buffers reused from call to call, or fresh tensors when disabled.

    A probe step makes a handful of map-sized temporaries (the patch bag, the weights over
    the patches, the pooled tokens, their gradients); with reuse each exists once per bank
    instead of once per step (why that matters on CPUs: benchmarks/README.md). Reusing them
    is only safe when every forward is backpropagated (or run without grad) before the
    next one, so it is off unless a trainer that guarantees that turns it on
    (`HeadBank.reuse_buffers`).
    """

    def __init__(self) -> None:
        self.enabled = False
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised `shape` tensor on `like`'s device, of `dtype` (default: `like`'s)."""
        dtype = dtype or like.dtype
        if not self.enabled:
            return like.new_empty(shape, dtype=dtype)
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != like.device or buf.dtype != dtype:
            buf = self._buffers[name] = like.new_empty(numel, dtype=dtype)
        return buf[:numel].view(*shape)


class _SoftmaxPool(torch.autograd.Function):
    """`softmax(w x_b^T + bias) x_b` for every image b and every row of `w`, plus the
    patch mean, with the backward written out.

    Autograd's version of the same products allocates every intermediate afresh (the
    logits, the pooled tokens, their gradients, and a zero-filled gradient for each slice
    of the pooled tensor that an aggregator takes) and reaches the gradient of `w` through
    an expand over the batch. Here the map-sized tensors live in `Scratch` buffers, each
    group of rows is its own output (so no zero-filled slice gradients), and the mean is
    one more row of the weighted sum (weights 1/N). Same function; tested against autograd.

    Arguments after `scratch`: the number of rows of each group, then `w (K, D)` and
    `bias (K,)` of all groups concatenated. Returns one `(B, K_i, D)` view per group and
    the `(B, D)` mean (or None).
    """

    @staticmethod
    def forward(
        ctx,
        patches: Tensor,
        with_mean: bool,
        scratch: Scratch,
        sizes: tuple[int, ...],
        w: Tensor,
        bias: Tensor,
    ):
        b, n, d = patches.shape
        k = w.shape[0]
        probs = scratch.get("pool_probs", (b, k, n), patches)
        if k:
            # batched (K, D) x (D, N) products give the logits directly in the (B, K, N)
            # layout the softmax and the weighted sum read, so no transposed copy is made
            logits = scratch.get("pool_logits", (b, k, n), patches)
            torch.baddbmm(
                bias.view(1, k, 1).expand(b, k, 1), w.expand(b, k, d), patches.transpose(1, 2), out=logits
            )
            torch.softmax(logits, dim=-1, out=probs)
        weights = probs
        if with_mean:
            weights = scratch.get("pool_weights", (b, k + 1, n), patches)
            weights[:, :k] = probs
            weights[:, k].fill_(1.0 / n)
        pooled = torch.bmm(weights, patches, out=scratch.get("pool_out", (b, weights.shape[1], d), patches))
        ctx.save_for_backward(patches, w, bias)
        ctx.weights, ctx.scratch, ctx.sizes = probs, scratch, list(sizes)
        groups = pooled[:, :k].split(ctx.sizes, dim=1)
        mean = pooled[:, k] if with_mean else None
        if mean is not None:
            ctx.mark_non_differentiable(mean)  # no parameter before it
        return (*groups, mean)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        patches, w, bias = ctx.saved_tensors
        a, scratch = ctx.weights, ctx.scratch
        b, n, d = patches.shape
        k = w.shape[0]
        grad_groups = grads[:-1]
        if not k or all(g is None for g in grad_groups):
            return None, None, None, None, torch.zeros_like(w), torch.zeros_like(bias)
        grad_pooled = scratch.get("pool_grad_out", (b, k, d), patches)
        for g, part in zip(grad_groups, grad_pooled.split(ctx.sizes, dim=1), strict=True):
            if g is None:  # that output was not used
                part.zero_()
            else:
                part.copy_(g)
        # d loss / d weights, then through the softmax: g_l = a * (g_a - sum_n a g_a), in place
        g_l = torch.bmm(
            grad_pooled, patches.transpose(1, 2), out=scratch.get("pool_grad_weights", (b, k, n), patches)
        )
        dot = torch.mul(a, g_l, out=scratch.get("pool_product", (b, k, n), patches)).sum(-1, keepdim=True)
        g_l.sub_(dot).mul_(a)
        g_w = torch.bmm(g_l, patches, out=scratch.get("pool_grad_w", (b, k, d), patches)).sum(0)
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = torch.bmm(a.transpose(1, 2), grad_pooled) + torch.matmul(g_l.transpose(1, 2), w)
        # A bias shared by all the patches of a row cancels in the softmax: its gradient is
        # exactly zero (autograd would return the rounding noise of g_l.sum).
        return g_x, None, None, None, g_w, torch.zeros_like(bias)


def softmax_pool(
    patches: Tensor,
    scorers: Sequence[tuple[Tensor, Tensor]],
    *,
    with_mean: bool,
    scratch: Scratch | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """Softmax-over-the-patches pooling of several scorers at once, and the patch mean.

    `scorers`: `(w (K_i, D), bias (K_i,))` each. Returns one `(B, K_i, D)` tensor per
    scorer, row j being `softmax_n(w_j . x_n + bias_j)`-weighted sum of the patches, and the
    `(B, D)` patch mean when `with_mean` (else None)."""
    scratch = scratch or Scratch()
    if not scorers:
        return [], (patches.mean(dim=1) if with_mean else None)
    w = torch.cat([s[0] for s in scorers])
    bias = torch.cat([s[1] for s in scorers])
    *groups, mean = _SoftmaxPool.apply(
        patches, with_mean, scratch, tuple(len(s[0]) for s in scorers), w, bias
    )
    return groups, mean


def attentive_num_heads(dim: int) -> int:
    """D/64 attention heads (at least 1, and a divisor of D)."""
    g = max(1, dim // ATTENTIVE_HEAD_DIM)
    while dim % g:
        g -= 1
    return g


@register_aggregator
class AttentivePool(Aggregator):
    """One learnable query cross-attending to the patches (CAPI-style attentive probe).

    Computed in an order that never materialises keys and values for every patch:
    q . (W_k x + b_k) = (W_k^T q) . x + const, and the constant cancels in the softmax;
    sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v because the weights sum to one.
    That is the same function as `forward_sdpa` (the textbook form, used to test this one)
    at a cost of O(B N D G) instead of O(B N D^2) per head.
    """

    name = "attentive"
    help = "one learnable query cross-attending to the patches, a CAPI-style attentive probe"
    selective = True
    init_stream = 5

    def __init__(self, num_heads: int, dim: int, *, generator: torch.Generator) -> None:
        super().__init__(num_heads, dim)
        self.attn_heads = attentive_num_heads(dim)
        self.head_dim = dim // self.attn_heads
        self.query = nn.Parameter(torch.randn(num_heads, dim, generator=generator) * 0.02)
        # The key/value projection Linear(D, 2D), stored as its two halves: each half is
        # contiguous per query head, so the per-head views the products below take are views,
        # not copies, in forward and backward.
        kv_w = _trunc_normal((num_heads, 2 * dim, dim), 0.02, generator)
        self.k_w = nn.Parameter(kv_w[:, :dim].clone())
        self.v_w = nn.Parameter(kv_w[:, dim:].clone())
        # the key bias cancels in the softmax; kept because Linear(D, 2D) has it
        self.k_b = nn.Parameter(torch.zeros(num_heads, dim))
        self.v_b = nn.Parameter(torch.zeros(num_heads, dim))

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h, g, k, d = self.num_heads, self.attn_heads, self.head_dim, self.dim
        q = self.query.view(h, g, k)
        w_k, w_v = self.k_w.view(h, g, k, d), self.v_w.view(h, g, k, d)
        b_v = self.v_b.view(h, g, k)
        return q, w_k, w_v, b_v

    def _query_matrix(self) -> Tensor:
        """`(H*G, D)`: W_k^T q / sqrt(head_dim) per query head, so logits = patches @ it.T."""
        q, w_k, _, _ = self._split()
        hg = self.num_heads * self.attn_heads
        return torch.einsum("hgk,hgkd->hgd", q, w_k).reshape(hg, self.dim) / math.sqrt(self.head_dim)

    def _attention(self, patches: Tensor) -> Tensor:
        """`(B, H*G, N)` attention of every query head over the patches."""
        b, n, d = patches.shape
        q_eff = self._query_matrix()
        logits = torch.mm(patches.reshape(b * n, d), q_eff.t())
        return logits.reshape(b, n, q_eff.shape[0]).transpose(1, 2).softmax(dim=-1)

    def linear_scores(self) -> tuple[Tensor, Tensor | None] | None:
        return self._query_matrix(), None

    def from_pooled(self, pooled: Tensor) -> Tensor:
        """`(B, H*G, D)` attention-weighted patches -> `(B, H, D)`: W_v per query head, + b_v."""
        _, _, w_v, b_v = self._split()
        h, g, k, d = self.num_heads, self.attn_heads, self.head_dim, self.dim
        b = pooled.shape[0]
        out = torch.baddbmm(
            b_v.reshape(h * g, 1, k), pooled.transpose(0, 1), w_v.reshape(h * g, k, d).transpose(1, 2)
        )
        return out.view(h, g, b, k).permute(2, 0, 1, 3).reshape(b, h, d)

    def patch_weights(self, patches: Tensor, cls: Tensor | None = None) -> Tensor:
        b, n, _ = patches.shape
        return (
            self._attention(patches).view(b, self.num_heads, self.attn_heads, n).mean(dim=2).transpose(0, 1)
        )

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return self.from_pooled(torch.bmm(self._attention(patches), patches))

    def forward_sdpa(self, patches: Tensor) -> Tensor:
        """Reference: project keys and values, then `F.scaled_dot_product_attention`."""
        h, g, k = self.num_heads, self.attn_heads, self.head_dim
        b, n, d = patches.shape
        kv_w, kv_b = torch.cat([self.k_w, self.v_w], dim=1), torch.cat([self.k_b, self.v_b], dim=1)
        kv = torch.einsum("bnd,hed->hbne", patches, kv_w) + kv_b[:, None, None]
        keys = kv[..., :d].reshape(h, b, n, g, k).transpose(2, 3)
        values = kv[..., d:].reshape(h, b, n, g, k).transpose(2, 3)
        query = self.query.view(h, 1, g, 1, k).expand(h, b, g, 1, k)
        out = F.scaled_dot_product_attention(query, keys, values)  # (H, B, G, 1, K)
        return out.reshape(h, b, d).transpose(0, 1)


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


class _AbmilpOptions(Aggregator):
    """AbMILP with the options of the paper's code (`ABMILPHead`), one per registered name.

    The bag is the patches, or with `with_cls` the class token and the patches (its
    `content="all"`). `self_attention`: one single-head self-attention layer (its
    `Attention(dim, num_heads=1)`: qkv without bias, an output projection with bias) over
    the bag, whose output the scorer reads (`"map"`), and which is also what is pooled
    (`"both"`). `positional`: the scorer reads the tokens plus a fixed 2-D sine-cosine
    position embedding (`cond="pe"`; zero for the class token). The scorer has
    `max(abmilp_depth, min_depth)` layers, hidden ones `Linear(D, D)` with `activation`.
    Every layer is initialised as `nn.Linear`. Computed head by head on the plain path
    (no shared pooling): the self-attention's (H, B, N, N) maps make it the costliest head.
    """

    selective = True
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
        grid: tuple[int, int] | None,
    ) -> None:
        super().__init__(num_heads, dim)
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
    ) -> Aggregator:
        return cls(num_heads, dim, abmilp_depth, generator=generator, grid=grid)

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

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        weights, content = self._weights(cls, patches)
        return torch.matmul(weights[..., None, :], content)[..., 0, :].transpose(0, 1)

    def patch_weights(self, patches: Tensor, cls: Tensor | None = None) -> Tensor:
        weights, _ = self._weights(cls, patches)
        if self.with_cls:  # over the patches only, renormalised (the class token has no place on a map)
            weights = weights[..., 1:] / weights[..., 1:].sum(-1, keepdim=True)
        return weights


@register_aggregator
class TanhAbmilpPool(_AbmilpOptions):
    name = "abmilp_tanh"
    help = "AbMILP whose scorer has tanh hidden layers (at least one: the paper code's default depth 2)"
    init_stream = 6
    activation = "tanh"
    min_depth = 2


@register_aggregator
class SelfAttentionAbmilpPool(_AbmilpOptions):
    name = "abmilp_sa"
    help = "AbMILP after a single-head self-attention over the patches, which it scores and pools (sa both)"
    init_stream = 7
    self_attention = "both"


@register_aggregator
class SelfAttentionMapAbmilpPool(_AbmilpOptions):
    name = "abmilp_sa_map"
    help = "AbMILP scoring the output of a self-attention over the patches but pooling the patches (sa map)"
    init_stream = 8
    self_attention = "map"


@register_aggregator
class PositionalAbmilpPool(_AbmilpOptions):
    name = "abmilp_pe"
    help = "AbMILP whose scorer also sees a fixed 2-D sine-cosine position embedding (cond pe)"
    init_stream = 9
    positional = True


@register_aggregator
class ClsAbmilpPool(_AbmilpOptions):
    name = "abmilp_all"
    help = "AbMILP over the class token and the patches together (content all)"
    init_stream = 10
    needs_cls = True
    with_cls = True


def synced_batch_norm(bns: Sequence[nn.BatchNorm1d], inputs: Sequence[Tensor], sync: SumFn) -> list[Tensor]:
    """Train-mode BatchNorm of each `(B, C)` input with statistics over every process's batch.

    SyncBatchNorm semantics (torch's own `nn.SyncBatchNorm` refuses CPU tensors, so gloo
    runs could not use it, and makes one collective per layer): the count and every
    layer's per-channel sum and sum of squares go through ONE `sync` call, in float64 so
    that E[x^2] - E[x]^2 does not cancel.
    `sync` is differentiable (its backward sums the gradients over the processes too), so
    autograd yields exactly the gradient of BatchNorm over the whole distributed batch.
    The running statistics are updated as `nn.BatchNorm1d` does (momentum, or a
    cumulative average when momentum is None, unbiased variance), from the global
    statistics, so they stay identical on every process. A process may hold no rows.
    """
    stat = torch.float64 if inputs[0].device.type in ("cpu", "cuda") else torch.float32
    local = [inputs[0].new_full((1,), float(inputs[0].shape[0]), dtype=stat)]
    for x in inputs:
        x64 = x.to(stat)
        local += [x64.sum(0), (x64 * x64).sum(0)]
    total = sync(torch.cat(local))
    n = total[0].detach()  # a count: no gradient
    update = float(n) > 1  # as nn.BatchNorm1d, which refuses to train on one value per channel
    out: list[Tensor] = []
    offset = 1
    for bn, x in zip(bns, inputs, strict=True):
        c = x.shape[1]
        mean = total[offset : offset + c] / n
        var = (total[offset + c : offset + 2 * c] / n - mean * mean).clamp_min(
            0.0
        )  # biased, as BatchNorm normalises
        offset += 2 * c
        out.append((x - mean.to(x.dtype)) * torch.rsqrt(var + bn.eps).to(x.dtype))
        if update and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
            with torch.no_grad():
                assert bn.num_batches_tracked is not None  # kept whenever track_running_stats is
                bn.num_batches_tracked.add_(1)
                f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
                unbiased = var * (n / (n - 1))
                bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)
    return out


# --------------------------------------------------------------------------- heads


class ProbeHeads(nn.Module):
    """One aggregator type x H heads, each followed by BatchNorm1d(affine=False) and Linear."""

    def __init__(
        self,
        aggregator: Aggregator,
        num_classes: int,
        *,
        generator: torch.Generator,
        classifier_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        h, f = aggregator.num_heads, aggregator.out_dim
        # A shared (parameter-free) pooling gives every head the same input, so one
        # BatchNorm over F channels has exactly each head's statistics.
        self.bn = nn.BatchNorm1d(f if aggregator.shared else h * f, affine=False, eps=BN_EPS)
        if classifier_init == "trunc_normal":  # MAE's linear-probe head
            self.weight = nn.Parameter(_trunc_normal((h, f, num_classes), 0.01, generator))
            self.bias = nn.Parameter(torch.zeros(h, num_classes))
        elif classifier_init == "linear_default":  # nn.Linear(F, C) per head, stored (F, C)
            w, b = _linear_default(h, num_classes, f, generator)
            self.weight = nn.Parameter(w.data.transpose(1, 2).contiguous())
            self.bias = b
        else:
            raise ConfigError(
                "classifier_init", f"is one of {', '.join(CLASSIFIER_INITS)}, got {classifier_init!r}"
            )

    @property
    def num_heads(self) -> int:
        return self.aggregator.num_heads

    def params_per_head(self) -> int:
        return self.aggregator.params_per_head() + (self.weight.numel() + self.bias.numel()) // self.num_heads

    def bn_input(self, cls: Tensor | None, patches: Tensor, pooled: Tensor | None = None) -> Tensor:
        """`(B, F)` (shared pooling) or `(B, H*F)`: what the BatchNorm normalises.

        `pooled`: the aggregator's output when the caller already has it (`HeadBank.pool`)."""
        if pooled is None:
            pooled = self.aggregator(cls, patches)
        b, h, f = pooled.shape
        return pooled[:, 0] if self.aggregator.shared else pooled.reshape(b, h * f)  # explicit: b may be 0

    def classify(self, normed: Tensor) -> Tensor:
        """`(H, B, C)` logits from the BatchNorm's output."""
        b = normed.shape[0]
        h, f, c = self.weight.shape
        if self.aggregator.shared:
            logits = torch.mm(normed, self.weight.permute(1, 0, 2).reshape(f, h * c))
            return logits.view(b, h, c).transpose(0, 1) + self.bias[:, None]
        return torch.baddbmm(self.bias[:, None], normed.view(b, h, f).transpose(0, 1), self.weight)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        """`(H, B, C)` logits."""
        return self.classify(self.bn(self.bn_input(cls, patches)))


class HeadBank(nn.Module):
    """Every requested aggregator with `num_heads` independent heads each.

    `forward(tokens)` takes the full last-block sequence `(B, T, D)` and returns
    `{aggregator: logits (H, B, C)}`; which tokens are prefix tokens is fixed at
    construction from the model's token layout.
    """

    def __init__(
        self,
        aggregators: Sequence[str],
        num_heads: int,
        dim: int,
        num_classes: int,
        *,
        num_prefix: int,
        has_cls: bool,
        abmilp_depth: int = 1,
        seed: int = 0,
        classifier_init: str = "trunc_normal",
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise AttnscopeError("a head bank needs at least one head per aggregator")
        missing_cls = [a for a in aggregators if aggregator_class(a).needs_cls and not has_cls]
        if missing_cls:
            raise AttnscopeError(f"{', '.join(missing_cls)} need a class token; this model has none")
        self.names = list(aggregators)
        self.num_heads = num_heads
        self.num_prefix = num_prefix
        self.has_cls = has_cls
        self.dim = dim
        self.num_classes = num_classes
        self._scratch = Scratch()
        # a ModuleDict (registers the heads' parameters) whose values are all ProbeHeads
        self.heads = cast("MutableMapping[str, ProbeHeads]", nn.ModuleDict())
        for name in self.names:
            # One generator per aggregator: adding an aggregator leaves the others' init unchanged.
            g = torch.Generator().manual_seed(int(seed) * 1000 + aggregator_class(name).init_stream)
            agg = build_aggregator(name, num_heads, dim, abmilp_depth=abmilp_depth, generator=g, grid=grid)
            self.heads[name] = ProbeHeads(agg, num_classes, generator=g, classifier_init=classifier_init)

    def split_tokens(self, tokens: Tensor) -> tuple[Tensor | None, Tensor]:
        """(class token or None, patch bag), float32 and contiguous.

        Cached tokens arrive as float16; converting the patch slice is one pass that also
        makes it contiguous, shared by every aggregator. With `reuse_buffers` the patch bag
        is written into the same buffer at every call (see `Scratch`). A graph that still
        needs the previous call's patches then fails loudly in backward (autograd's in-place
        check), so only the trainer, which backpropagates every forward before the next,
        switches it on.
        """
        cls = tokens[:, 0].float() if self.has_cls else None
        src = tokens[:, self.num_prefix :]
        if not self.reuse_buffers:
            return cls, (src.float() if src.dtype != torch.float32 else src.contiguous())
        patches = self._scratch.get("patches", src.shape, src, torch.float32)
        patches.copy_(src)
        return cls, patches

    @property
    def reuse_buffers(self) -> bool:
        """Reuse the map-sized temporaries from call to call (see `Scratch`)."""
        return self._scratch.enabled

    @reuse_buffers.setter
    def reuse_buffers(self, value: bool) -> None:
        self._scratch.enabled = bool(value)

    def forward(self, tokens: Tensor, sync: SumFn | None = None) -> dict[str, Tensor]:
        """`{aggregator: (H, B, C) logits}`.

        `sync` (data-parallel training): a differentiable sum over every process. In train
        mode the BatchNorms then normalise with the statistics of the whole distributed
        batch instead of this process's share (see `synced_batch_norm`). Every process must
        call this the same number of times, also with an empty batch.
        """
        return self.classify_inputs(self.bn_inputs(tokens), sync)

    def bn_inputs(self, tokens: Tensor) -> list[Tensor]:
        """What each aggregator's BatchNorm normalises, in `names` order: `(B, F)` or `(B, H*F)`.

        These do not depend on the BatchNorm statistics, which is what lets the trainer
        recompute the statistics and then score the same images without pooling twice."""
        cls, patches = self.split_tokens(tokens)
        pooled = self.pool(cls, patches)
        return [head.bn_input(cls, patches, pooled[name]) for name, head in self.heads.items()]

    def bn_input_bytes(self, images: int) -> int:
        """Bytes `bn_inputs` takes for `images` images (float32)."""
        widths = (
            h.aggregator.out_dim * (1 if h.aggregator.shared else h.num_heads) for h in self.heads.values()
        )
        return 4 * images * sum(widths)

    def classify_inputs(self, inputs: Sequence[Tensor], sync: SumFn | None = None) -> dict[str, Tensor]:
        """BatchNorm (training or running statistics, as the mode says) + classifier of every head."""
        normed = self.normalize(inputs, sync)
        return {name: head.classify(y) for (name, head), y in zip(self.heads.items(), normed, strict=True)}

    def normalize(self, inputs: Sequence[Tensor], sync: SumFn | None = None) -> list[Tensor]:
        """Every head's BatchNorm of its `bn_inputs` (in train mode this also updates the
        running statistics, with those of every process's batch when `sync` is given)."""
        bns = [head.bn for head in self.heads.values()]
        if sync is None or not self.training:
            return [bn(x) for bn, x in zip(bns, inputs, strict=True)]
        return synced_batch_norm(bns, inputs, sync)

    def pool(self, cls: Tensor | None, patches: Tensor) -> dict[str, Tensor]:
        """`{aggregator: (B, H, F)}` pooled tokens of every aggregator.

        The selective aggregators whose patch logits are linear (`abmilp` at depth 1 and
        `attentive`: 5 + 30 columns for ViT-S with 5 learning rates) share one logits
        product and one weighted-sum product, so the patches are read once for all of them
        instead of once per aggregator; the mean for `mean` and `cls_mean` is one more row
        of that weighted sum (`softmax_pool`). Every head's numbers are those of its own
        aggregator (the columns are independent), up to float rounding.
        """
        out: dict[str, Tensor] = {}
        linear: list[tuple[str, Aggregator, Tensor, Tensor | None]] = []
        for name, head in self.heads.items():
            agg = head.aggregator
            scores = agg.linear_scores()
            if scores is not None:
                linear.append((name, agg, *scores))
            elif not agg.uses_mean:
                out[name] = agg(cls, patches)
        mean_users = [(n, h.aggregator) for n, h in self.heads.items() if h.aggregator.uses_mean]
        if linear or mean_users:
            scorers = [(w, b if b is not None else w.new_zeros(len(w))) for _, _, w, b in linear]
            groups, mean = softmax_pool(patches, scorers, with_mean=bool(mean_users), scratch=self._scratch)
            for (name, agg, _, _), pooled in zip(linear, groups, strict=True):
                out[name] = agg.from_pooled(pooled)
            for name, agg in mean_users:
                assert mean is not None  # asked for (with_mean) since there are mean users
                out[name] = agg.from_mean(cls, mean)
        return {name: out[name] for name in self.names}

    def patch_weights(self, name: str, tokens: Tensor) -> Tensor | None:
        """`(H, B, N)` weights of a selective aggregator over the patch tokens."""
        cls, patches = self.split_tokens(tokens)
        return self.heads[name].aggregator.patch_weights(patches, cls)

    def params_per_head(self, name: str) -> int:
        return self.heads[name].params_per_head()
