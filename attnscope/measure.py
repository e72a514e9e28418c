"""The one loop: a model and a list of images in, each block's attention to a consumer.

Every job that runs a backbone over images goes through `forwards`: the streaming
statistics (`analyze`, `entropy`, `compare`), the attention maps (`maps`, the compare
gallery, the probe's [cls] maps) and probe feature extraction (`forward_features`).
So the input-size check, reduced-precision autocast and capture handling exist once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from attnscope.config import check_dtype
from attnscope.errors import AttnscopeError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnscope.capture import BlockTensors
    from attnscope.cka import GramCollector
    from attnscope.data import ImageBatch, Images
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
    tokens: bool = False,
) -> Generator[tuple[ImageBatch, TokenLayout | None], None, None]:
    """Run `loaded` over each `ImageBatch` of `batches` with every block's attention going
    to `consumer` (and its output tokens, with `tokens`); yield each batch after its
    forward with the token layout it had (None for a batch in which no image could be
    read, which is not run)."""
    import torch

    from attnscope.capture import AttentionRecorder
    from attnscope.models import token_layout

    model = loaded.model.to(device).eval()
    with (
        AttentionRecorder(model, consumer, residual=residual, tokens=tokens) as recorder,
        torch.inference_mode(),
    ):
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
    """Consumer that reduces each block into a `MetricAccumulator` as soon as it exists.

    `positions` are the list positions of the batch being forwarded (set before each
    forward), under which the accumulator keeps each image's values. A restored
    `accumulator` (a resumed run) is checked once against what this run measures.
    """

    def __init__(
        self, name: str, num_blocks: int, residual: bool, families: tuple[str, ...] = ("attention",)
    ) -> None:
        from attnscope.metrics import Workspace

        self.name = name
        self.num_blocks = num_blocks
        self.residual = residual
        self.families = families
        self.layout: TokenLayout | None = None
        self.accumulator: MetricAccumulator | None = None
        self.positions: Sequence[int] | None = None
        self.workspace = Workspace()
        self.grams: GramCollector | None = None  # each minibatch's CKA Grams, when asked for
        self._checked = False

    def begin(self, layout: TokenLayout) -> None:
        self.layout = layout

    def __call__(self, block: BlockTensors) -> None:
        from attnscope.metrics import MetricAccumulator, applicable_metrics, block_measures

        assert self.layout is not None
        per_head, per_block, profiles = block_measures(
            block.attn,
            self.layout,
            block.x,
            block.y,
            workspace=self.workspace,
            out=block.out,
            families=self.families,
        )
        if self.accumulator is None or not self._checked:
            heads, blocks = applicable_metrics(self.layout, residual=self.residual, families=self.families)
            expected = (self.num_blocks, block.attn.shape[1], heads, blocks if per_block else [])
            if self.accumulator is None:
                self.accumulator = MetricAccumulator(self.name, *expected)
            acc = self.accumulator
            if (acc.num_layers, acc.num_heads, acc.head_metrics, acc.block_metrics) != expected:
                raise AttnscopeError(
                    f"{self.name}: the saved statistics were measured on another model or metric set; "
                    "start the run over"
                )
            self._checked = True
        self.accumulator.update(block.index, per_head, per_block, positions=self.positions, profiles=profiles)
        if self.grams is not None and block.out is not None and self.positions is not None:
            self.grams.add_block(block.index, tuple(int(p) for p in self.positions), block.out, self.layout)


@dataclass
class StreamState:
    """Where a stream over a list of `total` images stands: enough to finish it or resume it.

    Positions are streamed in order, so `done` says which ones went through (the first
    `done` of the list, or of this process's share): `used` were measured, `failures`
    could not be read. Every field changes only at the end of a batch.
    """

    total: int
    done: int = 0
    used: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    accumulator: MetricAccumulator | None = None
    layout: TokenLayout | None = None


@dataclass
class Checkpointing:
    """How a stream commits its state for a later resume.

    `commit(state)` runs at the end of a batch once `every_images` images or
    `every_seconds` seconds have gone by since the last commit, and once more after the
    last batch. `resume`, when given, is the state the stream continues from.
    """

    commit: Callable[[StreamState], None]
    resume: StreamState | None = None
    every_images: int = 64
    every_seconds: float = 30.0


def _tagged(batches: Iterable[ImageBatch], stats: StreamingStats) -> Iterator[ImageBatch]:
    """Tell `stats` each batch's positions before its forward."""
    for batch in batches:
        stats.positions = batch.indices
        yield batch


Statistics = tuple["MetricAccumulator | None", "TokenLayout | None", list[int], list[tuple[int, str]]]


def run_statistics(
    loaded: LoadedModel,
    paths: Images,
    *,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
    residual: bool = True,
    families: tuple[str, ...] = ("attention",),
    grams: GramCollector | None = None,
    progress: ProgressFn | None = None,
    on_skip: SkipFn | None = None,
    checkpointing: Checkpointing | None = None,
) -> Statistics:
    """Stream `paths` (or the positions `indices` of it) through the model.

    Returns (accumulator, layout, used positions, failures). The accumulator is None when
    no image in this share could be read; callers decide whether that is an error (a
    distributed rank may legitimately own only bad files). With `checkpointing`, the state
    is committed as the stream goes and the stream starts where `checkpointing.resume`
    stopped (one process over all of `paths` only).
    """
    import torch

    from attnscope.data import build_eval_transform, make_loader
    from attnscope.models import resolve_device

    if checkpointing is not None and indices is not None:
        raise AttnscopeError("a resumable run streams every image in one process (not a torchrun share)")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    transform, _ = build_eval_transform(loaded.model, loaded.input_size)
    positions = list(indices) if indices is not None else list(range(len(paths)))
    resume = checkpointing.resume if checkpointing is not None else None
    state = resume if resume is not None else StreamState(len(positions))
    if state.total != len(positions) or not 0 <= state.done <= state.total:
        raise AttnscopeError(f"the saved state covers {state.total} images, this run lists {len(positions)}")
    stats = StreamingStats(loaded.name, loaded.num_blocks, residual, families)
    stats.accumulator, stats.layout = state.accumulator, state.layout
    if grams is not None:
        stats.grams = grams
        grams.complete = indices is None and state.done == 0  # a shard or a resumed stream sees a part
    if state.done < state.total:
        subset = indices if state.done == 0 else positions[state.done :]
        loader = make_loader(paths, transform, batch_size, num_workers, indices=subset)
        batches = forwards(
            loaded,
            _tagged(loader, stats),
            stats,
            device=dev,
            dtype=dtype,
            residual=residual,
            tokens="tokens" in families,
        )
        # closed on any exit: a suspended generator would keep inference mode (and the hooks) on
        with contextlib.closing(batches):
            _stream(batches, state, stats, paths, checkpointing, progress, on_skip)
    return state.accumulator, state.layout, state.used, state.failures


def _stream(
    batches: Iterator[tuple[ImageBatch, TokenLayout | None]],
    state: StreamState,
    stats: StreamingStats,
    paths: Images,
    checkpointing: Checkpointing | None,
    progress: ProgressFn | None,
    on_skip: SkipFn | None,
) -> None:
    """Drain `batches` into `state`, committing it when due (and after the last batch)."""
    since, last = 0, time.monotonic()
    for batch, _ in batches:
        for index, reason in batch.failures:
            if on_skip is not None:
                on_skip(Path(paths[index]), reason)
        state.used.extend(batch.indices)
        state.failures.extend(batch.failures)
        state.done += len(batch.indices) + len(batch.failures)
        state.accumulator, state.layout = stats.accumulator, stats.layout
        since += len(batch.indices) + len(batch.failures)
        if progress is not None:
            progress(state.done, state.total)
        if checkpointing is not None and (
            since >= checkpointing.every_images or time.monotonic() - last >= checkpointing.every_seconds
        ):
            checkpointing.commit(state)
            since, last = 0, time.monotonic()
    if checkpointing is not None and since:
        checkpointing.commit(state)


def rank_share(n: int, batch_size: int, grams: GramCollector | None) -> list[int] | None:
    """This rank's positions of a list of `n` images (None outside torchrun).

    Single images strided over the ranks (the most even split), except when collecting
    CKA Grams: their unbiased estimator depends on which images share a minibatch, so the
    ranks then take whole forward batches of the single-process split, and the Grams
    gathered from all ranks are exactly a single process's.
    """
    from attnscope import distributed

    return distributed.shard_positions(n, batch_size if grams is not None else None)


def run_statistics_all_ranks(
    loaded: LoadedModel,
    paths: Images,
    *,
    batch_size: int = 16,
    grams: GramCollector | None = None,
    on_skip: SkipFn | None = None,
    **kwargs: Any,
) -> Statistics:
    """`run_statistics` over all of `paths`, spread over the torchrun ranks if there are any.

    Outside torchrun this is plain `run_statistics`. Under torchrun each rank streams its
    own disjoint shard (`rank_share`), then `reduce_statistics` sums the ranks' statistics,
    so every rank returns the totals a single process would have (and all used/failed
    positions), and `grams` holds every rank's minibatches. On rank 0, `on_skip` also
    hears about the files other ranks could not read.
    """
    from attnscope import distributed

    indices = rank_share(len(paths), batch_size, grams)
    with distributed.step():
        local = run_statistics(
            loaded, paths, indices=indices, batch_size=batch_size, grams=grams, on_skip=on_skip, **kwargs
        )
    if indices is None:
        return local
    accumulator, layout, used, failures = reduce_statistics(*local)
    if grams is not None:
        grams.gather_ranks()
        grams.complete = True  # whole batches, every share streamed from its start (no resume here)
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
