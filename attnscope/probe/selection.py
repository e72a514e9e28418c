"""What a trained bank is read for: each aggregator's selected head, and what the probe selects.

`select_hyperparameters` picks each aggregator's (lr, wd) head on the hold-out (not on the
evaluation split). `selection_maps` draws, for a few evaluation images, a selective head's
weights over the patches beside the model's own last-block [cls] attention (`MapRecord`);
`maps_table` is their maps.csv.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from attnscope.capture import BlockTensors
    from attnscope.data import ImageBatch
    from attnscope.models import TokenLayout
    from attnscope.probe.datasets import LabelledSplit, Positions
    from attnscope.probe.features import TokenExtractor
    from attnscope.probe.heads import HeadBank
    from attnscope.probe.train import FeatureSource

__all__ = ["MapRecord", "add_best_epochs", "maps_table", "select_hyperparameters", "selection_maps"]

_MAPS_STREAM = 32  # random stream of the images drawn for the maps


def grid_edge_notes(results: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """A note for each aggregator whose selected lr or wd sits at an edge of its grid.

    The best value may then lie outside the grid; the note proposes the next grid, one
    geometric step further (the step of the grid's last two values at that edge)."""
    notes = []
    for row in summary.itertuples():
        group = results[results["aggregator"] == row.aggregator]
        for field, column in (("lrs", "lr"), ("wds", "wd")):
            grid = sorted(set(float(v) for v in group[column]))
            chosen = float(getattr(row, column))
            if len(grid) < 2 or chosen not in (grid[0], grid[-1]):
                continue
            top = chosen == grid[-1]
            if not top and chosen <= 0:
                continue  # nothing lies below a weight decay of 0
            inner = grid[-2] if top else grid[1]
            suggestion = ""
            if inner > 0 and chosen > 0:
                # one grid step further, at most a factor of 10 per step
                step = min(chosen / inner, 10.0) if top else max(chosen / inner, 0.1)
                values = [chosen * step**k for k in (range(3) if top else (2, 1, 0))]
                if column == "wd" and not top:
                    values = [0.0, chosen * step, chosen]  # weight decay can go all the way to 0
                suggestion = f"; try `{field}` " + ",".join(f"{v:.3g}" for v in values)
            side = "largest" if top else "smallest"
            notes.append(
                f"{row.aggregator}: the selected {column} {chosen:g} is the {side} "
                f"of the grid ({', '.join(f'{v:g}' for v in grid)}), so the best one may lie beyond it"
                + suggestion
            )
    return notes


def select_hyperparameters(
    results: pd.DataFrame, hits: Mapping[str, np.ndarray] | None = None, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results with a `selected` column, summary with one row per aggregator).

    Each aggregator's head (its lr and wd) is chosen on the hold-out (else on training
    accuracy); ties go to the lower hold-out loss, then the smaller lr and wd.

    `best_over_grid_eval_top1` is the best evaluation accuracy of any head of that
    aggregator: an optimistic number (selected on the evaluation split itself), reported
    separately because that is what papers that pick the best epoch on ImageNet val report.
    """
    import pandas as pd

    results = results.copy()
    results["selected"] = False
    rows = []
    for name, group in results.groupby("aggregator", sort=False):
        if group["holdout_top1"].notna().any():
            key, loss, selected_on = "holdout_top1", "holdout_loss", "holdout"
        else:
            key, loss, selected_on = "train_top1", "train_loss", "train"
        ranked = group.sort_values(
            [key, loss, "lr", "wd"], ascending=[False, True, True, True], kind="stable"
        )
        best = ranked.iloc[0]
        results.loc[best.name, "selected"] = True
        rows.append(
            {
                "aggregator": name,
                "lr": best["lr"],
                "wd": best["wd"],
                "params": int(best["params"]),
                "selected_on": selected_on,
                "holdout_top1": best["holdout_top1"],
                "train_top1": best["train_top1"],
                "eval_top1": best["eval_top1"],
                **{c: best[c] for c in ("eval_top1_ci_low", "eval_top1_ci_high") if c in best},
                "eval_top5": best["eval_top5"],
                "best_over_grid_eval_top1": group["eval_top1"].max(),
                **({"eval_images": int(best["eval_images"])} if "eval_images" in best else {}),
                "head": int(best["head"]),
            }
        )
    summary = pd.DataFrame(rows)
    names = list(summary["aggregator"])
    baseline = "cls" if "cls" in names else ("mean" if "mean" in names else None)
    summary["baseline"] = baseline
    if baseline is not None:
        base = float(summary.loc[summary["aggregator"] == baseline, "eval_top1"].iloc[0])
        summary["delta_top1_vs_baseline"] = summary["eval_top1"] - base
    else:
        summary["delta_top1_vs_baseline"] = np.nan
    if hits is not None:
        _delta_intervals(summary, hits, baseline, seed)
    return results, summary


def add_best_epochs(summary: pd.DataFrame, curves: pd.DataFrame | None) -> None:
    """Add `best_epoch` and `best_epoch_top1` next to `best_over_grid_eval_top1`: each
    selected head's highest evaluation top-1 over the epochs (its first epoch there), what
    the paper's code prints as "Max accuracy". Optimistic like best-over-grid: the epoch is
    chosen on the evaluation split itself. NaN without learning curves."""
    epochs: list[float] = []
    tops: list[float] = []
    for row in summary.itertuples():
        if curves is None:
            epochs.append(np.nan)
            tops.append(np.nan)
            continue
        mine = curves[
            (curves["split"] == "eval")
            & (curves["aggregator"] == row.aggregator)
            & (curves["head"] == row.head)
        ].sort_values("epoch", kind="stable")
        best = int(np.argmax(mine["top1"].to_numpy()))  # the first of equal maxima
        epochs.append(int(mine["epoch"].iloc[best]))
        tops.append(float(mine["top1"].iloc[best]))
    at = list(summary.columns).index("best_over_grid_eval_top1") + 1
    summary.insert(at, "best_epoch", epochs)
    summary.insert(at + 1, "best_epoch_top1", tops)


def _delta_intervals(
    summary: pd.DataFrame, hits: Mapping[str, np.ndarray], baseline: str | None, seed: int
) -> None:
    """The paired 95% interval of each selected head's gain over the baseline's selected head."""
    from attnscope.probe.intervals import delta_interval

    heads = dict(zip(summary["aggregator"], summary["head"], strict=True))
    bounds = [
        delta_interval(hits[name][:, heads[name]], hits[baseline][:, heads[baseline]], seed)
        if baseline is not None
        else (np.nan, np.nan)
        for name in summary["aggregator"]
    ]
    summary["delta_ci_low"] = [lo for lo, _ in bounds]
    summary["delta_ci_high"] = [hi for _, hi in bounds]


# --------------------------------------------------------------------------- maps


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
    cls_attention: np.ndarray | None  # (gh, gw) head mean of block `block`, renormalised over patches
    spearman: float
    block: int  # whose tokens the head read and whose [cls] attention is shown, counted from 0
    num_blocks: int  # of the model (block num_blocks - 1 is the last)


def selection_maps(
    bank: HeadBank,
    summary: pd.DataFrame,
    extractor: TokenExtractor,
    split: LabelledSplit,
    classes: Sequence[str],
    source: FeatureSource,
    positions: Positions,
    *,
    count: int,
    seed: int,
    block: int | None = None,
) -> list[MapRecord]:
    """For `count` evaluation images drawn (seeded) from `positions`: the weights of the first
    selective aggregator of the bank (its selected head) beside the model's [cls] attention
    in block `block` (counted from 0; default the last, the block the bank was trained on) on the
    same preprocessed image. Empty when `count` is 0 or the bank has no selective
    aggregator; without a class token `cls_attention` is None."""
    from attnscope.data import collate_images
    from attnscope.probe.features import ProbeImageDataset
    from attnscope.probe.heads import AGGREGATORS

    chosen = next((n for n, c in AGGREGATORS.items() if c.selective and n in bank.names), None)
    if count <= 0 or chosen is None:
        return []
    head = int(summary.loc[summary["aggregator"] == chosen, "head"].iloc[0])
    rng = np.random.default_rng([seed, _MAPS_STREAM])
    picks = np.sort(rng.choice(positions, size=min(count, len(positions)), replace=False))
    weights, preds = _head_weights(bank, chosen, head, source, picks)
    dataset = ProbeImageDataset(split.source, extractor.transform)
    batch = collate_images([dataset[int(p)] for p in picks if int(p) in weights])
    if batch.images is None:
        return []
    block = extractor.last_block if block is None else block
    cls_attn = _cls_attention(extractor, batch, block) if extractor.layout.has_cls else {}
    gh, gw = extractor.layout.grid
    records = []
    for i, p in enumerate(batch.indices):
        w, c = weights[int(p)], cls_attn.get(int(p))
        records.append(
            MapRecord(
                item=split.source.describe(int(p)),
                label=classes[int(split.labels[p])],
                predicted=classes[preds[int(p)]],
                image=_as_seen(extractor, batch.images[i]),
                grid=(gh, gw),
                aggregator=chosen,
                weights=w.reshape(gh, gw),
                cls_attention=None if c is None else c.reshape(gh, gw),
                spearman=_spearman(w, c),
                block=block,
                num_blocks=extractor.num_blocks,
            )
        )
    return records


def _head_weights(
    bank: HeadBank, name: str, head: int, source: FeatureSource, picks: np.ndarray
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per position: head `head` of aggregator `name`'s weights over the patches, and its prediction."""
    import torch

    bank.eval()
    weights: dict[int, np.ndarray] = {}
    preds: dict[int, int] = {}
    with torch.no_grad():
        for tokens, pos in source.iterate(picks, len(picks)):
            patch_weights = bank.patch_weights(name, tokens)
            assert patch_weights is not None  # `name` is a selective aggregator: it weights the patches
            w = patch_weights[head].float().cpu().numpy()
            predicted = bank(tokens)[name][head].argmax(-1).cpu().numpy()
            for i, p in enumerate(pos):
                weights[int(p)] = w[i]
                preds[int(p)] = int(predicted[i])
    return weights, preds


