"""The comparison report as one self-contained HTML file.

Every PNG is embedded as base64 and the CSS is inline, so the one file can be mailed,
attached to a paper's supplement or opened offline.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
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
    """A number, possibly followed by its interval ('0.42 [0.40, 0.44]')."""
    try:
        float(str(text).split(" [", 1)[0])
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
    intervals: pd.DataFrame | None = None,
) -> str:
    """The whole report as one HTML document with no external resource."""
    from attnscope import __version__
    from attnscope.plots.style import model_palette

    palette = {m: _hex(c) for m, c in model_palette([r.name for r in runs]).items()}
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    random = random_models(runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title(runs))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title(runs))}</h1>",
        f'<p class="meta">{image_count(runs)} images · attnscope {_e(__version__)} · {_e(created)}'
        + (f"<br>command: <code>{_e(command)}</code>" if command else "")
        + "</p>",
    ]
    if random:
        parts.append(f'<p class="warn">RANDOM WEIGHTS: {_e(", ".join(random))}. {_e(RANDOM_WARNING)}</p>')
        parts.append(f'<p class="meta">{_e(real_comparison_hint(command))}</p>')
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
    tokens = [f for f in figures if f.group == "tokens"]
    if tokens:
        parts += [f'<h2 id="tokens">{_e(TOKENS_HEADING)}</h2>', f"<p>{_e(TOKENS_INTRO)}</p>"]
        parts += [_figure_html(f) for f in tokens]
    header, rows = summary_rows(summary, runs, intervals)
    parts += [
        "<h2>Summary</h2>",
        "<p>Headline metrics in the last block and averaged over blocks (mean over images first), "
        "with the 95% bootstrap interval of the mean in brackets (intervals.csv). "
        "— marks a metric the model does not have.</p>",
        _html_table(header, rows),
        "<h2>Files</h2>",
        "<table><tbody>",
        *(f"<tr><td><code>{_e(name)}</code></td><td>{_e(what)}</td></tr>" for name, what in FILES),
        "</tbody></table>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
