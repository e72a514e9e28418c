"""Attention maps over the image: query-specific rows, attention rollout, upsampling, mass contours.

What DINO's `visualize_attention.py`, vit-explain's rollout and cl-vs-mim's notebooks each
hand-code, done once on the true token layout (registers and non-square grids included).
The tensor functions are pure; `collect_maps` runs the model through `measure.forwards`
with a consumer that keeps only the rows it needs (or, for rollout, one running (B, T, T)
product), so memory stays at one block's worth whatever the depth. Drawing is in
`attnscope.plots.maps`, the `maps` command in `attnscope.commands.maps`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from attnscope.config import check_choice, check_fraction
from attnscope.errors import AttnscopeError, ConfigError

if TYPE_CHECKING:
    import torch

    from attnscope.capture import BlockTensors
    from attnscope.models import LoadedModel, TokenLayout

UpsampleMode = Literal["nearest", "bilinear"]
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear")
HeadSelection = Literal["mean", "all"] | tuple[int, ...]  # the mean of the heads, every head, or these


# ---------------------------------------------------------------- what to show


@dataclass(frozen=True)
class Query:
    """Which query token's attention row to show.

    `cls`: the class token. `patch`: the patch at grid (row, col). `mean`: the average of
    every patch query's distribution, the stand-in for models without a class token.
    """

    kind: Literal["cls", "patch", "mean"]
    row: int = 0
    col: int = 0

    def describe(self) -> str:
        if self.kind == "cls":
            return "[cls]→patch"
        if self.kind == "mean":
            return "mean patch→patch"
        return f"patch ({self.row}, {self.col})→patch"

    def slug(self) -> str:
        return (
            "cls" if self.kind == "cls" else "mean" if self.kind == "mean" else f"patch{self.row}-{self.col}"
        )


def parse_query(text: str) -> Query:
    """`cls`, `mean` or `patch:ROW,COL` (0-based grid coordinates)."""
    value = text.strip().lower()
    if value in ("cls", "mean"):
        return Query(value)  # type: ignore[arg-type]
    if value.startswith("patch:"):
        parts = value[len("patch:") :].replace("x", ",").split(",")
        try:
            row, col = (int(p) for p in parts)
        except ValueError:
            raise ConfigError("query", f"patch takes patch:ROW,COL with two integers, got {text!r}") from None
        if row < 0 or col < 0:
            raise ConfigError("query", f"patch:ROW,COL takes non-negative grid coordinates, got {text!r}")
        return Query("patch", row, col)
    raise ConfigError("query", f"takes cls, mean or patch:ROW,COL, got {text!r}")


def parse_heads(text: str) -> HeadSelection:
    """`mean`, `all` or a comma list of head indices such as `0,3,5`."""
    value = text.strip().lower()
    if value in ("mean", "all"):
        return value  # type: ignore[return-value]
    try:
        heads = tuple(int(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise ConfigError("heads", f"takes mean, all or a list like 0,3,5, got {text!r}") from None
    if not heads or min(heads) < 0:
        raise ConfigError("heads", f"takes mean, all or non-negative indices like 0,3,5, got {text!r}")
    return tuple(dict.fromkeys(heads))


def check_map_options(heads: HeadSelection | Sequence[int], rollout: bool, discard_ratio: float) -> None:
    """The combinations of head selection, rollout and discard ratio that have a meaning."""
    check_fraction("discard_ratio", discard_ratio)
    if discard_ratio and not rollout:
        raise ConfigError(
            "rollout", f"must be on to discard attention weights (discard ratio {discard_ratio})"
        )
    if rollout and heads != "mean":
        shown = heads if isinstance(heads, str) else ",".join(map(str, heads))
        raise ConfigError(
            "heads", f"mean is the only choice with rollout, which averages the heads; got {shown}"
        )


def query_index(layout: TokenLayout, query: Query) -> int | None:
    """Sequence index of the query token (None for the patch mean)."""
    if query.kind == "cls":
        if layout.cls_index is None:
            raise ConfigError("query", "cls: this model has no class token; use mean or patch:ROW,COL")
        return layout.cls_index
    if query.kind == "mean":
        return None
    gh, gw = layout.grid
    if not (query.row < gh and query.col < gw):
        raise ConfigError(
            "query",
            f"patch:{query.row},{query.col} is outside the {gh}x{gw} patch grid "
            f"(rows 0-{gh - 1}, cols 0-{gw - 1})",
        )
    return layout.num_prefix + query.row * gw + query.col


# ---------------------------------------------------------------- pure tensor functions


def _renormalise_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; a row without mass stays zero instead of becoming NaN.

    Rollout of an identity-attention model gives the class token no mass on the patches:
    that is an answer to show, not an error.
    """
    import torch

    total = rows.sum(-1, keepdim=True)
    return torch.where(
        total > 0, rows / total.clamp_min(torch.finfo(rows.dtype).tiny), torch.zeros_like(rows)
    )


