"""Every figure of a comparison, drawn and written one at a time, with its title and caption.

Figures share one encoding across the report: a colour per model, a line style per
family, and x as relative depth when the models have different depths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.compare import ModelRun
    from attnscope.results import RunWriter


@dataclass
class ReportFigure:
    """One written figure: where its files are and what to say under it."""

    stem: str  # figures/<stem>.<fmt>
    title: str
    caption: str
    files: dict[str, str] = field(default_factory=dict)  # format -> path relative to the report
    png: bytes = b""
    # "main" (shown), "tokens" (the tokens family's own section) or "metric" (one per metric,
    # folded away in the HTML)
    group: str = "main"


def missing_reasons(runs: Sequence[ModelRun], metrics: Sequence[str]) -> dict[str, dict[str, str]]:
    """metric -> model -> why that model has no rows for it."""
    from attnscope.compare import missing_reason

    out: dict[str, dict[str, str]] = {}
    for metric in metrics:
        for run in runs:
            if metric not in set(run.layers["metric"]):
                out.setdefault(metric, {})[run.name] = missing_reason(metric, run.info) or "not measured"
    return out


@dataclass
class _Encoding:
    """What every figure of one report shares."""

    models: list[str]
    palette: dict[str, Any]
    families: dict[str, str]
    linestyles: dict[str, Any]
    relative: bool  # x is block / last block: the models have different depths
    reasons: dict[str, dict[str, str]]
    x_note: str
    random: list[str]

    @property
    def warn(self) -> str:
        """The figure's own warning line, so a figure cut out of the report keeps it."""
        return f"RANDOM WEIGHTS: {', '.join(self.random)}" if self.random else ""


def _encoding(runs: Sequence[ModelRun]) -> _Encoding:
    from attnscope.metrics import ALL_METRICS
    from attnscope.plots.compare import family_linestyles
    from attnscope.plots.style import model_palette

    models = [r.name for r in runs]
    families = {r.name: r.plan.family for r in runs}
    depths = {r.name: int(r.layers["layer"].max()) + 1 for r in runs}
    relative = len(set(depths.values())) > 1
    x_note = (
        "x is relative depth (block / last block) because the models have different depths ("
        + ", ".join(f"{m} {d}" for m, d in depths.items())
        + " blocks)."
        if relative
        else "x is the block index (0 = first)."
    )
    return _Encoding(
        models=models,
        palette=model_palette(models),
        families=families,
        linestyles=family_linestyles(families),
        relative=relative,
        reasons=missing_reasons(runs, ALL_METRICS),
        x_note=x_note,
        random=[r.name for r in runs if r.info.get("random_init")],
    )


class _Emitter:
    """Writes each figure as it is drawn (PNG always, plus `formats`) and keeps its record."""

    def __init__(self, writer: RunWriter, formats: Sequence[str], random: Sequence[str]) -> None:
        self.writer = writer
        self.formats = list(dict.fromkeys(["png", *formats]))
        self.random_note = f" {', '.join(random)}: RANDOM weights." if random else ""
        self.figures: list[ReportFigure] = []

    def __call__(self, stem: str, fig: Any, title: str, caption: str, group: str = "main") -> None:
        paths = self.writer.write_figure(f"figures/{stem}", fig, self.formats)
        files = {p.suffix.lstrip("."): f"figures/{p.name}" for p in paths}
        png = next(p for p in paths if p.suffix == ".png").read_bytes()
        caption = (caption.strip() + self.random_note).strip()
        self.figures.append(ReportFigure(stem, title, caption, files, png, group))


def _depth_panels(
    enc: _Encoding,
    layers: pd.DataFrame,
    metrics: Sequence[str],
    ncols: int = 4,
    intervals: pd.DataFrame | None = None,
) -> Any:
    from attnscope.plots.compare import depth_panels

    return depth_panels(
        layers,
        metrics,
        palette=enc.palette,
        linestyles=enc.linestyles,
        families=enc.families,
        relative_depth=enc.relative,
        missing_reasons=enc.reasons,
        ncols=ncols,
        note=enc.warn,
        intervals=intervals,
    )


