"""The bank's shared pooling: the softmax-weighted sums of every linear scorer and the
patch mean in one pass over the patches (`softmax_pool`), in reusable buffers (`Scratch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Scratch", "softmax_pool"]


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
