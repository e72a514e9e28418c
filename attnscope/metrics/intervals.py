"""Bootstrap confidence intervals of means over images, with `scipy.stats.bootstrap`.

What is resampled are the images. scipy draws each resample as a vector of image
indices (with replacement), and one statistic turns a resample into the mean of every
row at once, a row being one model's metric in one block, or the per-image difference
between two models. So within one call every row, every model and every block, sees the
very same resampled images, and the interval of a difference is a paired one.

The statistic counts how often each image was drawn and takes a matrix product, so a
batch of resamples costs (rows x images) per resample and the memory is bounded by the
batch, never (rows x resamples x images). The batch size depends on the image count
only, so a row's interval does not depend on which other rows share the call.

Intervals are percentile intervals: BCa would need a jackknife over the images (n
recomputations of every row, quadratic in the image count), which a 50 000-image run
cannot afford, and for a mean over hundreds of images the two agree closely.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

CONFIDENCE_LEVEL = 0.95
N_RESAMPLES = 2000
METHOD = "percentile"
_BATCH_FLOATS = 2**22  # resample weights per batch: 32 MiB of float64


def _rng_argument(seed: int) -> dict[str, Any]:
    """scipy >= 1.15 calls the generator `rng`; older releases `random_state`."""
    import numpy as np
    from scipy import stats

    name = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def bootstrap_means(
    values: np.ndarray,
    *,
    seed: int,
    n_resamples: int = N_RESAMPLES,
    confidence_level: float = CONFIDENCE_LEVEL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) for each row of `values` (rows x images), all rows resampled together.

    `mean` is the row's mean over the images (float64); [low, high] the percentile
    bootstrap interval of that mean at `confidence_level`, from `n_resamples` resamples of
    the images drawn from `numpy.random.default_rng(seed)`. With fewer than two images
    there is nothing to resample and the interval is NaN.
    """
    import numpy as np
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"values must be rows x images, got shape {data.shape}")
    rows, n = data.shape
    mean = data.mean(axis=1) if n else np.full(rows, np.nan)
    if rows == 0 or n < 2:
        return mean, np.full(rows, np.nan), np.full(rows, np.nan)
    if not np.isfinite(data).all():
        raise ValueError("values must be finite")

    def statistic(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(drawn).astype(np.intp)
        flat = idx.reshape(-1, n)
        k = flat.shape[0]
        offsets = (flat + n * np.arange(k)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=k * n).reshape(k, n).astype(np.float64)
        return (data @ counts.T / n).reshape(rows, *idx.shape[:-1])

    batch = max(1, min(n_resamples, _BATCH_FLOATS // n))
    result = stats.bootstrap(
        (np.arange(n),),
        statistic,
        n_resamples=n_resamples,
        batch=batch,
        vectorized=True,
        method=METHOD,
        confidence_level=confidence_level,
        **_rng_argument(seed),
    )
    interval = result.confidence_interval
    return mean, np.asarray(interval.low, dtype=np.float64), np.asarray(interval.high, dtype=np.float64)
