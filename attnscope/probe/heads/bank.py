"""The bank: every requested aggregator at every grid point, each head followed by
BatchNorm1d(affine=False) and a Linear classifier, trained together.

Heads of one aggregator type are stored stacked, with a leading head dimension `H` on
every parameter, and computed with batched products over that dimension, so every head of
the bank steps on a batch of tokens read once.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.probe.heads.base import (
    Aggregator,
    _linear_default,
    _trunc_normal,
    aggregator_class,
    build_aggregator,
)
from attnscope.probe.heads.fused import Scratch, softmax_pool

__all__ = ["BN_EPS", "CLASSIFIER_INITS", "HeadBank", "ProbeHeads", "SumFn", "synced_batch_norm"]

# The classifier's initialisation: MAE's trunc_normal(std 0.01) weights and zero bias (the
# default recipe), or what `nn.Linear` draws, U(+-1/sqrt(fan_in)) for weights and bias
# (the paper recipe: "Beyond [cls]"'s code replaces the head with a fresh nn.Linear).
CLASSIFIER_INITS = ("trunc_normal", "linear_default")
BN_EPS = 1e-6  # as MAE's linear-probe BatchNorm
SumFn = Callable[[Tensor], Tensor]  # a differentiable sum of a 1-D tensor over every process


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
