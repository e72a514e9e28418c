"""CAPI's encoder (facebookresearch/capi), which fits no timm architecture.

Its blocks are pre-norm with RMSNorm, separate bias-free q/k/v/out projections, a bias-free
GELU MLP, and a rotary position embedding applied to q and k whose angular frequencies are
learned parameters stored in the file (`rope.freqs`, shape (2, head_dim): one row per
image axis). There is no class token and no absolute position term: 16 register tokens
precede the patches, each with a position on the border of the unit square. The final norm
is an RMSNorm without weights.

Built here so that capture sees it like a timm ViT: `blocks[i].attn.attn_drop` receives the
post-softmax map when `fused_attn` is off, `drop_path1` carries the attention branch, and
`patch_embed.patch_size`, `cls_token` (None), `num_prefix_tokens`, `norm` and
`forward_features` mean what they mean in timm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) on the two halves of the last axis (not interleaved pairs)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class CapiRope(nn.Module):
    """x cos(theta) + rotate_half(x) sin(theta) with theta = coords @ freqs."""

    def __init__(self, head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4) -> None:
        super().__init__()
        self.freqs = nn.Parameter(self.default_freqs(head_dim, max_freq, min_freq))

    @staticmethod
    def default_freqs(head_dim: int, max_freq: float, min_freq: float) -> torch.Tensor:
        """CAPI's initial frequencies (used for random weights only; a checkpoint stores its
        own): head_dim/4 log-spaced frequencies from max_freq down to min_freq, doubled for
        the rotation pairs; the first half of the channels turns with the first image axis,
        the second half with the second, in radians."""
        quarter = head_dim // 4
        ratio = torch.linspace(0, -1, quarter, dtype=torch.float64)
        one_axis = max_freq * (max_freq / min_freq) ** ratio
        pairs = torch.cat([one_axis, one_axis])
        freqs = torch.zeros(2, head_dim, dtype=torch.float64)
        freqs[0, : head_dim // 2] = pairs
        freqs[1, head_dim - head_dim // 2 :] = pairs
        return (freqs * 2 * math.pi).float()

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        angle = coords @ self.freqs
        return x * angle.cos() + _rotate_half(x) * angle.sin()


class CapiAttention(nn.Module):
    fused_attn: bool

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = CapiRope(self.head_dim)
        self.attn_drop = nn.Dropout(0.0)
        self.fused_attn = True

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            p(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q = self.rope(q, coords[:, None])
        k = self.rope(k, coords[:, None])
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class CapiMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CapiBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=eps)
        self.attn = CapiAttention(dim, num_heads)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.RMSNorm(dim, eps=eps)
        self.mlp = CapiMlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), coords))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CapiPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, img_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size = (patch_size, patch_size)
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CapiViT(nn.Module):
    """CAPI's encoder: [registers R] [patches], RoPE blocks, weightless final RMSNorm."""

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        patch_size: int = 14,
        num_registers: int = 16,
        img_size: int | tuple[int, int] = 224,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if num_registers % 4:
            raise ValueError("CAPI places registers on the 4 sides of the square: a multiple of 4")
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens = num_registers
        self.num_prefix_tokens = num_registers
        self.cls_token = None
        self.patch_embed = CapiPatchEmbed(patch_size, embed_dim, img_size)
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.blocks = nn.ModuleList(
            CapiBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (3, *self.patch_embed.img_size),
            "num_classes": 0,
        }
        nn.init.normal_(self.reg_token, std=0.02)

    def coords(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(R + H*W, 2) positions in [0, 1]^2: registers along the border, then the patches
        row by row ((row, column), each axis spread over [0, 1])."""
        rows = torch.linspace(0, 1, grid[0], dtype=like.dtype, device=like.device)
        cols = torch.linspace(0, 1, grid[1], dtype=like.dtype, device=like.device)
        patches = torch.cartesian_prod(rows, cols)
        side = self.num_reg_tokens // 4
        c = torch.arange(side, dtype=like.dtype, device=like.device) / side
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        border = [(c, zero), (one, c), (1 - c, one), (zero, 1 - c)]
        regs = torch.cat([torch.stack(pair, dim=1) for pair in border])
        # registers span the extent of the (visible) patches; a whole image spans [0, 1]^2
        low, high = patches.min(dim=0).values, patches.max(dim=0).values
        return torch.cat([low + regs * (high - low), patches])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch_embed.patch_size
        tokens = self.patch_embed(x)
        coords = self.coords((h // p[0], w // p[1]), tokens)[None].expand(b, -1, -1)
        x = torch.cat([self.reg_token.expand(b, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x, coords)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def capi_kwargs(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Width, depth, patch size and registers from a converted state dict (the head count
    is not in the weights: CAPI's default config has 64-channel heads)."""
    dim = int(state["reg_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": dim // int(state["blocks.0.attn.rope.freqs"].shape[-1]),
        "patch_size": int(state["patch_embed.proj.weight"].shape[-1]),
        "num_registers": int(state["reg_token"].shape[1]),
    }
