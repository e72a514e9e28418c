"""`probe`: which aggregation of frozen ViT tokens classifies best, and what it selects.

`run(config, ui)` is the whole job, one step after the other: load the model and the
data, plan the feature caches (one per split, probed block and augmented view), extract
(or stream) the features, plan the training, train the head bank on each block in turn
(with learning curves unless told not to), select each block's and aggregator's
hyper-parameters, draw the selection maps, then write the run folder (results.csv,
summary.csv, curves.csv, maps.csv, figures/, run.json last), all on `threads` torch
threads. The science of each step lives in `attnscope.probe`.

What a person sees goes through `ui` (the random-weights banner, extraction progress,
skipped files) and `ProbeHooks` (the plan before extraction, the recipe before training,
training progress, notes); the CLI implements both, the defaults show nothing.

Under torchrun each rank extracts its share of the features into the shared cache, rank 0
writes the cache index once all have finished, then trains and writes alone. Without a
cache (`no_cache`) there is no extraction to share: every rank streams its share of every
training batch through the backbone and the head bank is trained data-parallel
(`train_bank(data_parallel=True)`); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from attnscope.commands.ui import UI, NullUI
from attnscope.config import (
    check_at_least,
    check_choice,
    check_dtype,
    check_fraction,
    config_dict,
    normalise_formats,
    normalise_img_size,
)
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models.loading import display_name, random_weights_warning

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from attnscope.models import LoadedModel
    from attnscope.probe.clusters import EvalEmbedding
    from attnscope.probe.datasets import ImageSource, LabelledSplit, Positions, ProbeData
    from attnscope.probe.features import (
        AugmentedSource,
        CacheIndex,
        ExtractReport,
        FeatureCache,
        FeatureStore,
        StreamSource,
        TokenExtractor,
    )
    from attnscope.probe.heads import HeadBank
    from attnscope.probe.selection import MapRecord
    from attnscope.probe.train import BankResult, FeatureSource, Recipe, ViewSource
    from attnscope.results import RunWriter

__all__ = [
    "BankPlan",
    "CachePlan",
    "FeaturePlan",
    "ProbeConfig",
    "ProbeHooks",
    "ProbeResult",
    "default_threads",
    "run",
    "torch_threads",
]

DEFAULT_AGGREGATORS = ("cls", "mean", "abmilp")
EMBEDDINGS = ("tsne", "pca", "none")  # `embedding`: attnscope.embedding's methods, or none
_HOLDOUT_STREAM = 31  # random stream of the hold-out split
BLOCK_NUMBERING = (
    "counted from 0: block k is the output of timm's blocks[k], the last of L blocks is L - 1 "
    "(as entropy's layer and maps' layer); the paper code's return_block k > 0 is block k"
)


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe run depends on; recorded as run.json's `config`."""

    model: str = "mae_vit_base"  # the paper's model
    checkpoint: Path | None = None
    random_init: bool = False
    data_config: str | None = None  # timm tag or mean=...,std=...; None: the model's own
    seed: int = 0
    img_size: tuple[int, int] | None = None
    position_resize: str = "own"  # 'own': the model's own resize rule at another size; 'timm'
    # e.g. {"depth": 2} for tiny test backbones
    model_kwargs: dict[str, Any] | None = field(default=None, hash=False)
    data: str | Path | None = None  # a folder tree (or a named dataset)
    train: Path | None = None
    val: Path | None = None
    csv: Path | None = None
    dataset: str | None = None
    data_root: Path | None = None
    val_fraction: float = 0.2  # evaluation share when the data has no evaluation split
    holdout_fraction: float = 0.1  # training share held out to select lr / wd
    shots: int | None = None  # training images kept per class
    max_images: int | None = None  # images kept per split (stratified)
    aggregators: tuple[str, ...] = DEFAULT_AGGREGATORS
    abmilp_depth: int = 1
    recipe: str = "default"
    epochs: int | None = None
    warmup_epochs: float | None = None  # None: 10% of the epochs; 10 with the paper recipe
    batch_size: int | None = None  # training: images per optimizer step
    lrs: tuple[float, ...] | None = None
    wds: tuple[float, ...] | None = None
    prenorm: bool = False
    # which blocks' tokens: "last", "all" or numbers counted from 0 (block k = the output of
    # timm's blocks[k]; negative from the end, -1 = last; the paper code's return_block k > 0 is k)
    blocks: str | tuple[int, ...] = "last"
    # learning curves: measure every head after every epoch (curves.csv); None: on unless `no_cache`
    curves: bool | None = None
    augment: int = 0  # augmented views cached per training image (one per image shown each epoch)
    cache_dir: Path | None = None
    no_cache: bool = False
    device: str = "auto"
    dtype: str = "float32"
    num_workers: int = 0
    extract_batch_size: int = 64  # images per backbone forward
    map_images: int = 6
    # the 2-D embedding of the deepest probed block's [cls] and mean-patch features: tsne, pca or none
    embedding: str = "tsne"
    shard_images: int | None = None  # images per cache shard (default: about 512 MiB)
    threads: int | None = None  # torch threads for extraction and training; None: `default_threads()`
    formats: tuple[str, ...] = ("png",)
    out: Path | None = field(default=None, compare=False)
    overwrite: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        from attnscope.probe.features import normalise_blocks
        from attnscope.probe.heads import parse_aggregators
        from attnscope.probe.train import RECIPES, grid_values

        object.__setattr__(self, "img_size", normalise_img_size(self.img_size))
        check_fraction("val_fraction", self.val_fraction)
        check_fraction("holdout_fraction", self.holdout_fraction)
        for name, low in _AT_LEAST.items():
            check_at_least(name, getattr(self, name), low)
        check_choice("recipe", self.recipe, RECIPES)
        check_choice("embedding", self.embedding, EMBEDDINGS)
        check_dtype(self.dtype)
        grid_values("lrs", self.lrs, positive=True)
        grid_values("wds", self.wds)
        set_ = object.__setattr__  # frozen: normalise in place once, here
        set_(self, "aggregators", tuple(parse_aggregators(self.aggregators)))
        set_(self, "img_size", tuple(self.img_size) if self.img_size is not None else None)
        set_(self, "lrs", tuple(self.lrs) if self.lrs is not None else None)
        set_(self, "wds", tuple(self.wds) if self.wds is not None else None)
        set_(self, "formats", normalise_formats(self.formats))
        set_(self, "blocks", normalise_blocks(self.blocks))
        if self.augment and self.no_cache:
            raise ConfigError("augment", "caches its views; it cannot go with `no_cache`")

    def as_dict(self) -> dict[str, Any]:
        return {"command": "probe", **config_dict(self, skip=("out", "overwrite"))}


