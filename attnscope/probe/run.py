"""The whole probe job: data -> frozen features (cached) -> head bank -> accuracies and maps.

`run_probe` returns data (tables, an info dict for run.json, AbMILP-vs-[cls] maps) and
shows nothing itself; whoever calls it passes `ProbeCallbacks` to see the plan before
extraction starts, the recipe before training, progress and skipped files.
`write_probe_run` writes a finished result through the run folder's `RunWriter`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attnscope.errors import AttnscopeError
from attnscope.models.loading import display_name

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.probe.heads import HeadBank
    from attnscope.probe.train import Recipe

__all__ = ["MapRecord", "ProbeCallbacks", "ProbeConfig", "ProbeResult", "run_probe", "write_probe_run"]

_HOLDOUT_STREAM, _MAPS_STREAM = 31, 32
DEFAULT_AGGREGATORS = ("cls", "mean", "abmilp")


@dataclass
class ProbeConfig:
    """Everything one probe run depends on (stored in run.json)."""

    model: str = "mae"
    checkpoint: Path | None = None
    random_init: bool = False
    data_config: str | None = None  # timm tag or mean=...,std=...; None: the model's own
    seed: int = 0
    img_size: tuple[int, int] | None = None
    model_kwargs: dict[str, Any] | None = None  # e.g. {"depth": 2} for tiny test backbones
    data: str | Path | None = None
    train: Path | None = None
    val: Path | None = None
    csv: Path | None = None
    dataset: str | None = None
    data_root: Path | None = None
    val_fraction: float = 0.2
    holdout_fraction: float = 0.1
    shots: int | None = None
    max_images: int | None = None
    aggregators: Sequence[str] = DEFAULT_AGGREGATORS
    abmilp_depth: int = 1
    recipe: str = "default"
    epochs: int | None = None
    batch_size: int | None = None
    lrs: Sequence[float] | None = None
    wds: Sequence[float] | None = None
    prenorm: bool = False
    cache_dir: Path | None = None
    no_cache: bool = False
    device: str = "auto"
    dtype: str = "float32"
    num_workers: int = 0
    extract_batch_size: int = 64
    map_images: int = 6
    shard_images: int | None = None  # images per cache shard (default: about 512 MiB)

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out


@dataclass
class ProbeCallbacks:
    """Optional hooks; each receives plain data."""

    on_plan: Callable[[dict[str, Any]], None] | None = None  # before extraction (cache sizes ...)
    on_recipe: Callable[[Recipe, dict[str, Any]], None] | None = None  # before training
    progress: Callable[[str, int, int], None] | None = None  # (stage, done, total)
    on_skip: Callable[[Path, str], None] | None = None  # once per unreadable image
    on_note: Callable[[str], None] | None = None


@dataclass
class MapRecord:
    """One evaluation image: a selective head's weights and [cls]'s attention over its patches."""

    item: str
    label: str
    predicted: str
    image: np.ndarray  # (H, W, 3) in [0, 1], as the model saw it
    grid: tuple[int, int]
    aggregator: str
    weights: np.ndarray  # (gh, gw), sums to 1
    cls_attention: np.ndarray | None  # (gh, gw) head mean of the last block, renormalised over patches
    spearman: float


@dataclass
class ProbeResult:
    results: pd.DataFrame
    summary: pd.DataFrame
    info: dict[str, Any]
    maps: list[MapRecord] = field(default_factory=list)
    bank: HeadBank | None = field(default=None, repr=False)


def _ram_budget() -> int:
    """Half of the memory available now (a cache that fits is read into RAM once)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 * 2**30


def _note(cb: ProbeCallbacks, notes: list[str], text: str) -> None:
    notes.append(text)
    if cb.on_note is not None:
        cb.on_note(text)


