"""The science of comparing models: plans, configuration hashes, stacked tables, findings.

Each model's single-model run lives in its own folder with a `config_hash` of everything
that changes its numbers (`config_inputs`, over `attnscope.inputs.run_inputs`), so a later
compare over the same images can re-read it instead of recomputing (a ViT-H over 10k
images is an hour; re-plotting should not be). Running, reusing and writing those folders
is `attnscope.commands.compare`'s job; this module holds the data and the decisions that
need no file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import ConfigError
from attnscope.inputs import run_inputs
from attnscope.metrics import HEADLINE_METRICS as HEADLINE

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from attnscope.cka import GramCollector
    from attnscope.models import LoadedModel, ModelSpec

HEADLINE_METRICS: tuple[str, ...] = tuple(HEADLINE)  # the metric registry decides


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelPlan:
    """One model to compare, validated before anything runs or is written."""

    name: str
    spec: ModelSpec
    slug: str
    checkpoint: Path | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def label(self) -> str:
        """The name shown in tables and figures: as given, or a path's short name."""
        return self.spec.alias if self.spec.path is not None else self.name


def check_models(models: Sequence[str], **per_model: Mapping[str, Any]) -> None:
    """Two or more distinct models; every per-model option (`checkpoints=`, ...) names one of them."""
    names = list(models)
    if len(names) < 2:
        got = f"only {names[0]!r}" if names else "none"
        raise ConfigError("models", f"must list two or more models, got {got}; for one model use entropy")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("models", f"has {dupes[0]!r} listed twice; give each model once")
    for option, given in per_model.items():
        stray = [n for n in given if n not in names]
        if stray:
            raise ConfigError(
                option, f"names {stray[0]!r}, which is not one of the compared models ({', '.join(names)})"
            )


def plan_models(
    models: Sequence[str],
    *,
    checkpoints: Mapping[str, str | Path] | None = None,
    families: Mapping[str, str] | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ModelPlan]:
    """Check the model list and per-model options; raise on the first problem, touch nothing."""
    from attnscope.files import slug as file_slug
    from attnscope.models.converters.hf import is_hf_source
    from attnscope.models.source import resolve_model

    checkpoints = dict(checkpoints or {})
    families = dict(families or {})
    check_models(models, checkpoints=checkpoints, families=families)
    plans: list[ModelPlan] = []
    slugs: set[str] = set()
    for name in models:
        spec = resolve_model(name, families.get(name))
        checkpoint = Path(checkpoints[name]).expanduser() if name in checkpoints else None
        if checkpoint is not None and not (checkpoint.is_file() or is_hf_source(checkpoint)):
            raise ConfigError("checkpoints", f"{name}={checkpoint}: checkpoint not found")
        if checkpoint is not None and spec.path is not None:
            raise ConfigError("checkpoints", f"{name}={checkpoint}: {name} is given as its weights already")
        plan = ModelPlan(name, spec, "", checkpoint, dict((model_kwargs or {}).get(name, {})))
        slug, n = file_slug(plan.label), 1
        while slug in slugs:  # "a/b" and "a-b" must not share a run folder
            n += 1
            slug = f"{file_slug(plan.label)}-{n}"
        slugs.add(slug)
        plans.append(replace(plan, slug=slug))
    _check_labels(plans)
    return plans


def _check_labels(plans: Sequence[ModelPlan]) -> None:
    """Two models shown under one name would merge in every table and figure."""
    seen: dict[str, str] = {}
    for plan in plans:
        other = seen.setdefault(plan.label, plan.name)
        if other != plan.name:
            raise ConfigError(
                "models", f"has {other!r} and {plan.name!r}, both shown as {plan.label!r}; rename one"
            )


# ---------------------------------------------------------------- reuse


def config_inputs(
    plan: ModelPlan,
    paths: Sequence[Path],
    *,
    random_init: bool,
    seed: int,
    img_size: Sequence[int] | None,
    dtype: str,
    position_resize: str = "own",
) -> dict[str, Any]:
    """Everything that changes a model's numbers, as plain JSON-able data.

    Batch size, workers and device are left out: they change the results by float
    rounding at most, and a run on the GPU should be reusable on a laptop. A folder
    written by an earlier version is reused only while this dict stays the same, key for key;
    `inputs_version` makes older folders recompute when what an input means has changed.
    """
    return run_inputs(
        plan.spec,
        paths,
        checkpoint=plan.checkpoint,
        model_kwargs=plan.model_kwargs,
        random_init=random_init,
        seed=seed,
        img_size=img_size,
        dtype=dtype,
        position_resize=position_resize,
    )