class _BlockClsAttention:
    """`measure.forwards` consumer: one block's [cls] attention over the patches (block
    `block`, counted from 0 as `BlockTensors.index`), averaged over heads, one `(B, N)` tensor
    per forward."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.layout: TokenLayout | None = None
        self.maps: list[torch.Tensor] = []

    def begin(self, layout: TokenLayout) -> None:
        self.layout = layout

    def __call__(self, block: BlockTensors) -> None:
        if block.index == self.block:
            assert self.layout is not None
            self.maps.append(block.attn[:, :, 0, self.layout.patch_slice].float().mean(1).cpu())


def _cls_attention(
    extractor: TokenExtractor, batch: ImageBatch, block: int | None = None
) -> dict[int, np.ndarray]:
    """Per image of `batch`: the model's own [cls] attention over the patches in block
    `block` (counted from 0, default the last; float32 forward), renormalised to sum to 1 over
    the patches."""
    from attnscope.measure import forwards

    grab = _BlockClsAttention(extractor.last_block if block is None else block)
    for _ in forwards(extractor.loaded, [batch], grab, device=extractor.device, residual=False):
        pass
    attn = grab.maps[-1].numpy()
    out = {}
    for i, p in enumerate(batch.indices):
        a = attn[i]
        out[int(p)] = a / a.sum() if a.sum() > 0 else a
    return out


def _as_seen(extractor: TokenExtractor, image: torch.Tensor) -> np.ndarray:
    """A normalised `(3, H, W)` input back to an `(H, W, 3)` picture in [0, 1]."""
    config = extractor.transform_config
    mean = np.asarray(config.get("mean", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    std = np.asarray(config.get("std", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    return np.clip(image.numpy() * std + mean, 0, 1).transpose(1, 2, 0)


def _spearman(weights: np.ndarray, cls_attention: np.ndarray | None) -> float:
    """Rank correlation of the two maps over the patches (NaN when either is constant)."""
    from scipy.stats import spearmanr

    if cls_attention is None or np.ptp(weights) <= 0 or np.ptp(cls_attention) <= 0:
        return float("nan")
    return float(spearmanr(weights, cls_attention).statistic)


def maps_table(maps: Sequence[MapRecord]) -> pd.DataFrame:
    """maps.csv: one row per mapped image."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "item": m.item,
                "label": m.label,
                "predicted": m.predicted,
                "aggregator": m.aggregator,
                "block": m.block,
                "spearman_vs_cls_attention": m.spearman,
                "max_weight": float(m.weights.max()),
                "uniform_weight": 1.0 / m.weights.size,
            }
            for m in maps
        ]
    )
