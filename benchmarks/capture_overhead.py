#!/usr/bin/env python
"""What does attnscope's capture + statistics cost on top of a plain timm forward?

Evidence for the requirement: for vit_small and vit_base at 224 px on CPU, images/s of

  (a)  plain `model.forward_features(x)` with timm's default fused attention,
  (a') the same forward with fused attention switched off and no hooks (what it costs
       just to materialise the attention maps),
  (h)  the forward inside `AttentionRecorder` with a consumer that does nothing (hooks only),
  (b)  attnscope's full statistics: `AttentionRecorder` + the consumer `analysis` uses
       (`StreamingStats`: `block_metrics` + `MetricAccumulator.update` per block),
  (c)  `timm.utils.AttentionExtract(model, method="fx")` returning every block's map (plus
       the block input and attention branch, so the *same* metrics, residual ratios
       included, can be computed), stored for the whole batch, then `block_metrics` +
       `MetricAccumulator.update` on every stored map afterwards,

the ratios b/a and c/a, and peak RSS growth for 32 vs 256 images (vit_small, batches of
16) for the plain forward, attnscope's streaming statistics and (c) keeping the maps of
*all* images before computing metrics. Target: b/a >= 0.95 and flat memory.

Inputs are random tensors (fixed seed) so the comparison isolates model + capture +
metrics; an end-to-end number through `attnscope.measure.run_statistics` on the bundled
sample images (decode + resize included) is printed for context. Each model is timed in a
fresh process; the approaches are interleaved round-robin (a, a', h, b, c, a, a', ...) and
the median is reported, so load from other processes hits all of them alike (the load
average is printed; on a shared 2-core machine, trust a run that started quiet). Kernel
CPU time and minor page faults per batch are printed too: on CPU, torch's allocator does
not cache, so every fresh multi-MB temporary is mmap'd and faulted in page by page, and
that shows up as system time. Each memory figure comes from a fresh process that resets
the kernel's peak-RSS counter (/proc/self/clear_refs) after building the model and reads
`ru_maxrss` at the end.

If b/a misses the target, a torch.profiler breakdown of (b) is printed: where the time
goes (forward vs `block_metrics` vs accumulator) and the ops inside `block_metrics`.

    .venv/bin/python benchmarks/capture_overhead.py            # full run, ~5-10 min on 2 cores
    .venv/bin/python benchmarks/capture_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import timm
import torch
from timm.utils import AttentionExtract

import attnscope
from attnscope.analysis import as_loaded_model
from attnscope.capture import AttentionRecorder
from attnscope.data import bundled_sample_paths
from attnscope.measure import StreamingStats, run_statistics
from attnscope.metrics import MetricAccumulator, Workspace, applicable_metrics, block_metrics
from attnscope.models import token_layout

MODELS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
IMG = 224
SEED = 0
TARGET = 0.95
STORE_CAP_BYTES = 8 * 1024**3  # (c) store-everything: never keep more than this
APPROACHES = ("a", "a_unfused", "hooks", "b", "c")
LABELS = {
    "a": "(a) fused fwd",
    "a_unfused": "(a') unfused fwd",
    "hooks": "(h) hooks only",
    "b": "(b) attnscope",
    "c": "(c) AttnExtract",
}


# --------------------------------------------------------------------------- setup


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(SEED)
    model = timm.create_model(MODELS.get(name, name), pretrained=False, img_size=IMG).eval()
    return model


def set_fused(model: torch.nn.Module, flag: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = flag


def make_batch(batch_size: int, index: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + index)
    return torch.randn(batch_size, 3, IMG, IMG, generator=g)


def new_stats(model: torch.nn.Module, name: str) -> StreamingStats:
    """The consumer `run_statistics` uses, set up the way it sets it up."""
    stats = StreamingStats(name, len(model.blocks), residual=True)
    stats.layout = token_layout(model, (IMG, IMG))
    return stats


class Extractor:
    """Approach (c): timm's fx AttentionExtract returning, per block, the post-softmax map
    plus the block input and the attention branch (needed for the residual ratios), then
    the metrics computed afterwards from the stored tensors."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        from timm.models._features_fx import get_graph_node_names

        set_fused(model, False)  # before tracing: the fused kernel has no softmax node
        nodes = set(get_graph_node_names(model)[1])
        self.keys: list[tuple[str, str, str]] = []
        for i in range(len(model.blocks)):
            x_in = "norm_pre" if i == 0 else f"blocks.{i - 1}.add_1"
            self.keys.append((f"blocks.{i}.attn.softmax", x_in, f"blocks.{i}.drop_path1"))
        # Also return forward_features' output so the traced graph is not pruned after the
        # last block's attention: (c) does the same compute as (a)/(b).
        self.final = "norm.layer_norm"
        names = sorted({n for k in self.keys for n in k} | {self.final})
        missing = [n for n in names if n not in nodes]
        if missing:
            raise SystemExit(f"{name}: fx graph has no node(s) {missing}; this benchmark expects a timm ViT")
        self.extract = AttentionExtract(model, names=names, method="fx")
        set_fused(model, True)  # the traced graph keeps the unfused path; (a) gets fused back
        self.layout = token_layout(model, (IMG, IMG))
        self.workspace = Workspace()  # (c) gets the same scratch reuse as attnscope
        heads, blocks = applicable_metrics(self.layout, residual=True)
        self.accumulator = MetricAccumulator(
            name, len(model.blocks), model.blocks[0].attn.num_heads, heads, blocks
        )

    def capture(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.extract(x)
        out.pop(self.final)
        return out

    def metrics(self, out: dict[str, torch.Tensor]) -> None:
        for layer, (a, xi, yi) in enumerate(self.keys):
            per_head, per_block = block_metrics(
                out[a], self.layout, out[xi], out[yi], workspace=self.workspace
            )
            self.accumulator.update(layer, per_head, per_block)

    @staticmethod
    def stored_bytes(out: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(bytes of attention maps, bytes of residual tensors) in one extracted batch."""
        maps = sum(t.numel() * t.element_size() for k, t in out.items() if k.endswith("softmax"))
        rest = sum(t.numel() * t.element_size() for k, t in out.items() if not k.endswith("softmax"))
        return maps, rest


class Runner:
    """One model and the five ways of pushing a batch through it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model = build_model(name)
        self.extractor = Extractor(self.model, name)
        self.stats = new_stats(self.model, name)
        self.recorder = AttentionRecorder(self.model, self.stats)
        self.noop = AttentionRecorder(self.model, lambda block: None)
        self._maps: torch.Tensor | None = None

    def log_floor(self, x: torch.Tensor) -> None:
        """One torch.log over a map of each block's shape: the least work an exact
        entropy of every attention row needs (every probability goes through a log)."""
        if self._maps is None or self._maps.shape[0] != x.shape[0]:
            t = self.stats.layout.num_tokens
            heads = self.model.blocks[0].attn.num_heads
            g = torch.Generator().manual_seed(SEED)
            self._maps = torch.randn(x.shape[0], heads, t, t, generator=g).softmax(-1)
        for _ in self.model.blocks:
            torch.log(self._maps)

    def a(self, x: torch.Tensor) -> None:
        self.model.forward_features(x)

    def a_unfused(self, x: torch.Tensor) -> None:
        set_fused(self.model, False)
        try:
            self.model.forward_features(x)
        finally:
            set_fused(self.model, True)

    def _recorded(self, recorder: AttentionRecorder, x: torch.Tensor) -> None:
        # Exactly the per-batch steps of run_statistics.
        with recorder:
            recorder.reset()
            self.model.forward_features(x)
            recorder.check()

    def hooks(self, x: torch.Tensor) -> None:
        self._recorded(self.noop, x)

    def b(self, x: torch.Tensor) -> None:
        self._recorded(self.recorder, x)

    def c(self, x: torch.Tensor) -> None:
        out = self.extractor.capture(x)  # every map of the batch is alive here
        self.extractor.metrics(out)


# --------------------------------------------------------------------------- timing


def check_same_statistics(name: str, batch_size: int) -> float:
    """(b) and (c) must compute the same numbers, or the comparison is meaningless."""
    runner = Runner(name)
    x = make_batch(batch_size)
    with torch.inference_mode():
        runner.b(x)
        runner.c(x)
    sb, sc = runner.stats.accumulator.state, runner.extractor.accumulator.state
    if set(sb) != set(sc):
        raise SystemExit(f"{name}: (b) and (c) produced different metric sets")
    return max(float((sb[k] - sc[k]).abs().max()) for k in sb)


def time_model(name: str, batch_size: int, warmup: int, iters: int) -> tuple[dict[str, float], dict]:
    """Median seconds per batch of each approach, interleaved round-robin; and the mean
    kernel (system) CPU seconds and minor page faults per batch, which show what fresh
    large temporaries cost (every new multi-MB buffer is mmap'd and faulted in page by page)."""
    runner = Runner(name)
    x = make_batch(batch_size)
    fns = {k: getattr(runner, k) for k in (*APPROACHES, "log_floor")}
    times: dict[str, list[float]] = defaultdict(list)
    sys_s: dict[str, float] = defaultdict(float)
    faults: dict[str, float] = defaultdict(float)
    with torch.inference_mode():
        for it in range(warmup + iters):
            for k, fn in fns.items():
                gc.collect()
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                fn(x)
                dt = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                if it >= warmup:
                    times[k].append(dt)
                    sys_s[k] += (r1.ru_stime - r0.ru_stime) / iters
                    faults[k] += (r1.ru_minflt - r0.ru_minflt) / iters
    med = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    return med, {
        "min": fastest,
        **{f"sys:{k}": v for k, v in sys_s.items()},
        **{f"faults:{k}": v for k, v in faults.items()},
    }


def time_end_to_end(name: str, batch_size: int, n_images: int) -> float:
    """images/s of run_statistics on the bundled samples (decode + transform + (b))."""
    samples = bundled_sample_paths()
    paths = [samples[i % len(samples)] for i in range(n_images)]
    loaded = as_loaded_model(build_model(name), name=name)
    run_statistics(loaded, paths[:batch_size], batch_size=batch_size, device="cpu")  # warm-up
    t0 = time.perf_counter()
    acc, _, used, failures = run_statistics(loaded, paths, batch_size=batch_size, device="cpu")
    dt = time.perf_counter() - t0
    if failures or len(used) != n_images or acc is None:
        raise SystemExit(f"end-to-end run on the bundled samples failed: {failures}")
    return n_images / dt


# --------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: peak RSS growth of one approach over n images."""
    name, approach, n, bs = spec["model"], spec["approach"], spec["images"], spec["batch_size"]
    model = build_model(name)
    runner_b = runner_c = None
    if approach == "b":
        stats = new_stats(model, name)
        runner_b = (AttentionRecorder(model, stats), stats)
    elif approach == "c":
        runner_c = Extractor(model, name)
    n_batches = math.ceil(n / bs)
    sizes = [min(bs, n - i * bs) for i in range(n_batches)]
    gc.collect()
    exact = _reset_peak()
    base = _rss_kib("VmRSS") if exact else _maxrss_kib()
    stored = [0, 0]
    with torch.inference_mode():
        if approach == "a":
            for i, s in enumerate(sizes):
                model.forward_features(make_batch(s, i))
        elif approach == "b":
            recorder, _ = runner_b
            with recorder:
                for i, s in enumerate(sizes):
                    recorder.reset()
                    model.forward_features(make_batch(s, i))
                    recorder.check()
        else:
            kept = []
            for i, s in enumerate(sizes):
                out = runner_c.capture(make_batch(s, i))
                maps, rest = Extractor.stored_bytes(out)
                stored[0] += maps
                stored[1] += rest
                kept.append(out)
            for out in kept:
                runner_c.metrics(out)
    # VmHWM, not ru_maxrss: getrusage also folds in a high-water mark kept from before the
    # reset (the signal struct's maxrss), which would hide everything below that.
    peak = _rss_kib("VmHWM") if exact else _maxrss_kib()
    return {
        "growth_mib": (peak - base) / 1024,
        "exact": exact,
        "stored_maps": stored[0],
        "stored_rest": stored[1],
    }


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh process of this script (clean heap, clean peak RSS)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "memory":
        return memory_worker(spec)
    result = {"same_stats_max_diff": check_same_statistics(spec["model"], spec["batch_size"])}
    med, extra = time_model(spec["model"], spec["batch_size"], spec["warmup"], spec["iters"])
    return {**result, "median": med, **extra}


def per_image_store_bytes(name: str) -> int:
    """Bytes (c) keeps per image: L maps (H, T, T) + L x (2, T, C) residual tensors, float32."""
    model = build_model(name)
    lay = token_layout(model, (IMG, IMG))
    t, h, c, L = lay.num_tokens, model.blocks[0].attn.num_heads, model.embed_dim, len(model.blocks)
    return 4 * L * (h * t * t + 2 * t * c)


# --------------------------------------------------------------------------- profile


class _LabelledStats(StreamingStats):
    """StreamingStats with profiler ranges around its two steps (same work)."""

    def __call__(self, block) -> None:
        from torch.profiler import record_function

        with record_function("attnscope:block_metrics"):
            per_head, per_block = block_metrics(
                block.attn, self.layout, block.x, block.y, workspace=self.workspace
            )
        if self.accumulator is None:
            heads, blocks = applicable_metrics(self.layout, residual=self.residual)
            self.accumulator = MetricAccumulator(
                self.name, self.num_blocks, block.attn.shape[1], heads, blocks
            )
        with record_function("attnscope:accumulator.update"):
            self.accumulator.update(block.index, per_head, per_block)


def _under(evt, label: str) -> bool:
    p = evt.cpu_parent
    while p is not None:
        if p.name == label:
            return True
        p = p.cpu_parent
    return False


def profile_b(name: str, batch_size: int, batches: int) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    model = build_model(name)
    stats = _LabelledStats(name, len(model.blocks), residual=True)
    stats.layout = token_layout(model, (IMG, IMG))
    x = make_batch(batch_size)
    with AttentionRecorder(model, stats) as rec, torch.inference_mode():
        model.forward_features(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(batches):
                with record_function("bench:forward"):
                    rec.reset()
                    model.forward_features(x)
                    rec.check()
    events = prof.events()
    total = defaultdict(float)
    for e in events:
        if e.name.startswith(("bench:", "attnscope:")):
            total[e.name] += e.cpu_time_total / 1e3 / batches
    fwd = total["bench:forward"]
    met, upd = total["attnscope:block_metrics"], total["attnscope:accumulator.update"]
    print(
        f"\n### profile of (b), {name}, batch {batch_size}, "
        f"torch.profiler over {batches} batches (ms per batch)"
    )
    print("  (the profiler adds per-op overhead, so shares matter more than absolute ms)")
    print(f"  whole forward with capture       {fwd:8.1f}")
    print(f"  - block_metrics (12 blocks)      {met:8.1f}  {100 * met / fwd:5.1f}%")
    print(f"  - MetricAccumulator.update       {upd:8.1f}  {100 * upd / fwd:5.1f}%")
    print(f"  - model ops + hooks              {fwd - met - upd:8.1f}  {100 * (fwd - met - upd) / fwd:5.1f}%")

    def top(label: str | None, n: int) -> None:
        agg: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        for e in events:
            if e.name.startswith(("bench:", "attnscope:")):
                continue
            inside = any(
                _under(e, lab) for lab in ("attnscope:block_metrics", "attnscope:accumulator.update")
            )
            if (label is None and inside) or (label is not None and not _under(e, label)):
                continue
            if label is None and not _under(e, "bench:forward"):
                continue
            shapes = str([list(s) for s in e.input_shapes if s][:2]) if e.input_shapes else ""
            slot = agg[(e.name, shapes)]
            slot[0] += e.self_cpu_time_total / 1e3 / batches
            slot[1] += 1 / batches
        rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]
        base = met if label == "attnscope:block_metrics" else fwd
        for (op, shapes), (ms, calls) in rows:
            print(f"    {ms:7.1f} ms {100 * ms / base:5.1f}%  {calls:5.0f} calls  {op:28s} {shapes}")

    print(f"  top ops inside block_metrics (% of block_metrics time {met:.1f} ms):")
    top("attnscope:block_metrics", 10)
    print(f"  top model/hook ops outside the consumer (% of the whole {fwd:.1f} ms):")
    top(None, 6)


def print_breakdown(name: str, batch_size: int, fwd_ms: dict[str, float]) -> None:
    """Split (b) - (a) into attention materialisation, hooks and metrics, from the medians."""
    a, a2, h, b = (fwd_ms[k] for k in ("a", "a_unfused", "hooks", "b"))
    print(f"\nwhere (b)'s extra time goes, {name}, from the timing medians (ms per batch of {batch_size})")
    rows = (
        ("(a)        fused forward", a, None),
        ("(a') - (a) unfused attention, no hooks", a2 - a, True),
        ("(h)  - (a) unfused attention + hooks, no metrics", h - a, True),
        ("(b)  - (h) block_metrics + accumulator", b - h, True),
        ("(b)  - (a) total", b - a, True),
    )
    for label, ms, rel in rows:
        print(
            f"  {label:50s} {ms:+9.1f}  {100 * ms / a:+6.1f}% of (a)" if rel else f"  {label:50s} {ms:9.1f}"
        )
    print(f"  budget for b/a >= {TARGET}: (b) - (a) <= {a * (1 / TARGET - 1):.1f} ms")
    floor = fwd_ms["log_floor"]
    print(
        f"  floor: one torch.log over every block's maps takes {floor:.1f} ms "
        f"({100 * floor / a:.1f}% of (a)); "
        f"any exact entropy pays it on top of (a'), so b/a <= {a / (a2 + floor):.3f} here"
    )


# --------------------------------------------------------------------------- main


def source_fingerprint() -> str:
    """Which code was measured: HEAD plus the hashes of the files on the measured path."""
    import hashlib
    from pathlib import Path

    pkg = Path(attnscope.__file__).parent
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True, text=True, check=False
    ).stdout.strip()
    parts = []
    for f in ("capture.py", "metrics.py", "analysis.py"):
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", f], cwd=pkg, capture_output=True, check=False
        ).returncode
        digest = hashlib.sha256((pkg / f).read_bytes()).hexdigest()[:8]
        parts.append(f"{f} {digest}{' (uncommitted changes)' if dirty else ''}")
    return f"HEAD {head or '?'}; " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="vit_small, vit_base or timm names")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--iters", type=int, default=None, help="timed iterations per approach (default 5, quick 2)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: fewer iterations, 16 vs 64 images for memory"
    )
    ap.add_argument("--memory-model", default="vit_small")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument(
        "--profile", choices=("auto", "always", "never"), default="auto",
        help="torch.profiler breakdown of (b): auto = only for models with b/a below target",
    )  # fmt: skip
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    torch.set_num_threads(args.threads)
    iters = args.iters or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    bs = args.batch_size
    mem_sizes = (16, 64) if args.quick else (32, 256)
    e2e_n = bs if args.quick else 4 * bs

    t_start = time.perf_counter()
    print("# attnscope capture overhead")
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, attnscope {attnscope.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"CPU, float32, {IMG} px, random-init weights, random inputs (seed {SEED}), batch {bs}, "
        f"{warmup} warm-up + {iters} timed iterations per approach, interleaved round-robin, median"
    )
    print(f"attnscope source measured: {source_fingerprint()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: 1-min load average {load:.2f} before starting: other processes compete for the CPUs")
    results: dict[str, dict[str, float]] = {}
    extra: dict[str, dict[str, float]] = {}
    mins: dict[str, dict[str, float]] = {}
    for name in args.models:
        spec = {"kind": "timing", "model": name, "batch_size": bs, "warmup": warmup, "iters": iters}
        out = run_worker({**spec, "threads": args.threads})
        diff = out.pop("same_stats_max_diff")
        print(f"check {name}: (b) and (c) accumulate the same statistics (max |diff| {diff:.2e})")
        results[name] = out.pop("median")
        mins[name] = out.pop("min")
        extra[name] = out

    print(f"\n## throughput (images/s, batch {bs}; higher is better)")
    head = (
        f"{'model':10s}"
        + "".join(f"{LABELS[k]:>18s}" for k in APPROACHES)
        + f"{'b/a':>8s}{'c/a':>8s}{'a_/a':>8s}"
    )
    print(head.replace("a_/a", "a'/a"))
    for name, med in results.items():
        ips = {k: bs / v for k, v in med.items()}
        row = f"{name:10s}" + "".join(f"{ips[k]:18.2f}" for k in APPROACHES)
        row += f"{ips['b'] / ips['a']:8.3f}{ips['c'] / ips['a']:8.3f}{ips['a_unfused'] / ips['a']:8.3f}"
        print(row)
    print(f"\nper batch of {bs}: wall ms (median) / kernel CPU ms (mean) / minor page faults (mean)")
    print(f"{'model':10s}" + "".join(f"{LABELS[k]:>18s}" for k in APPROACHES))
    for name, med in results.items():
        ex = extra[name]
        cells = [
            f"{1e3 * med[k]:.0f}/{1e3 * ex[f'sys:{k}']:.0f}/{ex[f'faults:{k}'] / 1e3:.0f}k"
            for k in APPROACHES
        ]
        print(f"{name:10s}" + "".join(f"{c:>18s}" for c in cells))
    verdicts = {}
    for name, med in results.items():
        ratio = med["a"] / med["b"]
        verdicts[name] = ratio >= TARGET
        fast = mins[name]["a"] / mins[name]["b"]
        print(
            f"{name}: b/a = {ratio:.3f} -> "
            f"{'MEETS' if verdicts[name] else 'MISSES'} the target b/a >= {TARGET}"
            f"   (from the fastest iterations instead of medians: {fast:.3f})"
        )

    for name, med in results.items():
        print_breakdown(name, bs, {k: 1e3 * v for k, v in med.items()})

    if not args.no_e2e:
        print(
            f"\n## end to end: attnscope.measure.run_statistics on the bundled samples "
            f"({e2e_n} images, batch {bs})"
        )
        print("  includes JPEG decode + timm eval transform in the main process (num_workers=0)")
        for name in args.models:
            ips = time_end_to_end(name, bs, e2e_n)
            print(f"  {name:10s} {ips:8.2f} images/s   (b on random tensors: {bs / results[name]['b']:.2f})")

    if not args.no_memory:
        name = args.memory_model
        small, large = mem_sizes
        per_img = per_image_store_bytes(name)
        cap = max(bs, (STORE_CAP_BYTES // per_img) // bs * bs)
        print(
            f"\n## peak memory: growth of peak RSS over the RSS before the first batch ({name}, batch {bs})"
        )
        print("  each cell is a fresh process; (c) keeps every image's maps (+ block input and attention")
        print(f"  branch) until all images are through, {per_img / 2**20:.1f} MiB per image stored")
        print(f"{'approach':34s}{f'{small} images':>14s}{f'{large} images':>14s}{'ratio':>8s}  stored by (c)")
        rows = (
            ("a", "(a) plain fused forward"),
            ("b", "(b) attnscope streaming stats"),
            ("c", "(c) store all maps, then metrics"),
        )
        all_flat = {}
        for approach, label in rows:
            cells, note = [], ""
            for n in (small, large):
                n_run = n
                if approach == "c" and n * per_img > STORE_CAP_BYTES:
                    n_run = cap
                    note += f" [capped {n} -> {cap} images: {n * per_img / 2**30:.1f} GiB > 8 GiB]"
                spec = {
                    "model": name,
                    "approach": approach,
                    "images": n_run,
                    "batch_size": bs,
                    "threads": args.threads,
                }
                cells.append(run_worker({"kind": "memory", **spec}))
            g0, g1 = cells[0]["growth_mib"], cells[1]["growth_mib"]
            ratio = g1 / g0 if g0 > 0 else float("nan")
            all_flat[approach] = ratio
            stored = ""
            if approach == "c":
                s = cells[1]
                total = (s["stored_maps"] + s["stored_rest"]) / 2**30
                stored = f"{total:.2f} GiB ({s['stored_maps'] / 2**30:.2f} maps)"
            print(f"{label:34s}{g0:10.0f} MiB{g1:10.0f} MiB{ratio:8.2f}  {stored}{note}")
            if not all(c["exact"] for c in cells):
                print(
                    "  (peak counter could not be reset: growth is ru_maxrss after - before, an upper bound)"
                )
        flat = all_flat["b"] <= 1.2
        print(
            f"attnscope memory {large} vs {small} images: "
            f"x{all_flat['b']:.2f} -> {'FLAT' if flat else 'GROWS'}"
        )

    for name in results:
        if args.profile == "always" or (args.profile == "auto" and not verdicts[name]):
            profile_b(name, bs, 2 if args.quick else 3)

    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
