"""Probe figures: accuracy by aggregator, over the lr grid, across depth, learning curves,
selection maps, the 2-D embedding of [cls] and mean-patch features.

Functions return matplotlib Figures; nothing here saves or prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from attnscope.plots.style import setup

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from attnscope.probe.clusters import EvalEmbedding
    from attnscope.probe.selection import MapRecord


def block_label(block: int, num_blocks: int) -> str:
    """'block 11 (last)' or 'block 3 of 0-11': blocks counted from 0, as in every figure."""
    last = num_blocks - 1
    return f"block {block} " + ("(last)" if block == last else f"of 0-{last}")


def accuracy_by_aggregator(
    results: pd.DataFrame, summary: pd.DataFrame, *, label: str = "", num_classes: int | None = None
) -> Figure:
    """Bars: evaluation top-1 of each aggregator's head selected on the hold-out.

    Dots are every head of the grid; the open diamond is the best-over-grid evaluation
    accuracy (optimistic: chosen on the evaluation split itself).
    """
    plt, sns = setup()
    names = list(summary["aggregator"])
    palette = dict(zip(names, sns.color_palette("colorblind", len(names)), strict=True))
    fig, ax = plt.subplots(figsize=(3.5 + 1.2 * len(names), 4.2))
    x = np.arange(len(names))
    sel = summary["eval_top1"].to_numpy() * 100
    ax.bar(x, sel, color=[palette[n] for n in names], width=0.62, label="selected on hold-out", zorder=2)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        accs = results.loc[results["aggregator"] == name, "eval_top1"].to_numpy() * 100
        ax.scatter(i + rng.uniform(-0.18, 0.18, len(accs)), accs, s=12, color="0.25", alpha=0.6, zorder=3,
                   label="every head of the grid" if i == 0 else None)  # fmt: skip
        ax.text(
            i,
            1.5,
            f"{sel[i]:.1f}",
            ha="center",
            va="bottom",
            color="white",
            fontsize=10,
            fontweight="bold",
            zorder=4,
        )
    best = summary["best_over_grid_eval_top1"].to_numpy() * 100
    ax.scatter(
        x,
        best,
        marker="D",
        s=40,
        facecolors="none",
        edgecolors="black",
        zorder=4,
        label="best over grid (optimistic)",
    )
    if num_classes:
        ax.axhline(
            100.0 / num_classes,
            color="0.4",
            ls="--",
            lw=1,
            zorder=1,
            label=f"chance ({100.0 / num_classes:.1f}%)",
        )
    ax.set_xticks(x, names)
    ax.set_ylabel("evaluation top-1 accuracy (%)")
    top = max(float(np.nanmax(best)), float(np.nanmax(sel)))
    ax.set_ylim(0, min(100, top * 1.12 + 2))
    ax.set_title(f"{label}: accuracy by aggregator" if label else "accuracy by aggregator")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def accuracy_by_lr(results: pd.DataFrame, *, label: str = "") -> Figure:
    """Hold-out (dashed) and evaluation (solid) top-1 across the learning-rate grid.

    With several weight decays each lr shows the best weight decay on the hold-out, so the
    figure stays readable; results.csv holds every head.
    """
    plt, sns = setup()
    names = list(dict.fromkeys(results["aggregator"]))
    palette = dict(zip(names, sns.color_palette("colorblind", len(names)), strict=True))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    has_hold = results["holdout_top1"].notna().any()
    for name in names:
        g = results[results["aggregator"] == name]
        key = "holdout_top1" if has_hold else "train_top1"
        best = g.sort_values(key, ascending=False).groupby("lr", sort=True).head(1).sort_values("lr")
        ax.plot(best["lr"], best["eval_top1"] * 100, marker="o", color=palette[name], label=name)
        if has_hold:
            ax.plot(best["lr"], best["holdout_top1"] * 100, ls="--", color=palette[name], alpha=0.7)
        chosen = g[g["selected"]] if "selected" in g else g.iloc[:0]
        ax.scatter(
            chosen["lr"],
            chosen["eval_top1"] * 100,
            s=90,
            facecolors="none",
            edgecolors=palette[name],
            linewidths=1.6,
            zorder=3,
        )
    if results["lr"].nunique() > 1:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("top-1 accuracy (%)")
    subtitle = (
        "solid: evaluation, dashed: hold-out, circle: selected"
        if has_hold
        else "evaluation; circle: selected"
    )
    ax.set_title(f"{label}: learning-rate grid\n{subtitle}" if label else subtitle, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_by_depth(
    summaries: pd.DataFrame | Mapping[str, pd.DataFrame], *, label: str = "", num_classes: int | None = None
) -> Figure:
    """Evaluation top-1 of each aggregator's selected head against relative depth (block / last
    block, blocks counted from 0: the first block at 0, the last at 1, as in entropy's and
    compare's depth figures), with its 95% interval as a band where the table has one.

    One summary table (a run's summary.csv): one panel, a line per aggregator. Several
    (`{model label: summary}`, e.g. a MIM and a JEA model): one panel per aggregator and a
    line per model, so models of different depths share one axis.
    """
    plt, sns = setup()
    tables = {label or "": summaries} if not isinstance(summaries, Mapping) else dict(summaries)
    aggregators = list(dict.fromkeys(a for t in tables.values() for a in t["aggregator"]))
    panels = aggregators if len(tables) > 1 else [""]
    keys = list(tables) if len(tables) > 1 else aggregators
    palette = dict(zip(keys, sns.color_palette("colorblind", len(keys)), strict=True))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.0 + 3.6 * len(panels), 4.0), squeeze=False, sharey=True
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        for key in keys:
            model, aggregator = (key, panel) if len(tables) > 1 else (next(iter(tables)), key)
            rows = tables[model][tables[model]["aggregator"] == aggregator].sort_values("relative_depth")
            if rows.empty:
                continue
            x, y = rows["relative_depth"].to_numpy(), rows["eval_top1"].to_numpy() * 100
            ax.plot(x, y, marker="o", color=palette[key], label=key)
            if "eval_top1_ci_low" in rows:
                low, high = rows["eval_top1_ci_low"] * 100, rows["eval_top1_ci_high"] * 100
                ax.fill_between(x, low, high, color=palette[key], alpha=0.15, lw=0)
        if num_classes:
            ax.axhline(100.0 / num_classes, color="0.4", ls="--", lw=1, label="chance")
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("relative depth (block / last block)")
        ax.set_title(panel, fontsize=10)
    axes[0][0].set_ylabel("evaluation top-1 (%), selected head")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    title = "accuracy across depth"
    fig.suptitle(f"{label}: {title}" if label and len(tables) == 1 else title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curves(curves: pd.DataFrame, summary: pd.DataFrame, *, label: str = "") -> Figure:
    """Top-1 of each aggregator's selected head after every epoch: on the training images
    (dotted), the hold-out (solid) and the evaluation split (dashed; optimistic to pick an
    epoch on), with the best evaluation epoch marked (the paper code's "Max accuracy").
    The other heads of the grid are the thin grey evaluation lines."""
    plt, sns = setup()
    names = list(summary["aggregator"])
    palette = dict(zip(names, sns.color_palette("colorblind", len(names)), strict=True))
    fig, axes = plt.subplots(1, len(names), figsize=(1.0 + 3.4 * len(names), 3.8), squeeze=False, sharey=True)
    styles = {"train": ":", "holdout": "-", "eval": "--"}
    for ax, row in zip(axes[0], summary.itertuples(), strict=True):
        mine = curves[curves["aggregator"] == row.aggregator]
        for head, others in mine[mine["split"] == "eval"].groupby("head"):
            if head != row.head:
                ax.plot(others["epoch"], others["top1"] * 100, color="0.75", lw=0.6, zorder=1)
        chosen = mine[mine["head"] == row.head]
        for split, style in styles.items():
            part = chosen[chosen["split"] == split].sort_values("epoch")
            if not part.empty:
                ax.plot(
                    part["epoch"], part["top1"] * 100, ls=style, color=palette[row.aggregator], label=split
                )
        best = getattr(row, "best_epoch", float("nan"))
        if best == best:  # not NaN
            ax.scatter([best], [row.best_epoch_top1 * 100], marker="*", s=90, color="black", zorder=3,
                       label="max accuracy (eval)")  # fmt: skip
        ax.set_title(f"{row.aggregator} (lr {row.lr:g}, wd {row.wd:g})", fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("top-1 (%), selected head")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    title = "learning curves (dashed: evaluation split, optimistic)"
    fig.suptitle(f"{label}: {title}" if label else title, fontsize=10)
    fig.tight_layout()
    return fig


def _overlay(ax, image: np.ndarray, grid_values: np.ndarray, vmax: float, title: str):
    h, w = image.shape[:2]
    ax.imshow(image.mean(axis=2), cmap="gray", extent=(0, w, h, 0), vmin=0, vmax=1)
    im = ax.imshow(
        grid_values,
        cmap="inferno",
        alpha=0.7,
        extent=(0, w, h, 0),
        interpolation="nearest",
        vmin=0,
        vmax=vmax,
    )
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return im


def selection_maps(maps: Sequence[MapRecord], *, label: str = "") -> Figure:
    """Per image: the picture, the selective head's patch weights, and [cls]'s attention.

    Both maps are drawn on one colour scale in units of the uniform weight (1 = every
    patch equal), so a near-uniform [cls] does not look as peaked as a selective head;
    the title gives the Spearman rank correlation of the two over all patches (does the
    probe select what [cls] attends to?).
    """
    plt, _ = setup()
    with_cls = any(m.cls_attention is not None for m in maps)
    cols = 3 if with_cls else 2
    fig, axes = plt.subplots(
        len(maps),
        cols,
        figsize=(2.5 * cols + 0.8, 2.5 * len(maps) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for row, m in zip(axes, maps, strict=True):
        short = m.item if len(m.item) <= 28 else "..." + m.item[-25:]
        ok = "right" if m.label == m.predicted else "WRONG"
        row[0].imshow(m.image)
        row[0].set_title(f"{short}\nlabel {m.label}, predicted {m.predicted} ({ok})", fontsize=8)
        row[0].axis("off")
        n = m.weights.size
        sel = m.weights * n
        cls = None if m.cls_attention is None else m.cls_attention * n
        vmax = max(float(sel.max()), float(cls.max()) if cls is not None else 0.0, 1.0)
        im = _overlay(row[1], m.image, sel, vmax, f"{m.aggregator} weights (max {sel.max():.1f}x uniform)")
        if with_cls:
            if cls is None:
                row[2].axis("off")
            else:
                rho = "n/a" if math.isnan(m.spearman) else f"{m.spearman:+.2f}"
                _overlay(
                    row[2],
                    m.image,
                    cls,
                    vmax,
                    f"{block_label(m.block, m.num_blocks)}: [cls] attention (max {cls.max():.1f}x)\n"
                    f"Spearman rho = {rho}",
                )
        fig.colorbar(im, ax=list(row[1:]), shrink=0.85, label="x uniform")
    title = "what the probe selects vs what [cls] attends to"
    fig.suptitle(f"{label}: {title}" if label else title, fontsize=10)
    return fig


_MANY_CLASSES = 20  # beyond: a colour scale by class index and a colourbar instead of a legend


def _class_colours(num_classes: int):
    """One colour per class, the same in every panel: a qualitative palette up to 20 classes."""
    import matplotlib as mpl

    if num_classes <= 10:
        _, sns = setup()
        return list(sns.color_palette("colorblind", 10))[:num_classes]
    if num_classes <= _MANY_CLASSES:
        cmap = mpl.colormaps["tab20"]
        return [cmap(i) for i in range(num_classes)]
    cmap = mpl.colormaps["turbo"]
    return [cmap(i / (num_classes - 1)) for i in range(num_classes)]


def _embedding_panel(ax, part: pd.DataFrame, colours, emb: EvalEmbedding, kind: str) -> None:
    from attnscope.probe.clusters import TOKEN_LABELS

    size = float(np.clip(4000 / max(len(part), 1), 4, 24))
    ax.scatter(part["x"], part["y"], s=size, c=[colours[i] for i in part["label"]], linewidths=0,
               alpha=0.85, rasterized=len(part) > 500)  # fmt: skip
    score = emb.scores[kind]
    sil = "n/a" if score.silhouette != score.silhouette else f"{score.silhouette:+.2f}"
    ax.set_title(
        f"{TOKEN_LABELS[kind]}\n{score.k}-NN accuracy {100 * score.knn_accuracy:.1f}%, silhouette {sil}",
        fontsize=10,
    )
    evr = emb.embeddings[kind].explained_variance_ratio
    if evr is not None:
        ax.set_xlabel(f"PC 1 ({100 * evr[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * evr[1]:.1f}% of variance)")
    else:  # t-SNE axes carry no units: only neighbourhoods mean something, so no ticks or grid
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    ax.set_aspect("equal", adjustable="datalim")


def embedding(emb: EvalEmbedding, classes: Sequence[str], *, label: str = "") -> Figure:
    """The evaluation images' [cls] and mean-patch features of one block in 2-D (t-SNE or
    PCA), side by side, coloured by class (the same colours in both panels).

    Each panel's title gives the leave-one-out k-NN accuracy and the silhouette (cosine) of
    the full features, not of the 2-D picture: t-SNE keeps neighbourhoods, not distances, so
    the size of a cluster and the gaps between clusters mean little."""
    plt, _ = setup()
    kinds = list(emb.embeddings)
    colours = _class_colours(len(classes))
    many = len(classes) > _MANY_CLASSES
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(4.6 * len(kinds) + (1.0 if many else 2.2), 5.4), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for ax, kind in zip(axes[0], kinds, strict=True):
        _embedding_panel(ax, emb.table[emb.table["token"] == kind], colours, emb, kind)
    if many:
        import matplotlib as mpl

        scale = mpl.cm.ScalarMappable(mpl.colors.Normalize(0, len(classes) - 1), mpl.colormaps["turbo"])
        fig.colorbar(scale, ax=list(axes[0]), shrink=0.85, label="class index")
    else:
        present = sorted(set(emb.table["label"]))
        handles = [
            plt.Line2D([], [], ls="", marker="o", ms=6, color=colours[i], label=str(classes[i]))
            for i in present
        ]
        axes[0][-1].legend(
            handles=handles, title="class", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
            title_fontsize=9, frameon=False, ncol=1 if len(present) <= 12 else 2,
        )  # fmt: skip
    fig.suptitle(_embedding_title(emb, label), fontsize=11)
    # supxlabel, not fig.text: constrained layout makes room for it under the panels
    width = int(fig.get_figwidth() * 16)  # characters of 8 pt text across the figure
    fig.supxlabel(_embedding_caption(emb, len(classes), width), fontsize=8, color="0.3")
    return fig


def _embedding_caption(emb: EvalEmbedding, num_classes: int, width: int) -> str:
    """How to read the panel titles' numbers, under the panels, wrapped to `width` characters."""
    import textwrap

    k = next(iter(emb.scores.values())).k
    lines = [
        f"Scores on the full {emb.dim}-d features (cosine distance), not on the 2-D picture. {k}-NN: "
        f"leave-one-out accuracy of a {k}-nearest-neighbour vote (chance about {100 / num_classes:.0f}%).",
        "Silhouette in [-1, 1]: above 0 when images are closer to their own class than to the nearest other.",
    ]
    if emb.method == "tsne":
        lines.append(
            "t-SNE keeps neighbourhoods, not distances: the sizes of clusters and the gaps between them "
            "mean little."
        )
    if "cls" not in emb.embeddings:
        lines.append("The model has no class token: only the mean of the patch tokens is shown.")
    return "\n".join(textwrap.fill(line, width) for line in lines)


def _embedding_title(emb: EvalEmbedding, label: str) -> str:
    """The suptitle: model, block, method and its settings, the images and how they were chosen."""
    first = next(iter(emb.embeddings.values()))
    if first.method == "pca":
        how = "PCA (the first two components)"
    else:
        how = f"t-SNE (perplexity {first.perplexity:g}"
        how += f", after PCA to {first.pca_dims} dims)" if first.pca_dims else ")"
    which = f"{emb.points:,} evaluation images"
    if emb.points < emb.eval_images:
        which += f" (a seeded random sample of the {emb.eval_images:,})"
    block = block_label(emb.block, emb.num_blocks)
    head = f"{label}, {block}" if label else block
    return f"{head}: {how}\nof {which}, coloured by class"