# ---------------------------------------------------------------- one model's results


@dataclass
class Gallery:
    """Last-block attention of the first K images, on the patch grid, and the images as seen."""

    maps: np.ndarray  # (K, gh, gw)
    views: np.ndarray  # (K, H, W, 3) uint8
    names: list[str]
    query: str  # "cls" or "mean"
    patch_size: tuple[int, int]

    def what(self) -> str:
        return "[cls]→patch" if self.query == "cls" else "mean patch→patch (no [cls])"


def gallery_maps(
    loaded: LoadedModel,
    info: Mapping[str, Any],
    k: int,
    *,
    batch_size: int,
    device: str | torch.device,
    dtype: str,
) -> Gallery | None:
    """Last-block [cls] maps (the patch mean without a class token) of the first `k` images used."""
    from attnscope.maps import Query, collect_maps

    paths = [Path(p) for p in info["images_used"][:k]]
    if not paths:
        return None
    query = Query("cls") if info["token_layout"]["has_cls"] else Query("mean")
    maps = collect_maps(
        loaded,
        paths,
        query=query,
        heads="mean",
        batch_size=min(batch_size, k),
        device=device,
        dtype=dtype,
    )
    return Gallery(
        maps=maps.maps[:, 0],
        views=maps.views,
        names=[p.name for p in maps.paths],
        query=query.kind,
        patch_size=tuple(maps.layout.patch_size),  # type: ignore[arg-type]
    )


@dataclass
class ModelRun:
    """One compared model: its tables, provenance, gallery and whether it was recomputed."""

    plan: ModelPlan
    layers: pd.DataFrame
    heads: pd.DataFrame
    info: dict[str, Any]
    config_hash: str
    status: str  # "computed", "reused", "reused (gallery recomputed)", "resumed"
    gallery: Gallery | None = None
    images: pd.DataFrame | None = None  # images.csv: each image's value per (layer, metric)
    grams: GramCollector | None = None  # each minibatch's CKA Grams (None: not available)
    spectrum: pd.DataFrame | None = None  # spectrum.csv (None: the tokens family was not measured)
    frequency: pd.DataFrame | None = None  # frequency.csv (likewise)

    @property
    def name(self) -> str:
        return self.plan.label


# ---------------------------------------------------------------- tables and findings


