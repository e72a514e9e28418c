"""`compare`: several models over the same images -> tables, figures and one report.

Each model's single-model run lives in `OUT/runs/<slug>/` with the `config_hash` of
everything that changes its numbers (`attnscope.compare.config_inputs`); a later compare
over the same images re-reads it instead of recomputing. The stacked tables, summary,
figures and report are rebuilt from those runs every time. A fresh run goes through the
same `load_with_ui` / `measure_configured` steps as `entropy`, so its numbers are entropy's.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.commands.ui import UI, NullUI
from attnscope.compare import check_models
from attnscope.config import (
    check_at_least,
    check_dtype,
    normalise_families,
    normalise_formats,
    normalise_img_size,
    plain,
)
from attnscope.errors import AttnscopeError, ConfigError, Interrupted

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from attnscope.analysis import AnalysisResult
    from attnscope.compare import Gallery, ModelPlan, ModelRun
    from attnscope.measure import StreamState
    from attnscope.models import LoadedModel
    from attnscope.results import Found

_COMPARE_ENTRIES = frozenset(
    {
        "runs",
        "figures",
        "layers.csv",
        "heads.csv",
        "images.csv",
        "intervals.csv",
        "summary.csv",
        "cka.csv",
        "spectrum.csv",
        "frequency.csv",
        "run.json",
        "report.html",
        "report.md",
    }
)
# What every compared model shares, in run.json's order (after the per-model options).
_SHARED = (
    "images",
    "max_images",
    "img_size",
    "position_resize",
    "random_init",
    "seed",
    "batch_size",
    "num_workers",
    "device",
    "dtype",
    "metrics",
    "gallery",
)


@dataclass(frozen=True)
class CompareConfig:
    """Everything a `compare` run depends on; recorded (with each model's family) in run.json.

    `checkpoints`, `families` and `model_kwargs` are keyed by model name; `model_kwargs`
    go to `timm.create_model` (tiny models for notebooks and tests). `reuse` re-reads a
    model's run folder whose configuration hash matches instead of recomputing it.
    `resume` continues a model run that was interrupted (`attnscope.commands.resume`);
    `overwrite` also discards such a run instead of refusing to start.
    """

    models: tuple[str, ...]
    checkpoints: Mapping[str, str | Path] = field(default_factory=dict)
    families: Mapping[str, str] = field(default_factory=dict)
    data_configs: Mapping[str, str] = field(default_factory=dict)  # name -> timm tag or mean=...,std=...
    model_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reuse: bool = True
    overwrite: bool = False
    resume: bool = False
    formats: tuple[str, ...] = ("png",)
    out: Path | None = None
    images: tuple[str, ...] | None = None
    max_images: int | None = None
    img_size: tuple[int, int] | None = None
    position_resize: str = "own"
    random_init: bool = False
    seed: int = 0
    batch_size: int = 16
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"
    metrics: tuple[str, ...] = ("attention",)  # the metric families measured (tokens: opt-in)
    gallery: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "out", Path(self.out) if self.out is not None else None)
        object.__setattr__(self, "formats", normalise_formats(self.formats))
        for name in ("checkpoints", "families", "data_configs", "model_kwargs"):
            object.__setattr__(self, name, dict(getattr(self, name) or {}))
        check_models(
            self.models, checkpoints=self.checkpoints, families=self.families, data_configs=self.data_configs
        )
        check_dtype(self.dtype)
        object.__setattr__(self, "metrics", normalise_families(self.metrics))
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("num_workers", self.num_workers, 0)
        check_at_least("max_images", self.max_images, 1)
        check_at_least("gallery", self.gallery, 0)
        object.__setattr__(self, "img_size", normalise_img_size(self.img_size))
        # no sources means the bundled samples; run.json records that as null
        object.__setattr__(self, "images", tuple(str(i) for i in self.images) if self.images else None)

    def shared_dict(self) -> dict[str, Any]:
        """The settings every model shares, as run.json records them."""
        return {name: plain(getattr(self, name)) for name in _SHARED}

    def inputs(self, plan: ModelPlan, paths: Sequence[Path]) -> dict[str, Any]:
        """`config_inputs` of one model under this configuration."""
        from attnscope.compare import config_inputs
        from attnscope.inputs import metric_inputs

        inputs = config_inputs(
            plan,
            paths,
            random_init=self.random_init,
            seed=self.seed,
            img_size=self.img_size,
            dtype=self.dtype,
            position_resize=self.position_resize,
        )
        if plan.name in self.data_configs:  # preprocessing changes every number
            inputs["data_config"] = self.data_configs[plan.name]
        inputs.update(metric_inputs(self.metrics))  # a reused run holds the same metrics, as defined now
        return inputs


@dataclass
class Comparison:
    """Everything a compare run produced, for the caller to show."""

    out_dir: Path
    runs: list[ModelRun]
    layers: pd.DataFrame
    heads: pd.DataFrame
    summary: pd.DataFrame
    images: pd.DataFrame
    intervals: pd.DataFrame
    findings: list[str]
    notes: list[str]
    figures: list[str]
    report_html: Path
    report_md: Path
    bootstrap: dict[str, Any] = field(default_factory=dict)  # how intervals.csv was made (run.json)


# ---------------------------------------------------------------- the output folder


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


def check_out_dir(out: Path, overwrite: bool) -> bool:
    """Refuse before any work: a non-empty folder that compare did not make needs `overwrite`.

    Returns whether the folder is compare's own (empty, new or a compare folder), in which
    stale figures may be deleted.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} exists and is not a folder")
    owned = not out.exists() or not any(out.iterdir()) or is_compare_dir(out)
    if not owned and not overwrite:
        raise ConfigError(
            "overwrite",
            f"is needed to write into {out}: it is not empty and is not an attnscope compare folder "
            "(or choose another folder)",
        )
    return owned


