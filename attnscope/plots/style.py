"""The plot style every figure shares: seaborn's theme on the Agg backend, one colour per
model, metric labels, and which metrics are drawn as block x head heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

from attnscope.metrics import METRIC_LABELS, UNIT_INTERVAL_METRICS

HEATMAP_METRICS = ("cls_self_attn", "cls_patch_entropy_norm", "attn_distance_px")
UNIT_INTERVAL = frozenset(UNIT_INTERVAL_METRICS)


def setup():
    """(pyplot, seaborn) with the shared theme; headless unless a backend was chosen."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt, sns


def model_palette(models: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per model, shared by every figure of a run or report."""
    _, sns = setup()
    colours = sns.color_palette("colorblind" if len(models) <= 10 else "husl", len(models))
    return dict(zip(models, colours, strict=True))


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)