_AT_LEAST = {
    "shots": 1,
    "max_images": 1,
    "abmilp_depth": 1,
    "epochs": 1,
    "batch_size": 2,
    "extract_batch_size": 1,
    "num_workers": 0,
    "map_images": 0,
    "shard_images": 1,
    "threads": 1,
    "augment": 0,
}


# --------------------------------------------------------------------------- what is shown


@dataclass(frozen=True)
class CachePlan:
    """The feature cache of a run, before extraction."""

    folder: Path
    bytes_total: int  # both splits, every block, fp16
    bytes_per_image: int  # one block
    bytes_to_write: int  # what is not cached yet
    disk_free: int
    blocks: int = 1  # one cache per block and split


@dataclass(frozen=True)
class FeaturePlan:
    """What the features will be, shown before extraction starts."""

    model: str
    data: dict[str, Any]  # `ProbeData.summary()`
    holdout_images: int
    tokens: int
    dim: int
    token_layout: dict[str, Any]
    norm: str  # of the last block's tokens; every other block's are its raw output
    cache: CachePlan | None  # None: not cached, streamed through the backbone every epoch
    blocks: list[int] = field(default_factory=list)  # counted from 0
    num_blocks: int = 0
    threads: int = 0  # torch threads of extraction and training


@dataclass(frozen=True)
class BankPlan:
    """The head bank about to be trained; run.json's `bank` (with the steps and losses)."""

    aggregators: list[str]
    heads: int
    train_images: int
    holdout_images: int
    eval_images: int
    steps_per_epoch: int
    # data-parallel: {"ranks", "images_per_rank_per_step": [fewest, most]}; the batch is global
    data_parallel: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.data_parallel is None:
            del out["data_parallel"]
        return out


class ProbeHooks:
    """Probe events the generic `UI` has no method for. These do nothing; the CLI overrides them."""

    def plan(self, plan: FeaturePlan) -> None:
        """Before extraction (and before the disk-space check)."""

    def recipe(self, recipe: Recipe, bank: BankPlan) -> None:
        """Before training."""

    def epoch(self, done: int, total: int) -> None:
        """After each training epoch."""

    def note(self, text: str) -> None:
        """A remark, also kept in run.json's notes; config fields are named in backquotes."""


@dataclass
class ProbeResult:
    """What `run` returns on rank 0: the tables it wrote, run.json's model entry, the maps."""

    results: pd.DataFrame  # every head
    summary: pd.DataFrame  # the selected head per aggregator
    info: dict[str, Any]  # run.json's entry for the model
    maps: list[MapRecord] = field(default_factory=list)
    bank: HeadBank | None = field(default=None, repr=False)
    curves: pd.DataFrame | None = None  # every head after every epoch (with `curves`)
    embedding: EvalEmbedding | None = None  # the deepest block's [cls] / mean-patch embedding


# --------------------------------------------------------------------------- the job


def run(
    config: ProbeConfig, ui: UI | None = None, *, hooks: ProbeHooks | None = None, command: str = ""
) -> tuple[Path, ProbeResult | None]:
    """Probe one model and write its run folder; returns the folder and the result (None
    on the torchrun ranks other than 0)."""
    from attnscope import distributed
    from attnscope.models.source import short_name
    from attnscope.results import RunWriter, default_run_dir, run_metadata

    device = distributed.setup(config.device)
    main = distributed.is_main()
    writer = None
    with distributed.step():
        if main:  # refuse a bad `out` before any work
            writer = RunWriter(
                config.out or default_run_dir(f"probe-{short_name(config.model)}"),
                overwrite=config.overwrite,
            )
    out_dir = distributed.broadcast_object(writer.out_dir if writer is not None else None)
    ctx = _Context(
        config, (ui or NullUI()) if main else NullUI(), (hooks or ProbeHooks()) if main else ProbeHooks(),
        device, main, data_parallel=config.no_cache and distributed.is_distributed(),
    )  # fmt: skip
    with torch_threads(config.threads or default_threads()[0]):
        result = _probe(ctx)
    if result is None or writer is None:
        return out_dir, None
    meta = run_metadata(command, config.as_dict(), {config.model: result.info}, config.seed)
    write_probe_run(writer, result, meta, config.formats)
    return writer.out_dir, result


