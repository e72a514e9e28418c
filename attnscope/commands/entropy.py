"""Whole runs: load, analyse, write the run folder. Shared by the CLI commands.

Anything shown to a person goes through a `ui` object (the CLI passes a rich one); the
default `NullUI` shows nothing, so these functions stay silent inside notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.commands.ui import NullUI
from attnscope.errors import AttnscopeError
from attnscope.models.loading import display_name, random_weights_warning

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.analysis import AnalysisResult

TABLE_METRICS = ("cls_self_attn", "cls_patch_entropy_norm", "patch_patch_entropy_norm", "attn_distance_px")


def analyse_with_ui(
    *,
    model: str,
    checkpoint: Path | None,
    images: Sequence[str] | None,
    random_init: bool,
    family: str | None,
    img_size: tuple[int, int] | None,
    max_images: int | None,
    batch_size: int,
    num_workers: int,
    device: str,
    dtype: str,
    seed: int,
    ui: Any,
    paths: Sequence[Path] | None = None,
) -> AnalysisResult:
    """Load one model and stream the images through it, with a progress bar.

    Under torchrun each rank streams its own shard and the sums are all-reduced (see
    attnscope.distributed); the image list is rank 0's and only rank 0 shows anything.
    """
    import torch

    from attnscope import distributed
    from attnscope.analysis import AnalysisResult, build_info, run_statistics_all_ranks
    from attnscope.data import collect_image_paths
    from attnscope.models import load_model

    dev = distributed.setup(device)  # resolve_device, or this rank's device under torchrun
    if not distributed.is_main():
        ui = NullUI()
    torch.manual_seed(seed)
    with distributed.step():  # a failure on any rank stops every rank here, not in a collective
        with ui.status(f"loading {model}"):
            loaded = load_model(
                model,
                checkpoint=checkpoint,
                random_init=random_init,
                seed=seed,
                img_size=img_size,
                family=family,
            )
        if paths is None and distributed.is_main():
            paths = collect_image_paths(images, max_images=max_images)
    paths = distributed.broadcast_object(paths)
    if random_init:
        ui.banner(random_weights_warning(model, seed))
    shown = distributed.share_size(len(paths))  # the bar follows rank 0's share
    label = model
    if distributed.is_distributed():
        label = f"{model} (rank 0 of {distributed.world_size()}: {shown} of {len(paths)} images)"
    with ui.progress(label) as prog:
        task = prog.add_task(label, total=shown)
        accumulator, layout, used, failures = run_statistics_all_ranks(
            loaded,
            paths,
            batch_size=batch_size,
            device=dev,
            dtype=dtype,
            num_workers=num_workers,
            progress=lambda done, total: prog.update(task, completed=done),
            on_skip=ui.skip,
        )
    with distributed.step():  # same outcome on every rank; rank 0 alone reports it
        if accumulator is None or layout is None:
            raise AttnscopeError(f"none of the {len(paths)} images could be read")
    layers, heads = accumulator.tables()
    info = build_info(
        loaded, layout, paths, used, failures, device=dev, dtype=dtype, seed=seed, batch_size=batch_size
    )
    info.update(distributed.describe())
    return AnalysisResult(layers, heads, info, accumulator)


def write_single_run(writer, result: AnalysisResult, meta: dict[str, Any], formats: Sequence[str]) -> None:
    """layers.csv, heads.csv, figures/, then run.json last: its presence marks a finished run."""
    from attnscope.plots.entropy import entropy_figures

    writer.write_csv("layers.csv", result.layers)
    writer.write_csv("heads.csv", result.heads)
    label = display_name(result.info["name"], bool(result.info.get("random_init")))
    for name, fig in entropy_figures(result.layers, result.heads, label=label):
        writer.write_figure(f"figures/{name}", fig, formats)
    writer.write_json("run.json", meta)


def layer_table(layers: pd.DataFrame, title: str):
    """Rich table of the headline metrics per block; missing metrics shown as a dash."""
    from rich.table import Table

    pivot = layers.pivot_table(index="layer", columns="metric", values="mean", aggfunc="first")
    table = Table(title=title, header_style="bold")
    table.add_column("block", justify="right")
    for m in TABLE_METRICS:
        table.add_column(m, justify="right")
    for layer, row in pivot.iterrows():
        cells = []
        for m in TABLE_METRICS:
            v = row.get(m)
            cells.append("—" if v is None or v != v else (f"{v:.1f}" if m.endswith("_px") else f"{v:.3f}"))
        table.add_row(str(layer), *cells)
    return table


def entropy_run(
    *,
    model: str,
    checkpoint: Path | None = None,
    images: Sequence[str] | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    random_init: bool = False,
    family: str | None = None,
    img_size: tuple[int, int] | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    formats: Sequence[str] = ("png",),
    command: str = "",
    ui: Any = None,
) -> Path:
    """The `entropy` command: one model, one run folder. Returns the folder.

    Under torchrun every rank measures its shard and only rank 0 writes and prints.
    """
    from attnscope import distributed
    from attnscope.results import RunWriter, default_run_dir, run_metadata

    distributed.setup(device)
    main = distributed.is_main()
    ui = (ui or NullUI()) if main else NullUI()
    writer = None
    with distributed.step():
        if main:
            writer = RunWriter(out or default_run_dir(model), overwrite=overwrite)  # refuse before any work
    out_dir = distributed.broadcast_object(writer.out_dir if writer is not None else None)
    result = analyse_with_ui(
        model=model,
        checkpoint=checkpoint,
        images=images,
        random_init=random_init,
        family=family,
        img_size=img_size,
        max_images=max_images,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        seed=seed,
        ui=ui,
    )
    if writer is None:  # not rank 0: the sums are in; rank 0 writes the folder
        return out_dir
    config = {
        "command": "entropy",
        "model": model,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "images": list(images) if images else None,
        "random_init": random_init,
        "family": family,
        "img_size": list(img_size) if img_size else None,
        "max_images": max_images,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "dtype": dtype,
        "formats": list(formats),
    }
    meta = run_metadata(command, config, {model: result.info}, seed)
    write_single_run(writer, result, meta, formats)
    n_used, n_skipped = len(result.info["images_used"]), len(result.info["images_skipped"])
    title = f"{display_name(model, random_init)}: mean over {n_used} images"
    ui.print(layer_table(result.layers, title))
    if n_skipped:
        ui.warn(f"{n_skipped} file(s) skipped; listed in run.json")
    ui.print(f"results: {writer.out_dir}")
    return writer.out_dir
