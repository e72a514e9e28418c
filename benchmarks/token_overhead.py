#!/usr/bin/env python
"""What does the token family cost, and does memory stay flat with it on?

For one model (random-init weights, CPU, `torch.set_num_threads(2)`, random input
batches with a fixed seed), seconds per batch of

  (a)  plain `model.forward_features(x)` (timm's default, fused attention),
  (s)  attnscope's streaming statistics with `families=("attention",)`,
  (t)  the same with `families=("attention", "tokens")`,

for ViT-S/16 and ViT-B/16 (the papers' size) by default,

interleaved round-robin, medians reported. The token family's cost is (t) - (s), shown
as a fraction of (a), the forward (target: at most 0.15), and of (s).

Memory: peak RSS growth (VmHWM after resetting it, in a fresh process per figure) of (t)
over 32 and 1024 images, batches of 16, on a small model so the run stays short. The
accumulator keeps each image's value per (block, metric) by design (images.csv); the
growth per extra image is printed next to that footprint: flat means nothing else grows
(no token tensor is kept).

    .venv/bin/python benchmarks/token_overhead.py           # ViT-S and ViT-B 224 px, ~6 min on 2 cores
    .venv/bin/python benchmarks/token_overhead.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import timm
import torch

from attnscope.analysis import as_loaded_model
from attnscope.data import ImageBatch
from attnscope.measure import StreamingStats, forwards


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _stats_pass(loaded, x: torch.Tensor, families: tuple[str, ...], positions: list[int]) -> None:
    stats = StreamingStats(loaded.name, loaded.num_blocks, True, families)
    stats.positions = positions
    batch = ImageBatch(x, positions)
    for _ in forwards(loaded, [batch], stats, device=torch.device("cpu"), tokens="tokens" in families):
        pass


def timing(name: str, img: int, batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img).eval()
    loaded = as_loaded_model(model)
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0))
    pos = list(range(batch))
    runs = {
        "a": lambda: model.forward_features(x),
        "s": lambda: _stats_pass(loaded, x, ("attention",), pos),
        "t": lambda: _stats_pass(loaded, x, ("attention", "tokens"), pos),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_worker(name: str, img: int, images: int, batch: int) -> float:
    """Runs in a fresh process: peak RSS growth (MiB) of the token statistics over `images`."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img).eval()
    loaded = as_loaded_model(model)
    stats = StreamingStats(loaded.name, loaded.num_blocks, True, ("attention", "tokens"))
    gen = torch.Generator().manual_seed(0)

    def batches():
        for start in range(0, images, batch):
            pos = list(range(start, min(images, start + batch)))
            stats.positions = pos
            yield ImageBatch(torch.randn(len(pos), 3, img, img, generator=gen), pos)

    warm = ImageBatch(torch.randn(batch, 3, img, img, generator=gen), list(range(batch)))
    scratch = StreamingStats(loaded.name, loaded.num_blocks, True, ("attention", "tokens"))
    scratch.positions = warm.indices
    for _ in forwards(loaded, [warm], scratch, device=torch.device("cpu"), tokens=True):
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_kib("VmRSS")
    for _ in forwards(loaded, batches(), stats, device=torch.device("cpu"), tokens=True):
        pass
    assert stats.accumulator is not None  # per-image values are kept (a few floats each), not tabled here
    return (_rss_kib("VmHWM") - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.memory_worker:
        name, img, images, batch = args.memory_worker
        print(json.dumps(memory_worker(name, int(img), int(images), int(batch))))
        return
    rounds = 2 if args.quick else 5
    for model in args.models.split(","):
        t = timing(model, 224, 16, rounds)
        tokens = t["t"] - t["s"]
        print(f"{model}, 224 px, batch 16, median of {rounds} rounds (s/batch):")
        print(f"  (a) forward {t['a']:.3f}  (s) attention statistics {t['s']:.3f}  (t) + tokens {t['t']:.3f}")
        verdict = "OK" if tokens / t["a"] <= 0.15 else "OVER"
        print(
            f"  token family cost: {tokens / t['a']:.3f} of the forward ({verdict}, target <= 0.15), "
            f"{tokens / t['s']:.3f} of the attention statistics"
        )
    small, large = (32, 256) if args.quick else (32, 1024)
    mib = {}
    for n in (small, large):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", "vit_tiny_patch16_224", "64", str(n), "16"],
            check=True,
            capture_output=True,
            text=True,
        )
        mib[n] = json.loads(out.stdout.strip().splitlines()[-1])
    per_image_kib = (mib[large] - mib[small]) * 1024 / (large - small)
    # what the accumulator keeps by design: one float64 per (image, block, metric) for images.csv
    from attnscope.metrics import applicable_metrics
    from attnscope.models import TokenLayout

    heads, blocks = applicable_metrics(
        TokenLayout(True, 0, 1, (4, 4), (16, 16)), families=("attention", "tokens")
    )
    kept_kib = 12 * (len(heads) + len(blocks)) * 8 / 1024
    flat = per_image_kib <= 2 * kept_kib
    print(
        f"memory, vit_tiny 64 px, attention + tokens: peak RSS growth {mib[small]:.1f} MiB ({small} images) "
        f"vs {mib[large]:.1f} MiB ({large}): {per_image_kib:.1f} KiB per extra image, against "
        f"{kept_kib:.1f} KiB of per-image values kept by design -> "
        f"{'FLAT apart from the per-image values' if flat else 'GROWS'}"
    )


if __name__ == "__main__":
    main()
