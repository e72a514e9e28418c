"""`entropy`: one model's per-layer and per-head statistics, written as a run folder.

Anything shown to a person goes through a `ui` object (the CLI passes a rich one); the
default `NullUI` shows nothing, so `run` stays silent inside notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.commands.steps import list_images, load_configured, measure_configured
from attnscope.commands.ui import UI, NullUI
from attnscope.config import (
    check_at_least,
    check_dtype,
    config_dict,
    normalise_families,
    normalise_formats,
    normalise_img_size,
)
from attnscope.errors import ConfigError
from attnscope.models.loading import display_name

if TYPE_CHECKING:
    from attnscope.analysis import AnalysisResult
    from attnscope.results import RunFolder


@dataclass(frozen=True)
class EntropyConfig:
    """Everything an `entropy` run depends on; recorded as run.json's `config`.

    `resume` continues the interrupted run in `out` (see `attnscope.commands.resume`);
    `overwrite` allows writing into a non-empty `out`, discarding an interrupted run there.
    """

    model: str
    checkpoint: Path | None = None
    images: tuple[str, ...] | None = None
    random_init: bool = False
    family: str | None = None
    data_config: str | None = None
    img_size: tuple[int, int] | None = None
    position_resize: str = "own"
    max_images: int | None = None
    batch_size: int = 16
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"
    metrics: tuple[str, ...] = ("attention",)  # the metric families measured (tokens: opt-in)
    seed: int = 0
    formats: tuple[str, ...] = ("png",)
    out: Path | None = field(default=None, compare=False)
    overwrite: bool = field(default=False, compare=False)
    resume: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("num_workers", self.num_workers, 0)
        check_at_least("max_images", self.max_images, 1)
        check_dtype(self.dtype)
        object.__setattr__(self, "metrics", normalise_families(self.metrics))
        object.__setattr__(self, "img_size", normalise_img_size(self.img_size))
        object.__setattr__(self, "formats", normalise_formats(self.formats))
        # no sources means the bundled samples; run.json records that as null
        object.__setattr__(self, "images", tuple(str(i) for i in self.images) if self.images else None)
        for name in ("out", "checkpoint"):  # notebooks pass strings
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())

    def as_dict(self) -> dict[str, Any]:
        return {"command": "entropy", **config_dict(self, skip=("seed", "out", "overwrite", "resume"))}

    def inputs_hash(self, paths: Sequence[Path]) -> str:
        """The hash of everything that changes this run's numbers (a resume must match it)."""
        from attnscope.inputs import config_hash, metric_inputs, run_inputs
        from attnscope.models.source import resolve_model

        inputs = run_inputs(
            resolve_model(self.model, self.family),
            paths,
            checkpoint=self.checkpoint,
            model_kwargs=None,
            random_init=self.random_init,
            seed=self.seed,
            img_size=self.img_size,
            dtype=self.dtype,
            position_resize=self.position_resize,
        )
        if self.data_config is not None:  # preprocessing changes every number
            inputs["data_config"] = self.data_config
        inputs.update(metric_inputs(self.metrics))  # a resumed run measures the same metrics, as defined now
        return config_hash({"command": "entropy", **inputs})


def write_single_run(
    folder: RunFolder, result: AnalysisResult, meta: dict[str, Any], formats: Sequence[str]
) -> None:
    """layers.csv, heads.csv, images.csv, the token profiles (spectrum.csv, frequency.csv)
    when measured, figures/, then run.json last: its presence marks a finished run (an older
    run.json is removed first, so a half-rewritten folder never looks finished)."""
    from attnscope.plots.entropy import entropy_figures
    from attnscope.plots.tokens import single_model_figures

    folder.write_tables(result)
    label = display_name(result.info["name"], bool(result.info.get("random_init")))
    figures = chain(
        entropy_figures(result.layers, result.heads, label=label),
        single_model_figures(result.spectrum, result.frequency, label=label),
    )
    for name, fig in figures:
        folder.write_figure(f"figures/{name}", fig, formats)
    folder.finish(meta)


