"""Bootstrap intervals of probe accuracies: known answers, pairing, and the written tables."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from attnscope.commands.probe import ProbeConfig, run
from attnscope.probe.intervals import accuracy_intervals, delta_interval


def test_accuracy_interval_matches_the_binomial_normal_approximation():
    rng = np.random.default_rng(0)
    n = 2000
    hits = rng.random((n, 3)) < np.array([0.7, 0.5, 2.0])  # the last head is always right
    low, high = accuracy_intervals(hits, seed=1)
    p = hits.mean(0)
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(low[:2], (p - half)[:2], atol=4e-3)
    np.testing.assert_allclose(high[:2], (p + half)[:2], atol=4e-3)
    assert low[2] == high[2] == 1.0
    small_low, small_high = accuracy_intervals(hits[:200], seed=1)
    assert (small_high - small_low)[:2].min() > (high - low)[:2].max()  # fewer images: wider
    again = accuracy_intervals(hits, seed=1)
    np.testing.assert_array_equal(again[0], low)  # seeded


def test_paired_gain_interval_is_tighter_than_unpaired_and_zero_for_identical_heads():
    rng = np.random.default_rng(2)
    n = 1000
    base = rng.random(n) < 0.6
    better = base | (rng.random(n) < 0.1)  # right wherever the baseline is, and on ~4% more
    low, high = delta_interval(better, base, seed=0)
    gain = better.mean() - base.mean()
    diff = better.astype(float) - base
    half = 1.96 * diff.std() / np.sqrt(n)
    assert low > 0 and abs(low - (gain - half)) < 4e-3 and abs(high - (gain + half)) < 4e-3
    assert delta_interval(base, base, seed=0) == (0.0, 0.0)


@pytest.mark.usefixtures("one_thread")
def test_summary_and_results_carry_intervals_that_bracket_the_accuracy(tmp_path):
    config = ProbeConfig(
        model="test_vit", random_init=True, img_size=(48, 48), cache_dir=tmp_path / "cache",
        max_images=200, epochs=5, lrs=[1e-2], wds=[1e-4], map_images=0,
    )  # fmt: skip
    _, result = run(replace(config, out=tmp_path / "run"))
    for table in (result.results, result.summary):
        assert (table["eval_top1_ci_low"] <= table["eval_top1"] + 1e-12).all()
        assert (table["eval_top1"] <= table["eval_top1_ci_high"] + 1e-12).all()
    summary = result.summary.set_index("aggregator")
    assert summary.loc["cls", "delta_ci_low"] == summary.loc["cls", "delta_ci_high"] == 0.0
    assert (summary["delta_ci_low"] <= summary["delta_top1_vs_baseline"] + 1e-12).all()
