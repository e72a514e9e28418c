"""Several models over the same images: run (or reuse) each, stack, summarise, state findings.

Each model's single-model run lives in `DIR/runs/<slug>/` with a `config_hash` of everything
that changes its numbers, so a later compare over the same images re-reads it instead of
recomputing (a ViT-H over 10k images is an hour; re-plotting should not be). The stacked
tables, summary, figures and report are rebuilt from those runs every time.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from attnscope.models import LoadedModel, ModelSpec

HEADLINE_METRICS: tuple[str, ...] = (
    "cls_self_attn",
    "cls_patch_entropy_norm",
    "cls_patch_eff_frac",
    "cls_patch_k90_frac",
    "patch_patch_entropy_norm",
    "attn_distance_px",
    "cls_residual_ratio",
)
GALLERY_FILE = "gallery.npz"
_COMPARE_ENTRIES = frozenset(
    {"runs", "figures", "layers.csv", "heads.csv", "summary.csv", "run.json", "report.html", "report.md"}
)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class CompareSettings:
    """What every compared model shares: the images and how they are run."""

    images: tuple[str, ...] | None = None
    max_images: int | None = None
    img_size: tuple[int, int] | None = None
    random_init: bool = False
    seed: int = 0
    batch_size: int = 16
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"
    gallery: int = 4

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": list(self.images) if self.images else None,
            "max_images": self.max_images,
            "img_size": list(self.img_size) if self.img_size else None,
            "random_init": self.random_init,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "device": self.device,
            "dtype": self.dtype,
            "gallery": self.gallery,
        }


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


def parse_assignments(values: Sequence[str] | None, option: str) -> dict[str, str]:
    """`["a=x", "b=y"]` -> `{"a": "x", "b": "y"}`; each NAME once, both sides non-empty."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target:
            raise AttnscopeError(f"{option} takes NAME=VALUE (e.g. {option} mae=mae.pth), got {value!r}")
        if name in out:
            raise AttnscopeError(f"{option} is given twice for {name!r}")
        out[name] = target
    return out


def _slug(name: str) -> str:
    from attnscope.files import slug as results_slug

    return results_slug(name)