def check_out(out: Path, config: EntropyConfig, ui: UI) -> bool:
    """Decide, before any work, what `out` may become; True when it holds a run to resume.

    An interrupted run (a partial state, no run.json) is continued with `resume`,
    discarded with `overwrite`, and refused otherwise, in one line that says so. `resume`
    on a finished run is refused; on an empty or new folder it starts from the first image.
    """
    from attnscope.commands.resume import PartialRun
    from attnscope.results import RunFolder, RunWriter

    finished = RunFolder(out).finished
    if PartialRun.exists(out):
        partial = PartialRun(out, "", config.model)
        if finished:  # killed between run.json and the clean-up: the run is complete
            partial.remove()
        elif config.resume:
            return True
        elif config.overwrite:
            partial.remove()
        else:
            raise ConfigError(
                None,
                f"{out} holds an interrupted run of {config.model} ({partial.describe()}); "
                "pass `resume` to continue it, or `overwrite` to start over",
            )
    if config.resume and finished:
        raise ConfigError(
            None, f"{out} holds a finished run: nothing to resume (pass `overwrite` to rerun it)"
        )
    if config.resume:
        ui.warn(f"no interrupted run in {out}: starting from the first image")
    RunWriter(out, overwrite=config.overwrite)  # refuses a non-empty folder without overwrite
    return False


def _prepare(config: EntropyConfig, ui: UI) -> tuple[Path, bool]:
    """Rank 0 checks `out` (its failure stops every rank); every rank gets the folder."""
    from attnscope import distributed
    from attnscope.models.source import short_name
    from attnscope.results import default_run_dir

    out, found = None, False
    with distributed.step():
        if distributed.is_main():
            out = config.out or default_run_dir(short_name(config.model))
            found = check_out(out, config, ui)
    return distributed.broadcast_object(out), found


def _partial(config: EntropyConfig, out: Path, paths: Sequence[Path], found: bool) -> tuple[Any, Any]:
    """(PartialRun, state to resume) on a single process; (None, None) under torchrun."""
    from attnscope import distributed
    from attnscope.commands.resume import PartialRun

    partial, state = None, None
    with distributed.step():  # a refused resume stops every rank
        if not distributed.is_distributed():
            partial = PartialRun(out, config.inputs_hash(paths), config.model)
            state = partial.load(len(paths)) if found else None
    return partial, state


def run(
    config: EntropyConfig, ui: UI | None = None, *, command: str = ""
) -> tuple[Path, AnalysisResult | None]:
    """Measure one model and write its run folder; returns the folder and the result.

    A single-process run commits its state as it goes (`attnscope.commands.resume`), so
    Ctrl-C ends with `Interrupted` saying what is committed, and `resume` continues it.
    Under torchrun every rank measures its shard and only rank 0 writes and gets the
    result (the other ranks get None); such runs are not resumable.
    """
    from attnscope import distributed
    from attnscope.commands.resume import committing
    from attnscope.results import RunFolder, run_metadata

    if config.resume and distributed.launched_by_torchrun():  # before the process group: said once
        raise ConfigError(
            "resume",
            "is not available under torchrun (each rank streams its own share); continue the run in one "
            "process, or start over with `overwrite`",
        )
    dev = distributed.setup(config.device)
    main = distributed.is_main()
    ui = (ui or NullUI()) if main else NullUI()
    out_dir, found = _prepare(config, ui)
    paths, ignored = list_images(config.images, config.max_images, ui)
    partial, state = _partial(config, out_dir, paths, found)
    resumed_after = state.done if state is not None else None  # the state object moves on
    with committing(partial):
        loaded = load_configured(config, ui)
        result = measure_configured(
            loaded,
            paths,
            ui,
            config,
            device=dev,
            checkpointing=partial.checkpointing(state) if partial is not None else None,
        )
        if not main:  # not rank 0: the sums are in; rank 0 writes the folder
            return out_dir, None
        result.info["files_ignored"] = [str(p) for p in sorted(ignored)]
        if resumed_after is not None:
            result.info["resumed_after"] = resumed_after
        meta = run_metadata(command, config.as_dict(), {config.model: result.info}, config.seed)
        write_single_run(RunFolder(out_dir), result, meta, config.formats)
    return out_dir, result
