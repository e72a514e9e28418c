"""Training the head bank: one pass over the features per epoch, every head steps on each batch.

Recipes:

- `default` (small data): AdamW, a grid of learning rates x weight decays, cosine schedule
  with linear warm-up (10% of the steps), batch 256, epochs chosen so the run makes about
  1,000 optimizer steps (10 to 100 epochs).
- `paper`: the linear-probe recipe of "Beyond [cls]"'s code (MAE's, with its changes):
  LARS (momentum 0.9, trust coefficient 0.001), base lr 0.1 scaled by batch/256, batch
  16,384 (capped at the training-set size, reached by gradient accumulation) whose
  BatchNorm statistics are taken over micro-batches of 2,048 (the per-GPU batch of its
  published command, which does not synchronise BatchNorm), 90 epochs of which 10 warm-up
  epochs whatever the epoch count, no weight decay, the classifier initialised as
  `nn.Linear` does (not MAE's trunc_normal 0.01). `lrs` then gives base learning rates.

Both optimizers below take parameters with a leading head dimension and a per-head
learning rate and weight decay, which is what lets heads with different hyper-parameters
live in one stacked tensor.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from attnscope import distributed
from attnscope.config import check_at_least, check_choice
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.probe.heads import HeadBank

if TYPE_CHECKING:
    import pandas as pd

    from attnscope.probe.datasets import Positions

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_WDS",
    "LARS",
    "RECIPES",
    "BankAdamW",
    "BankResult",
    "BankSpec",
    "FeatureSource",
    "Recipe",
    "StoreSource",
    "TensorSource",
    "TrainingData",
    "ViewSource",
    "cosine_factor",
    "evaluate_bank",
    "grid_values",
    "resolve_recipe",
    "train_bank",
]

DEFAULT_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_WDS: tuple[float, ...] = (1e-4, 5e-2)
RECIPES: tuple[str, ...] = ("default", "paper")
DEFAULT_BATCH = 256
TARGET_STEPS = 1000
MIN_EPOCHS, MAX_EPOCHS = 10, 100
PAPER_BASE_LR = 0.1
PAPER_BATCH = 16384
PAPER_EPOCHS = 90
PAPER_WARMUP = 10  # epochs, whatever the epoch count (the paper code's --warmup_epochs default)
PAPER_BN_BATCH = 2048  # its published command: 4 GPUs x 2048 images x 2 accumulation steps = 16,384
MAX_MICRO_BATCH = 1024  # larger optimizer batches are reached by gradient accumulation
FEW_STEPS = 1000  # fewer optimizer steps than this in the paper recipe earn a note
BN_PASS_IMAGES = 10000  # images used to recompute BatchNorm statistics after training
BN_KEEP_BYTES = 512 * 2**20  # pooled features kept from that pass to score the same images
ProgressFn = Callable[[int, int, float], None]  # (epochs done, epochs, mean loss of the epoch)


# --------------------------------------------------------------------------- optimizers


def _per_head(values: Tensor, like: Tensor) -> Tensor:
    """(H,) -> (H, 1, 1, ...) broadcastable against a stacked parameter."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _group_lr(group: dict[str, Any], p: Tensor) -> Tensor | float:
    head_lr = group.get("head_lr")
    return group["lr"] if head_lr is None else group["lr"] * _per_head(head_lr, p)


def _group_wd(group: dict[str, Any], p: Tensor) -> Tensor | float:
    head_wd = group.get("head_wd")
    return group["weight_decay"] if head_wd is None else _per_head(head_wd, p)


