"""Figures that compare models: metrics against depth, block x head heatmaps, per-head scatter.

Nothing here saves or prints. Every figure takes the report's one `palette` (model ->
colour) and `linestyles` (model -> family line style), so a model looks the same in every
figure of a report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from attnscope.metrics import METRICS
from attnscope.plots.style import UNIT_INTERVAL, metric_label, setup

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Fixed per family (not per report), so MIM is solid and JEA dashed in every report.
FAMILY_LINESTYLES: dict[str, Any] = {
    "MIM": "-",
    "MIM (fine-tuned)": "-.",
    "JEA": "--",
    "supervised": ":",
    "language-supervised": (0, (5, 1, 1, 1)),
    "unknown": "-",
}


def _with_note(title: str, note: str) -> str:
    """A title with its warning (e.g. RANDOM WEIGHTS) on a second line, so a cropped figure keeps it."""
    return f"{title}\n{note}" if note else title


def family_linestyles(families: Mapping[str, str]) -> dict[str, Any]:
    """model -> matplotlib line style from its family."""
    return {model: FAMILY_LINESTYLES.get(family, "-") for model, family in families.items()}


def _depths(layers: pd.DataFrame) -> dict[str, int]:
    return {str(m): int(g["layer"].max()) + 1 for m, g in layers.groupby("model", sort=False)}


def _x(layer: Any, depth: int, relative: bool) -> Any:
    return layer / max(depth - 1, 1) if relative else layer


def _set_ylim(ax: Axes, metric: str, data: pd.DataFrame | None = None, top: float | None = None) -> None:
    if metric in UNIT_INTERVAL:
        ax.set_ylim(-0.02, 1.02)
    elif metric.endswith(("_ratio", "_px", "entropy")):
        if top is None:
            top = (
                float((data["mean"] + data.get("std", 0)).max())
                if data is not None and not data.empty
                else 0.0
            )
        ax.set_ylim(0, top * 1.08 if top > 0 else None)


def block_intervals(intervals: pd.DataFrame, model: str, metric: str) -> pd.DataFrame:
    """A model's per-block interval rows of `metric` (layer, ci_low, ci_high), by block."""
    rows = intervals[
        (intervals["scope"] == "block")
        & (intervals["model"] == model)
        & (intervals["metric"] == metric)
        & (intervals["minus"].fillna("") == "")
    ]
    return rows[["layer", "ci_low", "ci_high"]].astype({"layer": int}).sort_values("layer")


def _legend_handles(
    models: Sequence[str],
    palette: Mapping[str, Any],
    linestyles: Mapping[str, Any],
    families: Mapping[str, str],
) -> tuple[list, list[str]]:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=palette[m], ls=linestyles.get(m, "-"), lw=2.0, marker="o", ms=3.5)
        for m in models
    ]
    labels = [f"{m} ({families[m]})" if families.get(m) else m for m in models]
    return handles, labels


def _draw_metric(
    ax: Axes,
    layers: pd.DataFrame,
    metric: str,
    *,
    models: Sequence[str],
    depths: Mapping[str, int],
    palette: Mapping[str, Any],
    linestyles: Mapping[str, Any],
    relative_depth: bool,
    absent: Mapping[str, str],
    intervals: pd.DataFrame | None = None,
) -> None:
    data = layers[layers["metric"] == metric]
    tops = []
    for model in models:
        d = data[data["model"] == model].sort_values("layer")
        if d.empty:
            continue
        x = _x(d["layer"], depths[model], relative_depth)
        ax.plot(x, d["mean"], ls=linestyles.get(model, "-"), marker="o", ms=2.5, lw=1.6, color=palette[model])
        if intervals is None:
            low, high = d["mean"] - d["std"], d["mean"] + d["std"]
        else:  # the 95% interval of the mean, per block; no band where there is none
            band = block_intervals(intervals, model, metric).set_index("layer")
            band = band.reindex(d["layer"].to_numpy())
            low, high = band["ci_low"].to_numpy(), band["ci_high"].to_numpy()
        ax.fill_between(x, low, high, color=palette[model], alpha=0.2, lw=0)
        tops.append(float(np.nanmax(np.append(np.asarray(high, dtype=float), d["mean"].max()))))
    ax.set_ylabel(_unit(metric), fontsize=8)
    xlabel = "relative depth (block / last block)" if relative_depth else "block"
    if absent:
        # Under the axis, not over the data: a missing model must read as absent, not as a low line.
        xlabel += "\nno line for " + "; ".join(f"{m} ({why})" for m, why in absent.items())
    ax.set_xlabel(xlabel, fontsize=8)
    if relative_depth:
        ax.set_xlim(-0.03, 1.03)
    else:
        cast(Any, ax.xaxis.get_major_locator()).set_params(integer=True)  # AutoLocator takes it
    _set_ylim(ax, metric, data, max(tops) if tops else None)


