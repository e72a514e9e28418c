"""The attentive probe: one learnable query cross-attending to the patches (`attentive`).

Key/value projection `Linear(D, 2D)`, D/64 heads, scaled-dot-product cross-attention over
the patches, no MLP and no output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnscope.probe.heads.base import Aggregator, _trunc_normal, register_aggregator

__all__ = ["ATTENTIVE_HEAD_DIM", "AttentivePool", "attentive_num_heads"]

ATTENTIVE_HEAD_DIM = 64


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