def _head_figures(emit: _Emitter, enc: _Encoding, heads: pd.DataFrame) -> None:
    """Per-head attention distance, then block x head heatmaps of the key metrics."""
    from attnscope.plots.compare import head_scatter, heatmaps_side_by_side
    from attnscope.plots.style import HEATMAP_METRICS, metric_label

    present = set(heads["metric"])
    if "attn_distance_px" in present:
        emit(
            "heads_attn_distance",
            head_scatter(heads, palette=enc.palette, note=enc.warn),
            "Mean attention distance per head",
            "Each dot is one head's mean attention distance (pixels of that model's input), as in Fig. 7 of "
            "the ViT paper; the line is the mean over heads.",
        )
    for metric in HEATMAP_METRICS:
        if metric in present:
            emit(
                f"heatmaps_{metric}",
                heatmaps_side_by_side(
                    heads,
                    metric,
                    models=enc.models,
                    palette=enc.palette,
                    missing_reasons=enc.reasons.get(metric, {}),
                    note=enc.warn,
                ),
                f"{metric_label(metric)}: block × head",
                "Mean over images per block (rows) and head (columns); one colour scale for all models.",
            )


def _gallery_figure(emit: _Emitter, enc: _Encoding, runs: Sequence[ModelRun]) -> None:
    """The first images x models grid, when every model has its gallery maps."""
    from attnscope.plots.maps import GalleryColumn, attention_gallery

    galleries = {r.name: r.gallery for r in runs if r.gallery is not None}
    if not runs or len(galleries) < len(runs):
        return
    columns = [
        GalleryColumn(m, g.views, g.maps, g.patch_size, g.what(), g.names) for m, g in galleries.items()
    ]
    no_cls = [m for m, g in galleries.items() if g.query != "cls"]
    caption = (
        f"{', '.join(no_cls)} {'has' if len(no_cls) == 1 else 'have'} no class token: shown is the mean "
        "over patch queries of their patch→patch attention."
        if no_cls
        else ""
    )
    emit(
        "gallery",
        attention_gallery(
            columns, palette=enc.palette, caption=" ".join(t for t in (caption, enc.warn) if t)
        ),
        f"Attention gallery: the first {min(len(c.views) for c in columns)} images",
        "Each model's last-block [cls]→patch attention (mean over heads) over the image as that model "
        "saw it; cyan line: smallest set of patches holding 60% of the mass (as in DINO's figures). "
        + caption,
    )


TOKEN_CAPTION = (
    "The residual stream leaving each block (docs/metrics.md, tokens family), mean over images, "
    'band ± std over images. How to read it: "What do self-supervised ViTs learn?" reports that '
    "contrastive / joint-embedding models (JEA) drive the patch tokens together in the later blocks "
    "(patch-patch cosine rising towards 1, effective rank and high-frequency amplitude falling) "
    'while masked-image-modelling models (MIM) keep them diverse and high-frequency; "Vision '
    'Transformers Need Registers" finds a few high-norm patches in large ViTs that take much of the '
    "[cls] attention: a separate mode of norms, about 10x the others (outlier fraction and [cls] "
    "outlier mass above zero from the middle blocks on; near 0 while a model's patch norms form "
    "one mode, as in small or untrained models). "
)
CKA_CAPTION = (
    "Linear CKA (unbiased minibatch estimator of Nguyen, Raghu & Kornblith 2021) between every block "
    "of one model (rows) and every block of another (columns) on the same images; 1 = the same "
    "representation up to rotation and scale. A model against itself shows its block structure "
    "(bright blocks along the diagonal); between models, a bright diagonal means the blocks "
    "correspond depth for depth, and a dark lower-right corner means the last blocks diverge, as "
    "between MIM and JEA models trained on the same data. "
)


SPECTRUM_CAPTION = (
    "spectrum.csv: the singular values s_k of each image's centred patch-token matrix (N patches x C "
    "channels), normalised to sum 1 (top, log-log; the distribution whose entropy is the effective rank) "
    "and the cumulative energy sum_{i<=k} s_i^2 / sum s^2 (bottom: the share of the tokens' variance in "
    "the first k principal directions), mean over images, at the first block, a third, two thirds and the "
    "last block of each model. How to read it: a steep spectrum whose energy reaches 1 within a few k "
    'means the patches differ along a few directions only. "What do self-supervised ViTs learn?" and '
    "LUT report that contrastive / JEA models collapse their later-block tokens to a few directions "
    "(steep spectrum) while MIM models keep a flatter one. "
)
FREQUENCY_CAPTION = (
    'frequency.csv: the Fourier analysis of "What do self-supervised ViTs learn?" (cl-vs-mim): the log '
    "amplitude of the 2-D DFT of the patch tokens on their grid, averaged over channels and images, "
    "relative to the DC (zero-frequency) value, along the diagonal from DC (0) to the highest frequency "
    "below Nyquist (x in units of π radians per patch; the last point is patch_hf_amp), at the same depths. "
    "How to read it: the lower a curve ends, the smoother the feature map. The paper reports that MIM "
    "models keep high-frequency amplitude in their later blocks while contrastive / JEA models lose it "
    "(their tokens carry low-frequency, shape-like information). "
)