def query_rows(matrix: torch.Tensor, layout: TokenLayout, query: Query) -> torch.Tensor:
    """Distribution over patches of `query` from (..., T, T) attention or rollout.

    Keys are restricted to the patches and renormalised (as `p_i` in docs/metrics.md), so
    class-token and register mass never shows up as a patch. Returns (..., N) float32.
    """
    if matrix.shape[-1] != layout.num_tokens or matrix.shape[-2] != layout.num_tokens:
        raise AttnscopeError(
            f"matrix of shape {tuple(matrix.shape)} does not match {layout.num_tokens} tokens"
        )
    m = matrix.float()
    P = layout.patch_slice
    index = query_index(layout, query)
    if index is None:
        return _renormalise_rows(m[..., P, P]).mean(-2)
    return _renormalise_rows(m[..., index, P])


def select_heads(
    rows: torch.Tensor, heads: Literal["mean", "all"] | Sequence[int]
) -> tuple[torch.Tensor, list[str]]:
    """(B, H, N) per-head rows -> (B, K, N) and a label per map."""
    n_heads = rows.shape[1]
    if heads == "mean":
        return rows.mean(1, keepdim=True), [f"mean of {n_heads} heads"]
    if heads == "all":
        return rows, [f"head {h}" for h in range(n_heads)]
    bad = [h for h in heads if h >= n_heads]
    if bad:
        raise ConfigError(
            "heads", f"{','.join(map(str, bad))}: the model has {n_heads} heads (0-{n_heads - 1})"
        )
    return rows[:, list(heads)], [f"head {h}" for h in heads]


def rollout_step(
    running: torch.Tensor | None, attn: torch.Tensor, discard_ratio: float = 0.0
) -> torch.Tensor:
    """One block of attention rollout (Abnar & Zuidema 2020): returns M_l @ running.

    attn: (B, H, T, T). Heads are averaged; with `discard_ratio` the smallest fraction of
    each image's averaged entries is zeroed (as vit-explain does); then
    M = 0.5 A + 0.5 I with rows re-normalised, so the residual path keeps half the mass.
    Every token (registers too) stays in the product.
    """
    import torch

    check_fraction("discard_ratio", discard_ratio)
    a = attn.float().mean(1)  # (B, T, T)
    b, t, _ = a.shape
    if discard_ratio > 0:
        flat = a.reshape(b, t * t).clone()
        k = int(t * t * discard_ratio)
        if k:
            _, idx = flat.topk(k, dim=-1, largest=False)
            flat.scatter_(-1, idx, 0.0)
        a = flat.reshape(b, t, t)
    eye = torch.eye(t, dtype=a.dtype, device=a.device)
    m = 0.5 * a + 0.5 * eye
    m = m / m.sum(-1, keepdim=True)
    return m if running is None else m @ running


