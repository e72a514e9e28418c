"""Attention overlays: a map on the patch grid drawn over the image the model saw.

`overlay_figure` is one image of the `maps` command (the input, then one overlay per head
or their mean); `attention_gallery` is the compare report's images x models grid. Arrays
in, Figure out; nothing here saves or prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from attnscope.maps import mass_mask, upsample
from attnscope.plots.style import setup

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CONTOUR_COLOUR = "#00e5ff"


@dataclass
class GalleryColumn:
    """One model's column of the attention gallery."""

    model: str
    views: np.ndarray  # (K, H, W, 3) uint8
    maps: np.ndarray  # (K, gh, gw), a distribution over patches per image
    patch_size: tuple[int, int]
    what: str  # "[cls]→patch" or "mean patch→patch (no [cls])"
    names: Sequence[str] = ()


def draw_overlay(
    ax: Axes,
    view: np.ndarray,
    grid_map: np.ndarray,
    patch_size: tuple[int, int],
    *,
    mode: str = "nearest",
    threshold: float | None = 0.6,
    vmax: float | None = None,
    alpha: float = 0.6,
):
    """Image as the model saw it, the map upsampled over it, and the `threshold`-mass contour."""
    h, w = view.shape[:2]
    up = upsample(grid_map, patch_size, (h, w), mode)  # type: ignore[arg-type]
    ax.imshow(view)
    top = vmax if vmax is not None else float(np.nanmax(grid_map)) or 1.0
    image = ax.imshow(up, cmap="inferno", vmin=0.0, vmax=top, alpha=alpha, interpolation="nearest")
    if threshold:
        mask = upsample(mass_mask(grid_map, threshold).astype(np.float32), patch_size, (h, w), "nearest")
        if np.nansum(mask) > 0:
            ax.contour(np.nan_to_num(mask), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return image


def attention_gallery(
    columns: Sequence[GalleryColumn],
    *,
    palette: Mapping[str, Any],
    threshold: float = 0.6,
    caption: str = "",
) -> Figure:
    """First K images (rows) x models (columns): last-block attention over each model's view."""
    plt, _ = setup()
    k = min(len(c.views) for c in columns)
    ncols = len(columns) + 1
    fig, axes = plt.subplots(k, ncols, figsize=(2.3 * ncols, 2.3 * k + 0.5), squeeze=False)
    for r in range(k):
        first = columns[0]
        axes[r, 0].imshow(first.views[r])
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].grid(False)
        name = first.names[r] if r < len(first.names) else f"image {r}"
        axes[r, 0].set_ylabel(name, fontsize=8)
        if r == 0:
            axes[r, 0].set_title(f"input\n(as {first.model} sees it)", fontsize=8)
        for c, col in enumerate(columns, start=1):
            draw_overlay(axes[r, c], col.views[r], col.maps[r], col.patch_size, threshold=threshold)
            if r == 0:
                axes[r, c].set_title(
                    f"{col.model}\n{col.what}",
                    fontsize=8,
                    color=palette.get(col.model, "black"),
                    fontweight="bold",
                )
    note = (
        f"Last block, mean over heads. Colour: attention relative to each map's maximum (inferno). "
        f"Cyan line: smallest set of patches holding {threshold:.0%} of the mass."
    )
    import textwrap

    # Wrapped here, not by matplotlib, so the space reserved below the grid fits the lines.
    width = int(fig.get_figwidth() * 16)
    lines = [ln for part in (note, caption) if part for ln in textwrap.wrap(part, width)]
    fig.tight_layout(rect=(0, (0.15 + 0.14 * len(lines)) / fig.get_figheight(), 1, 1))
    fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=7.5, color="0.25")
    return fig


def overlay_figure(
    view: np.ndarray,
    maps: np.ndarray,
    labels: Sequence[str],
    patch_size: tuple[int, int],
    *,
    title: str,
    mode: str = "nearest",
    threshold: float | None = 0.6,
    query_cell: tuple[int, int] | None = None,
    ncols: int = 4,
) -> Figure:
    """One image: the input, then one overlay per map (heads or their mean), one colour scale."""
    plt, _ = setup()
    from matplotlib.patches import Rectangle

    n = len(maps) + 1
    cols = min(n, ncols + 1 if len(maps) == 1 else ncols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.7 * cols + 0.8, 2.7 * rows + 0.9), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    flat[0].imshow(view)
    flat[0].set_title("input (as the model sees it)", fontsize=8)
    vmax = float(np.nanmax(maps)) or 1.0
    image = None
    for ax, grid_map, label in zip(flat[1:], maps, labels, strict=False):
        image = draw_overlay(ax, view, grid_map, patch_size, mode=mode, threshold=threshold, vmax=vmax)
        ax.set_title(label, fontsize=8)
    for ax in flat[: len(maps) + 1]:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        if query_cell is not None:
            r, c = query_cell
            ph, pw = patch_size
            ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="#39ff14", lw=1.6))
    for ax in flat[len(maps) + 1 :]:
        ax.axis("off")
    if image is not None:
        from matplotlib.cm import ScalarMappable

        # A fresh mappable: the overlay's alpha would wash out the colour bar.
        fig.colorbar(
            ScalarMappable(norm=image.norm, cmap=image.cmap),
            ax=flat,
            label="attention (fraction of patch mass)",
            shrink=0.85,
        )
    notes = []
    if threshold:
        notes.append(f"cyan line: smallest set of patches holding {threshold:.0%} of the mass")
    if query_cell is not None:
        notes.append("green square: query patch")
    fig.suptitle(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    return fig
