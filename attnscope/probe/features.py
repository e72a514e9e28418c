"""Frozen-backbone token extraction and the memory-mapped fp16 feature cache.

Probing trains many small heads for many epochs on the *same* backbone outputs, so the
backbone runs once per image and the tokens of the chosen blocks (all of them: prefix and
patches; the last block by default) are stored as float16 `.npy` shards that are
memory-mapped back for training. Each block has its own cache (and so does each augmented
view of the training images); one forward fills every block's cache that lacks an image.

Layout of one cache folder (`<cache-dir>/<model>[-b<block>]-<split>-<key>/`; `block` counted
from 0, absent for the last block):

    key.json                     everything the key was computed from (for people)
    shard-<first>-<last>.npy     (n, T, D) float16, row i = position positions[i]
    shard-<first>-<last>.json    positions and failures of that shard; written last, so
                                 its presence means the .npy beside it is complete
    index.json                   written once every position is in some shard

Extraction is a function over a list of dataset positions that writes only its own
shards, and the index is a separate step, so several processes (torchrun ranks) can
each extract a share and one of them writes the index afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from attnscope.errors import AttnscopeError, ConfigError, Interrupted
from attnscope.files import atomic_path, write_text_atomic
from attnscope.probe.datasets import ImageSource

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from attnscope.models import LoadedModel, TokenLayout
    from attnscope.probe.datasets import Positions

FORMAT_VERSION = 1
SHARD_TARGET_BYTES = 512 * 2**20  # big enough for few files, small enough to rewrite on resume
DISK_RESERVE_BYTES = 256 * 2**20  # never fill a disk to the last byte
_STALE_TMP_SECONDS = 3600

ProgressFn = Callable[[int, int], None]
SkipFn = Callable[[Path, str], None]

__all__ = [
    "AugmentedSource",
    "CacheIndex",
    "FeatureCache",
    "FeatureStore",
    "StackedStore",
    "StreamSource",
    "TokenExtractor",
    "augment_transform",
    "augmented_view",
    "cache_key",
    "default_cache_dir",
    "disk_free",
    "ensure_disk_space",
    "extract_shards",
    "feature_key_material",
    "open_cache",
    "write_cache_index",
]


def default_cache_dir() -> Path:
    """`$ATTNSCOPE_CACHE/probe`, else `$XDG_CACHE_HOME/attnscope/probe`, else ~/.cache/attnscope/probe."""
    if os.environ.get("ATTNSCOPE_CACHE"):
        return Path(os.environ["ATTNSCOPE_CACHE"]).expanduser() / "probe"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnscope" / "probe"


# --------------------------------------------------------------------------- backbone


class ProbeImageDataset:
    """`ImageSource` items through the eval transform; bad items become recorded failures."""

    def __init__(self, source: ImageSource, transform: Callable[[Any], torch.Tensor]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        from attnscope.data import ImageLoadError

        index = int(i)
        try:
            image = self.source.load(index)
        except ImageLoadError as exc:
            return None, index, exc.reason
        try:
            return self.transform(image), index, None
        except Exception as exc:  # a bad image must not kill the run
            return None, index, f"transform failed ({type(exc).__name__}: {exc})"


def make_source_loader(
    source: ImageSource,
    transform: Callable[[Any], torch.Tensor],
    positions: Positions,
    batch_size: int,
    num_workers: int = 0,
):
    """A DataLoader of `ImageBatch` over `positions` of `source`, in the given order."""
    from torch.utils.data import DataLoader, Subset

    from attnscope.data import collate_images

    return DataLoader(
        # Subset only indexes and measures it: torch's stub asks for a Dataset subclass
        Subset(cast("Dataset[Any]", ProbeImageDataset(source, transform)), [int(p) for p in positions]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        drop_last=False,
    )


class _StopForward(Exception):
    """Raised by the hook of the deepest block asked for when the blocks after it (and the
    final norm) are not needed: the forward ends there, as in the paper's code (its `return_block`)."""