def attention_rollout(attns: Iterable[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Rollout through a sequence of blocks' (B, H, T, T) attentions -> (B, T, T).

    Takes an iterable so blocks can be fed one at a time; only the running product is kept.
    """
    running = None
    for attn in attns:
        running = rollout_step(running, attn, discard_ratio)
    if running is None:
        raise AttnscopeError("attention rollout needs at least one block")
    return running


def to_grid(rows: torch.Tensor | np.ndarray, layout: TokenLayout) -> np.ndarray:
    """(..., N) patch values -> (..., gh, gw) numpy, row-major as the patch embedding orders them."""
    arr = rows.detach().cpu().numpy() if hasattr(rows, "detach") else np.asarray(rows)
    gh, gw = layout.grid
    if arr.shape[-1] != gh * gw:
        raise AttnscopeError(f"{arr.shape[-1]} patch values do not fill a {gh}x{gw} grid")
    return arr.reshape(*arr.shape[:-1], gh, gw).astype(np.float32, copy=False)


def upsample(
    maps: np.ndarray,
    patch_size: tuple[int, int],
    out_hw: tuple[int, int],
    mode: UpsampleMode = "nearest",
) -> np.ndarray:
    """(..., gh, gw) -> (..., H, W) in input pixels.

    The grid covers gh*ph x gw*pw pixels from the top-left (timm drops the remainder when
    the input is not a multiple of the patch); pixels outside it are NaN, so they are
    drawn as "no patch" rather than as attention.
    """
    import torch
    import torch.nn.functional as F

    check_choice("upsample", mode, UPSAMPLE_MODES)
    arr = np.asarray(maps, dtype=np.float32)
    lead, (gh, gw) = arr.shape[:-2], arr.shape[-2:]
    ch, cw = gh * patch_size[0], gw * patch_size[1]
    x = torch.from_numpy(np.ascontiguousarray(arr.reshape(-1, 1, gh, gw)))
    if mode == "nearest":
        up = x.repeat_interleave(patch_size[0], dim=-2).repeat_interleave(patch_size[1], dim=-1)
    else:
        up = F.interpolate(x, size=(ch, cw), mode="bilinear", align_corners=False)
    h, w = out_hw
    out = np.full((up.shape[0], h, w), np.nan, dtype=np.float32)
    hh, ww = min(h, ch), min(w, cw)
    out[:, :hh, :ww] = up[:, 0, :hh, :ww].numpy()
    return out.reshape(*lead, h, w)


def mass_mask(maps: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the smallest set of cells holding `threshold` of each map's mass.

    The same rule as `cls_patch_k60_frac`: cells sorted by value, cumulative mass compared
    with the threshold minus 1e-6. Works on the last two axes; all-zero maps give an
    empty mask.
    """
    if not 0.0 < threshold <= 1.0:
        raise AttnscopeError(f"mass threshold must be in (0, 1], got {threshold}")
    arr = np.asarray(maps, dtype=np.float64)
    lead, shape = arr.shape[:-2], arr.shape[-2:]
    flat = np.nan_to_num(arr.reshape(-1, shape[0] * shape[1]), nan=0.0)
    total = flat.sum(-1, keepdims=True)
    p = np.divide(flat, total, out=np.zeros_like(flat), where=total > 0)
    order = np.argsort(-p, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, -1), -1)
    k = np.minimum((cum < threshold - 1e-6).sum(-1) + 1, flat.shape[-1])
    k = np.where(total[:, 0] > 0, k, 0)
    mask_sorted = np.arange(flat.shape[-1])[None, :] < k[:, None]
    mask = np.zeros_like(mask_sorted)
    np.put_along_axis(mask, order, mask_sorted, -1)
    return mask.reshape(*lead, *shape)


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised model input -> (B, H, W, 3) uint8: the picture the model saw."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------- capture driver


@dataclass
class AttentionMaps:
    """Maps of some images from one model, on the patch grid, plus what is needed to draw them."""

    maps: np.ndarray  # (n_images, n_maps, gh, gw) float32, each map a distribution over patches
    labels: list[str]  # one per map: "mean of 12 heads", "head 3", "rollout"
    views: np.ndarray  # (n_images, H, W, 3) uint8, the model's input de-normalised
    paths: list[Path]
    layout: TokenLayout
    layer: int
    num_blocks: int
    query: Query
    rollout: bool = False
    discard_ratio: float = 0.0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        block = f"block {self.layer}" + (" (last)" if self.layer == self.num_blocks - 1 else "")
        if self.rollout:
            extra = f", discard {self.discard_ratio:g}" if self.discard_ratio else ""
            return f"{self.query.describe()} attention rollout through {block}{extra}"
        return f"{self.query.describe()} attention, {block}"


class _MapConsumer:
    """Keeps only the rows of one block, or one running rollout product."""

    def __init__(self, layer: int, query: Query, heads: Any, rollout: bool, discard_ratio: float) -> None:
        self.layer = layer
        self.query = query
        self.heads = heads
        self.rollout = rollout
        self.discard_ratio = discard_ratio
        self.layout: TokenLayout | None = None
        self.running: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.labels: list[str] = []

    def begin(self, layout: TokenLayout) -> None:
        query_index(layout, self.query)  # fail before the forward, with the grid in the message
        self.layout, self.running, self.rows = layout, None, None

    def __call__(self, block: BlockTensors) -> None:
        assert self.layout is not None
        if block.index > self.layer:
            return
        if self.rollout:
            self.running = rollout_step(self.running, block.attn, self.discard_ratio)
            if block.index == self.layer:
                self.rows = query_rows(self.running, self.layout, self.query).unsqueeze(1)
                self.labels = ["rollout (heads averaged)"]
                self.running = None
        elif block.index == self.layer:
            self.rows, self.labels = select_heads(query_rows(block.attn, self.layout, self.query), self.heads)


def resolve_layer(layer: int | None, num_blocks: int) -> int:
    """None -> last block; negative counts from the end, as in Python."""
    if layer is None:
        return num_blocks - 1
    index = layer + num_blocks if layer < 0 else layer
    if not 0 <= index < num_blocks:
        raise ConfigError(
            "layer", f"{layer} is out of range: the model has {num_blocks} blocks (0-{num_blocks - 1})"
        )
    return index


def collect_maps(
    loaded: LoadedModel,
    paths: Sequence[Path],
    *,
    query: Query | str = "cls",
    layer: int | None = None,
    heads: HeadSelection | Sequence[int] | str = "mean",
    rollout: bool = False,
    discard_ratio: float = 0.0,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    progress: Any = None,
) -> AttentionMaps:
    """Attention maps of `paths` through `loaded`, one block's worth of memory at a time.

    Unreadable images are skipped and listed in `skipped`; it is an error if none is left.
    `progress(done, total)` is called after each batch.
    """
    import torch

    from attnscope.data import build_eval_transform, make_loader
    from attnscope.measure import forwards
    from attnscope.models import resolve_device

    q = parse_query(query) if isinstance(query, str) else query
    selection = parse_heads(heads) if isinstance(heads, str) else heads
    check_map_options(selection, rollout, discard_ratio)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    num_blocks = len(loaded.model.blocks)  # type: ignore[arg-type]
    target = resolve_layer(layer, num_blocks)
    transform, cfg = build_eval_transform(loaded.model, loaded.input_size)
    loader = make_loader(paths, transform, batch_size)
    consumer = _MapConsumer(target, q, selection, rollout, discard_ratio)
    maps: list[np.ndarray] = []
    views: list[np.ndarray] = []
    used: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    layout = None
    done = 0
    for batch, batch_layout in forwards(loaded, loader, consumer, device=dev, dtype=dtype, residual=False):
        skipped.extend((Path(paths[i]), reason) for i, reason in batch.failures)
        if batch_layout is not None:
            layout = batch_layout
            assert consumer.rows is not None and batch.images is not None
            maps.append(to_grid(consumer.rows, layout))
            views.append(denormalise(batch.images, cfg["mean"], cfg["std"]))
            used.extend(Path(paths[i]) for i in batch.indices)
        done += len(batch.indices) + len(batch.failures)
        if progress is not None:
            progress(done, len(paths))
    if layout is None:
        raise AttnscopeError(f"none of the {len(paths)} images could be read")
    return AttentionMaps(
        maps=np.concatenate(maps),
        labels=consumer.labels,
        views=np.concatenate(views),
        paths=used,
        layout=layout,
        layer=target,
        num_blocks=num_blocks,
        query=q,
        rollout=rollout,
        discard_ratio=discard_ratio,
        skipped=skipped,
    )
