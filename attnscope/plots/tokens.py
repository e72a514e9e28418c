"""Figures of the token profiles: the singular-value spectrum and the radial frequency profile.

`profile_at_depths` draws either table (spectrum.csv, frequency.csv) at a few depths, one
panel per depth and a line per model, in the report's shared colours and line styles;
`profile_by_block` draws one model's every block in one panel, coloured by depth (the
style of the cl-vs-mim figures), for the single-model `entropy` run. Nothing here saves
or prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attnscope.plots.style import model_palette, setup

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The depths shown, as fractions of the last block: first, a third, two thirds, last.
DEPTHS: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)


def _kind(table: pd.DataFrame) -> str:
    return "spectrum" if "sv_share" in table.columns else "frequency"


def depth_blocks(num_blocks: int, fractions: Sequence[float] = DEPTHS) -> list[int]:
    """The block nearest each fraction of the last block (duplicates dropped, in order)."""
    last = max(num_blocks - 1, 0)
    return list(dict.fromkeys(int(round(f * last)) for f in fractions))


def _draw(ax: Axes, d: pd.DataFrame, kind: str, row: int, **style: Any) -> None:
    """One model's profile at one block: spectrum row 0 = sv_share, row 1 = energy_cum."""
    if kind == "spectrum":
        y = d["sv_share"] if row == 0 else d["energy_cum"]
        ax.plot(d["k"], y, lw=1.5, **style)
    else:
        ax.plot(d["frequency"] / math.pi, d["rel_log_amplitude"], marker="o", ms=2.5, lw=1.5, **style)


def _axes_labels(ax: Axes, kind: str, row: int, first: bool) -> None:
    if kind == "spectrum":
        ax.set_xscale("log")
        ax.set_xlabel("k (singular value rank)", fontsize=8)
        if row == 0:
            ax.set_yscale("log")
            if first:
                ax.set_ylabel("s_k / sum s", fontsize=8)
        else:
            ax.set_ylim(0, 1.02)
            if first:
                ax.set_ylabel("cumulative energy\n(variance share in the first k)", fontsize=8)
    else:
        ax.set_xlabel("frequency (× π rad / patch)", fontsize=8)
        if first:
            ax.set_ylabel("Δ log amplitude (vs DC)", fontsize=8)


def profile_at_depths(
    table: pd.DataFrame,
    *,
    palette: Mapping[str, Any] | None = None,
    linestyles: Mapping[str, Any] | None = None,
    note: str = "",
) -> Figure:
    """One panel per depth (first block, a third, two thirds, last; by each model's relative
    depth), a line per model: the mean over images of the spectrum (top: normalised
    singular values, log-log; bottom: cumulative energy) or of the frequency profile."""
    plt, _ = setup()
    kind = _kind(table)
    models = list(dict.fromkeys(table["model"]))
    palette = palette or model_palette(models)
    depths = {m: int(table.loc[table["model"] == m, "block"].max()) + 1 for m in models}
    rows = 2 if kind == "spectrum" else 1
    size = (3.2 * len(DEPTHS), 2.9 * rows + 0.6)
    fig, axes = plt.subplots(rows, len(DEPTHS), figsize=size, squeeze=False, sharey="row")  # depths compare
    for col, fraction in enumerate(DEPTHS):
        titles = []
        for model in models:
            block = depth_blocks(depths[model], (fraction,))[0]
            d = table[(table["model"] == model) & (table["block"] == block)]
            titles.append(f"{block}")
            for row in range(rows):
                style = {"color": palette[model], "ls": (linestyles or {}).get(model, "-"), "label": model}
                _draw(axes[row, col], d, kind, row, **style)
        same = len(set(titles)) == 1
        blocks = f"block {titles[0]}" if same else "blocks " + ", ".join(titles)
        axes[0, col].set_title(f"relative depth {fraction:.2f} ({blocks})", fontsize=9)
        for row in range(rows):
            _axes_labels(axes[row, col], kind, row, col == 0)
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8, title="model")
    title = (
        "Singular-value spectrum of the centred patch tokens (mean over images)"
        if kind == "spectrum"
        else "Relative log amplitude of the patch-token feature map along the diagonal frequency"
    )
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize=11)
    fig.tight_layout()
    return fig


def profile_by_block(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """One model's profile at every block in one panel per quantity, coloured by depth
    (dark: first block, yellow: last)."""
    plt, _ = setup()
    import matplotlib as mpl

    kind = _kind(table)
    blocks = sorted(set(table["block"]))
    cmap, norm = mpl.colormaps["viridis"], mpl.colors.Normalize(0, max(len(blocks) - 1, 1))
    rows = 2 if kind == "spectrum" else 1
    fig, axes = plt.subplots(1, rows, figsize=(4.6 * rows + 1.2, 3.8), squeeze=False)
    for row in range(rows):
        ax = axes[0, row]
        for block in blocks:
            _draw(ax, table[table["block"] == block], kind, row, color=cmap(norm(block)))
        _axes_labels(ax, kind, row, True)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes.flat), label="block")
    what = "singular-value spectrum" if kind == "spectrum" else "relative log amplitude by frequency"
    fig.suptitle(title or f"{what} at every block (mean over images)", fontsize=11)
    return fig


def single_model_figures(
    spectrum: pd.DataFrame | None, frequency: pd.DataFrame | None, *, label: str | None = None
) -> Iterator[tuple[str, Figure]]:
    """The `entropy` run's profile figures ("spectrum", "frequency"), for the tables that
    have rows (the caller saves and closes each)."""
    for stem, table, what in (
        ("spectrum", spectrum, "singular-value spectrum of the patch tokens"),
        ("frequency", frequency, "relative log amplitude by frequency"),
    ):
        if table is not None and not table.empty:
            title = f"{label}: {what} at every block" if label else None
            yield stem, profile_by_block(table, title=title)
