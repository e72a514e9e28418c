"""Independent float64 restatements of each family's position resize, for the rule tests.

Written from the families' code and PyTorch's documented interpolation arithmetic, not from
attnscope's implementation: resampling is spelled out as per-axis weight matrices (PyTorch's
cubic convolution with A = -0.75 and half-pixel source indices; its antialiased kernel, A =
-0.5 widened by the scale, for timm's loader), the sin-cos tables as their repositories write
them, and BEiT's spline as a not-a-knot cubic interpolant per axis (what FITPACK's s = 0
`regrid`, behind SciPy's old `interp2d(kind='cubic')`, computes), clamped to the source range
as FITPACK's evaluation is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.interpolate import make_interp_spline

Tensor = torch.Tensor


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def cubic_matrix(n_in: int, n_out: int, ratio: float) -> Tensor:
    """(n_out, n_in): PyTorch's bicubic (align_corners False) with source step `ratio`:
    output i reads around ratio * (i + 0.5) - 0.5, four taps clamped to the border."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        real = ratio * (i + 0.5) - 0.5
        base = math.floor(real)
        t = real - base
        for k in range(-1, 3):
            w[i, min(max(base + k, 0), n_in - 1)] += _cubic(k - t, -0.75)
    return w


def antialias_matrix(n_in: int, n_out: int, ratio: float) -> Tensor:
    """(n_out, n_in): PyTorch's antialiased bicubic (PIL's filter, A = -0.5, its support
    widened by `ratio` when shrinking), rows normalised to sum to 1."""
    support = 2.0 * ratio if ratio >= 1 else 2.0
    inv = 1.0 / ratio if ratio >= 1 else 1.0
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = ratio * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = _cubic((j - center + 0.5) * inv, -0.5)
        w[i] /= w[i].sum()
    return w


def resample(rows: Tensor, old: tuple[int, int], new: tuple[int, int], matrices) -> Tensor:
    """(gh*gw, C) -> (new_h*new_w, C) with one weight matrix per axis."""
    img = rows.double().reshape(old[0], old[1], -1).permute(2, 0, 1)  # (C, h, w)
    wh, ww = matrices
    out = torch.einsum("ij,cjk,lk->cil", wh, img, ww)
    return out.permute(1, 2, 0).reshape(new[0] * new[1], -1)


def offset_rule(rows: Tensor, old, new) -> Tensor:
    """DINO / iBOT / DINOv2: scale factor (new + 0.1) / old, so the step is old / (new + 0.1)."""
    mats = [cubic_matrix(o, n, o / (n + 0.1)) for o, n in zip(old, new, strict=True)]
    return resample(rows, old, new, mats)


def size_rule(rows: Tensor, old, new) -> Tensor:
    """MAE's interpolate_pos_embed, transformers', EVA-02's: bicubic to size, step old / new."""
    mats = [cubic_matrix(o, n, o / n) for o, n in zip(old, new, strict=True)]
    return resample(rows, old, new, mats)


def antialias_rule(rows: Tensor, old, new) -> Tensor:
    """timm's resample_abs_pos_embed and DINOv2's register models: antialiased bicubic."""
    mats = [antialias_matrix(o, n, o / n) for o, n in zip(old, new, strict=True)]
    return resample(rows, old, new, mats)


def mocov3_sincos(dim: int, grid: tuple[int, int]) -> Tensor:
    """moco-v3 vits.build_2d_sincos_position_embedding (without the class row), in float64."""
    h, w = grid
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(pos_dim, dtype=torch.float64) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)


def mae_sincos(dim: int, grid: tuple[int, int]) -> Tensor:
    """MAE's util/pos_embed.get_2d_sincos_pos_embed (I-JEPA's copy), generalised from a side
    to (h, w) the way its meshgrid reads: numpy, float64, no class row."""
    h, w = grid
    grid_hw = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))  # w first
    grid_hw = np.stack(grid_hw, axis=0).reshape(2, 1, h, w)

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid_hw[0]), one_d(dim // 2, grid_hw[1])], axis=1)
    return torch.from_numpy(emb)


def _beit_axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """BEiT's run_class_finetuning coordinates for one axis of the (2W - 1) table."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis = np.cumsum([q**i for i in range(src // 2)])
    x = np.concatenate([-dis[::-1], [0.0], dis])
    t = dst // 2.0
    return x, np.arange(-t, t + 0.1, 1.0)


def beit_geometric(table: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """BEiT/SimMIM's relative-bias resize of the (2h-1)(2w-1) x heads body of the table."""
    sh, sw, dh, dw = 2 * old[0] - 1, 2 * old[1] - 1, 2 * new[0] - 1, 2 * new[1] - 1
    ys, dys = _beit_axis(sh, dh)
    xs, dxs = _beit_axis(sw, dw)
    dys = np.clip(dys, ys[0], ys[-1])
    dxs = np.clip(dxs, xs[0], xs[-1])
    heads = []
    for z in table.double().numpy().T:
        z = z.reshape(sh, sw)
        z = make_interp_spline(ys, z, k=3, axis=0)(dys)  # not-a-knot along each axis
        z = make_interp_spline(xs, z, k=3, axis=1)(dxs)
        heads.append(z.reshape(-1))
    return torch.from_numpy(np.stack(heads, axis=1))