def plan_models(
    models: Sequence[str],
    *,
    checkpoints: Mapping[str, str | Path] | None = None,
    families: Mapping[str, str] | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ModelPlan]:
    """Check the model list and per-model options; raise on the first problem, touch nothing."""
    from attnscope.models import resolve_model_spec

    names = list(models)
    if len(names) < 2:
        got = f"only {names[0]!r}" if names else "none"
        raise AttnscopeError(
            f"compare needs two or more models, got {got}; for one model use `attnscope entropy`"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AttnscopeError(f"model {dupes[0]!r} is listed twice; give each model once")
    checkpoints = dict(checkpoints or {})
    families = dict(families or {})
    for option, given in (("--checkpoint", checkpoints), ("--family", families)):
        stray = [n for n in given if n not in names]
        if stray:
            raise AttnscopeError(
                f"{option} names {stray[0]!r}, which is not one of the compared models ({', '.join(names)})"
            )
    plans: list[ModelPlan] = []
    slugs: set[str] = set()
    for name in names:
        spec = resolve_model_spec(name, families.get(name))
        checkpoint = Path(checkpoints[name]).expanduser() if name in checkpoints else None
        if checkpoint is not None and not checkpoint.is_file():
            raise AttnscopeError(f"checkpoint not found: {checkpoint} (--checkpoint {name}=...)")
        slug, n = _slug(name), 1
        while slug in slugs:  # "a/b" and "a-b" must not share a run folder
            n += 1
            slug = f"{_slug(name)}-{n}"
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


def config_inputs(plan: ModelPlan, settings: CompareSettings, paths: Sequence[Path]) -> dict[str, Any]:
    """Everything that changes a model's numbers, as plain JSON-able data.

    Batch size, workers and device are left out: they change the results by float
    rounding at most, and a run on the GPU should be reusable on a laptop.
    """
    from attnscope import __version__
    from attnscope.versions import package_versions

    if plan.checkpoint is not None:
        weights: dict[str, Any] = {"checkpoint": _file_stamp(plan.checkpoint.resolve())}
    elif settings.random_init:
        weights = {"random_init": True, "seed": settings.seed}
    else:
        weights = {"pretrained": plan.spec.timm_name}
    versions = package_versions()
    return {
        "attnscope": __version__,
        "timm": versions.get("timm"),
        "torch": versions.get("torch"),
        "timm_name": plan.spec.timm_name,
        "weights": weights,
        "model_kwargs": {k: plan.model_kwargs[k] for k in sorted(plan.model_kwargs)},
        "img_size": list(settings.img_size) if settings.img_size else None,
        "dtype": settings.dtype,
        "images": [_file_stamp(Path(p)) for p in sorted(paths)],
    }


def config_hash(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config_inputs`."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _read_gallery(path: Path, expected_hash: str, k: int) -> Gallery | None:
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["config_hash"]) != expected_hash or len(data["maps"]) < k:
                return None
            return Gallery(
                maps=data["maps"][:k],
                views=data["views"][:k],
                names=[str(n) for n in data["names"][:k]],
                query=str(data["query"]),
                patch_size=(int(data["patch_size"][0]), int(data["patch_size"][1])),
            )
    except (OSError, KeyError, ValueError):
        return None  # a damaged cache is recomputed, not trusted


def _gallery_bytes(gallery: Gallery, chash: str) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        maps=gallery.maps.astype(np.float32),
        views=gallery.views,
        names=np.array(gallery.names),
        query=np.array(gallery.query),
        patch_size=np.array(gallery.patch_size),
        config_hash=np.array(chash),
    )
    return buf.getvalue()


def _reusable_run(
    run_dir: Path, chash: str, name: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]] | None:
    from attnscope.results import read_run

    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("config_hash") != chash or name not in meta.get("models", {}):
            return None
        return read_run(run_dir)
    except (OSError, ValueError, AttnscopeError):
        return None


# ---------------------------------------------------------------- running


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


def _gallery_maps(
    loaded: LoadedModel, info: dict[str, Any], k: int, settings: CompareSettings
) -> Gallery | None:
    from attnscope.maps import Query, collect_maps

    paths = [Path(p) for p in info["images_used"][:k]]
    if not paths:
        return None
    has_cls = bool(info["token_layout"]["has_cls"])
    maps = collect_maps(
        loaded,
        paths,
        query=Query("cls" if has_cls else "mean"),
        heads="mean",
        batch_size=min(settings.batch_size, k),
        device=settings.device,
        dtype=settings.dtype,
    )
    return Gallery(
        maps=maps.maps[:, 0],
        views=maps.views,
        names=[p.name for p in maps.paths],
        query="cls" if has_cls else "mean",
        patch_size=tuple(maps.layout.patch_size),  # type: ignore[arg-type]
    )


def _load(plan: ModelPlan, settings: CompareSettings) -> LoadedModel:
    import torch

    from attnscope.models import load_model

    torch.manual_seed(settings.seed)
    return load_model(
        plan.name,
        checkpoint=plan.checkpoint,
        random_init=settings.random_init and plan.checkpoint is None,
        seed=settings.seed,
        img_size=settings.img_size,
        family=plan.family,
        model_kwargs=plan.model_kwargs or None,
    )


def _free(loaded: LoadedModel | None) -> None:
    """Drop a finished model before loading the next: two ViT-H at once do not fit many GPUs."""
    import torch

    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_or_reuse(
    plan: ModelPlan,
    settings: CompareSettings,
    paths: Sequence[Path],
    runs_root: Path,
    *,
    reuse: bool = True,
    command: str = "",
    ui: Any = None,
) -> ModelRun | None:
    """The model's run folder under `runs_root`: re-read when its config hash matches, else computed.

    Under torchrun every rank measures its share; rank 0 alone decides reuse, draws the
    gallery and writes, and the other ranks return None.
    """
    from attnscope import distributed
    from attnscope.analysis import build_info
    from attnscope.commands.ui import NullUI
    from attnscope.measure import run_statistics_all_ranks
    from attnscope.models import display_name, random_weights_warning
    from attnscope.results import RunWriter, run_metadata

    ui = ui or NullUI()
    run_dir = runs_root / plan.slug
    # torchrun: rank 0's folder decides reuse for every rank
    main = distributed.is_main()
    inputs: dict[str, Any] = {}
    chash = ""
    found = None
    with distributed.step():
        if main:
            inputs = config_inputs(plan, settings, paths)
            chash = config_hash(inputs)
            found = _reusable_run(run_dir, chash, plan.name) if reuse else None
    if distributed.broadcast_object(found is not None) and not main:
        return None
    if found is not None:
        layers, heads, meta = found
        info = dict(meta["models"][plan.name])
        info["family"] = plan.family  # family never changes a number, so an override needs no rerun
        k = min(
            settings.gallery, len(info["images_used"])
        )  # asking for 4 of 2 images must still hit the cache
        gallery = _read_gallery(run_dir / GALLERY_FILE, chash, k) if k else None
        status = "reused"
        if k and gallery is None:
            loaded = _load(plan, settings)
            with ui.status(f"{plan.name}: statistics reused, computing the gallery maps"):
                gallery = _gallery_maps(loaded, info, k, settings)
            _free(loaded)
            if gallery is not None:
                RunWriter(run_dir, overwrite=True).write_bytes(GALLERY_FILE, _gallery_bytes(gallery, chash))
            status = "reused (gallery recomputed)"
        return ModelRun(plan, layers, heads, info, chash, status, gallery)

    dev = distributed.setup(settings.device)  # resolve_device, or this rank's device under torchrun
    with distributed.step(), ui.status(f"loading {plan.name}"):
        loaded = _load(plan, settings)
    if loaded.random_init:
        ui.banner(random_weights_warning(plan.name, settings.seed))
    label = display_name(plan.name, loaded.random_init)
    with ui.progress(label) as prog:
        task = prog.add_task(label, total=distributed.share_size(len(paths)))  # torchrun: rank 0's share
        accumulator, layout, used, failures = run_statistics_all_ranks(
            loaded,
            paths,
            batch_size=settings.batch_size,
            device=dev,
            dtype=settings.dtype,
            num_workers=settings.num_workers,
            progress=lambda done, total: prog.update(task, completed=done),
            on_skip=ui.skip,
        )
    with distributed.step():  # torchrun: the same outcome on every rank, reported once
        if accumulator is None or layout is None:
            raise AttnscopeError(f"none of the {len(paths)} images could be read")
    layers, heads = accumulator.tables()
    info = build_info(
        loaded,
        layout,
        paths,
        used,
        failures,
        device=dev,
        dtype=settings.dtype,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )
    info.update(distributed.describe())
    if not main:  # torchrun: rank 0 draws the gallery and writes the run folder
        _free(loaded)
        return None
    k = min(settings.gallery, len(info["images_used"]))
    gallery = _gallery_maps(loaded, info, k, settings) if k else None
    _free(loaded)

    writer = RunWriter(run_dir, overwrite=True)
    writer.write_csv("layers.csv", layers)
    writer.write_csv("heads.csv", heads)
    if gallery is not None:
        writer.write_bytes(GALLERY_FILE, _gallery_bytes(gallery, chash))
    config = {
        "command": "compare",
        "model": plan.name,
        "checkpoint": str(plan.checkpoint) if plan.checkpoint else None,
        "model_kwargs": dict(plan.model_kwargs),
        **settings.as_dict(),
    }
    meta = run_metadata(command, config, {plan.name: info}, settings.seed)
    meta["config_hash"] = chash
    meta["config_inputs"] = inputs
    writer.write_json("run.json", meta)  # last: its presence (and hash) marks a finished, reusable run
    # Round-trip through the CSV so reused and fresh runs stack to byte-identical tables.
    from attnscope.results import read_run

    layers, heads, _ = read_run(run_dir)
    return ModelRun(plan, layers, heads, info, chash, "computed", gallery)


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
    from attnscope.metrics import _NEEDS_CLS, _NEEDS_REGISTERS

    layout = info.get("token_layout", {})
    if metric in _NEEDS_CLS and not layout.get("has_cls", True):
        return "no class token"
    if metric in _NEEDS_REGISTERS and not layout.get("num_registers", 0):
        return "no registers"
    return None


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
        "In the last block, {hi}'s and {lo}'s [cls] keep about the same share of attention on themselves ({a} vs {b}).",
    ),
    (
        "cls_patch_entropy_norm_last",
        "{hi}'s [cls]→patch attention is closer to uniform in the last block (normalised entropy {a} vs {b} for {lo}).",
        "{hi}'s and {lo}'s [cls]→patch attention are about equally spread in the last block (normalised entropy {a} vs {b}).",
    ),
    (
        "cls_patch_k90_frac_last",
        "In the last block, 90% of {lo}'s [cls]→patch attention falls on {b} of the patches, vs {a} for {hi}: "
        "{lo}'s [cls] is the more selective.",
        "In the last block, 90% of the [cls]→patch attention falls on about the same share of patches ({a} for {hi}, {b} for {lo}).",
    ),
    (
        "patch_patch_entropy_norm_mean",
        "Averaged over blocks, {hi}'s patches spread their attention more evenly "
        "(normalised patch→patch entropy {a} vs {b} for {lo}).",
        "Averaged over blocks, {hi}'s and {lo}'s patches spread their attention about equally (normalised entropy {a} vs {b}).",
    ),
    (
        "attn_distance_px_mean",
        "Averaged over blocks, {hi}'s patches look farther: mean attention distance {a} vs {b} for {lo}{ratio}.",
        "Averaged over blocks, {hi}'s and {lo}'s patches look about as far (mean attention distance {a} vs {b}).",
    ),
    (
        "cls_residual_ratio_last",
        "In the last block, attention changes {hi}'s [cls] the most: the update is {a} of the residual stream's norm "
        "vs {b} for {lo}.",
        "In the last block, attention changes {hi}'s and {lo}'s [cls] about equally (update/residual norm {a} vs {b}).",
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
                f"No sentence on {metric} in the {column.rsplit('_', 1)[1]} block(s): fewer than two models have it."
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


# ---------------------------------------------------------------- the whole command


@dataclass
class Comparison:
    """Everything a compare run produced, for the caller to show."""

    out_dir: Path
    runs: list[ModelRun]
    layers: pd.DataFrame
    heads: pd.DataFrame
    summary: pd.DataFrame
    findings: list[str]
    notes: list[str]
    figures: list[str]
    report_html: Path
    report_md: Path


def is_compare_dir(path: Path) -> bool:
    """A folder that only holds what `compare` writes (hidden temp files aside)."""
    if not (path / "runs").is_dir():
        return False
    meta = path / "run.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("config", {}).get("command") != "compare":
                return False
        except (OSError, ValueError):
            return False
    return all(p.name in _COMPARE_ENTRIES for p in path.iterdir() if not p.name.startswith("."))


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse before any work: a non-empty folder that compare did not make needs --overwrite."""
    if out.exists() and not out.is_dir():
        raise AttnscopeError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_compare_dir(out):
        raise AttnscopeError(
            f"--out {out} is not empty and is not an attnscope compare folder; choose another folder or pass --overwrite"
        )


def _validate(settings: CompareSettings) -> None:
    from attnscope.config import DTYPES
    from attnscope.models import resolve_device

    if settings.dtype not in DTYPES:
        raise AttnscopeError(f"--dtype takes {', '.join(DTYPES)}, got {settings.dtype!r}")
    if settings.batch_size < 1:
        raise AttnscopeError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if settings.gallery < 0:
        raise AttnscopeError(f"--gallery must be 0 or more, got {settings.gallery}")
    resolve_device(settings.device)


def compare_run(
    models: Sequence[str],
    *,
    out: str | Path,
    settings: CompareSettings | None = None,
    checkpoints: Mapping[str, str | Path] | None = None,
    families: Mapping[str, str] | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    reuse: bool = True,
    overwrite: bool = False,
    formats: Sequence[str] = ("png",),
    command: str = "",
    ui: Any = None,
) -> Comparison | None:
    """The `compare` command: run or reuse each model, then write tables, figures and the report.

    All input is checked before anything is computed or written. `model_kwargs` (per model
    name, passed to `timm.create_model`) is for notebooks and tests: tiny models. Under
    torchrun every rank measures a share of the images, rank 0 writes and returns the
    Comparison, the other ranks return None.
    """
    from attnscope import distributed
    from attnscope.commands.ui import NullUI
    from attnscope.data import collect_image_paths
    from attnscope.results import RunWriter, run_metadata

    ui = ui or NullUI()
    settings = settings or CompareSettings()
    out = Path(out)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise AttnscopeError(f"--format takes png, svg or pdf, got {', '.join(bad)}")
    plans = plan_models(models, checkpoints=checkpoints, families=families, model_kwargs=model_kwargs)
    _validate(settings)
    # torchrun: join the process group; rank 0 checks --out, lists the images and shows progress
    distributed.setup(settings.device)
    main = distributed.is_main()
    ui = ui if main else NullUI()
    owned, paths = False, None
    with distributed.step():
        if main:
            check_out_dir(out, overwrite)
            owned = not out.exists() or not any(out.iterdir()) or is_compare_dir(out)
            paths = collect_image_paths(
                list(settings.images) if settings.images else None, max_images=settings.max_images
            )
    paths = distributed.broadcast_object(paths)

    runs = [
        run_or_reuse(p, settings, paths, out / "runs", reuse=reuse, command=command, ui=ui) for p in plans
    ]
    if not main:
        return None
    layers, heads = stack_tables(runs)
    summary = summary_table(runs)
    infos = {r.name: r.info for r in runs}
    sentences, notes = findings(summary, infos)

    from attnscope.report import build_figures, render_html, render_markdown

    writer = RunWriter(out, overwrite=True)  # check_out_dir has already decided it may be written
    writer.write_csv("layers.csv", layers)
    writer.write_csv("heads.csv", heads)
    writer.write_csv("summary.csv", summary)
    figures = build_figures(runs, layers, heads, writer, formats=formats)
    html_path = writer.write_text(
        "report.html", render_html(runs, summary, sentences, notes, figures, command=command, out_dir=out)
    )
    md_path = writer.write_text(
        "report.md", render_markdown(runs, summary, sentences, notes, figures, command=command)
    )
    config = {
        "command": "compare",
        "models": [p.name for p in plans],
        "checkpoints": {p.name: str(p.checkpoint) for p in plans if p.checkpoint},
        "families": {p.name: p.family for p in plans},
        "model_kwargs": {p.name: dict(p.model_kwargs) for p in plans if p.model_kwargs},
        "reuse": reuse,
        "formats": list(formats),
        **settings.as_dict(),
    }
    meta = run_metadata(command, config, infos, settings.seed)
    meta["runs"] = {
        r.name: {"folder": f"runs/{r.plan.slug}", "config_hash": r.config_hash, "status": r.status}
        for r in runs
    }
    meta["findings"] = sentences
    meta["notes"] = notes
    writer.write_json("run.json", meta)
    if owned:  # never delete in a folder the user only let us --overwrite
        _remove_stale_figures(out / "figures", set(writer.written))
    return Comparison(
        out_dir=out,
        runs=runs,
        layers=layers,
        heads=heads,
        summary=summary,
        findings=sentences,
        notes=notes,
        figures=[f.stem for f in figures],
        report_html=html_path,
        report_md=md_path,
    )


def _remove_stale_figures(folder: Path, written: set[Path]) -> None:
    """A refreshed compare folder must not keep figures of an earlier model set or format."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith(".") and path not in written:
            path.unlink()