def depth_panels(
    layers: pd.DataFrame,
    metrics: Sequence[str],
    *,
    palette: Mapping[str, Any],
    linestyles: Mapping[str, Any],
    families: Mapping[str, str],
    relative_depth: bool,
    missing_reasons: Mapping[str, Mapping[str, str]] | None = None,
    ncols: int = 4,
    note: str = "",
    intervals: pd.DataFrame | None = None,
) -> Figure:
    """One panel per metric against depth: a line per model (mean over images) and a band.

    The band is the 95% bootstrap interval of the mean from `intervals` (intervals.csv's
    per-block rows) when given, else ± one std over images. `missing_reasons[metric][model]`
    is written under the panel, so a model without a class token is visibly absent, never
    drawn as zero.
    """
    plt, _ = setup()
    models = [m for m in palette if m in set(layers["model"])]
    depths = _depths(layers)
    n = len(metrics)
    rows = -(-(n + 1) // ncols)  # one free slot holds the legend, away from the data
    fig, axes = plt.subplots(rows, ncols, figsize=(3.4 * ncols, 2.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, metric in zip(flat, metrics, strict=False):
        _draw_metric(
            ax,
            layers,
            metric,
            models=models,
            depths=depths,
            palette=palette,
            linestyles=linestyles,
            relative_depth=relative_depth,
            absent=(missing_reasons or {}).get(metric, {}),
            intervals=intervals,
        )
        ax.set_title(metric_label(metric), fontsize=9)
    for ax in flat[n:]:
        ax.axis("off")
    handles, labels = _legend_handles(models, palette, linestyles, families)
    flat[n].legend(
        handles, labels, loc="center", frameon=False, fontsize=8, title="model (family)", title_fontsize=8
    )
    band = "95% bootstrap interval of the mean" if intervals is not None else "± std over images"
    what = (
        "Token metrics"
        if all(METRICS[m].family == "tokens" for m in metrics if m in METRICS)
        else "Attention metrics"
    )
    title = f"{what} against depth (line: mean over images, band: {band})"
    fig.suptitle(_with_note(title, note), fontsize=11)
    fig.tight_layout()
    return fig


def _unit(metric: str) -> str:
    if metric.endswith("_px"):
        return "pixels"
    if metric.endswith("entropy"):
        return "nats"
    if metric.endswith("_ratio"):
        return "||update|| / ||residual||"
    if metric.endswith("entropy_norm"):
        return "entropy / ln N"
    if metric.endswith("_frac"):
        return "fraction of patches"
    if metric.endswith(("_mass", "_attn", "_max")):
        return "attention probability"
    if metric.endswith("_gini"):
        return "Gini coefficient"
    if metric.endswith("_nmi"):
        return "normalised MI"
    return "value"


def head_scatter(
    heads: pd.DataFrame,
    *,
    palette: Mapping[str, Any],
    metric: str = "attn_distance_px",
    note: str = "",
) -> Figure:
    """Per-head `metric` against block, one panel per model (as Fig. 7 of the ViT paper).

    Heads are spread a little left-right within a block so they do not hide each other;
    the line is the mean over heads.
    """
    plt, _ = setup()
    data = heads[heads["metric"] == metric]
    models = [m for m in palette if m in set(data["model"])]
    fig, axes = plt.subplots(
        1, max(len(models), 1), figsize=(0.4 + 3.2 * max(len(models), 1), 3.4), sharey=True, squeeze=False
    )
    for ax, model in zip(axes.flat, models, strict=False):
        d = data[data["model"] == model]
        n_heads = int(d["head"].max()) + 1
        offset = (d["head"] - (n_heads - 1) / 2) * (0.5 / max(n_heads, 1))
        ax.scatter(d["layer"] + offset, d["mean"], s=12, color=palette[model], alpha=0.75, lw=0)
        per_layer = d.groupby("layer")["mean"].mean()
        ax.plot(per_layer.index, per_layer.values, color=palette[model], lw=1.0, alpha=0.8)
        ax.set_title(model, color=palette[model], fontsize=10, fontweight="bold")
        ax.set_xlabel("block")
        cast(Any, ax.xaxis.get_major_locator()).set_params(integer=True)  # AutoLocator takes it
    axes.flat[0].set_ylabel(metric_label(metric))
    top = float(data["mean"].max()) if not data.empty else 0.0
    axes.flat[0].set_ylim(0, top * 1.08 if top > 0 else None)
    fig.suptitle(
        _with_note(f"{metric_label(metric)} per head (dots: heads, line: mean over heads)", note), fontsize=11
    )
    fig.tight_layout()
    return fig


def _missing_panel(ax: Axes, why: str) -> None:
    """An empty panel that says why the model has no value (never an all-zero heatmap)."""
    ax.text(
        0.5,
        0.5,
        f"not defined:\n{why}",
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=8,
        color="0.35",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _heatmap_panel(ax: Axes, grid: pd.DataFrame, norm: Any, metric: str) -> Any:
    """One model's block x head grid, with the values written in when they fit."""
    image = ax.imshow(grid.to_numpy(), cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
    ax.grid(False)
    ax.set_xticks(range(grid.shape[1]), [str(h) for h in grid.columns], fontsize=7)
    step = max(1, grid.shape[0] // 12)
    ax.set_yticks(range(0, grid.shape[0], step), [str(b) for b in grid.index[::step]], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    if grid.shape[0] <= 16 and grid.shape[1] <= 16:
        fmt = "{:.0f}" if metric.endswith("_px") else "{:.2f}"
        for (r, c), v in np.ndenumerate(grid.to_numpy()):
            colour = "black" if norm(v) > 0.6 else "white"
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=6.5, color=colour)
    return image


def heatmaps_side_by_side(
    heads: pd.DataFrame,
    metric: str,
    *,
    models: Sequence[str],
    palette: Mapping[str, Any],
    missing_reasons: Mapping[str, str] | None = None,
    note: str = "",
) -> Figure:
    """Block x head heatmaps of `metric`, one per model, on one shared colour scale."""
    plt, _ = setup()
    from matplotlib.colors import Normalize

    data = heads[heads["metric"] == metric]
    grids: dict[str, Any] = {}
    for model in models:
        d = data[data["model"] == model]
        if not d.empty:
            grids[model] = d.pivot_table(
                index="layer", columns="head", values="mean", aggfunc="first"
            ).sort_index()
    if metric in UNIT_INTERVAL:
        norm = Normalize(0, 1)
    else:
        values = np.concatenate([g.to_numpy().ravel() for g in grids.values()]) if grids else np.zeros(1)
        norm = Normalize(float(np.nanmin(values)), float(np.nanmax(values)) or 1.0)
    widths = [max(grids[m].shape[1], 3) if m in grids else 3 for m in models]
    max_blocks = max([g.shape[0] for g in grids.values()] + [4])
    fig, axes = plt.subplots(
        1,
        len(models),
        figsize=(1.6 + 0.45 * sum(widths) + 0.9 * len(models), 1.6 + 0.28 * max_blocks),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, model in zip(axes.flat, models, strict=True):
        ax.set_title(model, color=palette[model], fontsize=10, fontweight="bold")
        if model in grids:
            image = _heatmap_panel(ax, grids[model], norm, metric)
        else:
            _missing_panel(ax, (missing_reasons or {}).get(model, "not measured"))
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), label=metric_label(metric), fraction=0.05, pad=0.02)
    fig.suptitle(
        _with_note(f"{metric_label(metric)} per block and head (mean over images)", note), fontsize=11
    )
    return fig


def cka_heatmaps(cka: pd.DataFrame, token: str, *, models: Sequence[str], note: str = "") -> Figure:
    """Linear CKA block x block for every pair of models (upper triangle, self included), one
    panel per pair, on the common [0, 1] scale."""
    plt, _ = setup()
    from matplotlib.colors import Normalize

    data = cka[cka["token"] == token]
    pairs = [
        (a, b)
        for i, a in enumerate(models)
        for b in models[i:]
        if not data[(data["model_a"] == a) & (data["model_b"] == b)].empty
    ]
    ncols = min(len(pairs), 3) or 1
    nrows = max(1, -(-len(pairs) // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.0 + 3.4 * ncols, 0.8 + 3.2 * nrows), squeeze=False, layout="constrained"
    )
    norm = Normalize(0, 1)
    image = None
    for ax, (a, b) in zip(axes.flat, pairs, strict=False):
        d = data[(data["model_a"] == a) & (data["model_b"] == b)]
        grid = d.pivot_table(index="block_a", columns="block_b", values="cka", aggfunc="first").sort_index()
        image = ax.imshow(grid.to_numpy(), cmap="magma", norm=norm, origin="lower", interpolation="nearest")
        ax.grid(False)
        ax.set_xlabel(f"{b} block")
        ax.set_ylabel(f"{a} block")
        ax.set_title(f"{a} vs {b}" if a != b else a, fontsize=9)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), label="linear CKA", fraction=0.04, pad=0.02)
    fig.suptitle(_with_note(f"Linear CKA between blocks ({token} features)", note), fontsize=11)
    return fig
