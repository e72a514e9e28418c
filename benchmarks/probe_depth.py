#!/usr/bin/env python
"""What probing across depth and the learning curves cost.

1. Extraction: `extract_shards` over the built-in digits into fresh caches, once with the
   last block only (`--blocks last`) and once with every block (`--blocks all`, one forward
   filling one cache per block), interleaved round-robin; prints the median seconds of
   each and the ratio all / last. The backbone runs once per image either way: the extra
   cost is copying and writing the other blocks' tokens (and the disk they take).
2. Learning curves (`--curves`): `train_bank` on cached-size random features with the
   per-epoch evaluation of every head on the training images (BatchNorm pass), the
   hold-out and the evaluation split, against the same training without it; prints the
   median seconds and the ratio curves / no curves.
3. The geometry of a ViT-B/16 cache at 224 px (197 tokens x 768, fp16) for one block and
   for all 12, per image and for a few datasets (computed, not measured).

    .venv/bin/python benchmarks/probe_depth.py                  # test_vit, ~2 min on 2 cores
    .venv/bin/python benchmarks/probe_depth.py --model vit_small --img-size 224 --images 128
    .venv/bin/python benchmarks/probe_depth.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attnscope.models import load_model
from attnscope.probe import datasets as ds
from attnscope.probe import features as feat


def extraction_seconds(extractor, source, root: Path, blocks: list[int], batch: int) -> float:
    """Seconds to fill fresh caches of `blocks` for every image of `source`, in one pass."""
    caches = {}
    for b in blocks:
        material = {"benchmark": "probe_depth", "block": b, "n": len(source)}
        caches[b] = feat.open_cache(root, f"b{b}", material, len(source), *extractor.token_shape())
    start = time.perf_counter()
    feat.extract_shards(extractor, source, caches, range(len(source)), batch_size=batch)
    seconds = time.perf_counter() - start
    shutil.rmtree(root)
    return seconds


def extraction_benchmark(args) -> None:
    loaded = load_model(args.model, random_init=True, img_size=(args.img_size, args.img_size))
    data = ds.digits_data((args.img_size, args.img_size), val_fraction=0.2, seed=0)
    keep = ds.stratified_subsample(data.train.labels, min(args.images, len(data.train)), 0)
    source = ds.SubsetSource(data.train.source, keep)
    extractor = feat.TokenExtractor(loaded, blocks="all")
    every, last = extractor.blocks, [extractor.last_block]
    tokens, dim = extractor.token_shape()
    print(f"extraction: {args.model} at {args.img_size} px, {len(source)} digits, {tokens} tokens x {dim}, "
          f"{len(every)} blocks, batch {args.batch}, {torch.get_num_threads()} threads")  # fmt: skip
    extraction_seconds(extractor, source, Path(tempfile.mkdtemp()), last, args.batch)  # warm-up
    times: dict[str, list[float]] = {"last": [], "all": []}
    for _ in range(args.repeats):
        for name, blocks in (("last", last), ("all", every)):
            times[name].append(
                extraction_seconds(extractor, source, Path(tempfile.mkdtemp()), blocks, args.batch)
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["all"], times["last"], strict=True)]
    print(f"  --blocks last: {med['last']:.2f} s   --blocks all: {med['all']:.2f} s   "
          f"({len(source) / med['last']:.0f} vs {len(source) / med['all']:.0f} images/s)")  # fmt: skip
    print(f"RATIO extraction all / last = {statistics.median(ratios):.2f} "
          f"(rounds {min(ratios):.2f}..{max(ratios):.2f}); disk all / last = {len(every)}x")  # fmt: skip


def curves_seconds(curves: bool, n: int, tokens: int, dim: int, epochs: int) -> float:
    from attnscope.probe.train import BankSpec, TensorSource, TrainingData, resolve_recipe, train_bank

    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(n, tokens, dim)).astype(np.float16))
    y = g.integers(0, 10, n)
    fit, hold = np.arange(int(0.9 * n * 0.8)), np.arange(int(0.9 * n * 0.8), int(0.8 * n))
    ev = np.arange(int(0.8 * n), n)
    recipe = resolve_recipe("default", n_train=len(fit), epochs=epochs)
    start = time.perf_counter()
    train_bank(
        TrainingData(TensorSource(x), y, fit, hold, TensorSource(x), y, ev),
        BankSpec(["cls", "mean", "abmilp"], 10, dim, 1, True),
        recipe,
        curves=curves,
    )
    return time.perf_counter() - start


def curves_benchmark(args) -> None:
    n, tokens, dim = (600, 50, 192) if args.quick else (1797, 197, 384)
    epochs = 3 if args.quick else 10
    print(f"learning curves: {n} images (72% fit, 8% hold-out, 20% eval) of {tokens} x {dim} fp16, "
          f"cls, mean, abmilp x 5 lrs x 2 wds, batch 256, {epochs} epochs")  # fmt: skip
    curves_seconds(False, n, tokens, dim, 1)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for curves in (False, True):
            times[curves].append(curves_seconds(curves, n, tokens, dim, epochs))
    ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"  no curves: {off:.2f} s   curves: {on:.2f} s")
    print(f"RATIO training with curves / without = {statistics.median(ratios):.2f} "
          f"(rounds {min(ratios):.2f}..{max(ratios):.2f})")  # fmt: skip


def geometry() -> None:
    tokens, dim, blocks, batch = 197, 768, 12, 64
    per_block = tokens * dim * 2
    fmt = feat.format_bytes
    print(
        f"ViT-B/16 at 224 px: {tokens} tokens x {dim}, fp16: {fmt(per_block)} per image and block, "
        f"{fmt(blocks * per_block)} per image for all {blocks} blocks"
    )
    for name, images in (
        ("CUB-200 (5,994 + 5,794)", 11788),
        ("Oxford pets (3,680 + 3,669)", 7349),
        ("ImageNet-1k train", 1281167),
        ("ImageNet-1k val", 50000),
    ):
        one, every = fmt(images * per_block), fmt(images * per_block * blocks)
        print(f"  {name:28s} last block {one:>10s}   all 12 blocks {every:>10s}")
    captured, single = fmt(batch * blocks * tokens * dim * 4), fmt(batch * tokens * dim * 4)
    print(
        f"  extraction memory, batch {batch}: the 12 captured block outputs take {captured} float32 "
        f"until the forward ends (one block: {single})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="test_vit")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", choices=["extraction", "curves"], action="append", default=[])
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = min(args.images, 128), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry()
    if "extraction" not in args.skip:
        extraction_benchmark(args)
    if "curves" not in args.skip:
        curves_benchmark(args)


if __name__ == "__main__":
    main()
