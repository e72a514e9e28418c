"""The comparison report in Markdown: the HTML report's content, figures linked beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attnscope.report.content import (
    FILES,
    MODEL_HEADER,
    RANDOM_WARNING,
    TOKENS_HEADING,
    TOKENS_INTRO,
    image_count,
    models_rows,
    random_models,
    real_comparison_hint,
    summary_rows,
    title,
)

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.compare import ModelRun
    from attnscope.report.figures import ReportFigure


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
    intervals: pd.DataFrame | None = None,
) -> str:
    """The report in Markdown; figures are links to figures/*.png next to it."""
    from attnscope import __version__

    random = random_models(runs)
    lines = [f"# {title(runs)}", "", f"{image_count(runs)} images · attnscope {__version__}"]
    if command:
        lines += ["", f"Command: `{command}`"]
    if random:
        lines += [
            "",
            f"> **RANDOM WEIGHTS: {', '.join(random)}.** {RANDOM_WARNING}",
            ">",
            f"> {real_comparison_hint(command)}",
        ]
    lines += ["", "## Models", "", _md_table(MODEL_HEADER, models_rows(runs)), "", "## Findings", ""]
    lines += [f"- {s}" for s in sentences]
    if notes:
        lines += ["", *[f"- *{n}*" for n in notes]]
    lines += ["", "## Figures", ""]
    for group in ("main", "metric", "tokens"):  # the per-metric figures after the main ones, as in the HTML
        if group == "tokens" and any(f.group == group for f in figures):
            lines += [f"## {TOKENS_HEADING}", "", TOKENS_INTRO, ""]
        for fig in figures:
            if fig.group == group:
                lines += [f"### {_md_text(fig.title)}", "", f"![{_md_text(fig.title)}]({fig.files['png']})"]
                lines += ["", fig.caption, ""]
    header, rows = summary_rows(summary, runs, intervals)
    lines += [
        "## Summary",
        "",
        "Last block and mean over blocks, with the 95% bootstrap interval of the mean in brackets "
        "(intervals.csv); — marks a metric the model does not have.",
        "",
        _md_table(header, rows),
        "",
        "## Files",
        "",
    ]
    lines += [f"- `{name}`: {what}" for name, what in FILES]
    return "\n".join(lines) + "\n"