class BankAdamW(Optimizer):
    """AdamW (decoupled weight decay) with optional per-head lr / wd on stacked parameters.

    A group with `head_lr` (shape (H,)) treats dim 0 of its parameters as the head
    dimension: head h steps with `lr * head_lr[h]` and decays with `head_wd[h]`. `lr` is
    the schedule factor the trainer sets each step.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    # Optimizer.step's overloads, which mypy checks an override against
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        from torch.optim.adamw import adamw

        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            head_lr, head_wd = group.get("head_lr"), group.get("head_wd")
            heads = 1 if head_lr is None else len(head_lr)
            for p in params:
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                    # one step count per head: each update call advances the counts it is given
                    state["steps"] = [
                        torch.zeros((), dtype=torch.float32, device=p.device) for _ in range(heads)
                    ]
            states = [self.state[p] for p in params]
            b1, b2 = group["betas"]
            fused = self._fused(params)
            for h in range(heads):
                # torch's own AdamW update (its fused kernel where the device has one), once
                # per head on that head's slices with that head's lr and wd
                part: Callable[..., Tensor] = (lambda t: t) if head_lr is None else (lambda t, h=h: t[h])  # noqa: E731
                adamw(
                    [part(p) for p in params],
                    [part(p.grad) for p in params],
                    [part(st["m"]) for st in states],
                    [part(st["v"]) for st in states],
                    [],
                    [st["steps"][h] for st in states],
                    fused=fused,
                    amsgrad=False,
                    beta1=b1,
                    beta2=b2,
                    lr=group["lr"] * (1.0 if head_lr is None else float(head_lr[h])),
                    weight_decay=group["weight_decay"] if head_wd is None else float(head_wd[h]),
                    eps=group["eps"],
                    maximize=False,
                )
        return loss

    @staticmethod
    def _fused(params: Sequence[Tensor]) -> bool | None:
        """The fused kernel where torch has one for these tensors, else torch's default."""
        ok = all(p.device.type in ("cpu", "cuda", "mps") and p.dtype in _FUSED_DTYPES for p in params)
        return True if ok else None


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class LARS(Optimizer):
    """LARS with the semantics of MAE's `util/lars.py`, written for stacked heads too.

    Parameters with more than one dimension (per head) get weight decay and the layer-wise
    trust ratio `trust_coefficient * ||p|| / ||dp||`; 1-D ones (biases, the attentive
    query) get plain momentum SGD. For a stacked group (`head_lr` given) the norms are per
    head, so each head is scaled exactly as if it were alone.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    # Optimizer.step's overloads, which mypy checks an override against
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            stacked = group.get("head_lr") is not None
            for p in group["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if (p.ndim - 1 if stacked else p.ndim) > 1:
                    dp = dp + _group_wd(group, p) * p
                    if stacked:
                        param_norm = _per_head(p.flatten(1).norm(dim=1), p)
                        update_norm = _per_head(dp.flatten(1).norm(dim=1), p)
                    else:
                        param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(
                            update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one
                        ),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.sub_(_group_lr(group, p) * mu)
        return loss


def cosine_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then half a cosine to 0 (MAE's per-iteration schedule)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


# --------------------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """What training will actually do (printed, and stored in run.json)."""

    name: str
    optimizer: str
    epochs: int
    warmup_epochs: float
    batch_size: int  # effective: images per optimizer step
    micro_batch: int  # images per forward; batch_size / micro_batch steps are accumulated
    lrs: list[float]
    wds: list[float]
    base_lrs: list[float] | None = None
    epochs_auto: bool = False
    notes: list[str] = field(default_factory=list)
    classifier_init: str = "trunc_normal"  # heads.CLASSIFIER_INITS

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.wds]

    @property
    def accumulation(self) -> int:
        return math.ceil(self.batch_size / self.micro_batch)

    def steps_per_epoch(self, n_train: int) -> int:
        return max(1, n_train // self.batch_size)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grid_size": len(self.grid), "accumulation": self.accumulation}


def grid_values(field: str, values: Sequence[float] | None, *, positive: bool = False) -> list[float] | None:
    """The distinct values of one axis of the grid (learning rates, weight decays), checked:
    at least one, each finite and non-negative (positive with `positive`)."""
    if values is None:
        return None
    vals = [float(v) for v in values]
    if not vals:
        raise ConfigError(field, "needs at least one value")
    if any(not math.isfinite(v) or v < 0 or (positive and v == 0) for v in vals):
        kind = "positive" if positive else "non-negative"
        raise ConfigError(field, f"takes {kind} numbers, got {list(values)}")
    return list(dict.fromkeys(vals))


def resolve_recipe(
    name: str = "default",
    *,
    n_train: int,
    batch_size: int | None = None,
    epochs: int | None = None,
    lrs: Sequence[float] | None = None,
    wds: Sequence[float] | None = None,
    micro_batch: int | None = None,
    warmup_epochs: float | None = None,
) -> Recipe:
    """Fill in a recipe's defaults for a training split of `n_train` images.

    `micro_batch`: images per forward (the BatchNorm batch); default 1,024, and 2,048 for
    the paper recipe. `warmup_epochs`: default 10% of the epochs, 10 for the paper recipe."""
    if n_train < 2:
        raise AttnscopeError(f"training needs at least 2 images, got {n_train}")
    check_choice("recipe", name, RECIPES)
    check_at_least("batch_size", batch_size, 2)
    check_at_least("epochs", epochs, 1)
    if warmup_epochs is not None and (not math.isfinite(warmup_epochs) or warmup_epochs < 0):
        raise ConfigError("warmup_epochs", f"must be a non-negative number, got {warmup_epochs}")
    lrs_, wds_ = grid_values("lrs", lrs, positive=True), grid_values("wds", wds)
    notes: list[str] = []
    if name == "default":
        requested = batch_size or DEFAULT_BATCH
        batch = min(requested, n_train)
        if batch < requested:
            notes.append(f"batch size capped at the {n_train} training images")
        steps = max(1, n_train // batch)
        auto = epochs is None
        n_epochs = epochs or min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps)))
        warmup = 0.1 * n_epochs if warmup_epochs is None else warmup_epochs
        recipe = Recipe(
            "default", "adamw", n_epochs, warmup, batch, 0, lrs_ or list(DEFAULT_LRS),
            wds_ if wds_ is not None else list(DEFAULT_WDS), None, auto, notes,
        )  # fmt: skip
    else:
        recipe = _paper_recipe(n_train, batch_size, epochs, lrs_, wds_, warmup_epochs)
    cap = micro_batch or (PAPER_BN_BATCH if name == "paper" else MAX_MICRO_BATCH)
    n_micro = math.ceil(recipe.batch_size / cap)
    recipe.micro_batch = math.ceil(recipe.batch_size / n_micro)  # even chunks: no BatchNorm on 1 image
    return recipe


def _paper_recipe(
    n_train: int,
    batch_size: int | None,
    epochs: int | None,
    lrs: list[float] | None,
    wds: list[float] | None,
    warmup_epochs: float | None,
) -> Recipe:
    """The paper code's recipe at this training-set size, with notes where it cannot be itself."""
    notes: list[str] = []
    requested = batch_size or PAPER_BATCH
    batch = min(requested, n_train)
    if batch < requested:
        notes.append(f"batch {requested} capped at the {n_train} training images")
    base = lrs or [PAPER_BASE_LR]
    n_epochs = epochs or PAPER_EPOCHS
    warmup = PAPER_WARMUP if warmup_epochs is None else warmup_epochs
    if warmup >= n_epochs:
        notes.append(
            f"all {n_epochs} epochs are warm-up ({warmup:g} warm-up epochs): the learning rate never "
            "reaches its peak, as in the paper's code; give more `epochs` or fewer `warmup_epochs`"
        )
    steps = n_epochs * max(1, n_train // batch)
    if steps < FEW_STEPS:
        notes.append(_few_steps_note(n_train, batch, n_epochs, steps))
    return Recipe(
        "paper", "lars", n_epochs, warmup, batch, 0, [b * batch / 256 for b in base],
        wds if wds is not None else [0.0], base, False, notes, "linear_default",
    )  # fmt: skip


def _few_steps_note(n_train: int, batch: int, epochs: int, steps: int) -> str:
    """Why a short schedule may under-train, with two ways to more optimizer steps."""
    per_epoch = max(1, n_train // batch)
    need_epochs = math.ceil(FEW_STEPS / per_epoch)
    smaller = [b for b in (2**k for k in range(4, 15)) if b < batch and epochs * (n_train // b) >= FEW_STEPS]
    by_batch = ""
    if smaller:
        b = smaller[-1]
        total = epochs * (n_train // b)
        by_batch = (
            f"a smaller `batch_size` ({b}: {n_train // b} steps per epoch, {total:,} steps; "
            "the learning rate scales with the batch) or "
        )
    return (
        f"recipe paper: {epochs} epochs x {per_epoch} optimizer step(s) of {batch} images = {steps} steps, "
        f"fewer than {FEW_STEPS:,} (the paper's ImageNet-1k run makes 90 x 78 = 7,020); heads may be "
        f"under-trained. For more steps give {by_batch}more `epochs` ({need_epochs:,} at this batch)"
    )


# --------------------------------------------------------------------------- feature sources


class FeatureSource(Protocol):
    """Yields `(tokens (b, T, D) on the device, positions (b,))` batches.

    Tokens may be float16 (the cache's dtype; the heads convert) and a yielded batch may be
    overwritten when the next one is requested: sources copy every batch into one reused
    buffer, so a consumer that keeps a batch must clone it.
    """

    def iterate(
        self,
        positions: Positions,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, np.ndarray]]: ...


def _chunks(
    positions: Positions, batch_size: int, shuffle: bool, rng: np.random.Generator | None, drop_last: bool
) -> Iterator[np.ndarray]:
    """The batches of positions every FeatureSource yields: optionally shuffled, in order."""
    pos = np.asarray(positions, dtype=np.int64)
    if shuffle:
        pos = pos[(rng or np.random.default_rng()).permutation(len(pos))]
    for start in range(0, len(pos), batch_size):
        chunk = pos[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield chunk


class TensorSource:
    """Features held in memory (a loaded cache, or synthetic data in tests), any float dtype."""

    def __init__(self, tokens: Tensor | np.ndarray, device: str | torch.device = "cpu") -> None:
        self.tokens = (
            torch.from_numpy(np.ascontiguousarray(tokens)) if isinstance(tokens, np.ndarray) else tokens
        )
        self.device = torch.device(device)

    def iterate(
        self,
        positions: Positions,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, np.ndarray]]:
        buf = torch.empty((min(batch_size, len(positions)), *self.tokens.shape[1:]), dtype=self.tokens.dtype)
        for chunk in _chunks(positions, batch_size, shuffle, rng, drop_last):
            out = buf[: len(chunk)]
            torch.index_select(self.tokens, 0, torch.from_numpy(chunk), out=out)
            yield out.to(self.device, non_blocking=True), chunk


class StoreSource:
    """Features read from the memory-mapped cache batch by batch (caches larger than RAM)."""

    def __init__(self, store: Any, device: str | torch.device = "cpu") -> None:
        self.store = store
        self.device = torch.device(device)

    def iterate(
        self,
        positions: Positions,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, np.ndarray]]:
        buf: np.ndarray | None = None
        for chunk in _chunks(positions, batch_size, shuffle, rng, drop_last):
            buf = self.store.gather(chunk, out=buf)
            yield torch.from_numpy(buf[: len(chunk)]).to(self.device), chunk


VIEW_STREAM = 42  # random stream of the view each image shows in an epoch


class ViewSource:
    """K cached augmented views of the training images behind one `FeatureSource`: position
    `p` of view `v` is row `v * n + p` of `inner` (a `StackedStore` or its tensor). Each
    epoch (`set_epoch`) every image shows one view, drawn seeded by (seed, epoch), and
    `iterate` serves the chosen view's tokens under the image's own position."""

    def __init__(self, inner: FeatureSource, n_items: int, views: int, seed: int = 0) -> None:
        self.inner, self.n, self.views, self.seed = inner, int(n_items), int(views), int(seed)
        self.choice = np.zeros(self.n, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.choice = np.random.default_rng([self.seed, VIEW_STREAM, int(epoch)]).integers(
            0, self.views, self.n
        )

    def iterate(
        self,
        positions: Positions,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, np.ndarray]]:
        pos = np.asarray(positions, dtype=np.int64)
        if shuffle:
            pos = pos[(rng or np.random.default_rng()).permutation(len(pos))]
        rows = self.choice[pos] * self.n + pos
        for tokens, served in self.inner.iterate(rows, batch_size, drop_last=drop_last):
            yield tokens, served % self.n


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingData:
    """What a bank trains and is measured on: positions into each source; labels by position.

    The hold-out is a set of positions of the training source, kept out of training and
    used to select hyper-parameters.
    """

    train_source: FeatureSource
    train_labels: np.ndarray
    train_positions: Positions
    holdout_positions: Positions
    eval_source: FeatureSource
    eval_labels: np.ndarray
    eval_positions: Positions
    # augmented views the training steps read instead of `train_source` (one view per image
    # and epoch); the BatchNorm pass and every measurement read the plain images
    augmented: ViewSource | None = None


@dataclass(frozen=True)
class BankSpec:
    """The heads to train: which aggregators, over which token layout, for how many classes."""

    aggregators: Sequence[str]
    num_classes: int
    dim: int
    num_prefix: int  # tokens before the patches (class token and registers)
    has_cls: bool
    abmilp_depth: int = 1
    grid: tuple[int, int] | None = None  # the patch grid (rows, columns): where each patch is

    def build(self, num_heads: int, seed: int, classifier_init: str = "trunc_normal") -> HeadBank:
        """A freshly initialised bank with `num_heads` heads per aggregator."""
        return HeadBank(
            self.aggregators, num_heads, self.dim, self.num_classes, num_prefix=self.num_prefix,
            has_cls=self.has_cls, abmilp_depth=self.abmilp_depth, seed=seed, classifier_init=classifier_init,
            grid=self.grid,
        )  # fmt: skip


@dataclass
class BankResult:
    """Every head's accuracies (one row per aggregator x grid point) and the trained bank."""

    results: pd.DataFrame
    bank: HeadBank
    recipe: Recipe
    losses: list[float]
    steps: int
    seconds: float
    eval_hits: dict[str, np.ndarray] = field(default_factory=dict)  # aggregator -> (images, H) top-1 hits
    # with `curves`: every head measured after every epoch (train, holdout, eval rows), the
    # last epoch's rows being the final measurement; and the seconds those measurements took
    curves: pd.DataFrame | None = None
    curve_seconds: float = 0.0


def _param_groups(bank: HeadBank, grid: Sequence[tuple[float, float]]) -> list[dict[str, Any]]:
    lrs = torch.tensor([lr for lr, _ in grid], dtype=torch.float32)
    wds = torch.tensor([wd for _, wd in grid], dtype=torch.float32)
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for p in bank.parameters():
        # Per head a parameter has p.ndim - 1 dimensions; like MAE and timm, only matrices
        # are decayed (not biases, not the attentive query).
        (decay if p.ndim - 1 >= 2 else no_decay).append(p)
    groups = [{"params": decay, "head_lr": lrs, "head_wd": wds, "lr": 0.0, "weight_decay": 0.0}]
    if no_decay:
        groups.append(
            {
                "params": no_decay,
                "head_lr": lrs,
                "head_wd": torch.zeros_like(wds),
                "lr": 0.0,
                "weight_decay": 0.0,
            }
        )
    return groups


def _bank_loss_sum(logits: dict[str, Tensor], target: Tensor) -> Tensor:
    """Sum over every head and image of the cross-entropy: heads share no parameters, so
    each one's gradient is exactly what it would get trained alone. Summed, not averaged,
    so that a process holding no image of a batch adds zero instead of 0/0."""
    total = logits[next(iter(logits))].new_zeros(())
    for lg in logits.values():
        h, b, c = lg.shape
        total = total + F.cross_entropy(lg.reshape(h * b, c), target.repeat(h), reduction="sum")
    return total


def _micro_chunks(n_items: int, micro: int) -> list[int]:
    """Sizes of even micro-batches that make up `n_items` (no chunk of one image)."""
    k = math.ceil(n_items / micro)
    base, extra = divmod(n_items, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


# --------------------------------------------------------------------------- data parallel
#
# Under torchrun without a cache (`no_cache`) every rank streams its own images through the
# backbone and the bank is trained data-parallel. Every batch of the single-process plan (the
# same seeded order, the same micro-batches) is split over the ranks, positions
# `rank, rank + world, ...` of it, so the ranks' shares are disjoint, unpadded, and add up
# to the batch one process would take. Per micro-batch the ranks exchange how many images
# they hold (and whether they failed), which keeps every rank on the same sequence of
# collectives: each rank runs forward and backward for every micro-batch, even with no
# image; a micro-batch of fewer than 2 images in total is skipped by all of them.
#
# Gradients are summed with one all-reduce of the whole bank per optimizer step, not with
# DistributedDataParallel: (1) each rank's loss is its sum of per-image losses over the
# *global* batch size, so the sum over ranks is exactly the single-process gradient, while
# DDP averages per-rank means, which weighs images unequally when shares differ by one;
# (2) gradient accumulation over micro-batches needs one exchange per step, which DDP
# only gives with `no_sync()` bookkeeping; (3) DDP would broadcast the BatchNorm buffers
# from rank 0 before every forward, which the synchronised statistics below make moot.
# BankAdamW and LARS step on the summed `.grad`s unchanged. DDP's overlap of
# communication with backward buys nothing for a head bank of a few MB whose step costs
# far less than the backbone forwards that feed it.
#
# BatchNorm: in train mode the bank normalises with statistics of the whole distributed
# micro-batch (`heads.synced_batch_norm`), so each step is the single-process step and
# the running statistics stay identical on every rank.


class _SumOverRanks(torch.autograd.Function):
    """Sum over the ranks whose backward sums the incoming gradients over the ranks too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return distributed.all_reduce_sum(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return distributed.all_reduce_sum(grad)


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Differentiable all-reduce (sum) of `tensor` over every rank."""
    return _SumOverRanks.apply(tensor)


@dataclass
class _Ranks:
    """Who this process is in data-parallel training (rank 0 of 1 otherwise)."""

    parallel: bool = False
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, data_parallel: bool) -> _Ranks:
        if not data_parallel or not distributed.is_distributed():
            return cls()
        return cls(True, distributed.rank(), distributed.world_size())

    @property
    def sync(self) -> Callable[[Tensor], Tensor] | None:
        return sum_over_ranks if self.parallel else None

    def share(self, positions: np.ndarray) -> np.ndarray:
        return positions[self.rank :: self.world]

    def total(self, count: int, error: BaseException | None) -> int:
        """How many images the ranks hold together; every rank raises if one failed."""
        if self.parallel:
            return distributed.sum_and_agree(count, error)
        if error is not None:
            raise error
        return count

    def all_reduce(self, tensor: Tensor) -> Tensor:
        return distributed.all_reduce_sum(tensor) if self.parallel else tensor


def _split(order: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(order, np.cumsum(sizes)[:-1]) if len(sizes) else []


def _planned(
    source: FeatureSource, chunks: Sequence[np.ndarray], batch_size: int
) -> Iterator[tuple[Tensor | None, np.ndarray]]:
    """For every planned chunk, in order: the tokens of those of its positions the source
    could read (None and an empty array when none), whatever batches the source cuts.

    A streaming source drops unreadable images and regroups the rest, so its batches need
    not line up with the plan; positions are unique within a plan and come in plan order.
    """
    sizes = [len(c) for c in chunks]
    order = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    chunk_of = np.repeat(np.arange(len(chunks)), sizes)
    sorter = np.argsort(order, kind="stable")
    buf_t: list[Tensor] = []
    buf_p: list[np.ndarray] = []
    k = 0

    def flush() -> tuple[Tensor | None, np.ndarray]:
        out = (
            (torch.cat(buf_t) if buf_t else None),
            (np.concatenate(buf_p) if buf_p else np.zeros(0, dtype=np.int64)),
        )
        buf_t.clear()
        buf_p.clear()
        return out

    if len(order):
        for tokens, pos in source.iterate(order, batch_size):
            ids = chunk_of[sorter[np.searchsorted(order, pos, sorter=sorter)]]
            if not buf_p and len(pos) == sizes[k] and ids[0] == k and ids[-1] == k:
                yield tokens, pos  # the usual case: the source cut exactly the planned chunk
                k += 1
                continue
            start = 0
            while start < len(pos):
                cid = int(ids[start])
                while k < cid:  # chunk k is over: its other positions were unreadable
                    yield flush()
                    k += 1
                end = start + int(np.searchsorted(ids[start:], cid, side="right"))
                buf_t.append(tokens[start:end].clone())  # sources reuse their buffers
                buf_p.append(pos[start:end])
                start = end
                if sum(len(b) for b in buf_p) == sizes[k]:
                    yield flush()
                    k += 1
    while k < len(chunks):
        yield flush()
        k += 1


def _agreed_batches(
    source: FeatureSource, chunks: Sequence[np.ndarray], batch_size: int, ranks: _Ranks
) -> Iterator[tuple[Tensor | None, np.ndarray, int]]:
    """`(tokens, positions, images over all ranks)` for this rank's share of every chunk.

    A failure while reading (an image loader, the backbone of a streaming source) is
    agreed on before the next collective, so every rank raises at the same chunk.
    """
    stream = _planned(source, [ranks.share(c) for c in chunks], batch_size)
    for _ in range(len(chunks)):
        tokens, pos, error = None, np.zeros(0, dtype=np.int64), None
        try:
            tokens, pos = next(stream)
        except Exception as exc:
            error = exc
        total = ranks.total(len(pos), error)
        yield tokens, pos, total


def _empty_tokens(bank: HeadBank, device: torch.device) -> Tensor:
    """A batch of no image, for a rank whose share of a micro-batch is empty (it must still
    take part in the BatchNorm and gradient collectives)."""
    return torch.zeros((0, bank.num_prefix + 1, bank.dim), device=device)


@torch.no_grad()
def recompute_bn_stats(
    bank: HeadBank,
    source: FeatureSource,
    positions: Positions,
    batch_size: int,
    *,
    data_parallel: bool = False,
    keep_inputs: bool = False,
) -> list[tuple[list[Tensor], np.ndarray]] | None:
    """Exact BatchNorm statistics of the trained heads over `positions` (a cumulative
    average, instead of the momentum average of the last steps, which on a small dataset
    mixes statistics of heads that were still changing).

    `data_parallel`: each rank reads its share of every batch and the statistics of each
    batch are taken over all ranks, so the result is the single-process one, on every rank.
    `keep_inputs`: also return this rank's `(bank.bn_inputs, positions)` of every batch, so
    `evaluate_bank(features=...)` can score the same images without reading and pooling
    them again.
    """
    ranks = _Ranks.current(data_parallel)
    bns = [m for m in bank.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    bank.train()
    positions = np.asarray(positions, dtype=np.int64)
    chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    device = next(bank.parameters()).device
    kept: list[tuple[list[Tensor], np.ndarray]] | None = [] if keep_inputs else None
    for tokens, pos, total in _agreed_batches(source, chunks, math.ceil(batch_size / ranks.world), ranks):
        if total <= 1 and (kept is None or not len(pos)):
            continue  # BatchNorm cannot train on one image; nothing to keep either
        inputs = bank.bn_inputs(tokens if tokens is not None else _empty_tokens(bank, device))
        if total > 1:
            bank.normalize(inputs, sync=ranks.sync)  # train mode: updates the running statistics
        if kept is not None and len(pos):
            # cloned: some inputs are views of the batch (the class token), whose memory a
            # source or the bank's patch buffer may reuse for the next batch
            kept.append(([x.clone() for x in inputs], np.asarray(pos)))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    bank.eval()
    return kept


@torch.no_grad()
def evaluate_bank(
    bank: HeadBank,
    source: FeatureSource,
    labels: np.ndarray,
    positions: Positions,
    batch_size: int,
    *,
    data_parallel: bool = False,
    features: Sequence[tuple[Sequence[Tensor], np.ndarray]] | None = None,
    per_image: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per aggregator: top-1, top-5 (NaN with 5 classes or fewer), mean loss, each (H,),
    and `images`, how many images were measured (unreadable ones of a streaming source
    are not). With `per_image`, also `hits`: (images, H) top-1 hits in position order, and
    `positions`, for intervals over images.

    `features`: `(bank.bn_inputs, positions)` batches kept by `recompute_bn_stats` for
    exactly `positions` (this rank's share of them when data-parallel); then `source` is
    not read.

    `data_parallel`: each rank measures its share of `positions` (disjoint, unpadded) and
    the counts are summed over the ranks, so every image counts exactly once.
    """
    ranks = _Ranks.current(data_parallel)
    bank.eval()
    h = bank.num_heads
    k = 5 if bank.num_classes > 5 else 0
    # rows per aggregator: top-1 hits, top-5 hits, summed loss; float64 so the sum over ranks is exact
    sums = torch.zeros(len(bank.names), 3, h, dtype=torch.float64)
    count = 0
    hits: list[list[np.ndarray]] = [[] for _ in bank.names]
    seen: list[np.ndarray] = []
    if features is None:
        share = ranks.share(np.asarray(positions, dtype=np.int64))
        batches = ((bank(tokens), pos) for tokens, pos in source.iterate(share, batch_size))
    else:
        batches = ((bank.classify_inputs(inputs), pos) for inputs, pos in features)
    with distributed.step() if ranks.parallel else contextlib.nullcontext():
        for logits, pos in batches:
            target = torch.from_numpy(labels[pos]).to(next(iter(logits.values())).device)
            for i, lg in enumerate(logits.values()):
                correct = lg.argmax(-1) == target  # (H, B)
                sums[i, 0] += correct.sum(-1).cpu().double()
                if per_image:
                    hits[i].append(correct.T.cpu().numpy())
                if k:
                    sums[i, 1] += (
                        (lg.topk(k, dim=-1).indices == target[:, None]).any(-1).sum(-1).cpu().double()
                    )
                loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.repeat(h), reduction="none")
                sums[i, 2] += loss.view(h, -1).sum(-1).cpu().double()
            count += len(pos)
            seen.append(np.asarray(pos, dtype=np.int64))
    total = ranks.all_reduce(torch.cat([sums.reshape(-1), torch.tensor([float(count)], dtype=torch.float64)]))
    summed, count = total[:-1].view_as(sums).numpy(), int(total[-1])
    out = {}
    for i, name in enumerate(bank.names):
        acc = {
            key: summed[i, j] / count if count else np.full(h, np.nan)
            for j, key in enumerate(("top1", "top5", "loss"))
        }
        if not k:
            acc["top5"] = np.full(h, np.nan)
        acc["images"] = count
        out[name] = acc
    if per_image:
        _add_hits(out, bank.names, hits, seen, h, ranks)
    return out


def _add_hits(
    out: dict[str, dict[str, Any]],
    names: Sequence[str],
    hits: list[list[np.ndarray]],
    seen: list[np.ndarray],
    h: int,
    ranks: _Ranks,
) -> None:
    """Each aggregator's per-image hits in position order, gathered from every rank."""
    local = {
        "positions": np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64),
        "hits": [np.concatenate(x) if x else np.zeros((0, h), dtype=bool) for x in hits],
    }
    parts = distributed.all_gather(local) if ranks.parallel else [local]
    positions = np.concatenate([p["positions"] for p in parts])
    order = np.argsort(positions, kind="stable")
    for i, name in enumerate(names):
        out[name]["hits"] = np.concatenate([p["hits"][i] for p in parts])[order]
        out[name]["positions"] = positions[order]


def train_bank(
    data: TrainingData,
    spec: BankSpec,
    recipe: Recipe,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    data_parallel: bool = False,
    curves: bool = False,
) -> BankResult:
    """Train every (aggregator, lr, wd) head together and measure each one.

    Each training batch is read once and every head takes its step on it. Accuracies are
    measured after training on the training split (at most `BN_PASS_IMAGES` of it), the
    hold-out and the evaluation split.

    `curves`: measure every head the same way after every epoch too (`BankResult.curves`,
    one row per head, epoch and split). Measuring recomputes the BatchNorm statistics,
    which training in train mode never reads, so the heads train exactly as without
    curves, and the last epoch's rows are the final measurement itself.

    `data_parallel` (under torchrun; every rank calls this with the same arguments): each
    rank reads its share of every batch, gradients and BatchNorm statistics are summed
    over the ranks, so every rank ends with the same bank, the one a single process would
    train on the same features (up to float rounding); `recipe.batch_size` stays the
    global batch. Accuracies count every image once over all ranks.
    """
    ranks = _Ranks.current(data_parallel)
    device = torch.device(device)
    positions = np.asarray(data.train_positions, dtype=np.int64)
    labels = np.asarray(data.train_labels, dtype=np.int64)
    if len(positions) < 2:
        raise AttnscopeError(f"only {len(positions)} readable training images; need at least 2")
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 21])  # the epochs' orders, then the BatchNorm pass's images
    bn_positions = _bn_positions(positions, rng, recipe.epochs)
    bank = spec.build(len(recipe.grid), seed, recipe.classifier_init).to(device)
    bank.reuse_buffers = True  # every forward below is backpropagated (or no-grad) before the next one
    loop = _Loop(bank, data.augmented or data.train_source, labels, recipe, len(positions), ranks, device)
    losses: list[float] = []
    rows: list[dict[str, Any]] = []
    start, curve_seconds = time.perf_counter(), 0.0
    for epoch in range(recipe.epochs):
        bank.train()
        if data.augmented is not None:
            data.augmented.set_epoch(epoch)
        # the same seeded order on every rank; each takes its share of every micro-batch
        order = positions[rng.permutation(len(positions))][: loop.steps_per_epoch * loop.batch]
        epoch_loss, seen = loop.epoch(order)
        if ranks.parallel:
            epoch_loss, seen = ranks.all_reduce(
                torch.tensor([epoch_loss, float(seen)], dtype=torch.float64)
            ).tolist()
        losses.append(epoch_loss / max(1, seen))
        if curves and epoch + 1 < recipe.epochs:
            t = time.perf_counter()
            scores = _measure(bank, data, recipe, bn_positions, ranks, per_image=False)
            rows += _curve_rows(bank, recipe.grid, epoch + 1, loop.step, *scores)
            curve_seconds += time.perf_counter() - t
        if progress is not None:
            progress(epoch + 1, recipe.epochs, losses[-1])
    seconds = time.perf_counter() - start - curve_seconds
    measured = _measure(bank, data, recipe, bn_positions, ranks)
    if curves:
        rows += _curve_rows(bank, recipe.grid, recipe.epochs, loop.step, *measured)
    table = _results_table(bank, recipe.grid, *measured, seed=seed)
    hits = {name: measured[2][name]["hits"] for name in bank.names}
    table_of_curves = _curves_table(rows) if curves else None
    return BankResult(table, bank, recipe, losses, loop.step, seconds, hits, table_of_curves, curve_seconds)


def _bn_positions(positions: np.ndarray, rng: np.random.Generator, epochs: int) -> np.ndarray:
    """The training images the BatchNorm statistics are recomputed over: all of them, or
    `BN_PASS_IMAGES` drawn from `rng` after the epochs' orders (drawn here from a copy, so
    the per-epoch measurements of the learning curves use the final pass's images)."""
    if len(positions) <= BN_PASS_IMAGES:
        return positions
    ahead = copy.deepcopy(rng)
    for _ in range(epochs):
        ahead.permutation(len(positions))
    return np.sort(ahead.choice(positions, BN_PASS_IMAGES, replace=False))


CURVE_SPLITS = ("train", "holdout", "eval")


def _curve_rows(
    bank: HeadBank,
    grid: Sequence[tuple[float, float]],
    epoch: int,
    step: int,
    on_train: Scores,
    on_hold: Scores | None,
    on_eval: Scores,
) -> list[dict[str, Any]]:
    """One row per head and split of one epoch's measurement (the hold-out only when there is one)."""
    rows = []
    for name in bank.names:
        for split, scores in zip(CURVE_SPLITS, (on_train, on_hold, on_eval), strict=True):
            if scores is None:
                continue
            for h, (lr, wd) in enumerate(grid):
                rows.append(
                    {
                        "aggregator": name, "lr": lr, "wd": wd, "head": h, "epoch": epoch, "step": step,
                        "split": split, "top1": scores[name]["top1"][h], "top5": scores[name]["top5"][h],
                        "loss": scores[name]["loss"][h], "images": scores[name]["images"],
                        "optimistic": split == "eval",
                    }
                )  # fmt: skip
    return rows


def _curves_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows)


class _Loop:
    """The optimizer, batch plan and learning-rate schedule of one training run.

    An optimizer step is `batch` images (the global batch under data-parallel training) in
    `chunks` micro-batches whose gradients accumulate; the schedule is per step.
    """

    def __init__(
        self,
        bank: HeadBank,
        source: FeatureSource,
        labels: np.ndarray,
        recipe: Recipe,
        n_train: int,
        ranks: _Ranks,
        device: torch.device,
    ) -> None:
        self.bank, self.source, self.labels, self.ranks, self.device = bank, source, labels, ranks, device
        groups = _param_groups(bank, recipe.grid)
        self.opt: Optimizer = LARS(groups) if recipe.optimizer == "lars" else BankAdamW(groups)
        self.params = list(bank.parameters())
        self.batch = min(recipe.batch_size, n_train)
        self.steps_per_epoch = max(1, n_train // self.batch)
        self.total_steps = recipe.epochs * self.steps_per_epoch
        self.warmup_steps = round(recipe.warmup_epochs * self.steps_per_epoch)
        self.chunks = _micro_chunks(self.batch, recipe.micro_batch)
        self.share_batch = math.ceil(recipe.micro_batch / ranks.world)  # images per forward on this rank
        self.n_heads = len(bank.names) * len(recipe.grid)
        self.step = 0

    def epoch(self, order: np.ndarray) -> tuple[float, int]:
        """One pass over `order` (whole batches): (summed loss per head, images seen), this rank's."""
        bank, opt, ranks, per_step = self.bank, self.opt, self.ranks, len(self.chunks)
        plan = _split(order, self.chunks * self.steps_per_epoch)
        epoch_loss, seen, step_images = 0.0, 0, 0
        for i, (tokens, pos, total) in enumerate(_agreed_batches(self.source, plan, self.share_batch, ranks)):
            if i % per_step == 0:
                for g in opt.param_groups:
                    g["lr"] = cosine_factor(self.step, self.total_steps, self.warmup_steps)
                opt.zero_grad(set_to_none=True)
                step_images = 0
            if total >= 2:  # BatchNorm cannot train on one image (unreadable images shrink batches)
                if tokens is None:
                    tokens = _empty_tokens(bank, self.device)
                target = torch.from_numpy(self.labels[pos]).to(self.device)
                loss = _bank_loss_sum(bank(tokens, sync=ranks.sync), target)
                (loss / self.batch).backward()  # per image 1/batch: the mean over the planned (global) batch
                epoch_loss += float(loss.detach()) / self.n_heads
                seen += len(pos)
                step_images += total
            if (i + 1) % per_step == 0 and step_images:  # the same decision on every rank
                if ranks.parallel:
                    _sum_gradients(self.params)
                opt.step()
                self.step += 1
        return epoch_loss, seen


Scores = dict[str, dict[str, Any]]  # evaluate_bank's result


def _measure(
    bank: HeadBank,
    data: TrainingData,
    recipe: Recipe,
    bn_positions: np.ndarray,
    ranks: _Ranks,
    *,
    per_image: bool = True,
) -> tuple[Scores, Scores | None, Scores]:
    """Scores on the training split (`bn_positions` of it), the hold-out (None when empty)
    and the evaluation split (with per-image hits if `per_image`), after the BatchNorm
    statistics are recomputed over `bn_positions`."""
    labels = np.asarray(data.train_labels, dtype=np.int64)
    eval_batch = max(recipe.micro_batch, 2)
    # Keep the pooled features of the BatchNorm pass (unless they are large) to score the
    # training images from them: one pass over the training split instead of two. The
    # decision depends only on sizes every rank knows, so all ranks take the same path.
    keep = bank.bn_input_bytes(len(bn_positions)) <= BN_KEEP_BYTES
    kept = recompute_bn_stats(
        bank, data.train_source, bn_positions, eval_batch, data_parallel=ranks.parallel, keep_inputs=keep
    )
    measure: dict[str, Any] = {"batch_size": eval_batch, "data_parallel": ranks.parallel}
    on_train = evaluate_bank(bank, data.train_source, labels, bn_positions, features=kept, **measure)
    del kept  # free the kept features before the other passes
    holdout = np.asarray(data.holdout_positions, dtype=np.int64)
    on_hold = evaluate_bank(bank, data.train_source, labels, holdout, **measure) if len(holdout) else None
    eval_labels = np.asarray(data.eval_labels, dtype=np.int64)
    on_eval = evaluate_bank(
        bank, data.eval_source, eval_labels, data.eval_positions, per_image=per_image, **measure
    )
    return on_train, on_hold, on_eval


def _results_table(
    bank: HeadBank,
    grid: Sequence[tuple[float, float]],
    on_train: Scores,
    on_hold: Scores | None,
    on_eval: Scores,
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (aggregator, grid point): its hyper-parameters, size and scores, with the
    95% bootstrap interval of each evaluation accuracy (probe/intervals.py)."""
    import pandas as pd

    from attnscope.probe.intervals import accuracy_intervals

    rows = []
    for name in bank.names:
        params_per_head = bank.params_per_head(name)
        low, high = accuracy_intervals(on_eval[name]["hits"], seed)
        for h, (lr, wd) in enumerate(grid):
            rows.append(
                {
                    "aggregator": name,
                    "lr": lr,
                    "wd": wd,
                    "params": params_per_head,
                    "train_top1": on_train[name]["top1"][h],
                    "holdout_top1": on_hold[name]["top1"][h] if on_hold else np.nan,
                    "holdout_loss": on_hold[name]["loss"][h] if on_hold else np.nan,
                    "eval_top1": on_eval[name]["top1"][h],
                    "eval_top1_ci_low": low[h],
                    "eval_top1_ci_high": high[h],
                    "eval_top5": on_eval[name]["top5"][h],
                    "train_loss": on_train[name]["loss"][h],
                    "eval_images": on_eval[name]["images"],
                    "head": h,
                }
            )
    return pd.DataFrame(rows)


def _sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every gradient by its sum over the ranks: one all-reduce for the whole bank.

    Each rank's loss is its images' summed loss over the global batch size, so the sum is
    the gradient of the mean over the global batch, exactly as one process computes it.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    total = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = total[offset : offset + g.numel()].view_as(p)
        offset += g.numel()