def _remove_stale_figures(folder: Path, written: set[Path]) -> None:
    """A refreshed compare folder must not keep figures of an earlier model set or format."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith(".") and path not in written:
            path.unlink()


# ---------------------------------------------------------------- one model's run folder


def _load(plan: ModelPlan, config: CompareConfig) -> LoadedModel:
    from attnscope.models import load_model

    return load_model(
        plan.name,
        checkpoint=plan.checkpoint,
        # --random-init is the baseline for models without weights of their own
        random_init=config.random_init and plan.checkpoint is None and plan.spec.path is None,
        seed=config.seed,
        img_size=config.img_size,
        family=plan.family,
        model_kwargs=plan.model_kwargs or None,
        data_config=config.data_configs.get(plan.name),
        position_resize=config.position_resize,
    )


def _free(loaded: LoadedModel | None) -> None:
    """Drop a finished model before loading the next: two ViT-H at once do not fit many GPUs."""
    import torch

    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gallery(loaded: LoadedModel, info: Mapping[str, Any], config: CompareConfig, dev: Any) -> Gallery | None:
    from attnscope.compare import gallery_maps

    # asking for 4 of 2 images must still hit the cache
    k = min(config.gallery, len(info["images_used"]))
    if not k:
        return None
    return gallery_maps(loaded, info, k, batch_size=config.batch_size, device=dev, dtype=config.dtype)


def _reused(
    plan: ModelPlan,
    config: CompareConfig,
    found: Found,
    run_dir: Path,
    chash: str,
    dev: torch.device,
    ui: UI,
) -> ModelRun:
    """A matching run folder re-read; only its gallery is drawn again when the cache lacks it."""
    import torch

    from attnscope.compare import ModelRun
    from attnscope.results import RunFolder

    folder = RunFolder(run_dir)
    layers, heads, meta, images, profiles = found
    spectrum, frequency = profiles if profiles is not None else (None, None)
    info = dict(meta["models"][plan.name])
    info["family"] = plan.family  # family never changes a number, so an override needs no rerun
    k = min(config.gallery, len(info["images_used"]))
    gallery = folder.read_gallery(chash, k) if k else None
    grams = folder.read_grams()
    if not k or gallery is not None:
        return ModelRun(
            plan, layers, heads, info, chash, "reused", gallery, images, grams, spectrum, frequency
        )
    torch.manual_seed(config.seed)
    loaded = _load(plan, config)  # rank 0 alone is here: no step() that would wait for the others
    with ui.status(f"{plan.name}: statistics reused, computing the gallery maps"):
        gallery = _gallery(loaded, info, config, dev)
    _free(loaded)
    if gallery is not None:
        folder.write_gallery(gallery, chash)
    status = "reused (gallery recomputed)"
    return ModelRun(plan, layers, heads, info, chash, status, gallery, images, grams, spectrum, frequency)


def _write_model_run(
    run_dir: Path,
    plan: ModelPlan,
    config: CompareConfig,
    result: AnalysisResult,
    gallery: Gallery | None,
    inputs: dict[str, Any],
    chash: str,
    command: str,
) -> None:
    """layers.csv, heads.csv, images.csv, spectrum.csv and frequency.csv (tokens family),
    gallery.npz, then run.json: its presence (and hash) marks a reusable run, so an older
    run.json goes first."""
    from attnscope.results import RunFolder, run_metadata

    folder = RunFolder(run_dir)
    folder.write_tables(result)
    if gallery is not None:
        folder.write_gallery(gallery, chash)
    block = {
        "command": "compare",
        "model": plan.name,
        "checkpoint": str(plan.checkpoint) if plan.checkpoint else None,
        "model_kwargs": dict(plan.model_kwargs),
        **config.shared_dict(),
    }
    meta = run_metadata(command, block, {plan.name: result.info}, config.seed)
    meta["config_hash"] = chash
    meta["config_inputs"] = inputs
    folder.finish(meta)


def _computed(
    plan: ModelPlan,
    config: CompareConfig,
    paths: Sequence[Path],
    run_dir: Path,
    inputs: dict[str, Any],
    chash: str,
    dev: torch.device,
    ui: UI,
    command: str,
    resume: StreamState | None = None,
) -> ModelRun | None:
    """Measure the model as `entropy` does; rank 0 draws the gallery and writes the run folder.

    A single process commits its state in the run folder as it goes, and continues from
    `resume` when given; Ctrl-C then raises `Interrupted` saying what is committed.
    """
    from attnscope import distributed
    from attnscope.cka import GramCollector
    from attnscope.commands.resume import PartialRun, committing
    from attnscope.commands.steps import load_with_ui, measure_configured
    from attnscope.compare import ModelRun
    from attnscope.results import RunFolder

    partial = None if distributed.is_distributed() else PartialRun(run_dir, chash, plan.name)
    resumed_after = resume.done if resume is not None else None  # the state object moves on
    grams = None
    with committing(partial):
        loaded = load_with_ui(plan.name, ui, seed=config.seed, load=lambda: _load(plan, config))
        if "tokens" in config.metrics:  # under torchrun: whole minibatches per rank, gathered
            grams = GramCollector(loaded.num_blocks)
        result = measure_configured(
            loaded,
            paths,
            ui,
            config,
            device=dev,
            grams=grams,
            checkpointing=partial.checkpointing(resume) if partial is not None else None,
        )
        if not distributed.is_main():  # torchrun: the sums are in; rank 0 writes
            _free(loaded)
            return None
        if resumed_after is not None:
            result.info["resumed_after"] = resumed_after
        gallery = _gallery(loaded, result.info, config, dev)
        _free(loaded)
        _write_model_run(run_dir, plan, config, result, gallery, inputs, chash, command)
        grams = RunFolder(run_dir).write_grams(grams)
    # Round-trip through the CSV so reused and fresh runs stack to byte-identical tables.
    folder = RunFolder(run_dir)
    layers, heads, _ = folder.read()
    status = "resumed" if resume is not None else "computed"
    spectrum, frequency = folder.read_profiles() or (None, None)
    images = folder.read_images()
    return ModelRun(
        plan, layers, heads, result.info, chash, status, gallery, images, grams, spectrum, frequency
    )


def run_or_reuse(
    plan: ModelPlan,
    config: CompareConfig,
    paths: Sequence[Path],
    runs_root: Path,
    dev: torch.device,
    ui: UI,
    *,
    command: str = "",
    resume: StreamState | None = None,
) -> ModelRun | None:
    """The model's run folder under `runs_root`: re-read when its config hash matches, else
    computed (continuing from `resume`, a state `check_partial_runs` accepted).

    Under torchrun every rank measures its share; rank 0 alone decides reuse, draws the
    gallery and writes, and the other ranks return None.
    """
    from attnscope import distributed
    from attnscope.inputs import config_hash
    from attnscope.results import RunFolder

    run_dir = runs_root / plan.slug
    main = distributed.is_main()
    inputs: dict[str, Any] = {}
    chash = ""
    found = None
    with distributed.step():  # torchrun: rank 0's folder decides reuse for every rank
        if main:
            inputs = config.inputs(plan, paths)
            chash = config_hash(inputs)
            found = RunFolder(run_dir).reusable(chash, plan.name) if config.reuse else None
    if distributed.broadcast_object(found is not None):
        # only rank 0 holds the folder it found; the other ranks have nothing to return
        return _reused(plan, config, found, run_dir, chash, dev, ui) if found is not None else None
    return _computed(plan, config, paths, run_dir, inputs, chash, dev, ui, command, resume)


# ---------------------------------------------------------------- the comparison


def _run_json(
    config: CompareConfig, plans: Sequence[ModelPlan], comparison: Comparison, command: str
) -> dict[str, Any]:
    from attnscope.results import run_metadata

    block = {
        "command": "compare",
        "models": [p.name for p in plans],
        "checkpoints": {p.name: str(p.checkpoint) for p in plans if p.checkpoint},
        "families": {p.name: p.family for p in plans},
        "model_kwargs": {p.name: dict(p.model_kwargs) for p in plans if p.model_kwargs},
        "reuse": config.reuse,
        "formats": list(config.formats),
        **config.shared_dict(),
    }
    runs = comparison.runs
    meta = run_metadata(command, block, {r.name: r.info for r in runs}, config.seed)
    meta["runs"] = {
        r.name: {"folder": f"runs/{r.plan.slug}", "config_hash": r.config_hash, "status": r.status}
        for r in runs
    }
    meta["bootstrap"] = comparison.bootstrap
    meta["findings"] = comparison.findings
    meta["notes"] = comparison.notes
    return meta


def _write_comparison(
    out: Path, config: CompareConfig, plans: Sequence[ModelPlan], runs: list[ModelRun], command: str
) -> tuple[Comparison, list[Path]]:
    """Stacked tables, intervals, summary, findings, figures, both reports and run.json, in that order."""
    from attnscope.compare import (
        findings,
        interval_table,
        stack_images,
        stack_profiles,
        stack_tables,
        summary_table,
    )
    from attnscope.report.figures import build_figures
    from attnscope.report.html import render_html
    from attnscope.report.markdown import render_markdown
    from attnscope.results import RunWriter

    layers, heads = stack_tables(runs)
    images = stack_images(runs)
    summary = summary_table(runs)
    intervals, bootstrap = interval_table(runs, seed=config.seed)
    # without per-image values (runs made by other code) the thresholds alone decide
    sentences, notes = findings(
        summary, {r.name: r.info for r in runs}, None if intervals.empty else intervals
    )
    writer = RunWriter(out, overwrite=True)  # check_out_dir has already decided it may be written
    writer.write_csv("layers.csv", layers)
    writer.write_csv("heads.csv", heads)
    writer.write_csv("images.csv", images, float_format=None)
    writer.write_csv("intervals.csv", intervals)
    writer.write_csv("summary.csv", summary)
    cka, cka_note = _cka(runs)
    if cka is not None:
        writer.write_csv("cka.csv", cka)
    else:
        notes = [*notes, cka_note]
    profiles = {kind: stack_profiles(runs, kind) for kind in ("spectrum", "frequency")}
    for kind, table in profiles.items():
        if table is not None:
            writer.write_csv(f"{kind}.csv", table, float_format=None)
        else:  # never leave an earlier compare's table beside this one's
            (out / f"{kind}.csv").unlink(missing_ok=True)
    figures = build_figures(
        runs, layers, heads, writer, formats=config.formats, intervals=intervals, cka=cka, **profiles
    )
    html = render_html(
        runs, summary, sentences, notes, figures, command=command, out_dir=out, intervals=intervals
    )
    md = render_markdown(runs, summary, sentences, notes, figures, command=command, intervals=intervals)
    comparison = Comparison(
        out_dir=out,
        runs=runs,
        layers=layers,
        heads=heads,
        summary=summary,
        images=images,
        intervals=intervals,
        findings=sentences,
        notes=notes,
        figures=[f.stem for f in figures],
        report_html=writer.write_text("report.html", html),
        report_md=writer.write_text("report.md", md),
        bootstrap=bootstrap,
    )
    writer.write_json("run.json", _run_json(config, plans, comparison, command))
    return comparison, writer.written


def _cka(runs: Sequence[ModelRun]) -> tuple[pd.DataFrame | None, str]:
    """cka.csv's table, or None and the one line the report says about why it is missing."""
    import pandas as pd

    from attnscope.cka import cka_table

    missing = [r.name for r in runs if r.grams is None]
    if missing:
        return None, (
            "CKA needs the token family (metrics attention,tokens) measured in one uninterrupted "
            f"pass; not available for {', '.join(missing)}"
        )
    try:
        rows = cka_table({r.name: r.grams for r in runs if r.grams is not None})
    except AttnscopeError as exc:
        return None, str(exc)
    return pd.DataFrame(rows, columns=["model_a", "block_a", "model_b", "block_b", "token", "cka"]), ""