def _profile_figures(emit: _Emitter, enc: _Encoding, profiles: dict[str, pd.DataFrame | None]) -> None:
    """The spectrum and frequency profiles at a few depths, when measured."""
    from attnscope.plots.tokens import profile_at_depths

    for kind, title, caption in (
        ("spectrum", "Singular-value spectrum of the patch tokens", SPECTRUM_CAPTION),
        ("frequency", "High-frequency content of the patch tokens", FREQUENCY_CAPTION),
    ):
        table = profiles.get(kind)
        if table is not None and not table.empty:
            emit(
                kind,
                profile_at_depths(table, palette=enc.palette, linestyles=enc.linestyles, note=enc.warn),
                title,
                caption + "Colour: model, line style: family; a model's blocks are picked by relative depth.",
                group="tokens",
            )


def _token_figures(
    emit: _Emitter,
    enc: _Encoding,
    layers: pd.DataFrame,
    cka: pd.DataFrame | None,
    profiles: dict[str, pd.DataFrame | None],
) -> None:
    """The token metrics against depth, the spectrum and frequency profiles and the CKA
    heatmaps, when measured."""
    from attnscope.metrics import METRICS
    from attnscope.plots.compare import cka_heatmaps

    present = set(layers["metric"])
    tokens = [m for m, spec in METRICS.items() if spec.family == "tokens" and m in present]
    if tokens:
        emit(
            "tokens_depth",
            _depth_panels(enc, layers, tokens),
            "What the tokens carry, block by block",
            TOKEN_CAPTION + enc.x_note,
            group="tokens",
        )
    _profile_figures(emit, enc, profiles)
    if cka is not None and not cka.empty:
        for token in ("patch_mean", "cls"):
            if token in set(cka["token"]):
                what = "mean-pooled patch tokens" if token == "patch_mean" else "the [cls] token"
                emit(
                    f"cka_{token}",
                    cka_heatmaps(cka, token, models=enc.models, note=enc.warn),
                    f"Block correspondence: linear CKA of {what}",
                    CKA_CAPTION + "Pairs where a model has no [cls] are absent from the [cls] figure.",
                    group="tokens",
                )


def build_figures(
    runs: Sequence[ModelRun],
    layers: pd.DataFrame,
    heads: pd.DataFrame,
    writer: RunWriter,
    *,
    formats: Sequence[str] = ("png",),
    intervals: pd.DataFrame | None = None,
    cka: pd.DataFrame | None = None,
    spectrum: pd.DataFrame | None = None,
    frequency: pd.DataFrame | None = None,
) -> list[ReportFigure]:
    """Draw and write every comparison figure (PNG always, plus `formats`), in report order.

    With `intervals` (compare.interval_table) the headline depth panels draw the 95%
    bootstrap interval of the mean as their band; without, ± one std over images.
    `spectrum` and `frequency` (the stacked profile tables) add their figures after the
    token metrics.
    """
    from attnscope.compare import HEADLINE_METRICS
    from attnscope.metrics import ALL_METRICS

    enc = _encoding(runs)
    emit = _Emitter(writer, formats, enc.random)
    if intervals is not None and not intervals.empty:
        n = int(intervals["n_images"].iloc[0])
        band = (
            f"band: 95% bootstrap interval of the mean over the {n} images every model could read "
            "(images resampled, the same resample for every model and block). "
        )
    else:
        band, intervals = "band: ± std over images. ", None
    emit(
        "depth_panels",
        _depth_panels(enc, layers, HEADLINE_METRICS, intervals=intervals),
        "Headline metrics against depth",
        "One panel per metric; a line per model (colour: model, line style: family), "
        "mean over images; " + band + enc.x_note,
    )
    _head_figures(emit, enc, heads)
    _gallery_figure(emit, enc, runs)
    _token_figures(emit, enc, layers, cka, {"spectrum": spectrum, "frequency": frequency})
    present = [m for m in ALL_METRICS if m in set(layers["metric"])]
    emit(
        "depth_panels_all",
        _depth_panels(enc, layers, present),
        "Every metric against depth",
        "All metrics of the specification that at least one model has, same encoding as above, but the "
        "band is ± one std over images (the spread of the images, not an interval of the mean). "
        + enc.x_note,
        group="metric",
    )
    return emit.figures
