"""Figures and tables of a comparison -> report.html (self-contained) and report.md.

The HTML embeds every PNG as base64 and carries its own CSS, so the one file can be mailed,
attached to a paper's supplement or opened offline. The Markdown says the same with links
to figures/*.png beside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.compare import ModelRun
    from attnscope.results import RunWriter

HEATMAP_METRICS = ("cls_self_attn", "cls_patch_entropy_norm", "attn_distance_px")


@dataclass
class ReportFigure:
    """One written figure: where its files are and what to say under it."""

    stem: str  # figures/<stem>.<fmt>
    title: str
    caption: str
    files: dict[str, str] = field(default_factory=dict)  # format -> path relative to the report
    png: bytes = b""
    group: str = "main"  # "main" (shown) or "metric" (one per metric, folded away in the HTML)


def _missing_reasons(runs: Sequence[ModelRun], metrics: Sequence[str]) -> dict[str, dict[str, str]]:
    from attnscope.compare import missing_reason

    out: dict[str, dict[str, str]] = {}
    for metric in metrics:
        for run in runs:
            if metric not in set(run.layers["metric"]):
                out.setdefault(metric, {})[run.name] = missing_reason(metric, run.info) or "not measured"
    return out


def build_figures(
    runs: Sequence[ModelRun],
    layers: pd.DataFrame,
    heads: pd.DataFrame,
    writer: RunWriter,
    *,
    formats: Sequence[str] = ("png",),
) -> list[ReportFigure]:
    """Draw and write every comparison figure (PNG always, plus `formats`), one at a time."""
    from attnscope.compare import HEADLINE_METRICS
    from attnscope.metrics import ALL_METRICS
    from attnscope.plots.compare import (
        depth_panels,
        family_linestyles,
        head_scatter,
        heatmaps_side_by_side,
    )
    from attnscope.plots.maps import GalleryColumn, attention_gallery
    from attnscope.plots.entropy import metric_label, model_palette

    models = [r.name for r in runs]
    palette = model_palette(models)
    families = {r.name: r.plan.family for r in runs}
    styles = family_linestyles(families)
    depths = {r.name: int(r.layers["layer"].max()) + 1 for r in runs}
    relative = len(set(depths.values())) > 1
    reasons = _missing_reasons(runs, ALL_METRICS)
    fmts = list(dict.fromkeys(["png", *formats]))
    x_note = (
        "x is relative depth (block / last block) because the models have different depths ("
        + ", ".join(f"{m} {d}" for m, d in depths.items())
        + " blocks)."
        if relative
        else "x is the block index (0 = first)."
    )
    random = [r.name for r in runs if r.info.get("random_init")]
    random_note = f" {', '.join(random)}: RANDOM weights." if random else ""
    warn = f"RANDOM WEIGHTS: {', '.join(random)}" if random else ""
    figures: list[ReportFigure] = []

    def emit(stem: str, fig: Any, title: str, caption: str, group: str = "main") -> None:
        paths = writer.write_figure(f"figures/{stem}", fig, fmts)
        files = {p.suffix.lstrip("."): f"figures/{p.name}" for p in paths}
        png = next(p for p in paths if p.suffix == ".png").read_bytes()
        figures.append(ReportFigure(stem, title, (caption.strip() + random_note).strip(), files, png, group))

    emit(
        "depth_panels",
        depth_panels(
            layers,
            HEADLINE_METRICS,
            palette=palette,
            linestyles=styles,
            families=families,
            relative_depth=relative,
            missing_reasons=reasons,
            note=warn,
        ),
        "Headline metrics against depth",
        "One panel per metric; a line per model (colour: model, line style: family), band: ± std over images. "
        + x_note,
    )
    if "attn_distance_px" in set(heads["metric"]):
        emit(
            "heads_attn_distance",
            head_scatter(heads, palette=palette, note=warn),
            "Mean attention distance per head",
            "Each dot is one head's mean attention distance (pixels of that model's input), as in Fig. 7 of "
            "the ViT paper; the line is the mean over heads.",
        )
    for metric in HEATMAP_METRICS:
        if metric in set(heads["metric"]):
            emit(
                f"heatmaps_{metric}",
                heatmaps_side_by_side(
                    heads,
                    metric,
                    models=models,
                    palette=palette,
                    missing_reasons=reasons.get(metric, {}),
                    note=warn,
                ),
                f"{metric_label(metric)}: block × head",
                "Mean over images per block (rows) and head (columns); one colour scale for all models.",
            )
    if runs and all(r.gallery is not None for r in runs):
        columns = [
            GalleryColumn(
                r.name,
                r.gallery.views,
                r.gallery.maps,
                r.gallery.patch_size,
                r.gallery.what(),
                r.gallery.names,
            )
            for r in runs
            if r.gallery is not None
        ]
        no_cls = [r.name for r in runs if r.gallery is not None and r.gallery.query != "cls"]
        caption = (
            f"{', '.join(no_cls)} {'has' if len(no_cls) == 1 else 'have'} no class token: shown is the mean "
            "over patch queries of their patch→patch attention."
            if no_cls
            else ""
        )
        emit(
            "gallery",
            attention_gallery(columns, palette=palette, caption=" ".join(t for t in (caption, warn) if t)),
            f"Attention gallery: the first {min(len(c.views) for c in columns)} images",
            "Each model's last-block [cls]→patch attention (mean over heads) over the image as that model saw it; "
            "cyan line: smallest set of patches holding 60% of the mass (as in DINO's figures). " + caption,
        )
    present = [m for m in ALL_METRICS if m in set(layers["metric"])]
    emit(
        "depth_panels_all",
        depth_panels(
            layers,
            present,
            palette=palette,
            linestyles=styles,
            families=families,
            relative_depth=relative,
            missing_reasons=reasons,
            ncols=4,
            note=warn,
        ),
        "Every metric against depth",
        "All metrics of the specification that at least one model has, same encoding as above. " + x_note,
        group="metric",
    )
    return figures


# ---------------------------------------------------------------- shared content


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


def summary_rows(summary: pd.DataFrame, runs: Sequence[ModelRun]) -> tuple[list[str], list[list[Any]]]:
    """The headline table with one column per model (easier to read across than 15 columns).

    Cells are text, or ("—", why) for a metric the model does not have: missing, never 0.
    """
    from attnscope.compare import HEADLINE_METRICS, missing_reason
    from attnscope.plots.entropy import metric_label

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
                    row.append(_num(float(v), metric))
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
        "heads.csv",
        "every model's per-head table stacked: model, family, layer, head, metric, mean, std, count",
    ),
    ("run.json", "configuration, versions, each model's provenance, findings"),
    (
        "runs/<model>/",
        "each model's own run (layers.csv, heads.csv, run.json with config_hash, gallery.npz), "
        "reused by the next compare with the same configuration",
    ),
    ("figures/", "every figure as PNG (and SVG/PDF with --format)"),
]


def _title(runs: Sequence[ModelRun]) -> str:
    return "attnscope compare: " + " vs ".join(r.name for r in runs)


def _image_count(runs: Sequence[ModelRun]) -> int:
    return max((len(r.info.get("images_used", [])) for r in runs), default=0)


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555;font-size:.9em}.meta code{background:#f4f4f4;padding:.1em .3em;border-radius:3px}
.warn{background:#b00020;color:#fff;padding:.6em 1em;border-radius:4px;font-weight:600}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.missing{color:#999;text-align:center}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;margin-right:.35em;vertical-align:-.1em}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.9em;margin-top:.3em}.notes li{color:#555}
details summary{cursor:pointer;font-weight:600;margin:.6em 0}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _hex(colour: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in colour[:3])


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], swatches: Mapping[str, str] | None = None
) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            text, why = cell if isinstance(cell, tuple) else (cell, "")
            if why:
                out.append(f'<td class="missing" title="{_e(why)}">—<br><small>{_e(why)}</small></td>')
                continue
            cls = ' class="num"' if i > 0 and _is_number(text) else ""
            swatch = ""
            if i == 0 and swatches and text in swatches:
                swatch = f'<span class="swatch" style="background:{swatches[text]}"></span>'
            out.append(f"<td{cls}>{swatch}{_e(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _figure_html(fig: ReportFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    others = [
        f'<a href="{_e(path)}">{_e(fmt.upper())}</a>' for fmt, path in fig.files.items() if fmt != "png"
    ]
    extra = f" Also as {', '.join(others)} beside this report." if others else ""
    return (
        f'<figure id="{_e(fig.stem)}"><img alt="{_e(fig.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)}{extra}</figcaption></figure>"
    )


def render_html(
    runs: Sequence[ModelRun],
    summary: pd.DataFrame,
    sentences: Sequence[str],
    notes: Sequence[str],
    figures: Sequence[ReportFigure],
    *,
    command: str = "",
    out_dir: Path | None = None,
) -> str:
    """The whole report as one HTML document with no external resource."""
    from attnscope import __version__
    from attnscope.plots.entropy import model_palette

    palette = {m: _hex(c) for m, c in model_palette([r.name for r in runs]).items()}
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    random = [r.name for r in runs if r.info.get("random_init")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(_title(runs))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(_title(runs))}</h1>",
        f'<p class="meta">{_image_count(runs)} images · attnscope {_e(__version__)} · {_e(created)}'
        + (f"<br>command: <code>{_e(command)}</code>" if command else "")
        + "</p>",
    ]
    if random:
        parts.append(
            f'<p class="warn">RANDOM WEIGHTS: {_e(", ".join(random))}. These numbers describe untrained '
            "networks and say nothing about pretrained models.</p>"
        )
    parts += ["<h2>Models</h2>", _html_table(MODEL_HEADER, models_rows(runs), palette)]
    parts += ["<h2>Findings</h2>", "<ul>", *(f"<li>{_e(s)}</li>" for s in sentences), "</ul>"]
    if notes:
        parts += ['<ul class="notes">', *(f"<li>{_e(n)}</li>" for n in notes), "</ul>"]
    parts.append("<h2>Figures</h2>")
    parts += [_figure_html(f) for f in figures if f.group == "main"]
    per_metric = [f for f in figures if f.group == "metric"]
    if per_metric:
        parts.append("<details><summary>Every metric against depth</summary>")
        parts += [_figure_html(f) for f in per_metric]
        parts.append("</details>")
    header, rows = summary_rows(summary, runs)
    parts += [
        "<h2>Summary</h2>",
        "<p>Headline metrics in the last block and averaged over blocks (mean over images first). "
        "— marks a metric the model does not have.</p>",
        _html_table(header, rows),
        "<h2>Files</h2>",
        "<table><tbody>",
        *(f"<tr><td><code>{_e(name)}</code></td><td>{_e(what)}</td></tr>" for name, what in FILES),
        "</tbody></table>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- Markdown


def _md_text(text: str) -> str:
    """Brackets escaped: `[cls]` inside image alt text would end it early."""
    return text.replace("[", "\\[").replace("]", "\\]")


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = []
        for cell in row:
            text, why = cell if isinstance(cell, tuple) else (cell, "")
            cells.append(f"— ({why})" if why else _md_cell(text))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(
    runs: Sequence[ModelRun],
    summary: pd.DataFrame,
    sentences: Sequence[str],
    notes: Sequence[str],
    figures: Sequence[ReportFigure],
    *,
    command: str = "",
) -> str:
    """The report in Markdown; figures are links to figures/*.png next to it."""
    from attnscope import __version__

    random = [r.name for r in runs if r.info.get("random_init")]
    lines = [f"# {_title(runs)}", "", f"{_image_count(runs)} images · attnscope {__version__}"]
    if command:
        lines += ["", f"Command: `{command}`"]
    if random:
        lines += [
            "",
            f"> **RANDOM WEIGHTS: {', '.join(random)}.** These numbers describe untrained networks "
            "and say nothing about pretrained models.",
        ]
    lines += ["", "## Models", "", _md_table(MODEL_HEADER, models_rows(runs)), "", "## Findings", ""]
    lines += [f"- {s}" for s in sentences]
    if notes:
        lines += ["", *[f"- *{n}*" for n in notes]]
    lines += ["", "## Figures", ""]
    for fig in figures:
        if fig.group != "main":
            continue
        lines += [
            f"### {_md_text(fig.title)}",
            "",
            f"![{_md_text(fig.title)}]({fig.files['png']})",
            "",
            fig.caption,
            "",
        ]
    per_metric = [f for f in figures if f.group == "metric"]
    if per_metric:
        for fig in per_metric:
            lines += [
                f"### {_md_text(fig.title)}",
                "",
                f"![{_md_text(fig.title)}]({fig.files['png']})",
                "",
                fig.caption,
                "",
            ]
    header, rows = summary_rows(summary, runs)
    lines += [
        "## Summary",
        "",
        "Last block and mean over blocks; — marks a metric the model does not have.",
        "",
        _md_table(header, rows),
        "",
        "## Files",
        "",
    ]
    lines += [f"- `{name}`: {what}" for name, what in FILES]
    return "\n".join(lines) + "\n"