def check_partial_runs(
    out: Path, plans: Sequence[ModelPlan], config: CompareConfig, paths: Sequence[Path]
) -> dict[str, StreamState | None]:
    """Rank 0, before any model runs: the interrupted model runs under `out`/runs/.

    With `resume` each is checked against its configuration hash and returned to continue
    from; with `overwrite` it is discarded; otherwise compare refuses in one line that
    names them. A partial state beside a finished run of the same hash (killed during the
    clean-up) is removed.
    """
    from attnscope.commands.resume import PartialRun
    from attnscope.inputs import config_hash
    from attnscope.results import RunFolder

    states: dict[str, StreamState | None] = {}
    waiting = []
    for plan in plans:
        run_dir = out / "runs" / plan.slug
        if not PartialRun.exists(run_dir):
            continue
        chash = config_hash(config.inputs(plan, paths))
        partial = PartialRun(run_dir, chash, plan.name)
        if RunFolder(run_dir).reusable(chash, plan.name) is not None:
            partial.remove()
        elif config.resume:
            states[plan.name] = partial.load(len(paths))
        elif config.overwrite:
            partial.remove()
        else:
            waiting.append(f"{plan.name}: {partial.describe()}")
    if waiting:
        raise ConfigError(
            None,
            f"{out} holds interrupted model runs ({'; '.join(waiting)}); pass `resume` to continue "
            "them, or `overwrite` to start them over",
        )
    return states


