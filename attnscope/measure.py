"""The one loop: a model and a list of images in, each block's attention to a consumer.

Every job that runs a backbone over images goes through `forwards`: the streaming
statistics (`analyze`, `entropy`, `compare`), the attention maps (`maps`, the compare
gallery, the probe's [cls] maps) and probe feature extraction (`forward_features`).
So the input-size check, reduced-precision autocast and capture handling exist once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from attnscope.config import check_dtype
from attnscope.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnscope.capture import BlockTensors
    from attnscope.data import ImageBatch
    from attnscope.metrics import MetricAccumulator
    from attnscope.models import LoadedModel, TokenLayout

ProgressFn = Callable[[int, int], None]  # (images done, images total)
SkipFn = Callable[[Path, str], None]  # (path, reason), once per unreadable file


class BlockConsumer(Protocol):
    """Receives each block's tensors during a forward; told the token layout before it."""

    def begin(self, layout: TokenLayout) -> None: ...
    def __call__(self, block: BlockTensors) -> None: ...


def autocast_context(device: torch.device, dtype: str) -> Any:
    """Autocast for reduced-precision forwards; metrics are still computed in float32."""
    import torch

    check_dtype(dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def forward_features(
    model: nn.Module, images: torch.Tensor, *, dtype: str, name: str
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`model.forward_features(images)` under autocast, with timm's input-size assertion
    turned into a one-line error. The caller owns `inference_mode`."""
    with autocast_context(images.device, dtype):
        try:
            return cast(Any, model).forward_features(images)
        except AssertionError as exc:  # timm's input-size checks
            size = f"{images.shape[-2]}x{images.shape[-1]}"
            raise ConfigError(
                None, f"{name} cannot take {size} inputs ({exc}); choose another `img_size`"
            ) from exc


def forwards(
    loaded: LoadedModel,
    batches: Any,
    consumer: BlockConsumer,
    *,
    device: torch.device,
    dtype: str = "float32",
    residual: bool = True,
) -> Iterator[tuple[ImageBatch, TokenLayout | None]]:
    """Run `loaded` over each `ImageBatch` of `batches` with every block's attention going
    to `consumer`; yield each batch after its forward with the token layout it had (None
    for a batch in which no image could be read, which is not run)."""
    import torch

    from attnscope.capture import AttentionRecorder
    from attnscope.models import token_layout

    model = loaded.model.to(device).eval()
    with AttentionRecorder(model, consumer, residual=residual) as recorder, torch.inference_mode():
        for batch in batches:
            layout = None
            if batch.images is not None:
                images = batch.images.to(device, non_blocking=True)
                layout = token_layout(model, (images.shape[-2], images.shape[-1]))
                consumer.begin(layout)
                recorder.reset()
                forward_features(model, images, dtype=dtype, name=loaded.name)
                recorder.check()
            yield batch, layout


class StreamingStats:
    """Consumer that reduces each block into a `MetricAccumulator` as soon as it exists."""

    def __init__(self, name: str, num_blocks: int, residual: bool) -> None:
        from attnscope.metrics import Workspace

        self.name = name
        self.num_blocks = num_blocks
        self.residual = residual
        self.layout: TokenLayout | None = None
        self.accumulator: MetricAccumulator | None = None
        self.workspace = Workspace()

    def begin(self, layout: TokenLayout) -> None:
        self.layout = layout

    def __call__(self, block: BlockTensors) -> None:
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


Statistics = tuple["MetricAccumulator | None", "TokenLayout | None", list[int], list[tuple[int, str]]]


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
) -> Statistics:
    """Stream `paths` (or the positions `indices` of it) through the model.

    Returns (accumulator, layout, used positions, failures). The accumulator is None when
    no image in this share could be read; callers decide whether that is an error (a
    distributed rank may legitimately own only bad files).
    """
    import torch

    from attnscope.data import build_eval_transform, make_loader
    from attnscope.models import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    transform, _ = build_eval_transform(loaded.model, loaded.input_size)
    loader = make_loader(paths, transform, batch_size, num_workers, indices=indices)
    total = len(indices) if indices is not None else len(paths)
    stats = StreamingStats(loaded.name, loaded.num_blocks, residual)
    used: list[int] = []
    failures: list[tuple[int, str]] = []
    done = 0
    for batch, _ in forwards(loaded, loader, stats, device=dev, dtype=dtype, residual=residual):
        for index, reason in batch.failures:
            failures.append((index, reason))
            if on_skip is not None:
                on_skip(Path(paths[index]), reason)
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
) -> Statistics:
    """`run_statistics` over all of `paths`, spread over the torchrun ranks if there are any.

    Outside torchrun this is plain `run_statistics`. Under torchrun each rank streams its
    own disjoint shard, then `reduce_statistics` sums the ranks' statistics, so every rank
    returns the totals a single process would have (and all used/failed positions). On
    rank 0, `on_skip` also hears about the files other ranks could not read.
    """
    from attnscope import distributed

    indices = distributed.shard_positions(len(paths))
    with distributed.step():
        local = run_statistics(loaded, paths, indices=indices, on_skip=on_skip, **kwargs)
    if indices is None:
        return local
    accumulator, layout, used, failures = reduce_statistics(*local)
    if on_skip is not None and distributed.is_main():
        mine = set(indices)
        for index, reason in failures:
            if index not in mine:
                on_skip(Path(paths[index]), reason)
    return accumulator, layout, used, failures


def reduce_statistics(
    accumulator: MetricAccumulator | None,
    layout: TokenLayout | None,
    used: Sequence[int],
    failures: Sequence[tuple[int, str]],
) -> Statistics:
    """One rank's statistics -> every rank's together, the same on every rank (a collective).

    The accumulators are summed by `MetricAccumulator.all_reduce` (None when no rank read
    an image, and then the layout is None too); used positions and failures are gathered
    from every rank and sorted. Outside torchrun: the arguments, as lists.
    """
    from attnscope import distributed
    from attnscope.metrics import MetricAccumulator

    if not distributed.is_distributed():
        return accumulator, layout, list(used), list(failures)
    total = MetricAccumulator.all_reduce(accumulator)
    gathered = distributed.all_gather({"layout": layout, "used": list(used), "failures": list(failures)})
    all_used = sorted(i for g in gathered for i in g["used"])
    all_failures = sorted(f for g in gathered for f in g["failures"])
    if total is None:
        return None, None, all_used, all_failures
    layout = next(g["layout"] for g in gathered if g["layout"] is not None)
    return total, layout, all_used, all_failures
