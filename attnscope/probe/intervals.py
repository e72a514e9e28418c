"""Bootstrap 95% intervals of probe accuracies, from each evaluation image's hit or miss.

Images are resampled with scipy.stats.bootstrap (percentile method, seeded): every head's
top-1 accuracy gets an interval, and the gain of each selected head over the baseline a
paired one (the same resampled images for both heads), so a gain is called real only when
its interval excludes zero.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def _percentile_bootstrap(data: tuple[np.ndarray, ...], statistic, *, paired: bool, seed: int):
    from scipy.stats import bootstrap

    return bootstrap(
        data,
        statistic,
        paired=paired,
        vectorized=True,
        axis=-1,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
        batch=50,
    ).confidence_interval


def accuracy_intervals(hits: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """hits (n images, H heads) of 0/1 -> (low, high), each (H,): the 95% interval of each
    head's accuracy. A head with identical outcomes on every image has a zero-width one."""
    hits = np.asarray(hits, dtype=np.float64)
    if len(hits) == 0:  # nothing measured: no interval
        return np.full(hits.shape[1], np.nan), np.full(hits.shape[1], np.nan)
    mean = hits.mean(axis=0)
    low, high = mean.copy(), mean.copy()
    varied = np.ptp(hits, axis=0) > 0
    if len(hits) > 1 and varied.any():
        ci = _percentile_bootstrap(
            (hits[:, varied].T,), lambda x, axis: x.mean(axis=axis), paired=False, seed=seed
        )
        low[varied], high[varied] = ci.low, ci.high
    return low, high


def delta_interval(hits_a: np.ndarray, hits_b: np.ndarray, seed: int) -> tuple[float, float]:
    """The 95% interval of accuracy(a) - accuracy(b) over the same images (paired)."""
    a = np.asarray(hits_a, dtype=np.float64)
    b = np.asarray(hits_b, dtype=np.float64)
    if len(a) == 0:
        return np.nan, np.nan
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or np.ptp(a - b) == 0:
        return delta, delta
    ci = _percentile_bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), paired=True, seed=seed
    )
    return float(ci.low), float(ci.high)