def stack_tables(runs: Sequence[ModelRun]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model's layers/heads tables, in the order given, with `family` after `model`."""
    import pandas as pd

    def stacked(kind: str) -> pd.DataFrame:
        frames = []
        for run in runs:
            frame = getattr(run, kind).copy()
            frame.insert(1, "family", run.plan.family)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    return stacked("layers"), stacked("heads")


def missing_reason(metric: str, info: Mapping[str, Any]) -> str | None:
    """Why `metric` has no rows for a model (None when it should have them)."""
    from attnscope.metrics import absent_reason

    layout = info.get("token_layout", {})
    return absent_reason(
        metric, has_cls=bool(layout.get("has_cls", True)), num_registers=int(layout.get("num_registers", 0))
    )


def summary_table(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """One row per model: provenance, then `<metric>_last` and `<metric>_mean` (over blocks).

    A metric the model does not have stays NaN (an empty CSV cell), never 0.
    """
    import pandas as pd

    rows = []
    for run in runs:
        info = run.info
        layers = run.layers
        last = int(layers["layer"].max())
        size = info.get("input_size") or []
        row: dict[str, Any] = {
            "model": run.name,
            "family": run.plan.family,
            "timm_name": info.get("timm_name"),
            "weights": info.get("weights"),
            "random_init": bool(info.get("random_init")),
            "num_blocks": last + 1,
            "num_heads": int(run.heads["head"].max()) + 1 if not run.heads.empty else None,
            "input_size": "x".join(str(v) for v in size),
            "num_images": len(info.get("images_used", [])),
        }
        for metric in HEADLINE_METRICS:
            d = layers[layers["metric"] == metric]
            row[f"{metric}_last"] = (
                float(d.loc[d["layer"] == last, "mean"].iloc[0]) if not d.empty else math.nan
            )
            row[f"{metric}_mean"] = float(d["mean"].mean()) if not d.empty else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(v: float, metric: str) -> str:
    if metric.endswith("_px"):
        return f"{v:.0f} px"
    if metric.endswith("_frac"):
        return f"{v:.0%}" if v >= 0.01 else f"{v:.2%}"
    if abs(v) < 0.01:
        return f"{v:.2g}"  # 0.00012, not 0.000
    return f"{v:.3f}" if abs(v) < 0.1 else f"{v:.2f}"


def _others(ranked: list[tuple[str, float]], metric: str) -> str:
    middle = ranked[1:-1]
    return f" (others: {', '.join(f'{m} {_fmt(v, metric)}' for m, v in middle)})" if middle else ""


# ---------------------------------------------------------------- per-image values and intervals

INTERVAL_COLUMNS = ("model", "minus", "scope", "layer", "metric", "mean", "ci_low", "ci_high", "n_images")


def stack_images(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """Every model's images table (model, image, layer, metric, value), in the order given."""
    import pandas as pd

    frames = [run.images for run in runs if run.images is not None]
    if not frames:
        return pd.DataFrame(columns=["model", "image", "layer", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def stack_profiles(runs: Sequence[ModelRun], kind: str) -> pd.DataFrame | None:
    """Every model's `kind` table ("spectrum" or "frequency"), in the order given; None when
    no model has one (the tokens family was not measured)."""
    import pandas as pd

    frames = [getattr(run, kind) for run in runs if getattr(run, kind) is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def images_agree(images: pd.DataFrame, layers: pd.DataFrame) -> bool:
    """Whether a per-image table adds up to its layers table: the same (layer, metric) rows,
    the same counts, and means equal to layers.csv's 10 significant digits."""
    import numpy as np

    if images.empty or layers.empty:
        return images.empty and layers.empty
    got = images.groupby(["layer", "metric"])["value"].agg(["mean", "count"])
    want = layers.set_index(["layer", "metric"])
    if len(got) != len(want) or set(got.index) != set(want.index):
        return False
    got = got.reindex(want.index)
    same_counts = bool((got["count"].to_numpy() == want["count"].to_numpy()).all())
    return same_counts and bool(np.allclose(got["mean"], want["mean"], rtol=1e-8, atol=1e-12))


def common_images(runs: Sequence[ModelRun]) -> list[str]:
    """The images every model has values for, in the first model's order."""
    if not runs or any(run.images is None for run in runs):
        return []
    sets = [set(run.images["image"]) for run in runs[1:]]  # type: ignore[index]
    first = runs[0].images["image"].drop_duplicates()  # type: ignore[index]
    return [str(image) for image in first if all(image in s for s in sets)]


def _headline_values(run: ModelRun, images: Sequence[str]) -> dict[tuple[str, int], np.ndarray]:
    """(metric, layer) -> the model's values over `images` (in that order), headline metrics only."""
    assert run.images is not None
    frame = run.images[run.images["metric"].isin(HEADLINE_METRICS) & run.images["image"].isin(set(images))]
    if frame.empty:
        return {}
    table = frame.pivot(index=["metric", "layer"], columns="image", values="value").reindex(columns=images)
    return {(str(m), int(layer)): row.to_numpy(dtype="float64") for (m, layer), row in table.iterrows()}


def _interval_rows(runs: Sequence[ModelRun], images: Sequence[str]) -> tuple[list[tuple], list[np.ndarray]]:
    """The rows to bootstrap: each model's metric per block, in the last block and averaged
    over blocks, then each pair's per-image differences in the last block and over blocks."""
    import numpy as np

    keys: list[tuple] = []
    values: list[np.ndarray] = []
    scoped: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for run in runs:
        per_block = _headline_values(run, images) if run.images is not None else {}
        mine = scoped[run.name] = {}
        for metric in HEADLINE_METRICS:
            layers = sorted(layer for m, layer in per_block if m == metric)
            if not layers:
                continue
            for layer in layers:
                keys.append((run.name, "", "block", layer, metric))
                values.append(per_block[(metric, layer)])
            mine[(metric, "last")] = per_block[(metric, layers[-1])]
            mine[(metric, "mean")] = np.mean([per_block[(metric, layer)] for layer in layers], axis=0)
            keys.append((run.name, "", "last", layers[-1], metric))
            values.append(mine[(metric, "last")])
            keys.append((run.name, "", "mean", None, metric))
            values.append(mine[(metric, "mean")])
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            for metric in HEADLINE_METRICS:
                for scope in ("last", "mean"):
                    if (metric, scope) in scoped[a.name] and (metric, scope) in scoped[b.name]:
                        keys.append((a.name, b.name, scope, None, metric))
                        values.append(scoped[a.name][(metric, scope)] - scoped[b.name][(metric, scope)])
    return keys, values


def interval_table(runs: Sequence[ModelRun], *, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """95% bootstrap intervals of the mean over images, and what run.json records about them.

    Over the images every model could read, resampled together for every row (one call of
    `metrics.intervals.bootstrap_means`, seeded by `seed`), so all models see the same
    resample and a difference's interval is paired. Rows (columns `INTERVAL_COLUMNS`):

    - a model's own interval: `minus` empty, `scope` "block" (`layer` the block), "last"
      (the last block) or "mean" (the per-image average over blocks; `layer` empty);
    - a difference `model - minus` of two models' per-image values, `scope` "last" or
      "mean", for every pair of models, in the order they were given.
    """
    import numpy as np
    import pandas as pd

    from attnscope.metrics.intervals import CONFIDENCE_LEVEL, METHOD, N_RESAMPLES, bootstrap_means

    images = common_images(runs)
    keys, values = _interval_rows(runs, images)
    matrix = np.vstack(values) if values else np.zeros((0, len(images)))
    mean, low, high = bootstrap_means(matrix, seed=seed)
    frame = pd.DataFrame(keys, columns=list(INTERVAL_COLUMNS[:5]))
    frame["layer"] = frame["layer"].astype("Int64")
    frame["mean"], frame["ci_low"], frame["ci_high"] = mean, low, high
    frame["n_images"] = len(images)
    info = {
        "file": "intervals.csv",
        "method": METHOD,
        "confidence_level": CONFIDENCE_LEVEL,
        "n_resamples": N_RESAMPLES,
        "seed": seed,
        "resampled": "images, the same resample for every model, block and difference",
        "n_images": len(images),
        "metrics": list(HEADLINE_METRICS),
    }
    return frame, info


@dataclass(frozen=True)
class Interval:
    """A mean over images and its bootstrap interval (NaN ends: no interval)."""

    mean: float
    low: float
    high: float
    n_images: int

    @property
    def known(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def excludes_zero(self) -> bool:
        return self.known and (self.low > 0 or self.high < 0)


def difference_interval(intervals: pd.DataFrame, a: str, b: str, metric: str, scope: str) -> Interval | None:
    """The interval of `a - b` (per-image differences), whichever way round it was stored."""
    rows = intervals[(intervals["metric"] == metric) & (intervals["scope"] == scope)]
    for first, second, sign in ((a, b, 1.0), (b, a, -1.0)):
        hit = rows[(rows["model"] == first) & (rows["minus"] == second)]
        if not hit.empty:
            r = hit.iloc[0]
            low, high = sign * float(r["ci_low"]), sign * float(r["ci_high"])
            return Interval(sign * float(r["mean"]), min(low, high), max(low, high), int(r["n_images"]))
    return None


def model_interval(intervals: pd.DataFrame, model: str, metric: str, scope: str) -> Interval | None:
    """A model's own interval of `metric` in the last block or averaged over blocks."""
    hit = intervals[
        (intervals["model"] == model)
        & (intervals["minus"].fillna("") == "")
        & (intervals["metric"] == metric)
        & (intervals["scope"] == scope)
    ]
    if hit.empty:
        return None
    r = hit.iloc[0]
    return Interval(float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_images"]))


# ---------------------------------------------------------------- findings

#: Relative size a difference needs before findings call it (of the larger value).
RELATIVE_THRESHOLD = 0.02


def difference_thresholds(metric: str) -> tuple[float, float]:
    """(absolute, relative) size a difference of `metric` needs before findings call it.

    From the metric's record: 0.001 for [0, 1] metrics (probabilities and fractions, where
    0.0099 vs 0.0055 is a 1.8x difference worth naming), 0.5 px for distances, 0.005 nats
    for entropies, 0.001 for other ratios; and 2% of the larger value for every metric.
    """
    from attnscope.metrics import metric_spec

    spec = metric_spec(metric)
    if spec.unit_interval:
        absolute = 0.001
    elif spec.unit == "px":
        absolute = 0.5
    elif spec.unit == "nats":
        absolute = 0.005
    else:
        absolute = 0.001
    return absolute, RELATIVE_THRESHOLD


def _large_enough(a: float, b: float, metric: str) -> bool:
    absolute, relative = difference_thresholds(metric)
    gap = abs(a - b)
    return gap >= absolute and gap >= relative * max(abs(a), abs(b))


def _signed(v: float, metric: str) -> str:
    """A difference or an interval end, 2 significant digits (+0.0044, -0.31, +12 px)."""
    size = abs(v)
    text = f"{v:+.0f}" if size >= 10 else f"{v:+.1f}" if size >= 1 else f"{v:+#.2g}"
    text = text.replace("+0.0", "0.0") if v == 0 else text
    return text + (" px" if metric.endswith("_px") else "")


def _interval_text(iv: Interval, metric: str) -> str:
    if not iv.known:
        return f"difference {_signed(iv.mean, metric)}; no interval with {iv.n_images} image(s) in common"
    return (
        f"difference {_signed(iv.mean, metric)}, {CONFIDENCE_PERCENT} CI {_signed(iv.low, metric)} to "
        f"{_signed(iv.high, metric)} over {iv.n_images} images"
    )


CONFIDENCE_PERCENT = "95%"

_SENTENCES: tuple[tuple[str, str], ...] = (
    # (summary column, sentence when the difference is called); hi = the larger value
    (
        "cls_self_attn_last",
        "In the last block, {hi}'s [cls] keeps {a} of its attention on itself vs {b} for {lo}{ratio}",
    ),
    (
        "cls_patch_entropy_norm_last",
        "{hi}'s [cls]→patch attention is closer to uniform in the last block "
        "(normalised entropy {a} vs {b} for {lo})",
    ),
    (
        "cls_patch_k90_frac_last",
        "In the last block, 90% of {lo}'s [cls]→patch attention falls on {b} of the patches, "
        "vs {a} for {hi}: {lo}'s [cls] is the more selective",
    ),
    (
        "patch_patch_entropy_norm_mean",
        "Averaged over blocks, {hi}'s patches spread their attention more evenly "
        "(normalised patch→patch entropy {a} vs {b} for {lo})",
    ),
    (
        "attn_distance_px_mean",
        "Averaged over blocks, {hi}'s patches look farther: "
        "mean attention distance {a} vs {b} for {lo}{ratio}",
    ),
    (
        "cls_residual_ratio_last",
        "In the last block, attention changes {hi}'s [cls] the most: "
        "the update is {a} of the residual stream's norm vs {b} for {lo}",
    ),
)


def _not_measurable(metric: str, scope: str, hi: str, lo: str, a: str, b: str, detail: str) -> str:
    from attnscope.metrics import METRIC_LABELS

    where = "In the last block" if scope == "last" else "Averaged over blocks"
    label = METRIC_LABELS[metric].removesuffix(" (px)").removesuffix(" (nats)")  # the values carry the unit
    return f"{where}, {hi} and {lo} do not differ measurably in {label} ({a} vs {b}{detail})"


def _sentence(
    column: str, template: str, ranked: list[tuple[str, float]], intervals: pd.DataFrame | None
) -> str:
    """One finding: called only when the paired interval excludes zero and the gap is large enough."""
    metric, scope = column.rsplit("_", 1)
    (hi, a), (lo, b) = ranked[0], ranked[-1]
    fa, fb = _fmt(a, metric), _fmt(b, metric)
    big = _large_enough(a, b, metric)
    iv = difference_interval(intervals, hi, lo, metric, scope) if intervals is not None else None
    absolute, relative = difference_thresholds(metric)
    below = f"below the {absolute:g} / {relative:.0%} threshold"
    ratio = f" ({a / b:.1f}x)" if b > 0 and a / b >= 1.5 else ""
    called = template.format(hi=hi, lo=lo, a=fa, b=fb, ratio=ratio)
    if intervals is None:  # no per-image values: the thresholds alone decide
        text = called if big else _not_measurable(metric, scope, hi, lo, fa, fb, f"; {below}")
    elif iv is None or not iv.excludes_zero:
        detail = "; " + (_interval_text(iv, metric) if iv is not None else "no per-image values")
        text = _not_measurable(metric, scope, hi, lo, fa, fb, detail)
    elif not big:
        detail = f"; {_interval_text(iv, metric)}: consistent across images, but {below}"
        text = _not_measurable(metric, scope, hi, lo, fa, fb, detail)
    else:
        text = called + f"; {_interval_text(iv, metric)}"
    return text + _others(ranked, metric) + "."


def findings(
    summary: pd.DataFrame,
    infos: Mapping[str, Mapping[str, Any]] | None = None,
    intervals: pd.DataFrame | None = None,
) -> tuple[list[str], list[str]]:
    """Sentences generated from summary.csv and intervals.csv, and notes on what could not
    be compared and why.

    Each sentence names the model with the larger and the smaller value (others listed in
    brackets). It calls a difference only when the paired bootstrap interval of the
    per-image differences (`interval_table`) excludes zero and the difference passes
    `difference_thresholds`; otherwise it says the two do not differ measurably, with the
    interval. Without `intervals` the thresholds alone decide. A model missing the metric
    is left out of that sentence and the note says why; with fewer than two models left
    the sentence is skipped.
    """
    infos = infos or {}
    sentences: list[str] = []
    notes: list[str] = []
    random = [str(m) for m, r in zip(summary["model"], summary["random_init"], strict=True) if r]
    if random:
        sentences.append(
            f"{', '.join(random)} {'uses' if len(random) == 1 else 'use'} RANDOM weights: the findings below "
            "describe untrained networks, not pretrained models."
        )
    noted: set[tuple[str, str]] = set()
    for column, template in _SENTENCES:
        metric = column.rsplit("_", 1)[0]
        values = [(str(m), float(v)) for m, v in zip(summary["model"], summary[column], strict=True)]
        present = [(m, v) for m, v in values if not math.isnan(v)]
        for m in (m for m, v in values if math.isnan(v)):
            why = missing_reason(metric, infos.get(m, {})) or "not measured"
            if (m, why) not in noted:
                noted.add((m, why))
                notes.append(f"{m} is left out of the comparisons of metrics it does not have ({why}).")
        if len(present) < 2:
            notes.append(
                f"No sentence on {metric} in the {column.rsplit('_', 1)[1]} block(s): "
                "fewer than two models have it."
            )
            continue
        ranked = sorted(present, key=lambda mv: mv[1], reverse=True)
        sentences.append(_sentence(column, template, ranked, intervals))
    notes += _input_notes(summary, intervals)
    return sentences, notes


def _input_notes(summary: pd.DataFrame, intervals: pd.DataFrame | None) -> list[str]:
    notes = []
    sizes = {str(m): s for m, s in zip(summary["model"], summary["input_size"], strict=True)}
    if len(set(sizes.values())) > 1:
        notes.append(
            "Input sizes differ ("
            + ", ".join(f"{m} {s}" for m, s in sizes.items())
            + "): attention distances are in each model's own input pixels."
        )
    if intervals is not None and not intervals.empty:
        common = int(intervals["n_images"].iloc[0])
        counts = {str(m): int(n) for m, n in zip(summary["model"], summary["num_images"], strict=True)}
        fewer = [f"{m} {n}" for m, n in counts.items() if n != common]
        if fewer:
            notes.append(
                f"Intervals and differences use the {common} images every model could read "
                f"(read: {', '.join(fewer)}); the summary's means use each model's own images."
            )
    return notes
