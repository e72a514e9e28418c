"""One model over a set of images -> attention statistics as tables, nothing written.

`analyze` is the notebook entry point; `measure` is the part every command shares
(entropy, compare and analyze alike): stream the images through `measure.run_statistics`,
spread over torchrun ranks when there are any, and turn the sums into tables plus the
provenance block of run.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.config import check_at_least, check_dtype, normalise_families, normalise_img_size
from attnscope.errors import AttnscopeError
from attnscope.measure import Checkpointing, ProgressFn, SkipFn, run_statistics_all_ranks

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from attnscope.cka import GramCollector
    from attnscope.data import Images
    from attnscope.metrics import MetricAccumulator
    from attnscope.models import LoadedModel, TokenLayout


def empty_images_table() -> pd.DataFrame:
    """An images table without rows (the columns of images.csv)."""
    import pandas as pd

    return pd.DataFrame(columns=list(IMAGE_COLUMNS))


IMAGE_COLUMNS = ("model", "image", "layer", "metric", "value")


def empty_profile_table(kind: str) -> pd.DataFrame:
    """spectrum.csv's ("spectrum") or frequency.csv's ("frequency") columns, without rows."""
    import pandas as pd

    from attnscope.metrics.profiles import FREQUENCY_COLUMNS, SPECTRUM_COLUMNS

    return pd.DataFrame(columns=list(SPECTRUM_COLUMNS if kind == "spectrum" else FREQUENCY_COLUMNS))


@dataclass
class AnalysisResult:
    """The tables of one model's run and everything run.json needs to reproduce it.

    `layers` and `heads` are the statistics over images; `images` holds each image's
    value per (layer, metric) (heads averaged within the image, as layers.csv's unit),
    `image` being the name run.json lists in `images_used`. `spectrum` and `frequency` are
    the profile tables of the tokens family (spectrum.csv, frequency.csv; without rows when
    the family was not measured).
    """

    layers: pd.DataFrame
    heads: pd.DataFrame
    info: dict[str, Any]
    accumulator: MetricAccumulator | None = field(default=None, repr=False)
    images: pd.DataFrame = field(default_factory=empty_images_table, repr=False)
    spectrum: pd.DataFrame = field(default_factory=lambda: empty_profile_table("spectrum"), repr=False)
    frequency: pd.DataFrame = field(default_factory=lambda: empty_profile_table("frequency"), repr=False)


def as_loaded_model(model: str | Path | nn.Module | LoadedModel, **load_kwargs: Any) -> LoadedModel:
    """Accept what a notebook user has at hand: a name, a bare nn.Module or a LoadedModel."""
    from torch import nn

    from attnscope.models import LoadedModel, ModelSpec, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str | Path):  # a name, or a checkpoint file / Hugging Face folder
        return load_model(str(model), **load_kwargs)
    if isinstance(model, nn.Module):
        from attnscope.models import model_data_config

        cfg = model_data_config(model, load_kwargs.get("img_size"))
        name = load_kwargs.get("name") or type(model).__name__
        return LoadedModel(
            model=model.eval(),
            name=name,
            spec=ModelSpec(name, getattr(model, "default_cfg", {}).get("architecture", name), "unknown"),
            weights="user-supplied nn.Module",
            random_init=False,
            input_size=(int(cfg["input_size"][1]), int(cfg["input_size"][2])),
            data_config=cfg,
        )
    raise AttnscopeError(
        f"model must be a name, a path, an nn.Module or a LoadedModel, not {type(model).__name__}"
    )


def measure_model(
    loaded: LoadedModel,
    paths: Images,
    *,
    device: torch.device,
    batch_size: int = 16,
    dtype: str = "float32",
    num_workers: int = 0,
    seed: int = 0,
    progress: ProgressFn | None = None,
    on_skip: SkipFn | None = None,
    checkpointing: Checkpointing | None = None,
    families: tuple[str, ...] = ("attention",),
    grams: GramCollector | None = None,
) -> AnalysisResult:
    """Statistics of `loaded` over `paths`: tables and the provenance of run.json.

    `families` names the metric families measured (docs/metrics.md); `grams`, when given,
    collects each forward batch's CKA Gram matrices (`attnscope.cka`).

    Under torchrun every rank streams its share and ends with the all-reduced totals (the
    same result on every rank, per-image values included). It is an error, on every rank
    alike, if no image at all could be read. `checkpointing` (one process only) commits
    the state as it goes and resumes from a committed one.
    """
    from attnscope import distributed

    accumulator, layout, used, failures = run_statistics_all_ranks(
        loaded,
        paths,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        num_workers=num_workers,
        progress=progress,
        on_skip=on_skip,
        checkpointing=checkpointing,
        families=families,
        grams=grams,
    )
    with distributed.step():  # the same outcome on every rank; rank 0 alone reports it
        if accumulator is None or layout is None:
            raise AttnscopeError(f"none of the {len(paths)} images could be read")
    layers, heads = accumulator.tables()
    images = accumulator.images_table([str(paths[i]) for i in range(len(paths))])
    info = build_info(
        loaded, layout, paths, used, failures, device=device, dtype=dtype, seed=seed, batch_size=batch_size
    )
    info.update(distributed.describe())
    spectrum, frequency = profile_tables(accumulator, layout)
    return AnalysisResult(layers, heads, info, accumulator, images, spectrum, frequency)


def profile_tables(accumulator: MetricAccumulator, layout: TokenLayout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(spectrum, frequency) tables of the accumulator's profile sums (no rows without them)."""
    from attnscope.metrics.profiles import frequency_table, spectrum_table

    sums = accumulator.profile_sums()
    name, depth = accumulator.model, accumulator.num_layers
    return spectrum_table(name, depth, sums), frequency_table(name, depth, layout.grid, sums)


def analyze(
    model: str | Path | nn.Module | LoadedModel,
    images: Any = None,
    *,
    preprocessed: bool = False,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    img_size: int | tuple[int, int] | None = None,
    position_resize: str = "own",
    family: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    num_workers: int = 0,
    max_images: int | None = None,
    progress: ProgressFn | None = None,
    on_skip: SkipFn | None = None,
    metrics: Sequence[str] = ("attention",),
) -> AnalysisResult:
    """Attention and token statistics of one model over a set of images, as DataFrames.

    The notebook entry point: nothing is written or printed. `model` is a name, a checkpoint
    file or Hugging Face folder (`attnscope.models.source`), an nn.Module or a LoadedModel.
    `images` takes folders,
    files or globs (None: the bundled samples), PIL images, arrays or tensors (one, a list,
    or an (N, 3, H, W) batch), a torch Dataset or a DataLoader. Pictures (PIL, arrays,
    tensors in [0, 1] or uint8) go through the model's eval transform; tensors already
    normalised at the model's input size need `preprocessed=True` (a DataLoader's items are
    taken as preprocessed). Images in memory are named `images[i]` / `dataset[i]`. Returns
    `layers` and `heads` tables with the columns of docs/metrics.md, the per-image table
    `images` (model, image, layer, metric, value; what images.csv holds), with the tokens
    family the profile tables `spectrum` and `frequency` (spectrum.csv, frequency.csv), and
    an `info` dict (what run.json records).
    """
    import torch

    from attnscope import distributed
    from attnscope.data import image_source

    check_at_least("batch_size", batch_size, 1)
    check_at_least("num_workers", num_workers, 0)
    check_dtype(dtype)
    img_size = normalise_img_size(img_size)
    families = normalise_families(metrics)
    # the images are checked (and listed) before any model is built: a wrong one costs nothing
    source = image_source(images, preprocessed=preprocessed, max_images=max_images)
    dev = distributed.setup(device)  # resolve_device, or this rank's device under torchrun
    torch.manual_seed(seed)
    loaded = as_loaded_model(
        model,
        checkpoint=checkpoint,
        random_init=random_init,
        seed=seed,
        img_size=img_size,
        family=family,
        position_resize=position_resize,
    )
    return measure_model(
        loaded,
        source,
        device=dev,
        batch_size=batch_size,
        dtype=dtype,
        num_workers=num_workers,
        seed=seed,
        progress=progress,
        on_skip=on_skip,
        families=families,
    )


def provenance(
    loaded: LoadedModel, layout: TokenLayout, used: Sequence[str], skipped: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """What every run.json says about a model and the images it saw: weights, data config,
    token layout, blocks, the images used and the ones skipped with why."""
    info = loaded.provenance()
    info.update(
        {
            "token_layout": layout.as_dict(),
            "num_blocks": loaded.num_blocks,
            "images_used": list(used),
            "images_skipped": [{"path": path, "reason": reason} for path, reason in skipped],
        }
    )
    return info


def build_info(
    loaded: LoadedModel,
    layout: TokenLayout,
    paths: Images,
    used: Sequence[int],
    failures: Sequence[tuple[int, str]],
    *,
    device: torch.device,
    dtype: str,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """The provenance block of run.json for one model."""
    used_names = [str(paths[i]) for i in sorted(used)]
    skipped = [(str(paths[i]), r) for i, r in sorted(failures)]
    info = provenance(loaded, layout, used_names, skipped)
    info.update(
        {
            "device": str(device),
            "dtype": dtype,
            "seed": seed,
            "batch_size": batch_size,
        }
    )
    return info