def default_threads() -> tuple[int, str]:
    """(threads, why): the CPUs this process may run on (its affinity, not the machine's
    count: a batch job or `taskset` gets what it was given), shared among the processes of
    this node under torchrun (LOCAL_WORLD_SIZE)."""
    try:
        cpus = len(os.sched_getaffinity(0))
        where = "CPUs in this process's affinity"
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus, where = os.cpu_count() or 1, "CPUs"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = max(1, cpus // local)
    why = f"{cpus} {where}" + (f" / {local} processes on this node" if local > 1 else "")
    return threads, why


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads set to `threads` for the block, the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Context:
    """What every step of one run shares."""

    config: ProbeConfig
    ui: UI
    hooks: ProbeHooks
    device: torch.device
    main: bool  # rank 0 (or the only process): reports, trains (with a cache) and writes
    data_parallel: bool  # torchrun without a cache: every rank trains on its share of each batch
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.hooks.note(text)


@dataclass
class _Setup:
    """The loaded model and data."""

    loaded: LoadedModel
    extractor: TokenExtractor
    data: ProbeData
    aggregators: list[str]  # those this model can take
    fit_all: np.ndarray  # training positions used to fit the heads ...
    hold_all: np.ndarray  # ... and held out to select them (before unreadable images are dropped)
    tokens: int
    dim: int
    views: list[AugmentedSource] = field(default_factory=list)  # `augment`: the training split's views

    @property
    def splits(self) -> dict[str, LabelledSplit]:
        return {"train": self.data.train, "eval": self.data.eval}

    def parts(self) -> dict[str, tuple[ImageSource, dict[str, Any] | None]]:
        """What is cached, by cache name: each split's images, then each augmented view of the
        training split (with what identifies the view in a cache key)."""
        parts: dict[str, tuple[ImageSource, dict[str, Any] | None]] = {
            name: (split.source, None) for name, split in self.splits.items()
        }
        for view in self.views:
            parts[f"train-view{view.view}"] = (view, view.key())
        return parts

    @property
    def blocks(self) -> list[int]:
        """The probed blocks, counted from 0 and ascending."""
        return self.extractor.blocks


@dataclass
class _Features:
    """Where the heads read their features from, and which images could not be read.

    `sources` are those of block `block`, the one being trained (the deepest once training
    is over); `_use_block` swaps them, so one block's features are in memory at a time."""

    sources: dict[str, FeatureSource]
    failures: dict[str, dict[int, str]] = field(default_factory=dict)
    cache_info: dict[str, Any] = field(default_factory=dict)
    stores: dict[int, dict[str, FeatureStore]] | None = None  # each block's caches; None: streamed
    block: int | None = None
    views: ViewSource | None = None  # `augment`: the training split's views of block `block`


@dataclass
class _Training:
    """The planned training: the readable positions of each part, the recipe, the bank."""

    fit: np.ndarray
    hold: np.ndarray
    eval: np.ndarray
    recipe: Recipe
    bank: BankPlan


def _probe(ctx: _Context) -> ProbeResult | None:
    """The steps of one run; None on a rank other than 0."""
    from attnscope import distributed
    from attnscope.probe import features as feat

    config, t0 = ctx.config, time.perf_counter()
    if config.random_init:
        ctx.ui.banner(random_weights_warning(config.model, config.seed, "accuracies"))
    # torchrun: a failure on any rank while loading and planning stops every rank here, with one message
    with distributed.step():
        setup = _load(ctx)
        ctx.timings["load"] = time.perf_counter() - t0
        caches, plan = _plan_features(ctx, setup)
        ctx.hooks.plan(plan)
        if plan.cache is not None:
            feat.ensure_disk_space(plan.cache.folder, plan.cache.bytes_to_write)
    t1 = time.perf_counter()
    features = _streamed_features(ctx, setup) if config.no_cache else _cached_features(ctx, setup, caches)
    ctx.timings["features"] = time.perf_counter() - t1
    if features is None:  # torchrun: the caches are complete; rank 0 alone trains the heads and writes
        return None
    training = _plan_training(ctx, setup, features)
    t2 = time.perf_counter()
    trained: dict[int, BankResult] = {}
    for i, block in enumerate(setup.blocks):  # the deepest last: its features stay loaded for the maps
        _use_block(ctx, features, setup, block)
        trained[block] = _train(ctx, setup, features, training, i)
    ctx.timings["train"] = time.perf_counter() - t2
    if _curves_on(config):  # part of `train`
        ctx.timings["curves"] = sum(t.curve_seconds for t in trained.values())
    if config.no_cache:
        features.failures = _stream_failures(ctx, setup, features)
    if not ctx.main:  # data-parallel: every rank holds the same bank; rank 0 alone reports and writes
        return None
    return _report(ctx, setup, features, training, trained, t0)


def _load(ctx: _Context) -> _Setup:
    """The model (frozen, with its token extractor), the aggregators it can take, the data and
    the hold-out split."""
    import torch

    from attnscope.models import load_model
    from attnscope.probe import features as feat
    from attnscope.probe.datasets import load_probe_data, stratified_split

    config = ctx.config
    torch.manual_seed(config.seed)
    loaded = load_model(
        config.model, checkpoint=config.checkpoint, random_init=config.random_init, seed=config.seed,
        img_size=config.img_size, model_kwargs=config.model_kwargs, data_config=config.data_config,
        position_resize=config.position_resize,
    )  # fmt: skip
    for notice in loaded.notices:  # e.g. which preprocessing a bare checkpoint was given
        ctx.note(notice)
    extractor = feat.TokenExtractor(
        loaded, prenorm=config.prenorm, device=ctx.device, dtype=config.dtype, blocks=config.blocks
    )
    aggregators = _usable_aggregators(ctx, loaded.name, extractor.layout.has_cls)
    if config.prenorm and not extractor.has_token_norm:
        ctx.note(f"{loaded.name} has no per-token final norm; `prenorm` changes nothing")
    data = load_probe_data(
        data=config.data, train=config.train, val=config.val, csv_file=config.csv, dataset=config.dataset,
        data_root=config.data_root, input_size=loaded.input_size, val_fraction=config.val_fraction,
        shots=config.shots, max_images=config.max_images, seed=config.seed,
    )  # fmt: skip
    for text in data.notes:
        ctx.note(text)
    fit_all, hold_all = stratified_split(
        data.train.labels, config.holdout_fraction, config.seed, _HOLDOUT_STREAM
    )
    tokens, dim = extractor.token_shape()
    views = [
        feat.AugmentedSource(data.train.source, v, config.seed, loaded.input_size)
        for v in range(config.augment)
    ]
    if views:
        ctx.note(
            f"`augment`: {len(views)} augmented views of each training image are cached (RandomResizedCrop + "
            "flip, seeded per image and view); each epoch shows one per image; the hold-out, the BatchNorm "
            "statistics and every measurement use the images as they are"
        )
    return _Setup(loaded, extractor, data, aggregators, fit_all, hold_all, tokens, dim, views)


def _usable_aggregators(ctx: _Context, model: str, has_cls: bool) -> list[str]:
    """The configured aggregators without those that need a class token the model lacks."""
    from attnscope.probe.heads import aggregator_class

    wanted = list(ctx.config.aggregators)
    dropped = [a for a in wanted if aggregator_class(a).needs_cls and not has_cls]
    if not dropped:
        return wanted
    ctx.note(f"{model} has no class token: {', '.join(dropped)} dropped (mean is its linear baseline)")
    kept = [a for a in wanted if a not in dropped]
    if not kept:
        raise ConfigError(
            "aggregators", f"leave nothing {model} can use (it has no class token); try mean,abmilp"
        )
    return kept


def _plan_features(ctx: _Context, setup: _Setup) -> tuple[dict[str, dict[int, FeatureCache]], FeaturePlan]:
    """Open (or find) the feature cache of each split and block, keyed by everything that
    changes its tokens, and say how much of it is still to extract."""
    import torch

    from attnscope.probe import features as feat

    config, loaded, extractor = ctx.config, setup.loaded, setup.extractor
    caches: dict[str, dict[int, FeatureCache]] = {}
    cache_plan = None
    if not config.no_cache:
        cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else feat.default_cache_dir()
        to_write = 0
        for name, (source, augment) in setup.parts().items():
            caches[name] = {}
            for block in setup.blocks:
                material = feat.feature_key_material(
                    loaded, transform_config=extractor.transform_config, prenorm=config.prenorm,
                    dtype=config.dtype, seed=config.seed, item_ids=source.item_ids(),
                    model_kwargs=config.model_kwargs, block=block, num_blocks=extractor.num_blocks,
                    augment=augment,
                )  # fmt: skip
                # the last block's folder keeps the name it had before blocks could be chosen;
                # another block's folder carries its number, counted from 0 (the folders of
                # versions that counted from 1 carry other numbers and are never found)
                label = f"{loaded.spec.arch}-{name}"
                if block != extractor.last_block:
                    label = f"{loaded.spec.arch}-b{block}-{name}"
                cache = feat.open_cache(
                    cache_dir, label, material, len(source), setup.tokens, setup.dim, config.shard_images
                )
                caches[name][block] = cache
                if not cache.is_complete():
                    to_write += len(cache.pending(range(len(source)))) * cache.bytes_per_image
        cache_plan = CachePlan(
            cache_dir, sum(c.total_bytes() for cs in caches.values() for c in cs.values()),
            setup.tokens * setup.dim * 2, to_write, feat.disk_free(cache_dir), len(setup.blocks),
        )  # fmt: skip
    plan = FeaturePlan(
        loaded.name, setup.data.summary(), len(setup.hold_all), setup.tokens, setup.dim,
        extractor.layout.as_dict(), extractor.norm_label, cache_plan, list(setup.blocks),
        extractor.num_blocks, torch.get_num_threads(),
    )  # fmt: skip
    return caches, plan


def _streamed_features(ctx: _Context, setup: _Setup) -> _Features:
    """No cache: the heads read tokens computed on the fly, every epoch."""
    from attnscope import distributed
    from attnscope.probe.features import StreamSource

    config = ctx.config
    sources: dict[str, FeatureSource] = {}
    for name, split in setup.splits.items():
        # torchrun: each rank reports the skips it meets (only rank 0 shows them), and rank 0 the
        # other ranks' after training (`_stream_failures`)
        sources[name] = StreamSource(
            setup.extractor, split.source, batch_size=config.extract_batch_size,
            num_workers=config.num_workers, on_skip=ctx.ui.skip,
        )  # fmt: skip
    ctx.note("`no_cache`: features are streamed through the backbone every epoch")
    if len(setup.blocks) > 1:
        ctx.note(f"`no_cache`: the backbone is streamed again for each of the {len(setup.blocks)} blocks")
    if ctx.data_parallel:
        ctx.note(
            f"torchrun: each of the {distributed.world_size()} ranks streams its share of every batch; "
            "the heads are trained data-parallel (gradients and BatchNorm statistics summed over the ranks)"
        )
    return _Features(sources, block=setup.blocks[-1])


def _cached_features(
    ctx: _Context, setup: _Setup, caches: dict[str, dict[int, FeatureCache]]
) -> _Features | None:
    """Extract what the caches lack (each torchrun rank its share; one forward fills every
    block's cache), then open them for reading. None on a rank other than 0, which has
    nothing left to do."""
    from attnscope import distributed
    from attnscope.probe import features as feat

    # torchrun: every rank extracts into the same caches and follows rank 0's view of them
    keys = distributed.all_gather({n: [c.key for c in cs.values()] for n, cs in caches.items()})
    if any(k != keys[0] for k in keys):
        raise distributed.RankFailure(
            "the ranks see different images or settings (feature cache keys differ); the data must be "
            "at the same path on every node",
            [],
        )
    complete = distributed.broadcast_object(
        {n: [b for b, c in cs.items() if c.is_complete()] for n, cs in caches.items()}
    )
    features = _Features({}, stores={b: {} for b in setup.blocks})
    for name, (source, augment) in setup.parts().items():
        todo = {b: c for b, c in caches[name].items() if b not in complete[name]}
        report, shown = feat.ExtractReport(), set[int]()  # shown: skipped positions reported while extracting
        indices: dict[int, CacheIndex] | None = {}
        if todo:
            indices, report, shown = _extract(ctx, setup, name, todo)
        if indices is None or not ctx.main:  # not rank 0
            continue
        for block, cache in caches[name].items():
            if block not in indices:
                indices[block] = feat.read_cache_index(cache)
        failures = dict(indices[setup.blocks[-1]].failures)
        for index in indices.values():  # the same images fail in every block; a cache may have been resumed
            failures.update({p: r for p, r in index.failures.items() if p not in failures})
        for block in setup.blocks:
            assert features.stores is not None
            features.stores[block][name] = feat.FeatureStore(caches[name][block], indices[block])
        features.cache_info[name] = _cache_info(caches[name], report, len(source) - len(failures))
        if augment is not None:  # a view fails where its image does, which the train split reports
            continue
        for pos, reason in sorted(failures.items()):
            if pos not in shown:  # a reused cache still lists what it skipped; so do other ranks' shares
                ctx.ui.skip(source.path(pos), reason)
        features.failures[name] = failures
    return features if ctx.main else None


def _cache_info(caches: dict[int, FeatureCache], report: ExtractReport, readable: int) -> dict[str, Any]:
    """run.json's entry for one split's caches (`read_into_ram` is set when a block is loaded)."""
    counts = {"extracted": report.extracted, "reused": readable - report.extracted}
    if len(caches) == 1:
        cache = next(iter(caches.values()))
        return {
            "path": str(cache.root), "key": cache.key, **counts, "shards_written": report.shards_written,
            "bytes": cache.total_bytes(), "read_into_ram": False,
        }  # fmt: skip
    blocks = {
        str(b): {
            "path": str(c.root),
            "key": c.key,
            "written": report.rows.get(b, 0),
            "bytes": c.total_bytes(),
            "read_into_ram": False,
        }  # fmt: skip
        for b, c in caches.items()
    }
    total = sum(c.total_bytes() for c in caches.values())
    return {**counts, "shards_written": report.shards_written, "bytes": total, "blocks": blocks}


def _use_block(ctx: _Context, features: _Features, setup: _Setup, block: int) -> None:
    """Point `features.sources` at block `block`: its caches read into RAM while half the
    available memory holds them (memory-mapped beyond), or streams of its tokens."""
    import torch

    from attnscope.probe.features import StreamSource
    from attnscope.probe.train import StoreSource, TensorSource

    if features.block == block:
        return
    if features.stores is None:
        streams: dict[str, FeatureSource] = {}
        for name, old in features.sources.items():
            old = cast("StreamSource", old)
            new = StreamSource(
                setup.extractor, old.source, batch_size=old.batch_size, num_workers=old.num_workers,
                on_skip=old.on_skip, block=block,
            )  # fmt: skip
            new.failures = old.failures  # shared: an unreadable image is reported once
            streams[name] = new
        features.sources, features.block = streams, block
        return
    from attnscope.probe.features import StackedStore
    from attnscope.probe.train import ViewSource

    features.sources, features.views = {}, None  # the previous block's tensors go before the next's come
    budget = _ram_budget()
    stores = features.stores[block]
    views = [name for name in stores if name.startswith("train-view")]
    for name, store in stores.items():
        if name in views:
            continue
        size = store.cache.total_bytes()
        in_ram = size <= budget
        budget -= size if in_ram else 0  # both splits share the one budget
        features.sources[name] = (
            TensorSource(torch.from_numpy(store.load_all()), ctx.device)
            if in_ram
            else StoreSource(store, ctx.device)
        )
        _cache_entry(features, name, block)["read_into_ram"] = in_ram
    if views:  # then the augmented views, all of them or none in RAM
        stacked = StackedStore([stores[name] for name in views])
        in_ram = sum(stores[name].cache.total_bytes() for name in views) <= budget
        inner = TensorSource(torch.from_numpy(stacked.load_all()), ctx.device) if in_ram else None
        features.views = ViewSource(
            inner or StoreSource(stacked, ctx.device), stacked.n, len(views), ctx.config.seed
        )
        for name in views:
            _cache_entry(features, name, block)["read_into_ram"] = in_ram
    features.block = block


def _cache_entry(features: _Features, name: str, block: int) -> dict[str, Any]:
    """run.json's cache entry of one block of cache `name`."""
    entry = features.cache_info[name]
    return entry["blocks"][str(block)] if "blocks" in entry else entry


def _extract(
    ctx: _Context, setup: _Setup, name: str, caches: dict[int, FeatureCache]
) -> tuple[dict[int, CacheIndex] | None, ExtractReport, set[int]]:
    """Extract this rank's share of split `name` (all of it outside torchrun) into the
    `caches` (one per block; one forward serves them all); rank 0 then writes their
    indexes. Returns (indexes or None, every rank's report summed, the skipped positions
    this rank already reported)."""
    from attnscope import distributed
    from attnscope.probe import features as feat

    config, (source, augment) = ctx.config, setup.parts()[name]
    transform = feat.augment_transform(setup.extractor.transform_config) if augment is not None else None
    share = distributed.shard_positions(len(source))  # torchrun: this rank's share
    positions = range(len(source)) if share is None else share
    pending = any(c.pending(positions) for c in caches.values())
    with distributed.step():
        with _progress(ctx.ui, f"features {name}", pending) as progress:
            report = feat.extract_shards(
                setup.extractor, source, caches, positions, batch_size=config.extract_batch_size,
                num_workers=config.num_workers, progress=progress, on_skip=None if augment else ctx.ui.skip,
                transform=transform,
            )  # fmt: skip
    shown = set(report.failures)
    # torchrun: past the step every rank has finished its shards, so the index is complete
    reports = distributed.all_gather(report)
    report = feat.ExtractReport(
        sum(r.extracted for r in reports), {p: r for x in reports for p, r in x.failures.items()},
        max(r.seconds for r in reports), sum(r.shards_written for r in reports),
        {b: sum(r.rows.get(b, 0) for r in reports) for b in caches},
    )  # fmt: skip
    with distributed.step():
        indices = {b: feat.write_cache_index(c) for b, c in caches.items()} if ctx.main else None
    return indices, report, shown


@contextlib.contextmanager
def _progress(ui: UI, label: str, show: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A `(done, total)` callback driving a progress bar labelled `label` (None when not `show`)."""
    if not show:
        yield None
        return
    with ui.progress(label) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _plan_training(ctx: _Context, setup: _Setup, features: _Features) -> _Training:
    """The readable images of each part, the recipe (shown before training) and the bank."""
    import numpy as np

    from attnscope import distributed
    from attnscope.probe.train import resolve_recipe

    config = ctx.config

    def readable(name: str, positions: Positions) -> np.ndarray:
        bad = features.failures.get(name, {})
        return np.asarray([p for p in positions if int(p) not in bad], dtype=np.int64)

    # data-parallel: every rank plans the same; an error here is the same on all of them, shown once
    with distributed.step() if ctx.data_parallel else contextlib.nullcontext():
        fit, hold = readable("train", setup.fit_all), readable("train", setup.hold_all)
        ev = readable("eval", range(len(setup.data.eval)))
        if len(ev) == 0:
            raise AttnscopeError("none of the evaluation images could be read")
        if len(hold) == 0 and config.holdout_fraction > 0:
            ctx.note(
                "the hold-out is empty (too few training images): heads are selected on training accuracy"
            )
        elif 0 < len(hold) < 50:
            ctx.note(f"the hold-out has only {len(hold)} images: hyper-parameter selection is noisy")
        if config.holdout_fraction == 0:
            ctx.note("`holdout_fraction` 0: heads are selected on training accuracy")
        recipe = resolve_recipe(
            config.recipe, n_train=len(fit), batch_size=config.batch_size, epochs=config.epochs,
            lrs=config.lrs, wds=config.wds, warmup_epochs=config.warmup_epochs,
        )  # fmt: skip
        for text in recipe.notes:
            ctx.note(text)
        parallel = None
        if ctx.data_parallel:
            world = distributed.world_size()
            # the batch (and the lrs the paper recipe scales with it) is global: the sum of the ranks' shares
            share = [recipe.batch_size // world, -(-recipe.batch_size // world)]
            parallel = {"ranks": world, "images_per_rank_per_step": share}
        bank = BankPlan(
            setup.aggregators, len(setup.aggregators) * len(recipe.grid), len(fit), len(hold), len(ev),
            recipe.steps_per_epoch(len(fit)), parallel,
        )  # fmt: skip
        ctx.hooks.recipe(recipe, bank)
    return _Training(fit, hold, ev, recipe, bank)


def _train(ctx: _Context, setup: _Setup, features: _Features, training: _Training, index: int) -> BankResult:
    """Train the bank on the features of `features.block`, the `index`-th probed block."""
    from attnscope.probe.train import BankSpec, TrainingData, train_bank

    data, layout, blocks = setup.data, setup.extractor.layout, len(setup.blocks)
    return train_bank(
        TrainingData(
            features.sources["train"], data.train.labels, training.fit, training.hold,
            features.sources["eval"], data.eval.labels, training.eval, features.views,
        ),
        BankSpec(setup.aggregators, data.num_classes, setup.dim, layout.num_prefix, layout.has_cls,
                 ctx.config.abmilp_depth, layout.grid),
        training.recipe,
        seed=ctx.config.seed,
        device=ctx.device,
        # one bar over every block's epochs
        progress=lambda done, total, loss: ctx.hooks.epoch(index * total + done, blocks * total),
        data_parallel=ctx.data_parallel,
        curves=_curves_on(ctx.config),
    )  # fmt: skip


def _curves_on(config: ProbeConfig) -> bool:
    """Learning curves unless asked not to; by default not when streaming, where each
    measurement would run the backbone over the hold-out and evaluation images again."""
    return config.curves if config.curves is not None else not config.no_cache


def _stream_failures(ctx: _Context, setup: _Setup, features: _Features) -> dict[str, dict[int, str]]:
    """Every image a streaming source could not read, over all ranks, sorted by position.

    Data-parallel: each rank met the unreadable images of its own shares; rank 0 reports
    those the others met."""
    from attnscope import distributed

    failures = features.failures
    # called with `no_cache` only: every source is a StreamSource
    own = {name: dict(cast("StreamSource", features.sources[name]).failures) for name in setup.splits}
    for theirs in distributed.all_gather(own) if ctx.data_parallel else [own]:
        for name, split in setup.splits.items():
            for pos, reason in sorted(theirs[name].items()):
                if ctx.main and pos not in own[name] and pos not in failures.get(name, {}):
                    ctx.ui.skip(split.source.path(pos), reason)
                failures.setdefault(name, {})[pos] = reason
    return {name: dict(sorted(f.items())) for name, f in failures.items()}


def _report(
    ctx: _Context,
    setup: _Setup,
    features: _Features,
    training: _Training,
    trained: dict[int, BankResult],
    t0: float,
) -> ProbeResult:
    """Each block's and aggregator's selected head, the selection maps (of the deepest block)
    and the provenance for run.json."""
    from attnscope.probe.selection import selection_maps

    results, summary = _select(ctx, setup, trained)
    deepest = setup.blocks[-1]
    t3 = time.perf_counter()
    maps = selection_maps(
        trained[deepest].bank, summary[summary["block"] == deepest], setup.extractor, setup.data.eval,
        setup.data.classes, features.sources["eval"], training.eval, count=ctx.config.map_images,
        seed=ctx.config.seed, block=deepest,
    )  # fmt: skip
    if maps and not setup.extractor.layout.has_cls:
        ctx.notes.append("maps: the model has no class token, so only the selective weights are shown")
    ctx.timings["maps"] = time.perf_counter() - t3
    embedding = _embedding(ctx, setup, features, training)
    ctx.timings["total"] = time.perf_counter() - t0
    info = _provenance(ctx, setup, features, training, trained, maps)
    info["embedding"] = embedding.as_dict() if embedding is not None else None
    curves = _curves(trained)
    tables = (results, summary) + tuple(
        t for t in (curves, getattr(embedding, "table", None)) if t is not None
    )
    for table in tables:
        table.insert(0, "model", setup.loaded.name)
    return ProbeResult(results, summary, info, maps, trained[deepest].bank, curves, embedding)


def _embedding(
    ctx: _Context, setup: _Setup, features: _Features, training: _Training
) -> EvalEmbedding | None:
    """The 2-D embedding of the deepest block's [cls] and mean-patch features of the evaluation
    images (None with `embedding` "none" or fewer than 3 readable images)."""
    import torch

    from attnscope.embedding import sklearn_threads
    from attnscope.probe.clusters import EMBEDDING_POINTS, evaluation_embedding

    config = ctx.config
    if config.embedding == "none":
        return None
    t0 = time.perf_counter()
    if len(training.eval) > EMBEDDING_POINTS:
        ctx.note(
            f"embedding: a seeded random {EMBEDDING_POINTS:,} of the {len(training.eval):,} evaluation "
            "images are embedded and scored"
        )
    # scikit-learn's BLAS gets the run's threads, as torch does; its OpenMP (the t-SNE gradient)
    # one, which costs seconds at the 2,000-image cap and never thrashes on a busy CPU
    with sklearn_threads(blas=torch.get_num_threads()):
        result = evaluation_embedding(
            features.sources["eval"], training.eval, setup.data.eval.labels, setup.data.classes,
            setup.extractor.layout, method=config.embedding, block=setup.blocks[-1],
            num_blocks=setup.extractor.num_blocks, seed=config.seed,
        )  # fmt: skip
    if result is None:
        ctx.note("embedding: fewer than 3 readable evaluation images, none drawn")
    ctx.timings["embedding"] = time.perf_counter() - t0
    return result


def _curves(trained: dict[int, BankResult]) -> pd.DataFrame | None:
    """curves.csv: every block's learning curves, with a `block` column (None without curves)."""
    import pandas as pd

    parts = []
    for block, bank in trained.items():
        if bank.curves is None:
            return None
        parts.append(bank.curves.assign(block=block)[["block", *bank.curves.columns]])
    return pd.concat(parts, ignore_index=True)


def _select(
    ctx: _Context, setup: _Setup, trained: dict[int, BankResult]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every head, the selected head per aggregator), block by block, with a `block` column
    (and the summary a `relative_depth`: block / last block, as spectrum.csv's)."""
    import pandas as pd

    from attnscope.probe.selection import add_best_epochs, grid_edge_notes, select_hyperparameters

    every, chosen = [], []
    for block, bank in trained.items():
        results, summary = select_hyperparameters(bank.results, bank.eval_hits, ctx.config.seed)
        add_best_epochs(summary, bank.curves)
        for text in grid_edge_notes(results, summary):
            ctx.note(f"block {block}: {text}" if len(trained) > 1 else text)
        results.insert(0, "block", block)
        summary.insert(0, "block", block)
        summary.insert(1, "relative_depth", block / max(setup.extractor.last_block, 1))
        every.append(results)
        chosen.append(summary)
    return pd.concat(every, ignore_index=True), pd.concat(chosen, ignore_index=True)


def _provenance(
    ctx: _Context,
    setup: _Setup,
    features: _Features,
    training: _Training,
    trained: dict[int, BankResult],
    maps: list[MapRecord],
) -> dict[str, Any]:
    """run.json's entry for the model: where its features came from and how the heads were trained."""
    from attnscope import distributed

    loaded, extractor = setup.loaded, setup.extractor
    transform = {k: (list(v) if isinstance(v, tuple) else v) for k, v in extractor.transform_config.items()}
    deepest = trained[setup.blocks[-1]]
    info = loaded.provenance()
    info.update(
        {
            "token_layout": extractor.layout.as_dict(),
            "num_blocks": extractor.num_blocks,
            "features": _features_info(ctx, setup, transform),
            "data": setup.data.summary(),
            "splits": {"train": len(training.fit), "holdout": len(training.hold), "eval": len(training.eval)},
            "cache": features.cache_info or None,
            "recipe": training.recipe.as_dict(),
            "bank": {**training.bank.as_dict(), "steps": deepest.steps, "epoch_losses": deepest.losses},
            "bn_stats": "recomputed over the training split after the last step"
            + (" (statistics of each batch summed over the ranks)" if ctx.data_parallel else ""),
            "curves": _curves_info(ctx, trained),
            "augment": {
                "views": len(setup.views),
                "view": setup.views[0].key() | {"view": "0 .. views - 1"},
                "epochs": "each image shows one of its views per epoch, drawn from (seed, epoch)",
                "plain_images": "the hold-out, the BatchNorm statistics and every measurement",
            }
            if setup.views
            else None,
            "images_skipped": [
                {"split": name, "item": split.source.describe(p), "reason": r}
                for name, split in setup.splits.items()
                for p, r in sorted(features.failures.get(name, {}).items())
            ],
            "maps": [
                {"item": m.item, "label": m.label, "aggregator": m.aggregator, "spearman": m.spearman}
                for m in maps
            ],
            "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
            "device": str(ctx.device),
            "threads": _threads_info(ctx.config),
            "notes": ctx.notes,
            **distributed.describe(),
        }
    )
    if len(trained) > 1:
        info["bank"]["epoch_losses_by_block"] = {str(b): t.losses for b, t in trained.items()}
    return info


def _threads_info(config: ProbeConfig) -> dict[str, Any]:
    """run.json's `threads`: how many torch threads extraction and training ran on, and why."""
    import torch

    if config.threads is not None:
        return {"torch": torch.get_num_threads(), "from": "`threads`"}
    _, why = default_threads()
    return {"torch": torch.get_num_threads(), "from": f"default: {why}"}


def _curves_info(ctx: _Context, trained: dict[int, BankResult]) -> dict[str, Any]:
    """run.json's `curves`: whether every head was measured after every epoch, and at what cost."""
    on = _curves_on(ctx.config)
    seconds = sum(t.curve_seconds for t in trained.values())
    training = sum(t.seconds for t in trained.values())
    info: dict[str, Any] = {"measured": on, "default": ctx.config.curves is None}
    if on:
        info.update(
            {
                "splits": "train (the BatchNorm pass's images), holdout, eval (optimistic: an epoch chosen "
                "on it is chosen on the evaluation split)",
                "bn_stats": "recomputed over the training split before each measurement, as after the end",
                "seconds": round(seconds, 3),
                "training_seconds": round(training, 3),
            }
        )
    return info


def _features_info(ctx: _Context, setup: _Setup, transform: dict[str, Any]) -> dict[str, Any]:
    """run.json's `features`: which blocks, which norm, the token geometry and the transform."""
    extractor, blocks, last = setup.extractor, setup.blocks, setup.extractor.last_block
    layer = f"last block ({last}, timm's blocks.{last})"
    if blocks != [last]:
        layer = "blocks " + ", ".join(str(b) for b in blocks) + " (timm's blocks.<k>)"
    info: dict[str, Any] = {
        "layer": layer,
        "prenorm": ctx.config.prenorm,
        "norm": extractor.norm_label,
        "tokens": setup.tokens,
        "dim": setup.dim,
        "transform": transform,
        "forward_dtype": ctx.config.dtype,
        "blocks": list(blocks),
        "block_numbering": BLOCK_NUMBERING,
    }
    if blocks[0] < last:
        info["intermediate_blocks"] = "the block's output, without the final norm (as the paper's code)"
    return info


def _ram_budget() -> int:
    """Half of the memory available now (a cache that fits is read into RAM once)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 * 2**30


def write_probe_run(
    writer: RunWriter, result: ProbeResult, meta: dict[str, Any], formats: Sequence[str] = ("png",)
) -> None:
    """results.csv, summary.csv, curves.csv, maps.csv, embedding.csv, figures/, then run.json
    last (it marks a finished run).

    The aggregator and lr figures show the deepest probed block (the last one by default);
    with several blocks, figures/accuracy_by_depth shows them all."""
    from attnscope.plots.probe import (
        accuracy_by_aggregator,
        accuracy_by_depth,
        accuracy_by_lr,
        embedding,
        learning_curves,
        selection_maps,
    )
    from attnscope.probe.selection import maps_table

    writer.write_csv("results.csv", result.results)
    writer.write_csv("summary.csv", result.summary)
    label = display_name(result.info["name"], bool(result.info.get("random_init")))
    num_classes = result.info["data"]["num_classes"]
    blocks = sorted(set(result.summary["block"]))
    deepest = blocks[-1]
    results = result.results[result.results["block"] == deepest]
    summary = result.summary[result.summary["block"] == deepest]
    last = result.info["num_blocks"] - 1
    shown = label if blocks == [last] else f"{label}, block {deepest}"  # counted from 0
    writer.write_figure(
        "figures/accuracy_by_aggregator",
        accuracy_by_aggregator(results, summary, label=shown, num_classes=num_classes),
        formats,
    )
    writer.write_figure("figures/accuracy_by_lr", accuracy_by_lr(results, label=shown), formats)
    if result.curves is not None:
        writer.write_csv("curves.csv", result.curves)
        writer.write_figure(
            "figures/learning_curves",
            learning_curves(result.curves[result.curves["block"] == deepest], summary, label=shown),
            formats,
        )
    if len(blocks) > 1:
        writer.write_figure(
            "figures/accuracy_by_depth",
            accuracy_by_depth(result.summary, label=label, num_classes=num_classes),
            formats,
        )
    if result.maps:
        writer.write_csv("maps.csv", maps_table(result.maps))
        writer.write_figure(
            "figures/selection_vs_cls_attention", selection_maps(result.maps, label=shown), formats
        )
    if result.embedding is not None:
        writer.write_csv("embedding.csv", result.embedding.table)
        classes = result.info["data"]["classes"]
        writer.write_figure("figures/embedding", embedding(result.embedding, classes, label=label), formats)
    writer.write_json("run.json", meta)