def run_probe(config: ProbeConfig, callbacks: ProbeCallbacks | None = None) -> ProbeResult | None:
    """Run one probe: which aggregation of frozen tokens classifies best, and what it selects.

    Under torchrun each rank extracts its share of the features into the shared cache,
    rank 0 writes the cache index once all have finished, then trains and returns the
    result alone; the other ranks return None. With `no_cache` under torchrun there is no
    extraction to share: every rank streams its share of every training batch through the
    backbone and the head bank is trained data-parallel (`train_bank(data_parallel=True)`);
    rank 0 returns the result, the other ranks None.
    """
    import torch

    from attnscope import distributed
    from attnscope.config import DTYPES
    from attnscope.models import load_model
    from attnscope.probe import features as feat
    from attnscope.probe.datasets import load_probe_data, stratified_split
    from attnscope.probe.heads import NEEDS_CLS, parse_aggregators
    from attnscope.probe.train import StoreSource, TensorSource, resolve_recipe, select_heads, train_bank

    cb = callbacks or ProbeCallbacks()
    notes: list[str] = []
    aggregators = parse_aggregators(list(config.aggregators))
    if config.dtype not in DTYPES:
        raise AttnscopeError(f"--dtype takes {', '.join(DTYPES)}, got {config.dtype!r}")
    if not 0.0 <= config.holdout_fraction < 1.0:
        raise AttnscopeError(f"--holdout-fraction must be in [0, 1), got {config.holdout_fraction}")
    if config.abmilp_depth < 1:
        raise AttnscopeError(f"--abmilp-depth must be at least 1, got {config.abmilp_depth}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    device = distributed.setup(
        config.device
    )  # torchrun: this rank's device; features are extracted in shares
    main = distributed.is_main()
    # torchrun + --no-cache: no cache to share out, so the ranks share every training batch instead
    data_parallel = config.no_cache and distributed.is_distributed()
    # torchrun: a failure on any rank while loading and planning stops every rank here, with one message
    with distributed.step():
        torch.manual_seed(config.seed)
        loaded = load_model(
            config.model,
            checkpoint=config.checkpoint,
            random_init=config.random_init,
            seed=config.seed,
            img_size=config.img_size,
            model_kwargs=config.model_kwargs,
            data_config=config.data_config,
        )
        extractor = feat.TokenExtractor(loaded, prenorm=config.prenorm, device=device, dtype=config.dtype)
        layout = extractor.layout
        dropped = [a for a in aggregators if a in NEEDS_CLS and not layout.has_cls]
        if dropped:
            aggregators = [a for a in aggregators if a not in dropped]
            _note(
                cb,
                notes,
                f"{loaded.name} has no class token: {', '.join(dropped)} dropped (mean is its linear baseline)",
            )
            if not aggregators:
                raise AttnscopeError(
                    f"no aggregator left for {loaded.name} (no class token); try --aggregator mean,abmilp"
                )
        if config.prenorm and not extractor.has_token_norm:
            _note(cb, notes, f"{loaded.name} has no per-token final norm; --prenorm changes nothing")

        data = load_probe_data(
            data=config.data,
            train=config.train,
            val=config.val,
            csv_file=config.csv,
            dataset=config.dataset,
            data_root=config.data_root,
            input_size=loaded.input_size,
            val_fraction=config.val_fraction,
            shots=config.shots,
            max_images=config.max_images,
            seed=config.seed,
        )
        for n in data.notes:
            _note(cb, notes, n)
        fit_all, hold_all = stratified_split(
            data.train.labels, config.holdout_fraction, config.seed, _HOLDOUT_STREAM
        )
        tokens, dim = extractor.token_shape()
        timings["load"] = time.perf_counter() - t0

        # ---------------------------------------------------------------- features
        splits = {"train": data.train, "eval": data.eval}
        plan: dict[str, Any] = {
            "model": loaded.name,
            "weights": loaded.weights,
            "random_init": loaded.random_init,
            "data": data.summary(),
            "holdout_images": len(hold_all),
            "tokens": tokens,
            "dim": dim,
            "token_layout": layout.as_dict(),
            "norm": extractor.norm_label,
            "bytes_per_image": tokens * dim * 2,
            "cache": None if config.no_cache else {},
        }
        caches: dict[str, feat.FeatureCache] = {}
        if not config.no_cache:
            cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else feat.default_cache_dir()
            to_write = 0
            for name, split in splits.items():
                material = feat.feature_key_material(
                    loaded, transform_config=extractor.transform_config, prenorm=config.prenorm, dtype=config.dtype,
                    seed=config.seed, item_ids=split.source.item_ids(), model_kwargs=config.model_kwargs,
                )  # fmt: skip
                cache = feat.open_cache(
                    cache_dir,
                    f"{loaded.spec.arch}-{name}",
                    material,
                    len(split),
                    tokens,
                    dim,
                    config.shard_images,
                )
                caches[name] = cache
                complete = cache.is_complete()
                pending = 0 if complete else len(cache.pending(range(len(split))))
                to_write += pending * cache.bytes_per_image
                plan["cache"][name] = {
                    "path": str(cache.root),
                    "images": len(split),
                    "bytes": cache.total_bytes(),
                    "bytes_to_write": pending * cache.bytes_per_image,
                    "images_to_extract": pending,
                    "complete": complete,
                }
            plan["cache_dir"] = str(cache_dir)
            plan["bytes_to_write"] = to_write
            plan["disk_free"] = feat.disk_free(cache_dir)
        if cb.on_plan is not None:
            cb.on_plan(plan)
        if not config.no_cache:
            feat.ensure_disk_space(plan["cache_dir"], plan["bytes_to_write"])
    # torchrun: every rank extracts into the same caches and follows rank 0's view of them
    keys = distributed.all_gather({n: c.key for n, c in caches.items()})
    if any(k != keys[0] for k in keys):
        raise distributed.RankFailure(
            "the ranks see different images or settings (feature cache keys differ); the data must be "
            "at the same path on every node",
            [],
        )
    complete = distributed.broadcast_object({n: c.is_complete() for n, c in caches.items()})

    t1 = time.perf_counter()
    sources: dict[str, Any] = {}
    failures: dict[str, dict[int, str]] = {}
    cache_info: dict[str, Any] = {}
    if config.no_cache:
        for name, split in splits.items():
            sources[name] = feat.StreamSource(
                extractor, split.source, batch_size=config.extract_batch_size, num_workers=config.num_workers,
                on_skip=cb.on_skip if main else None,  # torchrun: rank 0 reports the other ranks' skips after training
            )  # fmt: skip
        _note(cb, notes, "--no-cache: features are streamed through the backbone every epoch")
        if data_parallel:
            _note(
                cb, notes, f"torchrun: each of the {distributed.world_size()} ranks streams its share of every batch; "
                "the heads are trained data-parallel (gradients and BatchNorm statistics summed over the ranks)",
            )  # fmt: skip
    else:
        budget = _ram_budget()
        for name, split in splits.items():
            cache = caches[name]
            report = feat.ExtractReport()
            shown: set[int] = set()  # skipped images already reported while extracting
            if not complete[name]:
                share = distributed.shard_positions(len(split))  # torchrun: this rank's share
                with distributed.step():
                    report = feat.extract_shards(
                        extractor, split.source, cache, range(len(split)) if share is None else share,
                        batch_size=config.extract_batch_size, num_workers=config.num_workers,
                        progress=(lambda d, t, n=name: cb.progress(f"features {n}", d, t)) if cb.progress else None,
                        on_skip=cb.on_skip,
                    )  # fmt: skip
                shown = set(report.failures)
                # torchrun: past the step every rank has finished its shards, so the index is complete
                reports = distributed.all_gather(report)
                report = feat.ExtractReport(
                    sum(r.extracted for r in reports), {p: r for x in reports for p, r in x.failures.items()},
                    max(r.seconds for r in reports), sum(r.shards_written for r in reports),
                )  # fmt: skip
                with distributed.step():
                    index = feat.write_cache_index(cache) if main else None
            elif main:
                index = feat.read_cache_index(cache)
            if not main:
                continue
            store = feat.FeatureStore(cache, index)
            if cb.on_skip is not None:
                for pos, reason in sorted(index.failures.items()):
                    if (
                        pos not in shown
                    ):  # a reused cache still lists what it skipped; so do other ranks' shares
                        cb.on_skip(split.source.path(pos), reason)
            failures[name] = dict(index.failures)
            in_ram = cache.total_bytes() <= budget
            budget -= cache.total_bytes() if in_ram else 0  # both splits share the one budget
            sources[name] = (
                TensorSource(torch.from_numpy(store.load_all()), device)
                if in_ram
                else StoreSource(store, device)
            )
            cache_info[name] = {
                "path": str(cache.root),
                "key": cache.key,
                "extracted": report.extracted,
                "reused": len(split) - len(index.failures) - report.extracted,
                "shards_written": report.shards_written,
                "bytes": cache.total_bytes(),
                "read_into_ram": in_ram,
            }
    timings["features"] = time.perf_counter() - t1
    if (
        not main and not data_parallel
    ):  # torchrun: the caches are complete; rank 0 alone trains the heads and writes
        return None

    def valid(name: str, positions: Sequence[int]) -> np.ndarray:
        bad = failures.get(name, {})
        return np.asarray([p for p in positions if int(p) not in bad], dtype=np.int64)

    # data-parallel: every rank plans the same; an error here is the same on all of them, shown once
    with distributed.step() if data_parallel else contextlib.nullcontext():
        fit = valid("train", fit_all)
        hold = valid("train", hold_all)
        ev = valid("eval", range(len(data.eval)))
        if len(ev) == 0:
            raise AttnscopeError("none of the evaluation images could be read")
        if len(hold) == 0 and config.holdout_fraction > 0:
            _note(
                cb,
                notes,
                "the hold-out is empty (too few training images): heads are selected on training accuracy",
            )
        elif 0 < len(hold) < 50:
            _note(cb, notes, f"the hold-out has only {len(hold)} images: hyper-parameter selection is noisy")
        if config.holdout_fraction == 0:
            _note(cb, notes, "--holdout-fraction 0: heads are selected on training accuracy")

        recipe = resolve_recipe(
            config.recipe,
            n_train=len(fit),
            batch_size=config.batch_size,
            epochs=config.epochs,
            lrs=config.lrs,
            wds=config.wds,
        )
        for n in recipe.notes:
            _note(cb, notes, n)
        bank_info = {
            "aggregators": aggregators,
            "heads": len(aggregators) * len(recipe.grid),
            "train_images": len(fit),
            "holdout_images": len(hold),
            "eval_images": len(ev),
            "steps_per_epoch": recipe.steps_per_epoch(len(fit)),
        }
        if data_parallel:
            world = distributed.world_size()
            # the batch (and the lrs the paper recipe scales with it) is global: the sum of the ranks' shares
            bank_info["data_parallel"] = {
                "ranks": world,
                "images_per_rank_per_step": [recipe.batch_size // world, -(-recipe.batch_size // world)],
            }
        if cb.on_recipe is not None:
            cb.on_recipe(recipe, bank_info)

    t2 = time.perf_counter()
    trained = train_bank(
        train_source=sources["train"],
        train_labels=data.train.labels,
        train_positions=fit,
        holdout_positions=hold,
        eval_source=sources["eval"],
        eval_labels=data.eval.labels,
        eval_positions=ev,
        aggregators=aggregators,
        num_classes=data.num_classes,
        dim=dim,
        num_prefix=layout.num_prefix,
        has_cls=layout.has_cls,
        recipe=recipe,
        abmilp_depth=config.abmilp_depth,
        seed=config.seed,
        device=device,
        progress=(lambda e, n, loss: cb.progress("train", e, n)) if cb.progress else None,
        data_parallel=data_parallel,
    )
    timings["train"] = time.perf_counter() - t2
    if config.no_cache:
        own = {name: dict(sources[name].failures) for name in splits}
        # data-parallel: each rank met the unreadable images of its own shares; rank 0 lists them all
        for theirs in distributed.all_gather(own) if data_parallel else [own]:
            for name in splits:
                for pos, reason in sorted(theirs[name].items()):
                    if (
                        main
                        and cb.on_skip is not None
                        and pos not in own[name]
                        and pos not in failures.get(name, {})
                    ):
                        cb.on_skip(splits[name].source.path(pos), reason)
                    failures.setdefault(name, {})[pos] = reason
        failures = {name: dict(sorted(f.items())) for name, f in failures.items()}
    if not main:  # data-parallel: every rank holds the same bank; rank 0 alone reports and writes
        return None
    results, summary = select_heads(trained.results)

    t3 = time.perf_counter()
    maps = _selection_maps(trained.bank, summary, extractor, data, sources["eval"], ev, config, notes, cb)
    timings["maps"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0

    info = loaded.provenance()
    info.update(
        {
            "token_layout": layout.as_dict(),
            "num_blocks": len(loaded.model.blocks),
            "features": {
                "layer": f"last block (blocks.{len(loaded.model.blocks) - 1})",
                "prenorm": config.prenorm,
                "norm": extractor.norm_label,
                "tokens": tokens,
                "dim": dim,
                "transform": {
                    k: (list(v) if isinstance(v, tuple) else v) for k, v in extractor.transform_config.items()
                },
                "forward_dtype": config.dtype,
            },
            "data": data.summary(),
            "splits": {"train": len(fit), "holdout": len(hold), "eval": len(ev)},
            "cache": cache_info or None,
            "recipe": recipe.as_dict(),
            "bank": {**bank_info, "steps": trained.steps, "epoch_losses": trained.losses},
            "bn_stats": "recomputed over the training split after the last step"
            + (" (statistics of each batch summed over the ranks)" if data_parallel else ""),
            "images_skipped": [
                {"split": name, "item": splits[name].source.describe(p), "reason": r}
                for name in splits
                for p, r in sorted(failures.get(name, {}).items())
            ],
            "maps": [
                {"item": m.item, "label": m.label, "aggregator": m.aggregator, "spearman": m.spearman}
                for m in maps
            ],
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "device": str(device),
            "notes": notes,
            **distributed.describe(),
        }
    )
    results.insert(0, "model", loaded.name)
    summary.insert(0, "model", loaded.name)
    return ProbeResult(results, summary, info, maps, trained.bank)


def _selection_maps(bank, summary, extractor, data, eval_source, ev, config, notes, cb) -> list[MapRecord]:
    """For a few evaluation images: the selected selective head's weights beside [cls] attention."""
    import torch
    from scipy.stats import spearmanr

    from attnscope.capture import AttentionRecorder
    from attnscope.probe.heads import SELECTIVE

    if config.map_images <= 0:
        return []
    chosen_agg = next((a for a in SELECTIVE if a in bank.names), None)
    if chosen_agg is None:
        return []
    head = int(summary.loc[summary["aggregator"] == chosen_agg, "head"].iloc[0])
    rng = np.random.default_rng([config.seed, _MAPS_STREAM])
    picks = np.sort(rng.choice(ev, size=min(config.map_images, len(ev)), replace=False))
    layout = extractor.layout
    bank.eval()
    weights: dict[int, np.ndarray] = {}
    preds: dict[int, int] = {}
    with torch.no_grad():
        for tokens, pos in eval_source.iterate(picks, len(picks)):
            w = bank.patch_weights(chosen_agg, tokens)[head].float().cpu().numpy()
            logits = bank(tokens)[chosen_agg][head].argmax(-1).cpu().numpy()
            for i, p in enumerate(pos):
                weights[int(p)] = w[i]
                preds[int(p)] = int(logits[i])

    # The model's own last-block [cls] attention, captured on the same preprocessed images.
    from attnscope.data import collate_images
    from attnscope.probe.features import ProbeImageDataset

    ds = ProbeImageDataset(data.eval.source, extractor.transform)
    batch = collate_images([ds[int(p)] for p in picks if int(p) in weights])
    if batch.images is None:
        return []
    cls_attn: dict[int, np.ndarray] = {}
    if layout.has_cls:
        last = len(extractor.model.blocks) - 1
        grabbed: list[torch.Tensor] = []

        def consumer(block) -> None:
            if block.index == last:
                grabbed.append(block.attn[:, :, 0, layout.patch_slice].float().mean(1).cpu())

        with AttentionRecorder(extractor.model, consumer, residual=False) as rec, torch.inference_mode():
            rec.reset()
            extractor.model.forward_features(batch.images.to(extractor.device))
            rec.check()
        attn = grabbed[-1].numpy()
        for i, p in enumerate(batch.indices):
            a = attn[i]
            cls_attn[int(p)] = a / a.sum() if a.sum() > 0 else a
    else:
        notes.append("maps: the model has no class token, so only the selective weights are shown")

    mean = np.asarray(extractor.transform_config.get("mean", (0.5, 0.5, 0.5)), dtype=np.float32)[
        :, None, None
    ]
    std = np.asarray(extractor.transform_config.get("std", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    gh, gw = layout.grid
    records = []
    for i, p in enumerate(batch.indices):
        img = np.clip(batch.images[i].numpy() * std + mean, 0, 1).transpose(1, 2, 0)
        w = weights[int(p)]
        c = cls_attn.get(int(p))
        rho = float("nan")
        if c is not None and np.ptp(w) > 0 and np.ptp(c) > 0:
            rho = float(spearmanr(w, c).statistic)
        records.append(
            MapRecord(
                item=data.eval.source.describe(int(p)),
                label=data.classes[int(data.eval.labels[p])],
                predicted=data.classes[preds[int(p)]],
                image=img,
                grid=(gh, gw),
                aggregator=chosen_agg,
                weights=w.reshape(gh, gw),
                cls_attention=None if c is None else c.reshape(gh, gw),
                spearman=rho,
            )
        )
    return records


def maps_table(maps: Sequence[MapRecord]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "item": m.item,
                "label": m.label,
                "predicted": m.predicted,
                "aggregator": m.aggregator,
                "spearman_vs_cls_attention": m.spearman,
                "max_weight": float(m.weights.max()),
                "uniform_weight": 1.0 / m.weights.size,
            }
            for m in maps
        ]
    )


def write_probe_run(
    writer: Any, result: ProbeResult, meta: dict[str, Any], formats: Sequence[str] = ("png",)
) -> None:
    """results.csv, summary.csv, maps.csv, figures/, then run.json last (it marks a finished run)."""
    from attnscope.plots.probe import accuracy_by_aggregator, accuracy_by_lr, selection_maps

    writer.write_csv("results.csv", result.results)
    writer.write_csv("summary.csv", result.summary)
    label = display_name(result.info["name"], bool(result.info.get("random_init")))
    num_classes = result.info["data"]["num_classes"]
    writer.write_figure(
        "figures/accuracy_by_aggregator",
        accuracy_by_aggregator(result.results, result.summary, label=label, num_classes=num_classes),
        formats,
    )
    writer.write_figure("figures/accuracy_by_lr", accuracy_by_lr(result.results, label=label), formats)
    if result.maps:
        writer.write_csv("maps.csv", maps_table(result.maps))
        writer.write_figure(
            "figures/selection_vs_cls_attention", selection_maps(result.maps, label=label), formats
        )
    writer.write_json("run.json", meta)
