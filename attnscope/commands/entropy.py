"""`entropy`: one model's per-layer and per-head statistics, written as a run folder.

Anything shown to a person goes through a `ui` object (the CLI passes a rich one); the
default `NullUI` shows nothing, so `run` stays silent inside notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.commands.steps import list_images, load_with_ui, measure_with_ui
from attnscope.commands.ui import UI, NullUI
from attnscope.config import (
    check_at_least,
    check_dtype,
    check_img_size,
    config_dict,
    normalise_formats,
)
from attnscope.models.loading import display_name

if TYPE_CHECKING:
    from attnscope.analysis import AnalysisResult
    from attnscope.results import RunWriter


@dataclass(frozen=True)
class EntropyConfig:
    """Everything an `entropy` run depends on; recorded as run.json's `config`."""

    model: str
    checkpoint: Path | None = None
    images: tuple[str, ...] | None = None
    random_init: bool = False
    family: str | None = None
    data_config: str | None = None
    img_size: tuple[int, int] | None = None
    max_images: int | None = None
    batch_size: int = 16
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    formats: tuple[str, ...] = ("png",)
    out: Path | None = field(default=None, compare=False)
    overwrite: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("num_workers", self.num_workers, 0)
        check_at_least("max_images", self.max_images, 1)
        check_dtype(self.dtype)
        check_img_size(self.img_size)
        object.__setattr__(self, "formats", normalise_formats(self.formats))
        # no sources means the bundled samples; run.json records that as null
        object.__setattr__(self, "images", tuple(str(i) for i in self.images) if self.images else None)

    def as_dict(self) -> dict[str, Any]:
        return {"command": "entropy", **config_dict(self, skip=("seed", "out", "overwrite"))}


def write_single_run(
    writer: RunWriter, result: AnalysisResult, meta: dict[str, Any], formats: Sequence[str]
) -> None:
    """layers.csv, heads.csv, figures/, then run.json last: its presence marks a finished run."""
    from attnscope.plots.entropy import entropy_figures

    writer.write_csv("layers.csv", result.layers)
    writer.write_csv("heads.csv", result.heads)
    label = display_name(result.info["name"], bool(result.info.get("random_init")))
    for name, fig in entropy_figures(result.layers, result.heads, label=label):
        writer.write_figure(f"figures/{name}", fig, formats)
    writer.write_json("run.json", meta)


def run(
    config: EntropyConfig, ui: UI | None = None, *, command: str = ""
) -> tuple[Path, AnalysisResult | None]:
    """Measure one model and write its run folder; returns the folder and the result.

    Under torchrun every rank measures its shard and only rank 0 writes and gets the
    result (the other ranks get None).
    """
    from attnscope import distributed
    from attnscope.models import load_model
    from attnscope.results import RunWriter, default_run_dir, run_metadata

    dev = distributed.setup(config.device)
    main = distributed.is_main()
    ui = (ui or NullUI()) if main else NullUI()
    writer = None
    with distributed.step():
        if main:  # refuse a bad --out before any work
            writer = RunWriter(config.out or default_run_dir(config.model), overwrite=config.overwrite)
    out_dir = distributed.broadcast_object(writer.out_dir if writer is not None else None)
    loaded = load_with_ui(
        config.model,
        ui,
        seed=config.seed,
        load=lambda: load_model(
            config.model,
            checkpoint=config.checkpoint,
            random_init=config.random_init,
            seed=config.seed,
            img_size=config.img_size,
            family=config.family,
            data_config=config.data_config,
        ),
    )
    paths, ignored = list_images(config.images, config.max_images, ui)
    result = measure_with_ui(
        loaded,
        paths,
        ui,
        seed=config.seed,
        device=dev,
        batch_size=config.batch_size,
        dtype=config.dtype,
        num_workers=config.num_workers,
    )
    if writer is None:  # not rank 0: the sums are in; rank 0 writes the folder
        return out_dir, None
    result.info["files_ignored"] = [str(p) for p in sorted(ignored)]
    meta = run_metadata(command, config.as_dict(), {config.model: result.info}, config.seed)
    write_single_run(writer, result, meta, config.formats)
    return writer.out_dir, result
