"""2-D embeddings of feature vectors (t-SNE or PCA) and how well they cluster by class.

`embed_2d(features, method)` maps an (n, C) matrix to (n, 2) coordinates:

- `"pca"`: scikit-learn's exact PCA (full SVD of the centred matrix, float64); the first two
  principal components and the share of the variance each explains. Signs follow
  scikit-learn's `svd_flip` (deterministic), so two runs draw the same picture.
- `"tsne"`: scikit-learn's Barnes-Hut t-SNE, seeded (`random_state`), PCA initialisation,
  `learning_rate="auto"`. As scikit-learn's documentation recommends, the features are first
  reduced to 50 dimensions by PCA (randomized SVD, seeded) when they have more (t-SNE's
  neighbour search is then cheaper and less noisy; the 2-D picture barely changes). The
  perplexity (default 30) is clipped to (n - 1) / 3 so small sets stay valid. With the PCA
  initialisation the seed changes little; the same seed gives the same coordinates.

t-SNE keeps neighbourhoods, not distances: the size of a cluster and the gaps between
clusters mean little. The numbers that do are `cluster_scores` on the full features:
leave-one-out k-NN accuracy and the silhouette, both with cosine distance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnscope.config import check_choice
from attnscope.errors import AttnscopeError, ConfigError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["EMBEDDING_METHODS", "ClusterScores", "Embedding", "cluster_scores", "embed_2d", "sklearn_threads"]

EMBEDDING_METHODS: tuple[str, ...] = ("tsne", "pca")
TSNE_PCA_DIMS = 50  # PCA before t-SNE, scikit-learn's advice
DEFAULT_PERPLEXITY = 30.0
KNN_K = 10


@contextlib.contextmanager
def sklearn_threads(blas: int, openmp: int = 1) -> Iterator[None]:
    """scikit-learn's BLAS and OpenMP thread pools limited for the block, restored after.

    threadpoolctl limits only the libraries already loaded, and scikit-learn loads its OpenMP
    runtime with its first compiled module that uses it, so the modules used here are
    imported first. OpenMP defaults to one thread: on a busy shared CPU, two spinning OpenMP
    threads made a 359-image t-SNE take 12-24 s instead of 1.1 s."""
    import sklearn.decomposition  # noqa: F401
    import sklearn.manifold  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits={"openmp": openmp, "blas": blas}):
        yield


@dataclass(frozen=True)
class Embedding:
    """2-D coordinates of n feature vectors and how they were made."""

    coords: np.ndarray  # (n, 2) float64
    method: str  # "tsne" or "pca"
    # pca: the share of the variance of the two components shown; None for t-SNE
    explained_variance_ratio: tuple[float, float] | None = None
    perplexity: float | None = None  # tsne: as used, after clipping
    pca_dims: int | None = None  # tsne: the PCA dimensions it ran on (None: the features as given)

    def settings(self) -> dict[str, Any]:
        """What run.json records of it (no coordinates)."""
        out: dict[str, Any] = {"method": self.method}
        if self.method == "pca":
            assert self.explained_variance_ratio is not None
            out["explained_variance_ratio"] = [round(v, 6) for v in self.explained_variance_ratio]
        else:
            out.update(
                perplexity=self.perplexity,
                pca_dims_before_tsne=self.pca_dims,
                pca_before_tsne="randomized SVD, seeded",
                init="pca",
                learning_rate="auto",
            )
        return out


def embed_2d(
    features: Any,
    method: str = "tsne",
    *,
    seed: int = 0,
    perplexity: float = DEFAULT_PERPLEXITY,
    pca_dims: int | None = TSNE_PCA_DIMS,
) -> Embedding:
    """2-D coordinates of the rows of `features` (n, C; any float dtype, computed in float64).

    `method` "tsne" (seeded by `seed`: the same seed gives the same coordinates; `pca_dims`
    None skips the PCA before it) or "pca". Needs at least 3 rows and 2 columns, all finite.
    """
    import numpy as np

    check_choice("method", method, EMBEDDING_METHODS)
    if not perplexity > 0:
        raise ConfigError("perplexity", f"must be positive, got {perplexity}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2:
        raise AttnscopeError(f"an embedding needs an (n, C) matrix with n >= 3 and C >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise AttnscopeError("the features to embed contain NaN or infinite values")
    if method == "pca":
        return _pca(x)
    return _tsne(x, seed, perplexity, pca_dims)


def _pca(x: np.ndarray) -> Embedding:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, svd_solver="full")
    coords = pca.fit_transform(x)
    ratio = pca.explained_variance_ratio_
    return Embedding(coords.astype("float64"), "pca", (float(ratio[0]), float(ratio[1])))


def _tsne(x: np.ndarray, seed: int, perplexity: float, pca_dims: int | None) -> Embedding:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n, dims = x.shape
    used_dims = None
    if pca_dims is not None and dims > pca_dims and n > pca_dims:
        # randomized (seeded) rather than exact: a full SVD of 2,000 x 768 costs seconds, and
        # t-SNE only needs the leading subspace
        x = PCA(n_components=pca_dims, svd_solver="randomized", random_state=seed).fit_transform(x)
        used_dims = pca_dims
    used = min(float(perplexity), (n - 1) / 3)  # scikit-learn needs perplexity < n
    tsne = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed)
    coords = tsne.fit_transform(x)
    return Embedding(coords.astype("float64"), "tsne", perplexity=round(used, 6), pca_dims=used_dims)


@dataclass(frozen=True)
class ClusterScores:
    """How well feature vectors cluster by class, measured on the vectors themselves."""

    knn_accuracy: float  # leave-one-out k-NN accuracy (majority vote; a tie goes to the lowest label)
    k: int
    silhouette: float  # mean silhouette by class, in [-1, 1]; NaN with fewer than 2 classes
    metric: str = "cosine"

    def as_dict(self) -> dict[str, Any]:
        return {
            "knn_accuracy": round(self.knn_accuracy, 6),
            "knn_k": self.k,
            "knn": "leave-one-out: each image's class by majority vote of its k nearest other images",
            "silhouette": None if self.silhouette != self.silhouette else round(self.silhouette, 6),
            "metric": self.metric,
        }


def cluster_scores(features: Any, labels: Any, *, k: int = KNN_K) -> ClusterScores:
    """Leave-one-out k-NN accuracy and silhouette of `features` (n, C) by `labels` (n,
    integers), cosine distance, in float64. k is capped at n - 1."""
    import numpy as np
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise AttnscopeError(f"cluster scores need (n, C) features and n labels, n >= 2; got {x.shape}")
    k = max(1, min(k, len(x) - 1))
    # kneighbors() without a query leaves each point out of its own neighbours
    index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x)
    neighbours = index.kneighbors(return_distance=False)
    votes = np.zeros((len(x), int(y.max()) + 1), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(x)), k), y[neighbours].ravel()), 1)
    knn = float((votes.argmax(axis=1) == y).mean())
    classes = len(np.unique(y))
    sil = float(silhouette_score(x, y, metric="cosine")) if 2 <= classes < len(x) else float("nan")
    return ClusterScores(knn, k, sil)
