"""Model + images -> attention statistics: the loop that drives capture and metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from attnscope.metrics import MetricAccumulator
    from attnscope.models import LoadedModel, TokenLayout

DTYPES = ("float32", "bfloat16", "float16")

ProgressFn = Callable[[int, int], None]  # (images done, images total)
SkipFn = Callable[[Path, str], None]  # (path, reason), once per unreadable file


@dataclass
class AnalysisResult:
    """The tables of one model's run and everything run.json needs to reproduce it."""

    layers: pd.DataFrame
    heads: pd.DataFrame
    info: dict[str, Any]
    accumulator: MetricAccumulator | None = field(default=None, repr=False)


def autocast_context(device: torch.device, dtype: str):
    """Autocast for reduced-precision forwards; metrics are still computed in float32."""
    import torch

    if dtype not in DTYPES:
        raise AttnscopeError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def as_loaded_model(model: str | nn.Module | LoadedModel, **load_kwargs: Any) -> LoadedModel:
    """Accept what a notebook user has at hand: a name, a bare nn.Module or a LoadedModel."""
    from torch import nn

    from attnscope.models import LoadedModel, ModelSpec, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model, **load_kwargs)
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
    raise AttnscopeError(f"model must be a name, an nn.Module or a LoadedModel, not {type(model).__name__}")


class _StreamingStats:
    """Consumer for AttentionRecorder: reduces each block as soon as it exists."""

    def __init__(self, name: str, num_blocks: int, residual: bool) -> None:
        from attnscope.metrics import Workspace

        self.name = name
        self.num_blocks = num_blocks
        self.residual = residual
        self.layout: TokenLayout | None = None
        self.accumulator: MetricAccumulator | None = None
        self.workspace = Workspace()

    def __call__(self, block) -> None:
        from attnscope.metrics import MetricAccumulator, applicable_metrics, block_metrics

        assert self.layout is not None
        per_head, per_block = block_metrics(
            block.attn, self.layout, block.x, block.y, workspace=self.workspace
        )
        if self.accumulator is None:
            heads, blocks = applicable_metrics(self.layout, residual=self.residual)
            self.accumulator = MetricAccumulator(
                self.name, self.num_blocks, block.attn.shape[1], heads, blocks if per_block else []
            )
        self.accumulator.update(block.index, per_head, per_block)


def run_statistics(
    loaded: LoadedModel,
    paths: Sequence[Path],
    *,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
    residual: bool = True,
    progress: ProgressFn | None = None,
    on_skip: SkipFn | None = None,
) -> tuple[MetricAccumulator | None, TokenLayout | None, list[int], list[tuple[int, str]]]:
    """Stream `paths` (or the positions `indices` of it) through the model.

    Returns (accumulator, layout, used positions, failures). The accumulator is None when
    no image in this share could be read; callers decide whether that is an error (a
    distributed rank may legitimately own only bad files).
    """
    import torch

    from attnscope.capture import AttentionRecorder
    from attnscope.data import build_eval_transform, make_loader
    from attnscope.models import resolve_device, token_layout

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = loaded.model.to(dev).eval()
    transform, _ = build_eval_transform(model, loaded.input_size)
    loader = make_loader(paths, transform, batch_size, num_workers, indices=indices)
    total = len(indices) if indices is not None else len(paths)
    stats = _StreamingStats(loaded.name, 0, residual)
    used: list[int] = []
    failures: list[tuple[int, str]] = []
    done = 0
    with AttentionRecorder(model, stats, residual=residual) as recorder, torch.inference_mode():
        stats.num_blocks = recorder.num_blocks
        for batch in loader:
            for index, reason in batch.failures:
                failures.append((index, reason))
                if on_skip is not None:
                    on_skip(Path(paths[index]), reason)
            if batch.images is not None:
                images = batch.images.to(dev, non_blocking=True)
                stats.layout = token_layout(model, (images.shape[-2], images.shape[-1]))
                recorder.reset()
                with autocast_context(dev, dtype):
                    try:
                        model.forward_features(images)
                    except AssertionError as exc:  # timm's input-size checks
                        size = f"{images.shape[-2]}x{images.shape[-1]}"
                        raise AttnscopeError(
                            f"{loaded.name} cannot take {size} inputs ({exc}); use --img-size"
                        ) from exc
                recorder.check()
                used.extend(batch.indices)
            done += len(batch.indices) + len(batch.failures)
            if progress is not None:
                progress(done, total)
    return stats.accumulator, stats.layout, used, failures


