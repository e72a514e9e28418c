"""Streaming float64 statistics per (layer, head, metric), summable across processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnscope.metrics.registry import ALL_METRICS

if TYPE_CHECKING:
    import pandas as pd
    import torch

Key = tuple[str, int, str]  # (kind "head" | "layer", layer, metric)


def _spec_order(key: Key) -> tuple[str, int, int]:
    return key[0], key[1], ALL_METRICS.index(key[2])


@dataclass
class MetricAccumulator:
    """Running float64 sums per (layer, metric[, head]); flat memory in the image count.

    `state` maps (kind, layer, metric) -> tensor [count, sum, sum_sq] of shape (3,) for
    per-layer rows, (3, H) for per-head rows. Sums (not running means), so shards from
    several processes add up exactly (`all_reduce`).

    `update` runs once per block and batch, so it reduces all metrics of a block with one
    stacked set of tensor ops and keeps per-layer stacked sums; they are split into
    `state`'s rows only when `state` is read.
    """

    model: str
    num_layers: int
    num_heads: int
    head_metrics: list[str]
    block_metrics: list[str]
    _state: dict[Key, torch.Tensor] = field(default_factory=dict, repr=False)
    # (layer, kind, names of the rows) -> stacked [count, sum, sum_sq] (3, M[, H])
    _stacked: dict[tuple[int, str, tuple[str, ...]], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> dict[Key, torch.Tensor]:
        for (layer, kind, names), stats in self._stacked.items():
            for i, name in enumerate(names):
                key = (kind, layer, name)
                row = stats[:, i]
                current = self._state.get(key)
                self._state[key] = row.clone() if current is None else current + row.to(current.device)
        self._stacked.clear()
        return self._state

    @staticmethod
    def _float64(values: torch.Tensor) -> torch.Tensor:
        import torch

        v = values.detach()
        if v.device.type == "mps":  # MPS has no float64
            v = v.cpu()
        return v.to(dtype=torch.float64)

    def _add(self, layer: int, kind: str, names: tuple[str, ...], v: torch.Tensor) -> None:
        """v: (M, B[, H]) float64 per-image values of the metrics `names`."""
        import torch

        count = torch.full_like(v[:, 0], v.shape[1])
        stats = torch.stack([count, v.sum(1), (v * v).sum(1)])  # (3, M[, H])
        key = (layer, kind, names)
        current = self._stacked.get(key)
        self._stacked[key] = stats if current is None else current + stats.to(current.device)

    def update(
        self, layer: int, per_head: dict[str, torch.Tensor], per_block: dict[str, torch.Tensor]
    ) -> None:
        import torch

        if self.head_metrics:
            names = tuple(self.head_metrics)
            values = self._float64(torch.stack([per_head[name].detach() for name in names]))  # (M, B, H)
            self._add(layer, "head", names, values)
            self._add(layer, "layer", names, values.mean(dim=2))  # head mean per image, in float64
        present = tuple(name for name in self.block_metrics if name in per_block)
        if present:
            values = self._float64(torch.stack([per_block[name].detach() for name in present]))  # (M, B)
            self._add(layer, "layer", present, values)

    def keys(self) -> list[Key]:
        return sorted(self.state, key=_spec_order)

    def _description(self) -> dict[str, Any]:
        """What ranks compare before summing: the metric sets and every row's shape."""
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_metrics": list(self.head_metrics),
            "block_metrics": list(self.block_metrics),
            "shapes": {key: tuple(v.shape) for key, v in self.state.items()},
        }

    @classmethod
    def all_reduce(cls, local: MetricAccumulator | None) -> MetricAccumulator | None:
        """The sum of every torchrun rank's accumulator, the same on every rank.

        A collective: every rank calls it, also one whose shard held no readable image
        (`local` None). The ranks first agree on the union of their rows (a rank may lack
        some), then sum all rows in one float64 all-reduce, so the totals equal what one
        process over all images accumulates, bitwise. None when no rank has an
        accumulator; `local` itself outside torchrun. Ranks that measured different metric
        sets (different models) raise `RankFailure` together.
        """
        from attnscope import distributed

        if not distributed.is_distributed():
            return local
        import torch

        gathered = distributed.all_gather(None if local is None else local._description())
        described = [(r, d) for r, d in enumerate(gathered) if d is not None]
        if not described:
            return None
        ref_rank, ref = described[0]
        fields = ("model", "num_layers", "num_heads", "head_metrics", "block_metrics")
        for r, d in described[1:]:
            if any(d[k] != ref[k] for k in fields):  # every rank sees the same list: all raise
                raise distributed.RankFailure(
                    f"ranks {ref_rank} and {r} measured different metric sets (different models?)", [r]
                )
        shapes: dict[Key, tuple[int, ...]] = {}
        for _, d in described:
            shapes.update(d["shapes"])
        keys = sorted(shapes, key=_spec_order)
        mine = {} if local is None else local.state
        parts = [
            (mine[key] if key in mine else torch.zeros(shapes[key]))
            .detach()
            .to(device="cpu", dtype=torch.float64)
            .reshape(-1)
            for key in keys
        ]
        flat = distributed.all_reduce_sum(torch.cat(parts))
        total = cls(*(ref[k] for k in fields))
        offset = 0
        for key in keys:
            size = torch.Size(shapes[key]).numel()
            total.state[key] = flat[offset : offset + size].reshape(shapes[key])
            offset += size
        return total

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(layers, heads) DataFrames with the contract's columns, in spec order."""
        import numpy as np
        import pandas as pd

        layer_rows, head_rows = [], []
        for kind, layer, metric in self.keys():
            stats = self.state[(kind, layer, metric)].cpu().numpy()
            count, total, total_sq = stats[0], stats[1], stats[2]
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
            if kind == "layer":
                layer_rows.append((self.model, layer, metric, float(mean), float(std), int(count)))
            else:
                for h in range(mean.shape[0]):
                    head_rows.append(
                        (self.model, layer, h, metric, float(mean[h]), float(std[h]), int(count[h]))
                    )
        layers = pd.DataFrame(layer_rows, columns=["model", "layer", "metric", "mean", "std", "count"])
        heads = pd.DataFrame(head_rows, columns=["model", "layer", "head", "metric", "mean", "std", "count"])
        order = {m: i for i, m in enumerate(ALL_METRICS)}
        layers = layers.sort_values(
            ["layer", "metric"], key=lambda s: s.map(order) if s.name == "metric" else s
        )
        heads = heads.sort_values(
            ["layer", "metric", "head"], key=lambda s: s.map(order) if s.name == "metric" else s
        )
        return layers.reset_index(drop=True), heads.reset_index(drop=True)
