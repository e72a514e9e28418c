"""The metrics of shared/metrics.md, computed per batch and streamed into running sums.

`block_metrics` is a pure function of one block's attention (and residual stream) for a
batch of images; `MetricAccumulator` keeps float64 sums, sums of squares and counts per
(layer, head, metric), so memory does not grow with the number of images and partial
sums from several processes can simply be added (all-reduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from attnscope.models import TokenLayout

# Spec order; CSV rows and plots follow it.
HEAD_METRICS: tuple[str, ...] = (
    "cls_self_attn",
    "cls_patch_mass",
    "cls_register_mass",
    "patch_cls_attn",
    "patch_self_attn",
    "patch_register_mass",
    "cls_patch_entropy",
    "cls_patch_entropy_norm",
    "cls_patch_eff_frac",
    "cls_patch_k60_frac",
    "cls_patch_k90_frac",
    "cls_patch_gini",
    "cls_patch_max",
    "patch_patch_entropy",
    "patch_patch_entropy_norm",
    "patch_patch_eff_frac",
    "attn_distance_px",
    "attn_nmi",
)
BLOCK_METRICS: tuple[str, ...] = ("cls_residual_ratio", "patch_residual_ratio")
ALL_METRICS: tuple[str, ...] = HEAD_METRICS + BLOCK_METRICS

_NEEDS_CLS = {
    "cls_self_attn",
    "cls_patch_mass",
    "cls_register_mass",
    "patch_cls_attn",
    "cls_patch_entropy",
    "cls_patch_entropy_norm",
    "cls_patch_eff_frac",
    "cls_patch_k60_frac",
    "cls_patch_k90_frac",
    "cls_patch_gini",
    "cls_patch_max",
    "cls_residual_ratio",
}
_NEEDS_REGISTERS = {"cls_register_mass", "patch_register_mass"}

METRIC_LABELS: dict[str, str] = {
    "cls_self_attn": "[cls] self-attention",
    "cls_patch_mass": "[cls] attention mass on patches",
    "cls_register_mass": "[cls] attention mass on registers",
    "patch_cls_attn": "patch attention to [cls]",
    "patch_self_attn": "patch self-attention",
    "patch_register_mass": "patch attention mass on registers",
    "cls_patch_entropy": "[cls]->patch entropy (nats)",
    "cls_patch_entropy_norm": "[cls]->patch entropy / ln N",
    "cls_patch_eff_frac": "[cls] effective fraction of patches",
    "cls_patch_k60_frac": "fraction of patches holding 60% of [cls] mass",
    "cls_patch_k90_frac": "fraction of patches holding 90% of [cls] mass",
    "cls_patch_gini": "Gini of [cls]->patch attention",
    "cls_patch_max": "max [cls]->patch attention",
    "patch_patch_entropy": "patch->patch entropy (nats)",
    "patch_patch_entropy_norm": "patch->patch entropy / ln N",
    "patch_patch_eff_frac": "patch->patch effective fraction",
    "attn_distance_px": "mean attention distance (px)",
    "attn_nmi": "query-key NMI",
    "cls_residual_ratio": "[cls] residual update ratio",
    "patch_residual_ratio": "patch residual update ratio",
}


def applicable_metrics(layout: TokenLayout, *, residual: bool = True) -> tuple[list[str], list[str]]:
    """(head metrics, block metrics) that exist for this token layout, in spec order.

    Absent metrics are left out entirely (no NaN rows), as the spec requires.
    """

    def keep(name: str) -> bool:
        if name in _NEEDS_CLS and not layout.has_cls:
            return False
        if name in _NEEDS_REGISTERS and layout.num_registers == 0:
            return False
        return True

    heads = [m for m in HEAD_METRICS if keep(m)]
    blocks = [m for m in BLOCK_METRICS if keep(m)] if residual else []
    return heads, blocks


class Workspace:
    """One scratch buffer for `block_metrics`, reused across blocks and batches.

    The patch->patch metrics need one map-sized temporary (a ln a, then a D). A fresh
    multi-MB tensor per block costs more than the arithmetic on CPUs: torch does not cache
    CPU memory, so each one is mmap'd and faulted in page by page (kernel time that showed
    up as ~1 s per batch of 16 for ViT-B/16). Hold one Workspace per stream of batches
    (the consumer in `analysis` does); not for use from two threads at once.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape`, `like`'s dtype and device, backed by the buffer."""
        import torch

        numel = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < numel or buf.device != like.device or buf.dtype != like.dtype:
            buf = self._buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


_DISTANCE_CACHE: dict[tuple, torch.Tensor] = {}


def patch_distance_matrix(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(N, N) float32 Euclidean distances between patch centres in input pixels, row-major
    grid, computed in float64 and rounded once."""
    import torch

    key = (layout.grid, layout.patch_size, str(device))
    cached = _DISTANCE_CACHE.get(key)
    if cached is None:
        gh, gw = layout.grid
        ph, pw = layout.patch_size
        rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw) * ph
        cols = torch.arange(gw, dtype=torch.float64).repeat(gh) * pw
        coords = torch.stack([rows, cols], dim=1)
        cached = torch.cdist(coords, coords).to(device=device, dtype=torch.float32)
        _DISTANCE_CACHE[key] = cached
    return cached


def _mean_distance(
    patch_patch: torch.Tensor, inv_s: torch.Tensor, layout: TokenLayout, workspace: Workspace | None
) -> torch.Tensor:
    """`attn_distance_px` per (image, head): mean_i (sum_j a_ij D_ij) / S_i.

    The values are ~100 px while the spread across images can be < 0.1 px, so rounding
    shows in the std over images. The row dot products (the bulk of the work) are float32,
    off by a few float32 ulps; everything after them is float64 where the device has it
    (not MPS): rounding each image's ~100 px value to float32 alone would move the std by
    ~4e-6 px. tests/test_reference_agreement.py holds this to the float64 reference.
    """
    import torch

    wide = torch.float32 if patch_patch.device.type == "mps" else torch.float64
    dist = patch_distance_matrix(layout, patch_patch.device)
    if workspace is None:
        rows = torch.linalg.vecdot(patch_patch, dist)
    else:
        rows = torch.mul(patch_patch, dist, out=workspace.take(patch_patch.shape, patch_patch)).sum(-1)
    rows = rows.to(wide)
    return (rows * inv_s.to(wide)).mean(-1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Exact Shannon entropy over the last dim, 0 ln 0 = 0 (no epsilon in the log)."""
    import torch

    return torch.special.entr(p).sum(dim=-1)


def _sum_a_log_a(A: torch.Tensor, patches: slice, workspace: Workspace | None) -> torch.Tensor:
    """sum over patch keys of a ln a, per patch query row, with 0 ln 0 = 0 exactly.

    Elementwise work runs on the whole contiguous map (on the strided patch view it costs
    ~4x more) and in place. `torch.special.entr` would be the direct form but is ~4x slower
    than log + mul on CPUs. A zero probability gives 0 * log(0) = NaN, so rows with NaN
    are recomputed with log(0) raised to a finite value that a zero multiplies to 0 (no
    positive float32 is near it: the smallest subnormal has ln = -103.3).
    """
    import torch

    scratch = None if workspace is None else workspace.take(A.shape, A)
    terms = torch.log(A, out=scratch).mul_(A)
    sums = terms[:, :, patches, patches].sum(-1)
    if bool(torch.isnan(sums).any()):
        terms = torch.log(A, out=scratch).clamp_min_(-1e4).mul_(A)
        sums = terms[:, :, patches, patches].sum(-1)
    return sums


def _renormalise(rows: torch.Tensor, what: str) -> torch.Tensor:
    total = rows.sum(dim=-1, keepdim=True)
    if bool((total <= 0).any()):
        raise AttnscopeError(
            f"{what}: an attention row puts zero mass on the patches (corrupt attention map)"
        )
    return rows / total


def block_metrics(
    attn: torch.Tensor,
    layout: TokenLayout,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    workspace: Workspace | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-image metrics of one block.

    attn: (B, H, T, T) post-softmax attention. x, y: (B, T, C) block input and attention
    branch. `workspace`: scratch memory to reuse from call to call (see `Workspace`).
    Returns (per_head {name: (B, H)}, per_block {name: (B,)}), float32 (float64 for
    attn_distance_px where the device has it), on attn's device, holding exactly the
    metrics `applicable_metrics` names.
    """
    import torch

    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise AttnscopeError(f"expected attention of shape (B, H, T, T), got {tuple(attn.shape)}")
    if attn.shape[-1] != layout.num_tokens:
        raise AttnscopeError(
            f"attention has {attn.shape[-1]} tokens but the layout expects {layout.num_tokens} "
            f"({layout.num_prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches)"
        )
    A = attn.float()
    P = layout.patch_slice
    R = layout.register_slice
    n = layout.num_patches
    log_n = math.log(n)
    out: dict[str, torch.Tensor] = {}

    if layout.has_cls:
        c = 0
        out["cls_self_attn"] = A[:, :, c, c]
        cls_patch = A[:, :, c, P]
        out["cls_patch_mass"] = cls_patch.sum(-1)
        if layout.num_registers:
            out["cls_register_mass"] = A[:, :, c, R].sum(-1)
        out["patch_cls_attn"] = A[:, :, P, c].mean(-1)
    patch_patch = A[:, :, P, P]
    out["patch_self_attn"] = patch_patch.diagonal(dim1=-2, dim2=-1).mean(-1)
    if layout.num_registers:
        out["patch_register_mass"] = A[:, :, P, R].sum(-1).mean(-1)

    if layout.has_cls:
        pc = _renormalise(cls_patch, "[cls]->patch attention")
        h_c = _entropy(pc)
        out["cls_patch_entropy"] = h_c
        out["cls_patch_entropy_norm"] = h_c / log_n
        out["cls_patch_eff_frac"] = torch.exp(h_c) / n
        desc, _ = pc.sort(dim=-1, descending=True)
        cum = desc.cumsum(dim=-1)
        # k = smallest count whose top-k mass reaches the threshold; the 1e-6 slack keeps
        # float rounding at the boundary from adding a patch.
        out["cls_patch_k60_frac"] = ((cum < 0.6 - 1e-6).sum(-1) + 1).clamp(max=n).float() / n
        out["cls_patch_k90_frac"] = ((cum < 0.9 - 1e-6).sum(-1) + 1).clamp(max=n).float() / n
        ranks = torch.arange(n, 0, -1, device=A.device, dtype=torch.float32)  # ascending rank of desc order
        out["cls_patch_gini"] = 2.0 * (desc * ranks).sum(-1) / n - (n + 1) / n
        out["cls_patch_max"] = desc[..., 0]

    # The patch->patch metrics touch all B*H*N*N probabilities, so they dominate the cost of
    # a run; they are written to read the map a few times and never materialise the
    # renormalised rows p_i = a_i / S_i:
    #   H(p_i)            = ln S_i - (sum_j a_ij ln a_ij) / S_i
    #   sum_j p_i(j) D_ij = (sum_j a_ij D_ij) / S_i
    #   k(j)              = (1/N) sum_i a_ij / S_i          (one matrix-vector product)
    s = patch_patch.sum(-1)  # (B, H, N)
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise AttnscopeError(
            "patch->patch attention: an attention row puts zero (or no finite) mass on the patches (corrupt attention map)"
        )
    inv_s = 1.0 / s
    a_log_a = _sum_a_log_a(A, P, workspace)  # (B, H, N), sum_j a_ij ln a_ij (<= 0)
    h_rows = torch.log(s) - a_log_a * inv_s
    mean_h = h_rows.mean(-1)
    out["patch_patch_entropy"] = mean_h
    out["patch_patch_entropy_norm"] = mean_h / log_n
    out["patch_patch_eff_frac"] = torch.exp(h_rows).mean(-1) / n
    out["attn_distance_px"] = _mean_distance(patch_patch, inv_s, layout, workspace)
    k = torch.matmul(inv_s.unsqueeze(-2), patch_patch).squeeze(-2) / n  # (B, H, N), sums to 1
    h_k = _entropy(k)
    # H_K = 0 means every query looks at one and the same key: I = 0 too, and the spec's
    # 0/0 is taken as 0 (no information about the query in the key distribution).
    nmi = (h_k - mean_h) / torch.sqrt(log_n * h_k).clamp_min(torch.finfo(torch.float32).tiny)
    out["attn_nmi"] = torch.where(h_k > 0, nmi, torch.zeros_like(nmi))

    per_block: dict[str, torch.Tensor] = {}
    if x is not None and y is not None:
        xn = x.float().norm(dim=-1)
        yn = y.float().norm(dim=-1)
        if layout.has_cls:
            per_block["cls_residual_ratio"] = yn[:, 0] / xn[:, 0]
        per_block["patch_residual_ratio"] = (yn[:, P] / xn[:, P]).mean(-1)

    per_head = {m: out[m] for m in HEAD_METRICS if m in out}
    return per_head, per_block


@dataclass
class MetricAccumulator:
    """Running float64 sums per (layer, metric[, head]); flat memory in the image count.

    `state` maps (kind, layer, metric) -> tensor [count, sum, sum_sq] of shape (3,) for
    per-layer rows, (3, H) for per-head rows. Sums (not running means) so shards from
    several processes merge by addition.

    `update` runs once per block and batch, so it works on all metrics of a block at once
    (a handful of tensor ops instead of ~10 per metric) and keeps per-layer stacked sums;
    they are split into `state`'s rows only when `state` is read.
    """

    model: str
    num_layers: int
    num_heads: int
    head_metrics: list[str]
    block_metrics: list[str]
    _state: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    # layer -> (names of the rows, kind of each row, stacked [count, sum, sum_sq] (3, M[, H]))
    _stacked: dict[tuple[int, str, tuple[str, ...]], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> dict[tuple[str, int, str], torch.Tensor]:
        for (layer, kind, names), stats in self._stacked.items():
            for i, name in enumerate(names):
                key = (kind, layer, name)
                row = stats[:, i]
                current = self._state.get(key)
                self._state[key] = row.clone() if current is None else current + row.to(current.device)
        self._stacked.clear()
        return self._state

    @staticmethod
    def _float64(values: torch.Tensor) -> torch.Tensor:
        import torch

        v = values.detach()
        if v.device.type == "mps":  # MPS has no float64
            v = v.cpu()
        return v.to(dtype=torch.float64)

    def _add(self, layer: int, kind: str, names: tuple[str, ...], v: torch.Tensor) -> None:
        """v: (M, B[, H]) float64 per-image values of the metrics `names`."""
        import torch

        count = torch.full_like(v[:, 0], v.shape[1])
        stats = torch.stack([count, v.sum(1), (v * v).sum(1)])  # (3, M[, H])
        key = (layer, kind, names)
        current = self._stacked.get(key)
        self._stacked[key] = stats if current is None else current + stats.to(current.device)

    def update(
        self, layer: int, per_head: dict[str, torch.Tensor], per_block: dict[str, torch.Tensor]
    ) -> None:
        import torch

        if self.head_metrics:
            names = tuple(self.head_metrics)
            values = self._float64(torch.stack([per_head[name].detach() for name in names]))  # (M, B, H)
            self._add(layer, "head", names, values)
            self._add(layer, "layer", names, values.mean(dim=2))  # head mean per image, in float64
        present = tuple(name for name in self.block_metrics if name in per_block)
        if present:
            values = self._float64(torch.stack([per_block[name].detach() for name in present]))  # (M, B)
            self._add(layer, "layer", present, values)

    def merge_(self, other: MetricAccumulator) -> None:
        for key, value in other.state.items():
            current = self.state.get(key)
            self.state[key] = value.clone() if current is None else current + value.to(current.device)

    def keys(self) -> list[tuple[str, int, str]]:
        return sorted(self.state, key=lambda k: (k[0], k[1], ALL_METRICS.index(k[2])))

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(layers, heads) DataFrames with the spec's columns, in the spec's order."""
        import numpy as np
        import pandas as pd

        layer_rows, head_rows = [], []
        for kind, layer, metric in self.keys():
            stats = self.state[(kind, layer, metric)].cpu().numpy()
            count, total, total_sq = stats[0], stats[1], stats[2]
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
            if kind == "layer":
                layer_rows.append((self.model, layer, metric, float(mean), float(std), int(count)))
            else:
                for h in range(mean.shape[0]):
                    head_rows.append(
                        (self.model, layer, h, metric, float(mean[h]), float(std[h]), int(count[h]))
                    )
        layers = pd.DataFrame(layer_rows, columns=["model", "layer", "metric", "mean", "std", "count"])
        heads = pd.DataFrame(head_rows, columns=["model", "layer", "head", "metric", "mean", "std", "count"])
        order = {m: i for i, m in enumerate(ALL_METRICS)}
        layers = layers.sort_values(
            ["layer", "metric"], key=lambda s: s.map(order) if s.name == "metric" else s
        )
        heads = heads.sort_values(
            ["layer", "metric", "head"], key=lambda s: s.map(order) if s.name == "metric" else s
        )
        return layers.reset_index(drop=True), heads.reset_index(drop=True)
