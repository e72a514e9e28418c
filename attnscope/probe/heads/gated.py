"""Gated attention MIL pooling (Ilse, Tomczak & Welling 2018): `abmilp_gated`.

logit = w^T [tanh(V h) * sigmoid(U h)], hidden 128, computed in row chunks with the
backward written out (`_GatedScores`), since its hidden activations are the largest
tensors of the bank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnscope.probe.heads.base import Aggregator, _linear_default, register_aggregator

__all__ = ["GATED_HIDDEN", "GatedAbmilpPool"]

GATED_HIDDEN = 128


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