class TokenExtractor:
    """Frozen backbone -> the tokens `(B, T, D)` of chosen blocks, from one forward.

    Blocks are numbered from 0, as everywhere in attnscope: block k is the output of timm's
    `blocks[k]`, the last one is `num_blocks - 1`. The last block's tokens have the model's
    final norm applied (`forward_features`, timm semantics) unless `prenorm`; every other
    block's are the block's output as it is, with no norm (as the paper's code, which never
    applies the final norm at any block). Models whose final norm sits after pooling
    (`fc_norm`) have no per-token final norm; for them `prenorm` changes nothing.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        prenorm: bool = False,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        blocks: str | Sequence[int] | None = None,
    ) -> None:
        import torch

        from attnscope.data import build_eval_transform
        from attnscope.models import token_layout

        self.loaded = loaded
        self.prenorm = prenorm
        self.device = torch.device(device)
        self.dtype = dtype
        # eval(): a frozen backbone must never run dropout/drop-path or update norms.
        self.model = loaded.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.transform, self.transform_config = build_eval_transform(self.model, loaded.input_size)
        self.layout: TokenLayout = token_layout(self.model, loaded.input_size)
        norm = getattr(self.model, "norm", None)
        self.has_token_norm = norm is not None and not isinstance(norm, torch.nn.Identity)
        self.num_blocks = len(self._block_modules())
        self.blocks = parse_blocks(blocks, self.num_blocks)  # counted from 0, ascending
        self._shape: tuple[int, int] | None = None

    def _block_modules(self) -> torch.nn.Sequential | torch.nn.ModuleList:
        # timm keeps the blocks in a Sequential (ViT) or a ModuleList (EVA, BEiT)
        return cast("torch.nn.Sequential | torch.nn.ModuleList", self.model.blocks)

    @property
    def norm_label(self) -> str:
        """What the last block's tokens are (the other blocks' are always their raw output)."""
        if not self.has_token_norm:
            return "no per-token final norm in this model (prenorm and normed are the same)"
        return "pre-norm (last block output)" if self.prenorm else "final norm applied"

    @property
    def last_block(self) -> int:
        """The number of the last block, `num_blocks - 1`."""
        return self.num_blocks - 1

    def is_normed(self, block: int) -> bool:
        """Whether block `block`'s tokens pass through the model's final norm."""
        return block == self.last_block and not self.prenorm and self.has_token_norm

    def extract(self, images: torch.Tensor, blocks: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """`{block: (B, T, D) float32 tokens}` of `blocks` (default: the extractor's), one forward."""
        import torch

        from attnscope.measure import forward_features

        wanted = sorted(set(blocks if blocks is not None else self.blocks))
        last = self.last_block
        hooked = [b for b in wanted if b != last or self.prenorm]
        stop_at = wanted[-1] if wanted[-1] < last else None
        captured: dict[int, torch.Tensor] = {}

        def hook(block: int) -> Callable[..., None]:
            def grab(module: Any, args: Any, output: Any) -> None:
                captured[block] = output[0] if isinstance(output, (tuple, list)) else output
                if block == stop_at:
                    raise _StopForward

            return grab

        modules = self._block_modules()
        handles = [modules[b].register_forward_hook(hook(b)) for b in hooked]
        out: Any = None
        try:
            with torch.inference_mode():
                out = forward_features(
                    self.model, images.to(self.device), dtype=self.dtype, name=self.loaded.name
                )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(out, (tuple, list)):
            out = out[0]
        return {b: self._checked(captured[b] if b in captured else out, b) for b in wanted}

    def _checked(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != self.layout.num_tokens:
            raise AttnscopeError(
                f"{self.loaded.name}: expected the tokens of block {block} to have shape "
                f"(B, {self.layout.num_tokens}, D), got {tuple(tokens.shape)}"
            )
        return tokens.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The deepest chosen block's tokens (the last block's by default)."""
        return self.extract(images, [self.blocks[-1]])[self.blocks[-1]]

    def token_shape(self) -> tuple[int, int]:
        """(T, D), from one forward of a blank image (cheaper than trusting attributes)."""
        import torch

        if self._shape is None:
            h, w = self.loaded.input_size
            out = self(torch.zeros(1, 3, h, w))
            self._shape = (int(out.shape[1]), int(out.shape[2]))
        return self._shape


def block_tokens(
    extractor: TokenExtractor, images: torch.Tensor, blocks: Sequence[int]
) -> dict[int, torch.Tensor]:
    """`extractor.extract`, through `extractor(images)` when only its deepest block is wanted
    (the one entry point of the single-block case, which tests may wrap)."""
    if list(blocks) == [extractor.blocks[-1]]:
        return {extractor.blocks[-1]: extractor(images)}
    return extractor.extract(images, blocks)


def normalise_blocks(spec: str | Sequence[int | str]) -> str | tuple[int, ...]:
    """`last`, `all` or block numbers (`"2,5,8,11"` or a sequence; counted from 0, negative from
    the end) as a config keeps them: the word, or a tuple of ints (checked against a model later)."""
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    words = [s.strip().lower() for s in items if s.strip()]
    if words in (["last"], ["all"]):
        return words[0]
    try:
        numbers = tuple(int(w) for w in words)
    except ValueError:
        numbers = ()
    if not numbers:
        raise ConfigError(
            "blocks", f"takes last, all or block numbers counted from 0 (e.g. 2,5,8,11), got {spec!r}"
        )
    return numbers


def parse_blocks(spec: str | Sequence[int] | None, num_blocks: int) -> list[int]:
    """`last`, `all` or block numbers (counted from 0, as timm's `blocks[k]`; negative counts
    from the end, -1 = last) -> sorted distinct block numbers of a model with `num_blocks`
    blocks, `0 .. num_blocks - 1`."""
    if spec is None or spec == "last":
        return [num_blocks - 1]
    if spec == "all":
        return list(range(num_blocks))
    if isinstance(spec, str):
        raise ConfigError("blocks", f"takes last, all or block numbers, got {spec!r}")
    chosen = [int(b) + num_blocks if int(b) < 0 else int(b) for b in spec]
    bad = [b for b, c in zip(spec, chosen, strict=True) if not 0 <= c < num_blocks]
    if bad or not chosen:
        raise ConfigError(
            "blocks",
            f"names blocks {list(bad or spec)}; the model has blocks 0 to {num_blocks - 1} "
            "(counted from 0; -1 is the last)",
        )
    return sorted(set(chosen))


# --------------------------------------------------------------------------- cache key


def weights_identity(loaded: LoadedModel, seed: int) -> dict[str, Any]:
    """What identifies the weights: file + size + mtime (a Hugging Face folder: its config.json
    and weights file, each), hub source, or the init seed."""
    report = loaded.checkpoint_report or {}
    if report.get("path"):
        stamps = [_stamp(Path(f)) for f in report.get("files") or [report["path"]]]
        if report["path"].startswith("hf:"):  # each file: a folder's mtime stays put when one is rewritten
            return {"kind": "hf", "files": stamps}
        return {"kind": "checkpoint", **stamps[0]}  # the key every earlier cache has
    if loaded.random_init:
        return {"kind": "random", "seed": int(seed)}
    hub = None
    with contextlib.suppress(Exception):
        import timm

        cfg = timm.models.get_pretrained_cfg(loaded.spec.timm_name)
        hub = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None)
    if loaded.weights.startswith(("hf-hub:", "url:")):
        return {"kind": "pretrained", "timm_name": loaded.spec.timm_name, "hub": hub}
    return {"kind": "other", "weights": loaded.weights}


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def feature_key_material(
    loaded: LoadedModel,
    *,
    transform_config: dict[str, Any],
    prenorm: bool,
    dtype: str,
    seed: int,
    item_ids: Sequence[str],
    model_kwargs: dict[str, Any] | None = None,
    block: int | None = None,
    num_blocks: int | None = None,
    augment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that changes the cached tokens, as a JSON-able dict.

    `block` (counted from 0) of `num_blocks`: None or the last block is the layer `last` (the
    key of every cache written before blocks could be chosen, so those caches stay valid);
    another block is timm's module name `blocks.<block>`, whose tokens never pass the final
    norm. The key names the module, never a number of ours, so it cannot depend on how
    blocks are counted.
    `augment`: what identifies one augmented view (`AugmentedSource.key`); absent for the
    plain images, whose keys stay those of every earlier cache."""
    images = hashlib.sha256("\n".join(item_ids).encode()).hexdigest()
    last = None if num_blocks is None else num_blocks - 1
    layer = "last" if block is None or block == last else f"blocks.{block}"
    return (
        {
            "format": FORMAT_VERSION,
            "timm_name": loaded.spec.timm_name,
            "model_kwargs": dict(sorted((model_kwargs or {}).items())),
            "weights": weights_identity(loaded, seed),
            "transform": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(transform_config.items())
            },
            "layer": layer,
            "prenorm": bool(prenorm) if layer == "last" else True,
            "forward_dtype": dtype,
            "num_images": len(item_ids),
            "images_sha256": images,
        }
        | ({"augment": augment} if augment is not None else {})
        | _positions_key(loaded)
    )