def run_statistics_all_ranks(
    loaded: LoadedModel,
    paths: Sequence[Path],
    *,
    on_skip: SkipFn | None = None,
    **kwargs: Any,
) -> tuple[MetricAccumulator | None, TokenLayout | None, list[int], list[tuple[int, str]]]:
    """`run_statistics` over all of `paths`, spread over the torchrun ranks if there are any.

    Outside torchrun this is plain `run_statistics`. Under torchrun each rank streams its
    own disjoint shard, then the float64 sums of all ranks are all-reduced, so every rank
    returns the totals a single process would have (and all used/failed positions). On
    rank 0, `on_skip` also hears about the files other ranks could not read.
    """
    from attnscope import distributed

    indices = distributed.shard_positions(len(paths))
    with distributed.step():
        local = run_statistics(loaded, paths, indices=indices, on_skip=on_skip, **kwargs)
    if indices is None:
        return local
    accumulator, layout, used, failures = distributed.reduce_statistics(*local)
    if on_skip is not None and distributed.is_main():
        mine = set(indices)
        for index, reason in failures:
            if index not in mine:
                on_skip(Path(paths[index]), reason)
    return accumulator, layout, used, failures


def analyze(
    model: str | nn.Module | LoadedModel,
    images: Sequence[str | Path] | None = None,
    *,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    img_size: tuple[int, int] | None = None,
    family: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    num_workers: int = 0,
    max_images: int | None = None,
    progress: ProgressFn | None = None,
    on_skip: SkipFn | None = None,
) -> AnalysisResult:
    """Attention statistics of one model over a set of images, as DataFrames.

    The notebook entry point: nothing is written or printed. `images` takes folders,
    files or globs (None: the bundled samples). Returns `layers` and `heads` tables with
    the columns of shared/metrics.md and an `info` dict (what run.json records).
    """
    import torch

    from attnscope import distributed
    from attnscope.data import collect_image_paths

    if batch_size < 1:
        raise AttnscopeError(f"--batch-size must be at least 1, got {batch_size}")
    dev = distributed.setup(device)  # resolve_device, or this rank's device under torchrun
    torch.manual_seed(seed)
    loaded = as_loaded_model(
        model, checkpoint=checkpoint, random_init=random_init, seed=seed, img_size=img_size, family=family
    )
    paths = collect_image_paths(images, max_images=max_images)
    accumulator, layout, used, failures = run_statistics_all_ranks(
        loaded,
        paths,
        batch_size=batch_size,
        device=dev,
        dtype=dtype,
        num_workers=num_workers,
        progress=progress,
        on_skip=on_skip,
    )
    if accumulator is None or layout is None:
        raise AttnscopeError(f"none of the {len(paths)} images could be read")
    layers, heads = accumulator.tables()
    info = build_info(
        loaded, layout, paths, used, failures, device=dev, dtype=dtype, seed=seed, batch_size=batch_size
    )
    return AnalysisResult(layers, heads, info, accumulator)


def build_info(
    loaded: LoadedModel,
    layout: TokenLayout,
    paths: Sequence[Path],
    used: Sequence[int],
    failures: Sequence[tuple[int, str]],
    *,
    device: torch.device,
    dtype: str,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """The provenance block of run.json for one model."""
    info = loaded.provenance()
    info.update(
        {
            "token_layout": layout.as_dict(),
            "num_blocks": len(loaded.model.blocks),
            "images_used": [str(paths[i]) for i in sorted(used)],
            "images_skipped": [{"path": str(paths[i]), "reason": r} for i, r in sorted(failures)],
            "device": str(device),
            "dtype": dtype,
            "seed": seed,
            "batch_size": batch_size,
        }
    )
    return info
