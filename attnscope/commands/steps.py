"""Steps every measuring command shares: load a model, list the images, measure with a
progress bar. Each one behaves the same under torchrun (rank 0 lists and shows; a failure
on any rank stops every rank at the same step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.commands.ui import UI
from attnscope.models.loading import random_weights_warning

if TYPE_CHECKING:
    from attnscope.analysis import AnalysisResult
    from attnscope.models import LoadedModel


def load_with_ui(name: str, ui: UI, *, seed: int, load: Callable[[], LoadedModel]) -> LoadedModel:
    """`load()` seeded, under a status line; a failure on any rank stops every rank here."""
    import torch

    from attnscope import distributed

    torch.manual_seed(seed)
    with distributed.step(), ui.status(f"loading {name}"):
        loaded = load()
    for notice in loaded.notices:  # e.g. which preprocessing a bare checkpoint got, and why
        ui.notice(notice)
    return loaded


def load_configured(config: Any, ui: UI) -> LoadedModel:
    """`load_with_ui` for a command config with the usual model fields (model, checkpoint,
    random_init, seed, img_size, data_config, and family where the command has one)."""
    from attnscope.models import load_model

    return load_with_ui(
        config.model,
        ui,
        seed=config.seed,
        load=lambda: load_model(
            config.model,
            checkpoint=config.checkpoint,
            random_init=config.random_init,
            seed=config.seed,
            img_size=config.img_size,
            family=getattr(config, "family", None),
            data_config=config.data_config,
            position_resize=config.position_resize,
        ),
    )


def list_images(
    images: Sequence[str] | None, max_images: int | None, ui: UI | None = None
) -> tuple[list[Path], list[Path]]:
    """Rank 0 lists the images (its failure stops every rank) and every rank gets its list.

    Also returns the non-image files found in the image folders, each warned about on `ui`."""
    from attnscope import distributed
    from attnscope.data import collect_image_paths

    paths = None
    ignored: list[Path] = []
    with distributed.step():
        if distributed.is_main():
            paths = collect_image_paths(images, max_images=max_images, ignored=ignored)
    for path in ignored:
        if ui is not None:
            ui.skip(path, f"not an image file ({path.suffix or 'no extension'})")
    return distributed.broadcast_object(paths), ignored


def measure_configured(
    loaded: LoadedModel, paths: Sequence[Path], ui: UI, config: Any, **extra: Any
) -> AnalysisResult:
    """`measure_with_ui` with the settings every measuring config shares (seed, batch size,
    dtype, workers, metric families); `extra` adds the device and per-command options."""
    return measure_with_ui(
        loaded,
        paths,
        ui,
        seed=config.seed,
        batch_size=config.batch_size,
        dtype=config.dtype,
        num_workers=config.num_workers,
        families=config.metrics,
        **extra,
    )


def measure_with_ui(
    loaded: LoadedModel, paths: Sequence[Path], ui: UI, *, seed: int, **options: Any
) -> AnalysisResult:
    """`analysis.measure_model` with the random-weights banner and a progress bar.

    Under torchrun each rank streams its own shard and the sums are all-reduced; the bar
    follows rank 0's share and only rank 0 shows anything.
    """
    from attnscope import distributed
    from attnscope.analysis import measure_model
    from attnscope.measure import rank_share

    if loaded.random_init:
        ui.banner(random_weights_warning(loaded.name, seed))
    share = rank_share(len(paths), options.get("batch_size", 16), options.get("grams"))
    shown = len(paths) if share is None else len(share)
    label = loaded.label
    if distributed.is_distributed():
        label = f"{loaded.name} (rank 0 of {distributed.world_size()}: {shown} of {len(paths)} images)"
    checkpointing = options.get("checkpointing")
    start = checkpointing.resume.done if checkpointing is not None and checkpointing.resume else 0
    if start:  # the bar (and its rate and ETA) covers this session's images only
        label = f"{label} (resumed after {start} of {len(paths)})"
    with ui.progress(label) as prog:
        task = prog.add_task(label, total=shown - start)
        return measure_model(
            loaded,
            paths,
            seed=seed,
            progress=lambda done, total: prog.update(task, completed=done - start),
            on_skip=ui.skip,
            **options,
        )