def _positions_key(loaded: LoadedModel) -> dict[str, Any]:
    """The position resize, when the weights met another grid: caches written before the
    family's own rule existed were resampled by timm's and must not be reused (a model at
    its weights' own grid keeps the keys of every earlier cache)."""
    if not loaded.positions:
        return {}
    return {"positions": {k: loaded.positions[k] for k in ("rule", "from", "to")}}


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- cache folder


@dataclass
class ShardMeta:
    name: str
    positions: list[int]
    failures: dict[int, str]

    @property
    def npy(self) -> str:
        return f"{self.name}.npy"


@dataclass
class FeatureCache:
    """One cache folder and its fixed geometry."""

    root: Path
    key: str
    num_items: int
    tokens: int
    dim: int
    shard_images: int

    @property
    def bytes_per_image(self) -> int:
        return self.tokens * self.dim * 2

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def shards(self) -> list[ShardMeta]:
        """Complete shards (meta present and the array beside it)."""
        found: list[ShardMeta] = []
        if not self.root.is_dir():
            return found
        for meta_path in sorted(self.root.glob("shard-*.json")):
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable meta: that shard is redone
            if (self.root / f"{meta_path.stem}.npy").is_file():
                found.append(
                    ShardMeta(
                        meta_path.stem,
                        [int(p) for p in meta["positions"]],
                        {int(k): v for k, v in meta["failures"].items()},
                    )
                )
        return found

    def done_positions(self) -> set[int]:
        return {p for s in self.shards() for p in s.positions}

    def pending(self, indices: Sequence[int]) -> list[int]:
        done = self.done_positions()
        return [int(i) for i in indices if int(i) not in done]

    def is_complete(self) -> bool:
        if not self.index_path.is_file():
            return False
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return index.get("key") == self.key and all(
            (self.root / f"{s['name']}.npy").is_file() for s in index["shards"]
        )

    def total_bytes(self) -> int:
        return self.num_items * self.bytes_per_image


