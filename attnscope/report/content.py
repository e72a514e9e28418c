"""What both reports say: the models table, the headline summary, the list of files.

Cells are text, or a ("—", why) pair for a metric a model does not have, which the HTML
and the Markdown writers each render in their own way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.compare import ModelRun


def _params(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.0f} k"


def _tokens(layout: Mapping[str, Any]) -> str:
    if not layout:
        return "?"
    gh, gw = layout.get("grid", ["?", "?"])
    parts = ["1 [cls]"] if layout.get("has_cls") else ["no [cls]"]
    if layout.get("num_registers"):
        parts.append(f"{layout['num_registers']} registers")
    parts.append(f"{gh}×{gw} patches")
    return " + ".join(parts) + f" = {layout.get('num_tokens', '?')}"


def models_rows(runs: Sequence[ModelRun]) -> list[list[str]]:
    """Rows of the models table (header: MODEL_HEADER)."""
    rows = []
    for r in runs:
        info = r.info
        layout = info.get("token_layout", {})
        size = "×".join(str(v) for v in info.get("input_size", []))
        patch = "×".join(str(v) for v in layout.get("patch_size", []))
        n_heads = int(r.heads["head"].max()) + 1 if not r.heads.empty else "?"
        rows.append(
            [
                r.name,
                r.plan.family,
                str(info.get("timm_name", "")),
                str(info.get("weights", "")),
                _params(info.get("num_params")),
                f"{size} (patch {patch})",
                _tokens(layout),
                f"{info.get('num_blocks', '?')} × {n_heads}",
                str(len(info.get("images_used", []))),
                r.status,
            ]
        )
    return rows


MODEL_HEADER = [
    "model",
    "family",
    "timm name",
    "weights",
    "parameters",
    "input px",
    "tokens",
    "blocks × heads",
    "images",
    "this run",
]


def _num(v: float, metric: str) -> str:
    if metric.endswith("_px"):
        return f"{v:.1f}"
    return f"{v:.2g}" if 0 < abs(v) < 0.001 else f"{v:.3f}"  # 1.4e-07, not a misleading 0.000


def _with_interval(text: str, metric: str, iv: Any) -> str:
    """'0.420 [0.401, 0.441]': the value and its 95% bootstrap interval, when there is one."""
    if iv is None or not iv.known:
        return text
    return f"{text} [{_num(iv.low, metric)}, {_num(iv.high, metric)}]"


def summary_rows(
    summary: pd.DataFrame, runs: Sequence[ModelRun], intervals: pd.DataFrame | None = None
) -> tuple[list[str], list[list[Any]]]:
    """The headline table with one column per model (easier to read across than 15 columns).

    Cells are text, with the 95% bootstrap interval of the mean in brackets when
    `intervals` has it, or ("—", why) for a metric the model does not have: missing, never 0.
    """
    from attnscope.compare import HEADLINE_METRICS, missing_reason, model_interval
    from attnscope.plots.style import metric_label

    infos = {r.name: r.info for r in runs}
    models = [str(m) for m in summary["model"]]
    header = ["metric", "blocks", *models]
    rows: list[list[Any]] = []
    for metric in HEADLINE_METRICS:
        for which, label in (("last", "last"), ("mean", "mean over blocks")):
            row: list[Any] = [f"{metric_label(metric)} ({metric})", label]
            for model, v in zip(models, summary[f"{metric}_{which}"], strict=True):
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    row.append(("—", missing_reason(metric, infos.get(model, {})) or "not measured"))
                else:
                    iv = model_interval(intervals, model, metric, which) if intervals is not None else None
                    row.append(_with_interval(_num(float(v), metric), metric, iv))
            rows.append(row)
    return header, rows


FILES = [
    ("report.html", "this report, one self-contained file (figures embedded)"),
    ("report.md", "the same report in Markdown, linking figures/*.png"),
    (
        "summary.csv",
        "one row per model: provenance and each headline metric in the last block (`_last`) "
        "and averaged over blocks (`_mean`); empty = metric not defined for that model",
    ),
    ("layers.csv", "every model's per-block table stacked: model, family, layer, metric, mean, std, count"),
    (
        "images.csv",
        "every model's per-image values stacked: model, image, layer, metric, value "
        "(heads averaged within each image; its means are layers.csv's)",
    ),
    (
        "intervals.csv",
        "95% bootstrap intervals of the headline means per block, in the last block and over blocks, "
        "and of the paired differences between models: model, minus, scope, layer, metric, mean, "
        "ci_low, ci_high, n_images",
    ),
    (
        "heads.csv",
        "every model's per-head table stacked: model, family, layer, head, metric, mean, std, count",
    ),
    (
        "spectrum.csv",
        "tokens family only: each model's mean normalised singular-value spectrum of the centred patch "
        "tokens per block: model, block, relative_depth, k, sv_share, energy_share, energy_cum",
    ),
    (
        "frequency.csv",
        "tokens family only: each model's mean relative log amplitude of the patch-token feature map along "
        "the diagonal frequency per block: model, block, relative_depth, step, freq_row, freq_col, "
        "frequency, rel_log_amplitude",
    ),
    ("run.json", "configuration, versions, each model's provenance, findings"),
    (
        "runs/<model>/",
        "each model's own run (layers.csv, heads.csv, images.csv, spectrum.csv and frequency.csv with "
        "the tokens family, run.json with config_hash, gallery.npz), "
        "reused by the next compare with the same configuration",
    ),
    ("figures/", "every figure as PNG (and as SVG/PDF when those formats were asked for)"),
]


def title(runs: Sequence[ModelRun]) -> str:
    return "attnscope compare: " + " vs ".join(r.name for r in runs)


def image_count(runs: Sequence[ModelRun]) -> int:
    return max((len(r.info.get("images_used", [])) for r in runs), default=0)


def random_models(runs: Sequence[ModelRun]) -> list[str]:
    """The models with random weights, which every report names in a warning."""
    return [r.name for r in runs if r.info.get("random_init")]


RANDOM_WARNING = "These numbers describe untrained networks and say nothing about pretrained models."

TOKENS_HEADING = "What the tokens carry"
TOKENS_INTRO = (
    "The tokens family (--metrics attention,tokens): what each block's output tokens hold, beside "
    "how its attention spreads. The papers' contrast to look for: MIM models (MAE, SimMIM, BEiT) keep "
    "diverse, high-frequency patch tokens with a flat spectrum to the last block, while joint-embedding "
    "models (DINO, iBOT, MoCo v3) make their patch tokens similar to one another and to [cls], "
    "concentrated on a few directions and on low frequencies. The CKA heatmaps say which blocks of two "
    "models hold the same representation up to a rotation and scale."
)


def real_comparison_hint(command: str) -> str:
    """What a comparison of pretrained models needs, and the command to run then."""
    words = [w for w in command.split() if w != "--random-init"]
    rerun = " ".join(words) if words else "the same command without --random-init"
    return (
        "A real comparison needs the pretrained weights: in the local Hugging Face cache "
        "(downloaded on first use where the Hub can be reached) or as files passed with "
        f"--checkpoint NAME=PATH. Once they are there, run: {rerun}"
    )
