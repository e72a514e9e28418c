"""Streaming float64 statistics per (layer, head, metric), summable across processes, and each
image's head-averaged value per (layer, metric), tied to the image's position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnscope.metrics.registry import ALL_METRICS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

Key = tuple[str, int, str]  # (kind "head" | "layer", layer, metric)
Group = tuple[int, tuple[str, ...]]  # (layer, metrics updated together)


def _spec_order(key: Key) -> tuple[str, int, int]:
    return key[0], key[1], ALL_METRICS.index(key[2])


@dataclass
class MetricAccumulator:
    """Running float64 sums per (layer, metric[, head]), whose memory does not grow with the
    image count, and each image's per-layer values (which do, by a few floats per image).

    `state` maps (kind, layer, metric) -> tensor [count, sum, sum_sq] of shape (3,) for
    per-layer rows, (3, H) for per-head rows. Sums (not running means), so shards from
    several processes add up exactly (`all_reduce`).

    `update` runs once per block and batch, so it reduces all metrics of a block with one
    stacked set of tensor ops and keeps per-layer stacked sums; they are split into
    `state`'s rows only when `state` is read.

    Given the batch's image `positions`, `update` also keeps each image's layers.csv value
    (per-head metrics averaged over heads within the image, in float64; per-block metrics
    as they are) for the per-image table (`images_table`) and the bootstrap intervals. That
    is images x blocks x metrics floats, while the attention maps are never kept.

    `snapshot` / `restore` save and rebuild the exact internal sums (not a re-summed copy),
    so a run resumed from a snapshot adds the same numbers in the same order as one that
    never stopped.

    Profiles (`attnscope.metrics.profiles`: a vector per image and block, such as the
    singular-value spectrum) keep only [count, sum_1, ..., sum_K] in float64 per (layer,
    profile): the mean vector over images, without any per-image copy.
    """

    model: str
    num_layers: int
    num_heads: int
    head_metrics: list[str]
    block_metrics: list[str]
    _state: dict[Key, torch.Tensor] = field(default_factory=dict, repr=False)
    # (layer, kind, names of the rows) -> stacked [count, sum, sum_sq] (3, M[, H])
    _stacked: dict[tuple[int, str, tuple[str, ...]], torch.Tensor] = field(default_factory=dict, repr=False)
    # (layer, metrics) -> one (positions (B,) int64, values (M, B) float64) per batch
    _images: dict[Group, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict, repr=False)
    # (layer, profile) -> [count, sum_1, ..., sum_K] (K + 1,) float64
    _profiles: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

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

    def _keep(self, layer: int, names: tuple[str, ...], v: torch.Tensor, positions: Any) -> None:
        """Each image's values (M, B) of the metrics `names`, under the images' positions."""
        import numpy as np

        if positions is None:
            return
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.shape[0] != v.shape[1]:
            raise ValueError(f"{pos.shape[0]} positions for a batch of {v.shape[1]} images")
        self._images.setdefault((layer, names), []).append((pos, v.cpu().numpy().copy()))

    def update(
        self,
        layer: int,
        per_head: dict[str, torch.Tensor],
        per_block: dict[str, torch.Tensor],
        positions: Sequence[int] | None = None,
        profiles: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add one block's per-image values; `positions` (one per image of the batch) also
        keeps each image's values for `images_table`; `profiles` {name: (B, K)} adds each
        profile's per-image vectors to its sums."""
        import torch

        if self.head_metrics:
            names = tuple(self.head_metrics)
            values = self._float64(torch.stack([per_head[name].detach() for name in names]))  # (M, B, H)
            self._add(layer, "head", names, values)
            means = values.mean(dim=2)  # head mean per image, in float64
            self._add(layer, "layer", names, means)
            self._keep(layer, names, means, positions)
        present = tuple(name for name in self.block_metrics if name in per_block)
        if present:
            values = self._float64(torch.stack([per_block[name].detach() for name in present]))  # (M, B)
            self._add(layer, "layer", present, values)
            self._keep(layer, present, values, positions)
        for name, vectors in (profiles or {}).items():
            v = self._float64(vectors)  # (B, K)
            stats = torch.cat([v.new_full((1,), v.shape[0]), v.sum(0)])
            current = self._profiles.get((layer, name))
            self._profiles[(layer, name)] = stats if current is None else current + stats.to(current.device)

    def profile_sums(self) -> dict[tuple[int, str], np.ndarray]:
        """(layer, profile) -> [count, sum_1, ..., sum_K] as float64 numpy arrays."""
        return {key: self._numpy(t) for key, t in sorted(self._profiles.items())}

    def keys(self) -> list[Key]:
        return sorted(self.state, key=_spec_order)

    # ---------------------------------------------------------------- per-image values

    @property
    def image_batches(self) -> int:
        """How many batches of per-image values are kept: the mark `images_since` counts from."""
        return max((len(chunks) for chunks in self._images.values()), default=0)

    def _merged_images(self, since: int = 0) -> dict[Group, tuple[np.ndarray, np.ndarray]]:
        """(layer, metrics) -> (positions (N,), values (M, N)) of the batches from `since` on."""
        import numpy as np

        out = {}
        for group, chunks in self._images.items():
            part = chunks[since:]
            if part:
                out[group] = (
                    np.concatenate([p for p, _ in part]),
                    np.concatenate([v for _, v in part], axis=1),
                )
        return out

    def image_positions(self) -> list[int]:
        """The positions of the images with per-image values, in the order they came."""
        merged = self._merged_images()
        return [] if not merged else [int(p) for p in next(iter(merged.values()))[0]]

    def images_table(self, names: Sequence[str]) -> pd.DataFrame:
        """Each image's value per (layer, metric): columns model, image, layer, metric, value.

        `names[position]` names the image (run.json's `images_used` entry). Rows are ordered
        by image position, then block, then metric in spec order; the mean of `value` over
        the images of one (layer, metric) is layers.csv's `mean` (up to float64 rounding).
        """
        import numpy as np
        import pandas as pd

        order = {m: i for i, m in enumerate(ALL_METRICS)}
        pos, lay, met, val = [], [], [], []
        for (layer, metrics), (p, v) in self._merged_images().items():
            m, b = v.shape
            pos.append(np.tile(p, m))  # v.reshape(-1) runs image-fastest within each metric
            lay.append(np.full(m * b, layer, dtype=np.int64))
            met.append(np.repeat(np.array([order[x] for x in metrics], dtype=np.int64), b))
            val.append(v.reshape(-1))
        if not pos:
            return pd.DataFrame(
                {
                    "model": pd.Series(dtype=object),
                    "image": pd.Series(dtype=object),
                    "layer": pd.Series(dtype=np.int64),
                    "metric": pd.Series(dtype=object),
                    "value": pd.Series(dtype=np.float64),
                }
            )
        positions, layers, metric_ids, values = (np.concatenate(a) for a in (pos, lay, met, val))
        rows = np.lexsort((metric_ids, layers, positions))
        labels = np.asarray(list(names), dtype=object)
        return pd.DataFrame(
            {
                "model": self.model,
                "image": labels[positions[rows]],
                "layer": layers[rows],
                "metric": np.asarray(ALL_METRICS, dtype=object)[metric_ids[rows]],
                "value": values[rows],
            }
        )

    # ---------------------------------------------------------------- saving and resuming

    def snapshot(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The exact running sums as JSON-able metadata and float64 arrays.

        Reads the internal sums as they are (reading `state` would fold the stacked sums in
        and change the order of later additions). Per-image values go separately, batch by
        batch, through `images_since`.
        """
        meta: dict[str, Any] = {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_metrics": list(self.head_metrics),
            "block_metrics": list(self.block_metrics),
            "state": [[kind, layer, metric] for kind, layer, metric in self._state],
            "stacked": [[layer, kind, list(names)] for layer, kind, names in self._stacked],
            "profiles": [[layer, name] for layer, name in self._profiles],
        }
        arrays = {f"state{i}": self._numpy(t) for i, t in enumerate(self._state.values())}
        arrays.update({f"stacked{i}": self._numpy(t) for i, t in enumerate(self._stacked.values())})
        arrays.update({f"profile{i}": self._numpy(t) for i, t in enumerate(self._profiles.values())})
        return meta, arrays

    @staticmethod
    def _numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    def images_since(self, mark: int) -> tuple[list[list[Any]], dict[str, np.ndarray]]:
        """Per-image values of the batches from `mark` (an earlier `image_batches`) on:
        ([[layer, metrics], ...], {"pos<i>": positions, "val<i>": values (M, N)})."""
        groups: list[list[Any]] = []
        arrays = {}
        for i, ((layer, names), (p, v)) in enumerate(self._merged_images(mark).items()):
            groups.append([layer, list(names)])
            arrays[f"pos{i}"], arrays[f"val{i}"] = p, v
        return groups, arrays

    @classmethod
    def restore(
        cls,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        image_parts: Sequence[tuple[list[list[Any]], dict[str, np.ndarray]]] = (),
    ) -> MetricAccumulator:
        """The accumulator `snapshot` and `images_since` described; ValueError when the parts
        do not fit together (a damaged file must never be added to)."""
        import numpy as np
        import torch

        acc = cls(
            str(meta["model"]),
            int(meta["num_layers"]),
            int(meta["num_heads"]),
            [str(m) for m in meta["head_metrics"]],
            [str(m) for m in meta["block_metrics"]],
        )
        for i, (kind, layer, metric) in enumerate(meta["state"]):
            acc._state[(str(kind), int(layer), str(metric))] = torch.from_numpy(
                np.array(arrays[f"state{i}"], dtype=np.float64)
            )
        for i, (layer, kind, names) in enumerate(meta["stacked"]):
            stats = np.array(arrays[f"stacked{i}"], dtype=np.float64)
            if stats.shape[:2] != (3, len(names)):
                raise ValueError(f"stacked sums of block {layer} have shape {stats.shape}")
            acc._stacked[(int(layer), str(kind), tuple(str(n) for n in names))] = torch.from_numpy(stats)
        acc._restore_profiles(meta, arrays)
        for groups, parts in image_parts:
            for i, (layer, names) in enumerate(groups):
                p = np.array(parts[f"pos{i}"], dtype=np.int64)
                v = np.array(parts[f"val{i}"], dtype=np.float64)
                if v.shape != (len(names), p.shape[0]):
                    raise ValueError(f"per-image values of block {layer} have shape {v.shape}")
                acc._images.setdefault((int(layer), tuple(str(n) for n in names)), []).append((p, v))
        positions = {tuple(p.tolist()) for p, _ in acc._merged_images().values()}
        if len(positions) > 1:
            raise ValueError("per-image values of different blocks cover different images")
        return acc

    def _restore_profiles(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        import numpy as np
        import torch

        from attnscope.metrics.registry import METRICS

        if "profiles" not in meta and any(METRICS[m].family == "tokens" for m in self.block_metrics):
            raise ValueError("it was saved without the profile sums of the token family (an older attnscope)")
        for i, (layer, name) in enumerate(meta.get("profiles", [])):
            sums = np.array(arrays[f"profile{i}"], dtype=np.float64)
            if sums.ndim != 1 or sums.shape[0] < 2:
                raise ValueError(f"profile sums of block {layer} have shape {sums.shape}")
            self._profiles[(int(layer), str(name))] = torch.from_numpy(sums)

    def _description(self) -> dict[str, Any]:
        """What ranks compare before summing: the metric sets and every row's shape."""
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_metrics": list(self.head_metrics),
            "block_metrics": list(self.block_metrics),
            "shapes": {key: tuple(v.shape) for key, v in self.state.items()},
            "profiles": {key: tuple(v.shape) for key, v in self._profiles.items()},
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
        profile_shapes: dict[tuple[int, str], tuple[int, ...]] = {}
        for _, d in described:
            shapes.update(d["shapes"])
            profile_shapes.update(d["profiles"])
        keys = sorted(shapes, key=_spec_order)
        profile_keys = sorted(profile_shapes)
        mine = {} if local is None else local.state
        my_profiles = {} if local is None else local._profiles
        rows = [(mine.get(k), shapes[k]) for k in keys] + [
            (my_profiles.get(k), profile_shapes[k]) for k in profile_keys
        ]
        parts = [
            (torch.zeros(shape) if t is None else t)
            .detach()
            .to(device="cpu", dtype=torch.float64)
            .reshape(-1)
            for t, shape in rows
        ]
        flat = distributed.all_reduce_sum(torch.cat(parts))  # one collective for every sum
        chunks = iter(torch.split(flat, [p.numel() for p in parts]))
        total = cls(*(ref[k] for k in fields))
        for key in keys:
            total.state[key] = next(chunks).reshape(shapes[key])
        for pkey in profile_keys:
            total._profiles[pkey] = next(chunks).reshape(profile_shapes[pkey]).clone()
        total._gather_images(local)
        return total

    def _gather_images(self, local: MetricAccumulator | None) -> None:
        """Every rank's per-image values, in position order: what one process would hold."""
        import numpy as np

        from attnscope import distributed

        mine = {} if local is None else local._merged_images()
        gathered = distributed.all_gather([(g[0], list(g[1]), p, v) for g, (p, v) in mine.items()])
        merged: dict[Group, list[tuple[np.ndarray, np.ndarray]]] = {}
        for part in gathered:
            for layer, names, p, v in part:
                merged.setdefault((int(layer), tuple(names)), []).append((p, v))
        for group, chunks in merged.items():
            p = np.concatenate([c[0] for c in chunks])
            v = np.concatenate([c[1] for c in chunks], axis=1)
            order = np.argsort(p, kind="stable")
            self._images[group] = [(p[order], v[:, order])]

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