def open_cache(
    cache_dir: str | Path,
    label: str,
    material: dict[str, Any],
    num_items: int,
    tokens: int,
    dim: int,
    shard_images: int | None = None,
) -> FeatureCache:
    """The cache folder for `material` (created with its key.json if new)."""
    key = cache_key(material)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)[:40]
    root = Path(cache_dir).expanduser() / f"{slug}-{key[:16]}"
    if shard_images is None:
        shard_images = max(1, min(65536, SHARD_TARGET_BYTES // max(1, tokens * dim * 2)))
    key_file = root / "key.json"
    if key_file.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            stored = json.loads(key_file.read_text(encoding="utf-8"))
            shard_images = int(stored["shard_images"])  # resume with the geometry it started with
    cache = FeatureCache(root, key, num_items, tokens, dim, shard_images)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            doc = {
                "key": key,
                "material": material,
                "tokens": tokens,
                "dim": dim,
                "shard_images": shard_images,
            }
            write_text_atomic(key_file, json.dumps(doc, indent=2, default=str) + "\n")
    except OSError as exc:
        raise ConfigError(
            "cache_dir",
            f"cannot hold the feature cache ({root}: {exc.strerror or exc}); choose another folder, "
            "or set `no_cache`",
        ) from exc
    _remove_stale_tmp(root)
    return cache


def _remove_stale_tmp(root: Path) -> None:
    """Temporary shard files of a killed run (a live run's are younger than an hour)."""
    now = time.time()
    for tmp in root.glob(".shard-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free(folder: str | Path) -> int:
    """Free bytes on the disk that holds (or will hold) `folder`."""
    return int(shutil.disk_usage(_existing_ancestor(Path(folder))).free)


def ensure_disk_space(folder: str | Path, needed: int) -> int:
    """Free bytes at `folder`; raises when `needed` would not fit with a safety reserve."""
    where = _existing_ancestor(Path(folder))
    free = disk_free(where)
    if needed > 0 and needed + DISK_RESERVE_BYTES > free:
        raise ConfigError(
            "cache_dir",
            f"is on a disk with {format_bytes(free)} free ({where}) but the feature cache needs "
            f"{format_bytes(needed)}; choose a folder on a larger disk, or set `no_cache` to stream the "
            "features through the backbone every epoch",
        )
    return free


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass
class ExtractReport:
    extracted: int = 0  # readable images run through the backbone
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    shards_written: int = 0  # over every block's cache
    rows: dict[int, int] = field(default_factory=dict)  # block -> readable images written to its cache


COMMIT_IMAGES = 64  # a shard is committed at the latest after this many images ...
COMMIT_SECONDS = 30.0  # ... or this much time, so an interruption loses little work


def extract_shards(
    extractor: TokenExtractor,
    source: ImageSource,
    cache: FeatureCache | Mapping[int, FeatureCache],
    indices: Sequence[int],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
    on_skip: SkipFn | None = None,
    commit_images: int = COMMIT_IMAGES,
    commit_seconds: float = COMMIT_SECONDS,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ExtractReport:
    """Extract the positions `indices` that no committed shard holds yet into new shards.

    `cache`: one cache (of the extractor's deepest block), or `{block: cache}`. With
    several, an image missing from any of them is run through the backbone once and its
    tokens of every block go to the caches that lack it, so a cache of an added block is
    filled without touching (or recomputing) the others.

    Tokens are kept in memory and committed as a shard (array renamed into place, then its
    meta file) every `commit_images` images (at most the cache's shard size) or
    `commit_seconds`, whichever comes first. An interruption therefore loses at most that
    much work, and the next call continues with the positions still missing; a shard
    without its meta file is never trusted. Ctrl-C raises `ExtractionInterrupted`, which
    says how much is committed. `transform`: what turns a loaded image into the model's
    input (default: the extractor's eval transform).
    """
    caches = {extractor.blocks[-1]: cache} if isinstance(cache, FeatureCache) else dict(cache)
    buffers = _BlockBuffers(caches, indices)
    report = ExtractReport()
    todo = buffers.todo()
    if not todo:
        return report
    start = time.perf_counter()
    limit = max(1, min(commit_images, *(c.shard_images for c in caches.values())))
    done, last_commit = 0, time.monotonic()
    try:
        for batch in make_source_loader(
            source, transform or extractor.transform, todo, batch_size, num_workers
        ):
            for pos, reason in batch.failures:
                if on_skip is not None:
                    on_skip(source.path(pos), reason)
            report.extracted += buffers.add(extractor, batch)
            done += len(batch.indices) + len(batch.failures)
            if len(buffers) >= limit or time.monotonic() - last_commit >= commit_seconds:
                buffers.commit(report)
                last_commit = time.monotonic()
            if progress is not None:
                progress(done, len(todo))
        buffers.commit(report)
    except KeyboardInterrupt:
        committed = min(len(c.done_positions()) for c in caches.values())
        where = (
            next(iter(caches.values())).root if len(caches) == 1 else next(iter(caches.values())).root.parent
        )
        raise ExtractionInterrupted(
            f"{committed} of {len(source)} images' features are committed in "
            f"{where}; the same command continues from there"
        ) from None
    report.seconds = time.perf_counter() - start
    return report


class ExtractionInterrupted(Interrupted):
    """Ctrl-C during extraction, saying how much is committed (a rerun continues from it)."""


class _BlockBuffers:
    """One `_ShardBuffer` per block's cache, fed by one forward per batch."""

    def __init__(self, caches: Mapping[int, FeatureCache], indices: Sequence[int]) -> None:
        self.buffers = {b: _ShardBuffer(c) for b, c in caches.items()}
        self.pending = {b: set(c.pending(indices)) for b, c in caches.items()}
        self.order = [int(i) for i in indices]

    def todo(self) -> list[int]:
        """The positions some cache lacks, in the order asked."""
        return [i for i in self.order if any(i in p for p in self.pending.values())]

    def __len__(self) -> int:
        return max(len(b) for b in self.buffers.values())

    def add(self, extractor: TokenExtractor, batch: Any) -> int:
        """Route the batch's failures and tokens to the caches lacking them; returns the
        number of readable images run through the backbone."""
        import torch

        wanted = {
            b: [i for i, p in enumerate(batch.indices) if int(p) in pending]
            for b, pending in self.pending.items()
        }
        tokens: dict[int, np.ndarray] = {}
        if batch.images is not None:
            blocks = [b for b, rows in wanted.items() if rows]
            out = block_tokens(extractor, batch.images, blocks) if blocks else {}
            tokens = {b: t.to("cpu", dtype=torch.float16).numpy() for b, t in out.items()}
        for b, buffer in self.buffers.items():
            failures = [(p, r) for p, r in batch.failures if int(p) in self.pending[b]]
            rows = wanted[b]
            buffer.add(failures, [int(batch.indices[i]) for i in rows], tokens[b][rows] if rows else None)
        return len(batch.indices) if batch.images is not None else 0

    def commit(self, report: ExtractReport) -> None:
        for b, buffer in self.buffers.items():
            report.rows[b] = report.rows.get(b, 0) + buffer.commit(report)


class _ShardBuffer:
    """The tokens extracted since the last commit, in position order of arrival."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self.positions: list[int] = []
        self.rows: list[np.ndarray] = []
        self.failures: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def add(
        self, failures: Sequence[tuple[int, str]], positions: Sequence[int], tokens: np.ndarray | None
    ) -> None:
        zeros = np.zeros((self.cache.tokens, self.cache.dim), dtype=np.float16)
        for pos, reason in failures:  # a failed image keeps a row of zeros it never serves
            self.positions.append(int(pos))
            self.rows.append(zeros)
            self.failures[int(pos)] = reason
        if tokens is not None:
            self.positions.extend(positions)
            self.rows.extend(tokens)

    def commit(self, report: ExtractReport) -> int:
        """Write the buffer as one shard: the array first, its meta file last. Returns the
        readable images written."""
        if not self.positions:
            return 0
        order = np.argsort(self.positions, kind="stable")
        positions = [self.positions[i] for i in order]
        name = f"shard-{positions[0]:09d}-{positions[-1]:09d}"
        with atomic_path(self.cache.root / f"{name}.npy") as tmp:
            np.save(tmp, np.stack([self.rows[i] for i in order]), allow_pickle=False)
        meta = {"positions": positions, "failures": {str(k): v for k, v in self.failures.items()}}
        write_text_atomic(self.cache.root / f"{name}.json", json.dumps(meta) + "\n")
        written = len(positions) - len(self.failures)
        report.failures.update(self.failures)
        report.shards_written += 1
        self.positions, self.rows, self.failures = [], [], {}
        return written


@dataclass
class CacheIndex:
    key: str
    num_items: int
    tokens: int
    dim: int
    shards: list[ShardMeta]
    failures: dict[int, str]


def write_cache_index(cache: FeatureCache) -> CacheIndex:
    """Check that every position is in exactly one complete shard and write index.json."""
    shards = cache.shards()
    owner: dict[int, str] = {}
    chosen: list[ShardMeta] = []
    for shard in shards:
        if any(p in owner for p in shard.positions):
            continue  # overlapping leftovers of a different split into shards: first one wins
        chosen.append(shard)
        owner.update(dict.fromkeys(shard.positions, shard.name))
    missing = [p for p in range(cache.num_items) if p not in owner]
    if missing:
        raise AttnscopeError(
            f"feature cache {cache.root} is incomplete: {len(missing)} images have no shard yet"
        )
    failures = {p: r for s in chosen for p, r in s.failures.items()}
    doc = {
        "key": cache.key,
        "format": FORMAT_VERSION,
        "num_items": cache.num_items,
        "tokens": cache.tokens,
        "dim": cache.dim,
        "dtype": "float16",
        "shards": [{"name": s.name, "positions": s.positions} for s in chosen],
        "failures": {str(k): v for k, v in sorted(failures.items())},
    }
    write_text_atomic(cache.index_path, json.dumps(doc) + "\n")
    return CacheIndex(cache.key, cache.num_items, cache.tokens, cache.dim, chosen, failures)


def read_cache_index(cache: FeatureCache) -> CacheIndex:
    doc = json.loads(cache.index_path.read_text(encoding="utf-8"))
    shards = [ShardMeta(s["name"], [int(p) for p in s["positions"]], {}) for s in doc["shards"]]
    failures = {int(k): v for k, v in doc["failures"].items()}
    return CacheIndex(
        doc["key"], int(doc["num_items"]), int(doc["tokens"]), int(doc["dim"]), shards, failures
    )


class FeatureStore:
    """Read side of a complete cache: position -> (T, D) float16 tokens, memory-mapped."""

    def __init__(self, cache: FeatureCache, index: CacheIndex | None = None) -> None:
        self.cache = cache
        self.index = index or read_cache_index(cache)
        n = self.index.num_items
        self.shard_of = np.full(n, -1, dtype=np.int64)
        self.row_of = np.full(n, -1, dtype=np.int64)
        for k, shard in enumerate(self.index.shards):
            pos = np.asarray(shard.positions, dtype=np.int64)
            self.shard_of[pos] = k
            self.row_of[pos] = np.arange(len(pos))
        self.valid = np.ones(n, dtype=bool)
        if self.index.failures:
            self.valid[list(self.index.failures)] = False
        self._arrays: dict[int, np.ndarray] = {}

    @property
    def failures(self) -> dict[int, str]:
        return self.index.failures

    def _array(self, k: int) -> np.ndarray:
        if k not in self._arrays:
            name = self.index.shards[k].name
            self._arrays[k] = np.load(self.cache.root / f"{name}.npy", mmap_mode="r")
        return self._arrays[k]

    def gather(self, positions: Positions, out: np.ndarray | None = None) -> np.ndarray:
        """(len, T, D) float16 for `positions`, in that order (written into `out` if it is
        large enough; then the first len rows of it are returned)."""
        positions = np.asarray(positions, dtype=np.int64)
        if out is None or len(out) < len(positions):
            out = np.empty((len(positions), self.index.tokens, self.index.dim), dtype=np.float16)
        out = out[: len(positions)]
        shards = self.shard_of[positions]
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            rows = self.row_of[positions[sel]]
            order = np.argsort(rows)  # ascending rows read a memory map sequentially
            out[sel[order]] = self._array(int(k))[rows[order]]
        return out

    def load_all(self) -> np.ndarray:
        return self.gather(np.arange(self.index.num_items))


# --------------------------------------------------------------------------- augmented views

AUGMENT_STREAM = 41  # random stream of the augmented views
AUGMENT_SCALE = (0.08, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)


def augmented_view(image: Any, size: tuple[int, int], rng: np.random.Generator) -> Any:
    """The paper recipe's training augmentation of one PIL image: `RandomResizedCrop(size,
    interpolation=bicubic)` with the paper code's TF-style parameters (util/crop.py: one
    draw of the area fraction in [0.08, 1] and of the log aspect ratio in [log 3/4, log 4/3],
    the crop clipped to the image, no retry loop), then a horizontal flip with probability
    1/2; every draw from `rng`."""
    from PIL import Image

    width, height = image.size
    area = width * height * rng.uniform(*AUGMENT_SCALE)
    aspect = float(np.exp(rng.uniform(np.log(AUGMENT_RATIO[0]), np.log(AUGMENT_RATIO[1]))))
    w = min(int(round(np.sqrt(area * aspect))), width)
    h = min(int(round(np.sqrt(area / aspect))), height)
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    crop = image.crop((left, top, left + w, top + h)).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else crop


class AugmentedSource(ImageSource):
    """View `view` of every image of `base`: `augmented_view` drawn from a generator seeded
    by (seed, position, view) alone, so a view never changes when more views are asked for
    and a cache of it stays valid. Its images are already at the model's input size; they
    take `augment_transform` (tensor + normalisation), not the eval transform."""

    def __init__(self, base: ImageSource, view: int, seed: int, size: tuple[int, int]) -> None:
        self.base, self.view, self.seed, self.size = base, int(view), int(seed), (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.base)

    def load(self, i: int) -> Any:
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(i), self.view])
        return augmented_view(self.base.load(i), self.size, rng)

    def describe(self, i: int) -> str:
        return self.base.describe(i)

    def path(self, i: int) -> Path:
        return self.base.path(i)

    def item_ids(self) -> list[str]:
        return self.base.item_ids()

    def key(self) -> dict[str, Any]:
        """What identifies this view in a cache key."""
        return {
            "view": self.view, "seed": self.seed, "size": list(self.size),
            "recipe": "RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bicubic, TF-style) + flip",
        }  # fmt: skip


def augment_transform(transform_config: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """An augmented view (already at the input size) -> the normalised tensor the model takes,
    with the mean and std of its eval transform."""
    from torchvision import transforms

    mean, std = transform_config.get("mean", (0.5, 0.5, 0.5)), transform_config.get("std", (0.5, 0.5, 0.5))
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(list(mean), list(std))])


class StackedStore:
    """Several complete caches of equally many images as one: row `k * n + p` is position
    `p` of cache `k` (the augmented views of the training split, read by `ViewSource`)."""

    def __init__(self, stores: Sequence[FeatureStore]) -> None:
        self.stores = list(stores)
        self.n = stores[0].index.num_items
        self.index = stores[0].index

    def gather(self, positions: Positions, out: np.ndarray | None = None) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if out is None or len(out) < len(positions):
            out = np.empty((len(positions), self.index.tokens, self.index.dim), dtype=np.float16)
        out = out[: len(positions)]
        which, rows = np.divmod(positions, self.n)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            out[sel] = self.stores[int(k)].gather(rows[sel])
        return out

    def load_all(self) -> np.ndarray:
        return np.concatenate([s.load_all() for s in self.stores])


# --------------------------------------------------------------------------- streaming


class StreamSource:
    """Tokens computed on the fly (no cache): one backbone forward feeds the whole bank.

    The backbone takes `batch_size` images per forward (which bounds its memory); its
    outputs are regrouped into the batches `iterate` is asked for. `block`: whose tokens
    (default: the extractor's deepest block).
    """

    def __init__(
        self,
        extractor: TokenExtractor,
        source: ImageSource,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        on_skip: SkipFn | None = None,
        block: int | None = None,
    ) -> None:
        self.extractor = extractor
        self.block = extractor.blocks[-1] if block is None else block
        self.source = source
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_skip = on_skip
        self.failures: dict[int, str] = {}

    def iterate(
        self,
        positions: Positions,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        positions = np.asarray([p for p in positions if int(p) not in self.failures], dtype=np.int64)
        if shuffle:
            positions = positions[(rng or np.random.default_rng()).permutation(len(positions))]
        loader = make_source_loader(
            self.source, self.extractor.transform, positions, self.batch_size, self.num_workers
        )
        pending_tokens: list[torch.Tensor] = []
        pending_pos: list[np.ndarray] = []
        for batch in loader:
            for pos, reason in batch.failures:
                if pos not in self.failures:
                    self.failures[pos] = reason
                    if self.on_skip is not None:
                        self.on_skip(self.source.path(pos), reason)
            if batch.images is None:
                continue
            pending_tokens.append(block_tokens(self.extractor, batch.images, [self.block])[self.block])
            pending_pos.append(np.asarray(batch.indices, dtype=np.int64))
            # Failures shrink batches; regroup so training steps keep the batch size.
            while sum(len(p) for p in pending_pos) >= batch_size:
                yield _take(pending_tokens, pending_pos, batch_size)
        if pending_pos and not drop_last:
            n = sum(len(p) for p in pending_pos)
            yield _take(pending_tokens, pending_pos, n)


def _take(tokens: list[torch.Tensor], pos: list[np.ndarray], n: int) -> tuple[torch.Tensor, np.ndarray]:
    import torch

    t = torch.cat(tokens)
    p = np.concatenate(pos)
    tokens[:] = [t[n:]] if len(p) > n else []
    pos[:] = [p[n:]] if len(p) > n else []
    return t[:n], p[:n]
