"""How the evaluation images' [cls] and mean-patch features cluster by class ("Beyond [cls]").

`evaluation_embedding` reads the probed block's tokens of (a seeded subsample of) the
evaluation split, pools each image to its class token and to the mean of its patch tokens
(every prefix token out, as the `mean` head does), embeds each in 2-D
(`attnscope.embedding.embed_2d`) and scores how well the full features cluster by class
(`attnscope.embedding.cluster_scores`). The result is the tidy table of embedding.csv and
what run.json records.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from attnscope.embedding import ClusterScores, Embedding
    from attnscope.models.layout import TokenLayout
    from attnscope.probe.train import FeatureSource

__all__ = ["EMBEDDING_POINTS", "TOKEN_LABELS", "EvalEmbedding", "evaluation_embedding", "pooled_features"]

EMBEDDING_POINTS = 2000  # at most this many evaluation images (a seeded subsample beyond)
TOKEN_LABELS = {"cls": "[cls] token", "patch_mean": "mean of the patch tokens"}
_SAMPLE_STREAM = 53  # random stream of the subsample


@dataclass
class EvalEmbedding:
    """The 2-D embedding of each token kind of the sampled evaluation images."""

    table: pd.DataFrame  # embedding.csv: image, split, label, class, block, token, method, x, y
    method: str
    block: int  # counted from 0, as everywhere
    num_blocks: int
    dim: int  # width of the features that were embedded and scored
    points: int  # images embedded
    eval_images: int  # readable evaluation images they were drawn from
    embeddings: dict[str, Embedding] = field(default_factory=dict)  # by token kind
    scores: dict[str, ClusterScores] = field(default_factory=dict)  # on the full features
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """run.json's `embedding`."""
        first = next(iter(self.embeddings.values())).settings()
        first.pop("explained_variance_ratio", None)  # per token kind, below
        tokens = {}
        for kind, emb in self.embeddings.items():
            tokens[kind] = {"scores_on_full_features": self.scores[kind].as_dict()}
            if emb.explained_variance_ratio is not None:
                tokens[kind]["explained_variance_ratio"] = emb.settings()["explained_variance_ratio"]
        subsample = f"seeded uniform random {self.points} of {self.eval_images}"
        return {
            **first,
            "block": self.block,
            "split": "eval",
            "points": self.points,
            "eval_images": self.eval_images,
            "subsample": None if self.points == self.eval_images else subsample,
            "features": f"{self.dim}-d, float64 from the cache's float16; cls: the class token, "
            "patch_mean: the mean of the patch tokens (prefix tokens excluded)",
            "tokens": tokens,
            "seconds": round(self.seconds, 3),
        }


def sample_positions(positions: Any, cap: int, seed: int) -> np.ndarray:
    """`positions` as they are when at most `cap`, else a seeded uniform subsample of `cap`
    of them, in ascending order."""
    import numpy as np

    pos = np.asarray(positions, dtype=np.int64)
    if len(pos) <= cap:
        return pos
    rng = np.random.default_rng([seed, _SAMPLE_STREAM])
    return np.sort(rng.choice(pos, size=cap, replace=False))


def pooled_features(
    source: FeatureSource, positions: Any, layout: TokenLayout, *, batch_size: int = 256
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(positions read, {token kind: (n, C) float64}): the class token (when the model has one)
    and the mean of the patch tokens (every prefix token excluded) of each image.

    The positions read may be fewer than asked: a streamed source drops unreadable images."""
    import numpy as np

    read: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {"patch_mean": [], "cls": []}
    for tokens, pos in source.iterate(np.asarray(positions, dtype=np.int64), batch_size):
        t = tokens.double()  # the cache's float16, summed in float64
        read.append(np.asarray(pos, dtype=np.int64).copy())
        parts["patch_mean"].append(t[:, layout.patch_slice].mean(dim=1).cpu().numpy())
        if layout.has_cls:
            parts["cls"].append(t[:, 0].cpu().numpy())
    order = ["cls", "patch_mean"] if layout.has_cls else ["patch_mean"]
    dim = 0 if not read else parts["patch_mean"][0].shape[1]
    pooled = {k: np.concatenate(parts[k]) if read else np.zeros((0, dim)) for k in order}
    return (np.concatenate(read) if read else np.zeros(0, dtype=np.int64)), pooled


def evaluation_embedding(
    source: FeatureSource,
    positions: Any,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    layout: TokenLayout,
    *,
    method: str,
    block: int,
    num_blocks: int,
    seed: int = 0,
    cap: int = EMBEDDING_POINTS,
) -> EvalEmbedding | None:
    """The embedding of block `block`'s [cls] and mean-patch features of the evaluation images
    at `positions` (at most `cap`, a seeded subsample beyond); None with fewer than 3 images."""
    import numpy as np
    import pandas as pd

    from attnscope.embedding import cluster_scores, embed_2d

    t0 = time.perf_counter()
    readable = np.asarray(positions, dtype=np.int64)
    read, pooled = pooled_features(source, sample_positions(readable, cap, seed), layout)
    if len(read) < 3:
        return None
    y = np.asarray(labels, dtype=np.int64)[read]
    rows, embeddings, scores = [], {}, {}
    for kind, x in pooled.items():
        emb = embed_2d(x, method, seed=seed)
        embeddings[kind], scores[kind] = emb, cluster_scores(x, y)
        rows.append(
            pd.DataFrame(
                {
                    "image": read, "split": "eval", "label": y, "class": [classes[i] for i in y],
                    "block": block, "token": kind, "method": method,
                    "x": emb.coords[:, 0], "y": emb.coords[:, 1],
                }
            )
        )  # fmt: skip
    dim = next(iter(pooled.values())).shape[1]
    return EvalEmbedding(
        pd.concat(rows, ignore_index=True), method, block, num_blocks, dim, len(read), len(readable),
        embeddings, scores, time.perf_counter() - t0,
    )  # fmt: skip
