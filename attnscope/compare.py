"""The science of comparing models: plans, configuration hashes, stacked tables, findings.

Each model's single-model run lives in its own folder with a `config_hash` of everything
that changes its numbers (`config_inputs`), so a later compare over the same images can
re-read it instead of recomputing (a ViT-H over 10k images is an hour; re-plotting should
not be). Running, reusing and writing those folders is `attnscope.commands.compare`'s job;
this module holds the data and the decisions that need no file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import ConfigError
from attnscope.metrics import HEADLINE_METRICS as HEADLINE

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

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
    from attnscope.models import resolve_model_spec

    checkpoints = dict(checkpoints or {})
    families = dict(families or {})
    check_models(models, checkpoints=checkpoints, families=families)
    plans: list[ModelPlan] = []
    slugs: set[str] = set()
    for name in models:
        spec = resolve_model_spec(name, families.get(name))
        checkpoint = Path(checkpoints[name]).expanduser() if name in checkpoints else None
        if checkpoint is not None and not checkpoint.is_file():
            raise ConfigError("checkpoints", f"{name}={checkpoint}: checkpoint not found")
        slug, n = file_slug(name), 1
        while slug in slugs:  # "a/b" and "a-b" must not share a run folder
            n += 1
            slug = f"{file_slug(name)}-{n}"
        slugs.add(slug)
        plans.append(ModelPlan(name, spec, slug, checkpoint, dict((model_kwargs or {}).get(name, {}))))
    return plans


# ---------------------------------------------------------------- reuse


def _file_stamp(path: Path) -> list[Any]:
    # A file that vanished after listing is skipped (and listed) at load time like any
    # unreadable one; here it only needs a stamp that differs from the file's.
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def config_inputs(
    plan: ModelPlan,
    paths: Sequence[Path],
    *,
    random_init: bool,
    seed: int,
    img_size: Sequence[int] | None,
    dtype: str,
) -> dict[str, Any]:
    """Everything that changes a model's numbers, as plain JSON-able data.

    Batch size, workers and device are left out: they change the results by float
    rounding at most, and a run on the GPU should be reusable on a laptop. A folder
    written by an earlier version is reused only while this dict stays the same, key for key;
    `inputs_version` makes older folders recompute when what an input means has changed.
    """
    from attnscope import __version__
    from attnscope.versions import package_versions

    if plan.checkpoint is not None:
        weights: dict[str, Any] = {"checkpoint": _file_stamp(plan.checkpoint.resolve())}
    elif random_init:
        weights = {"random_init": True, "seed": seed}
    else:
        weights = {"pretrained": plan.spec.timm_name}
    versions = package_versions()
    return {
        # bumped when an input's meaning changes: 2 = random weights drawn per model, aliases
        # carrying their family's preprocessing (folders of version 1 hold other numbers)
        "inputs_version": 2,
        "attnscope": __version__,
        "timm": versions.get("timm"),
        "torch": versions.get("torch"),
        "timm_name": plan.spec.timm_name,
        "weights": weights,
        "model_kwargs": {k: plan.model_kwargs[k] for k in sorted(plan.model_kwargs)},
        "img_size": list(img_size) if img_size else None,
        "dtype": dtype,
        "images": [_file_stamp(Path(p)) for p in sorted(paths)],
    }


def config_hash(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config_inputs`."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
    status: str  # "computed", "reused", "reused (gallery recomputed)"
    gallery: Gallery | None = None

    @property
    def name(self) -> str:
        return self.plan.name


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


def _close(a: float, b: float, metric: str) -> bool:
    """Too close to call a difference: 0.005 on [0, 1] metrics, 2% on pixels and ratios."""
    if metric.endswith(("_px", "_ratio")):
        return abs(a - b) <= 0.02 * max(abs(a), abs(b), 1e-12)
    return abs(a - b) <= 0.005


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


_SENTENCES: tuple[tuple[str, str, str], ...] = (
    # (summary column, sentence when they differ, sentence when they do not); hi = larger value
    (
        "cls_self_attn_last",
        "In the last block, {hi}'s [cls] keeps {a} of its attention on itself vs {b} for {lo}{ratio}.",
        "In the last block, {hi}'s and {lo}'s [cls] keep about the same share of attention on themselves "
        "({a} vs {b}).",
    ),
    (
        "cls_patch_entropy_norm_last",
        "{hi}'s [cls]→patch attention is closer to uniform in the last block "
        "(normalised entropy {a} vs {b} for {lo}).",
        "{hi}'s and {lo}'s [cls]→patch attention are about equally spread in the last block "
        "(normalised entropy {a} vs {b}).",
    ),
    (
        "cls_patch_k90_frac_last",
        "In the last block, 90% of {lo}'s [cls]→patch attention falls on {b} of the patches, "
        "vs {a} for {hi}: {lo}'s [cls] is the more selective.",
        "In the last block, 90% of the [cls]→patch attention falls on about the same share of patches "
        "({a} for {hi}, {b} for {lo}).",
    ),
    (
        "patch_patch_entropy_norm_mean",
        "Averaged over blocks, {hi}'s patches spread their attention more evenly "
        "(normalised patch→patch entropy {a} vs {b} for {lo}).",
        "Averaged over blocks, {hi}'s and {lo}'s patches spread their attention about equally "
        "(normalised entropy {a} vs {b}).",
    ),
    (
        "attn_distance_px_mean",
        "Averaged over blocks, {hi}'s patches look farther: "
        "mean attention distance {a} vs {b} for {lo}{ratio}.",
        "Averaged over blocks, {hi}'s and {lo}'s patches look about as far "
        "(mean attention distance {a} vs {b}).",
    ),
    (
        "cls_residual_ratio_last",
        "In the last block, attention changes {hi}'s [cls] the most: "
        "the update is {a} of the residual stream's norm vs {b} for {lo}.",
        "In the last block, attention changes {hi}'s and {lo}'s [cls] about equally "
        "(update/residual norm {a} vs {b}).",
    ),
)


def findings(
    summary: pd.DataFrame, infos: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[list[str], list[str]]:
    """Sentences generated from summary.csv, and notes on what could not be compared and why.

    Each sentence names the model with the larger and the smaller value (others listed in
    brackets). A model missing the metric is left out of that sentence and the note says
    why; with fewer than two models left the sentence is skipped.
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
    for column, differ, same in _SENTENCES:
        metric = column.rsplit("_", 1)[0]
        values = [(str(m), float(v)) for m, v in zip(summary["model"], summary[column], strict=True)]
        present = [(m, v) for m, v in values if not math.isnan(v)]
        absent = [m for m, v in values if math.isnan(v)]
        for m in absent:
            why = missing_reason(metric, infos.get(m, {})) or "not measured"
            key = (m, why)
            if key not in noted:
                noted.add(key)
                notes.append(f"{m} is left out of the comparisons of metrics it does not have ({why}).")
        if len(present) < 2:
            notes.append(
                f"No sentence on {metric} in the {column.rsplit('_', 1)[1]} block(s): "
                "fewer than two models have it."
            )
            continue
        ranked = sorted(present, key=lambda mv: mv[1], reverse=True)
        (hi, a), (lo, b) = ranked[0], ranked[-1]
        if _close(a, b, metric):
            text = same.format(hi=hi, lo=lo, a=_fmt(a, metric), b=_fmt(b, metric))
        else:
            ratio = f" ({a / b:.1f}x)" if b > 0 and a / b >= 1.5 else ""
            text = differ.format(hi=hi, lo=lo, a=_fmt(a, metric), b=_fmt(b, metric), ratio=ratio)
        sentences.append(text[:-1] + _others(ranked, metric) + ".")
    sizes = {str(m): s for m, s in zip(summary["model"], summary["input_size"], strict=True)}
    if len(set(sizes.values())) > 1:
        notes.append(
            "Input sizes differ ("
            + ", ".join(f"{m} {s}" for m, s in sizes.items())
            + "): attention distances are in each model's own input pixels."
        )
    return sentences, notes