def _interrupted(
    exc: KeyboardInterrupt, runs: Sequence[ModelRun | None], total: int, out: Path
) -> Interrupted:
    """Ctrl-C during a compare: which model runs are complete, and what the current one committed."""
    done = [r.name for r in runs if r is not None]
    complete = f"{', '.join(done)} complete in {out / 'runs'}; " if done else ""
    if isinstance(exc, Interrupted):
        return Interrupted(complete + exc.detail, resumable=exc.resumable)
    if len(done) == total:
        return Interrupted(
            f"every model run is complete in {out / 'runs'}; the same command reuses them and writes "
            "the report"
        )
    return Interrupted(
        complete + "nothing of the current step was committed; the same command goes on from here"
    )


def run(config: CompareConfig, ui: UI | None = None, *, command: str = "") -> Comparison | None:
    """Run or reuse each model, then write tables, figures and the report.

    All input is checked before anything is computed or written. A single process commits
    each model run as it goes: Ctrl-C raises `Interrupted` saying what is complete, and
    `resume` continues. Under torchrun every rank measures a share of the images; rank 0
    writes and gets the Comparison, the other ranks get None (no resume there).
    """
    from attnscope import distributed
    from attnscope.commands.steps import list_images
    from attnscope.compare import plan_models
    from attnscope.results import default_run_dir

    plans = plan_models(
        config.models,
        checkpoints=config.checkpoints,
        families=config.families,
        model_kwargs=config.model_kwargs,
    )
    if config.resume and distributed.launched_by_torchrun():
        raise ConfigError(
            "resume",
            "is not available under torchrun (each rank streams its own share); continue the compare in "
            "one process, or start the interrupted runs over with `overwrite`",
        )
    dev = distributed.setup(config.device)  # the device; under torchrun also joins the process group
    main = distributed.is_main()
    ui = (ui or NullUI()) if main else NullUI()
    out, owned = None, False
    with distributed.step():
        if main:  # refuse a bad out folder before any work
            out = config.out or default_run_dir("compare-" + "-vs-".join(config.models))
            owned = check_out_dir(out, config.overwrite)
    out = distributed.broadcast_object(out)
    paths, _ = list_images(config.images, config.max_images, ui)
    states: dict[str, StreamState | None] = {}
    with distributed.step():
        if main:
            states = check_partial_runs(out, plans, config, paths)
    runs: list[ModelRun | None] = []
    try:
        for plan in plans:
            runs.append(
                run_or_reuse(
                    plan, config, paths, out / "runs", dev, ui, command=command, resume=states.get(plan.name)
                )
            )
        if not main:
            return None
        done = [r for r in runs if r is not None]  # rank 0 has every model's run
        comparison, written = _write_comparison(out, config, plans, done, command)
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, runs, len(plans), out) from None
    if owned:  # never delete in a folder the user only let us overwrite
        _remove_stale_figures(out / "figures", set(written))
    return comparison
