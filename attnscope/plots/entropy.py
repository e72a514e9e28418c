"""A single-model run's figures: metric lines over depth and block x head heatmaps.

DataFrame -> matplotlib Figure. Nothing here saves or prints; the run folder does that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from attnscope.plots.style import HEATMAP_METRICS, UNIT_INTERVAL, metric_label, model_palette, setup

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def metric_lines(
    layers: pd.DataFrame,
    metric: str,
    *,
    palette: dict[str, tuple] | None = None,
    relative_depth: bool = False,
    linestyles: dict[str, str] | None = None,
    title: str | None = None,
) -> Figure:
    """Mean +/- std over images of `metric` against block, one line per model.

    With `relative_depth`, x is block / (depth - 1) so a 12-block and a 32-block model
    share one axis.
    """
    plt, _ = setup()
    data = layers[layers["metric"] == metric]
    models = list(dict.fromkeys(data["model"]))
    palette = palette or model_palette(models)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for model in models:
        d = data[data["model"] == model].sort_values("layer")
        depth = int(layers.loc[layers["model"] == model, "layer"].max()) + 1
        x = d["layer"] / max(depth - 1, 1) if relative_depth else d["layer"]
        style = (linestyles or {}).get(model, "-")
        ax.plot(x, d["mean"], style, marker="o", ms=3.5, lw=1.8, color=palette[model], label=model)
        ax.fill_between(x, d["mean"] - d["std"], d["mean"] + d["std"], color=palette[model], alpha=0.18, lw=0)
    ax.set_xlabel("relative depth (block / last block)" if relative_depth else "block")
    ax.set_ylabel(metric_label(metric))
    if metric in UNIT_INTERVAL:
        ax.set_ylim(-0.02, 1.02)
    elif metric.endswith("_ratio") or metric.endswith("_px") or metric.endswith("entropy"):
        ax.set_ylim(bottom=0)
    if not relative_depth:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title or f"{metric_label(metric)} (mean ± std over images)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def head_heatmap(heads: pd.DataFrame, metric: str, *, model: str | None = None, ax=None) -> Figure:
    """Layer x head heatmap of the per-head mean of `metric` for one model."""
    plt, sns = setup()
    data = heads[heads["metric"] == metric]
    if model is not None:
        data = data[data["model"] == model]
    grid = data.pivot_table(index="layer", columns="head", values="mean", aggfunc="first").sort_index()
    if ax is None:
        n_heads = grid.shape[1]
        fig, ax = plt.subplots(figsize=(1.2 + 0.42 * max(n_heads, 4), 1.0 + 0.3 * max(grid.shape[0], 4)))
    else:
        fig = ax.figure
    bounded = metric in UNIT_INTERVAL
    sns.heatmap(
        grid,
        ax=ax,
        cmap="viridis",
        vmin=0 if bounded else None,
        vmax=1 if bounded else None,
        annot=grid.shape[1] <= 16 and grid.shape[0] <= 16,
        fmt=".2f" if bounded else ".0f" if metric.endswith("_px") else ".2f",
        annot_kws={"fontsize": 6},
        cbar_kws={"label": metric_label(metric)},
    )
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    name = model or ", ".join(dict.fromkeys(data["model"]))
    ax.set_title(f"{name}: {metric_label(metric)}")
    fig.tight_layout()
    return fig


def entropy_figures(
    layers: pd.DataFrame, heads: pd.DataFrame, *, label: str | None = None
) -> Iterator[tuple[str, Figure]]:
    """Every figure of a single-model run, one at a time (the caller saves and closes each).

    One line plot per metric, plus layer x head heatmaps for the key metrics.
    """
    from attnscope.metrics import ALL_METRICS

    present = [m for m in ALL_METRICS if m in set(layers["metric"])]
    for metric in present:
        title = f"{label}: {metric_label(metric)}" if label else None
        yield f"layers_{metric}", metric_lines(layers, metric, title=title)
    for metric in HEATMAP_METRICS:
        if metric in set(heads["metric"]):
            fig = head_heatmap(heads, metric)
            if label:
                fig.axes[0].set_title(f"{label}: {metric_label(metric)}")
            yield f"heads_{metric}", fig
