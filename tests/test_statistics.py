"""Per-image values (images.csv), bootstrap intervals (intervals.csv) and what the report makes of them.

The per-image values themselves are checked against the float64 reference in
test_reference_agreement.py; the bootstrap against a plain numpy percentile bootstrap
and the normal approximation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.metrics import HEADLINE_METRICS
from attnscope.metrics.intervals import bootstrap_means

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def numpy_bootstrap(x: np.ndarray, seed: int, n_resamples: int = 4000) -> tuple[float, float]:
    """The textbook percentile bootstrap of a mean: resample, average, take the 2.5/97.5% quantiles."""
    rng = np.random.default_rng(seed)
    n = len(x)
    means = x[rng.integers(0, n, (n_resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------- the bootstrap


def test_bootstrap_agrees_with_numpy_and_the_normal_approximation():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    mean, low, high = bootstrap_means(x[None], seed=0)
    assert mean[0] == pytest.approx(x.mean(), rel=1e-15)
    width = high[0] - low[0]
    ref_low, ref_high = numpy_bootstrap(x, seed=7)  # another generator: Monte Carlo noise only
    assert abs(low[0] - ref_low) < 0.1 * width and abs(high[0] - ref_high) < 0.1 * width
    half = 1.96 * x.std() / np.sqrt(len(x))  # known answer for a mean of 400 normal values
    assert low[0] == pytest.approx(x.mean() - half, abs=0.1 * width)
    assert high[0] == pytest.approx(x.mean() + half, abs=0.1 * width)


def test_intervals_shrink_as_images_grow():
    """Width ~ 1/sqrt(n): half as wide for four times the images, on fresh samples, and
    (up to Monte Carlo noise) exactly so for the same values repeated four times."""
    rng = np.random.default_rng(2)
    widths = []
    for n in (100, 400, 1600):
        _, low, high = bootstrap_means(rng.normal(0.0, 1.0, size=(3, n)), seed=0)
        widths.append(high - low)
    for small, large in zip(widths, widths[1:], strict=False):
        assert np.all((small / large > 1.6) & (small / large < 2.5)), small / large
    base = rng.exponential(1.0, size=(3, 25))
    _, low1, high1 = bootstrap_means(base, seed=0)
    _, low4, high4 = bootstrap_means(np.tile(base, 4), seed=0)
    np.testing.assert_allclose((high1 - low1) / (high4 - low4), 2.0, rtol=0.1)


def test_every_row_sees_the_same_resample():
    """A row's interval does not depend on the other rows: they are resampled together,
    so every model and block of one call sees the same images drawn."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=60), rng.gamma(2.0, size=60)
    _, low_xy, high_xy = bootstrap_means(np.vstack([x, y, x]), seed=5)
    _, low_y, high_y = bootstrap_means(y[None], seed=5)
    # equal up to the rounding of a matrix product of another shape
    assert low_xy[1] == pytest.approx(low_y[0], rel=1e-13) and high_xy[1] == pytest.approx(
        high_y[0], rel=1e-13
    )
    # the same values in rows 0 and 2: equal up to the rounding BLAS gives a row by its place
    assert low_xy[0] == pytest.approx(low_xy[2], rel=1e-13)
    assert high_xy[0] == pytest.approx(high_xy[2], rel=1e-13)
    _, other, _ = bootstrap_means(y[None], seed=6)  # the seed decides the resample
    assert abs(other[0] - low_y[0]) > 1e-6


def test_paired_differences_see_what_overlapping_intervals_hide():
    """Two models measured on the same images: their own intervals overlap, the paired
    interval of the per-image differences excludes zero (and matches a numpy paired bootstrap)."""
    rng = np.random.default_rng(4)
    image_effect = rng.normal(0.5, 0.1, size=80)  # images differ far more than the models do
    a = image_effect + 0.01 + rng.normal(0, 0.002, 80)
    b = image_effect + rng.normal(0, 0.002, 80)
    mean, low, high = bootstrap_means(np.vstack([a, b, a - b]), seed=0)
    assert low[0] < high[1] and low[1] < high[0]  # the models' own intervals overlap
    assert low[2] > 0  # the paired difference does not
    assert mean[2] == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    ref_low, ref_high = numpy_bootstrap(a - b, seed=9)
    width = high[2] - low[2]
    assert abs(low[2] - ref_low) < 0.1 * width and abs(high[2] - ref_high) < 0.1 * width


def test_degenerate_and_tiny_samples():
    mean, low, high = bootstrap_means(np.full((1, 10), 0.25), seed=0)
    assert mean[0] == 0.25 and low[0] == pytest.approx(0.25, rel=1e-12) and high[0] == pytest.approx(0.25)
    mean, low, high = bootstrap_means(np.array([[0.3]]), seed=0)  # one image: nothing to resample
    assert mean[0] == 0.3 and np.isnan(low[0]) and np.isnan(high[0])
    with pytest.raises(ValueError):
        bootstrap_means(np.array([[0.1, np.nan]]), seed=0)


# ---------------------------------------------------------------- images.csv


def test_entropy_images_csv_means_equal_layers_csv_means(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "entropy", "--model", "test_vit2", "--random-init", "--max-images", "3", "--batch-size", "2",
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    images = pd.read_csv(out / "images.csv")
    layers = pd.read_csv(out / "layers.csv")
    assert list(images.columns) == ["model", "image", "layer", "metric", "value"]
    used = json.loads((out / "run.json").read_text())["models"]["test_vit2"]["images_used"]
    assert list(dict.fromkeys(images["image"])) == used  # named as run.json names them, in order
    assert len(images) == len(layers) * len(used)
    stats = images.groupby(["layer", "metric"], sort=False)["value"].agg(["mean", "count", "std"])
    stats = stats.reindex(pd.MultiIndex.from_frame(layers[["layer", "metric"]]))
    np.testing.assert_allclose(stats["mean"], layers["mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(stats["count"], layers["count"])
    np.testing.assert_allclose(stats["std"] * np.sqrt(2 / 3), layers["std"], rtol=1e-6, atol=1e-9)  # ddof 0


def test_analyze_returns_the_images_table(sample_paths):
    import attnscope

    result = attnscope.analyze("test_vit", sample_paths[:2], random_init=True, batch_size=1)
    images = result.images
    assert set(images["image"]) == {str(p) for p in sample_paths[:2]}
    assert len(images) == 2 * len(result.layers)
    means = images.groupby(["layer", "metric"])["value"].mean()
    layers = result.layers.set_index(["layer", "metric"])["mean"]
    np.testing.assert_allclose(means.reindex(layers.index), layers, rtol=1e-12)


# ---------------------------------------------------------------- intervals in compare


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from attnscope.commands.compare import CompareConfig, run

    out = tmp_path_factory.mktemp("stats") / "cmp"
    result = run(CompareConfig(("test_vit", "test_vit2"), out=out, random_init=True, gallery=0, seed=3))
    return out, result


@pytest.mark.slow
def test_intervals_csv_columns_means_and_differences(comparison):
    out, result = comparison
    intervals = pd.read_csv(out / "intervals.csv")
    assert list(intervals.columns) == [
        "model", "minus", "scope", "layer", "metric", "mean", "ci_low", "ci_high", "n_images",
    ]  # fmt: skip
    assert (intervals["n_images"] == 7).all() and set(intervals["metric"]) <= set(HEADLINE_METRICS)
    assert (intervals["ci_low"] <= intervals["mean"] + 1e-12).all()
    assert (intervals["mean"] <= intervals["ci_high"] + 1e-12).all()
    layers = pd.read_csv(out / "layers.csv")
    own = intervals[intervals["minus"].isna() & (intervals["scope"] == "block")]
    merged = own.merge(layers, on=["model", "layer", "metric"], suffixes=("", "_layers"))
    assert len(merged) == len(own) == len(layers[layers["metric"].isin(HEADLINE_METRICS)])
    np.testing.assert_allclose(merged["mean"], merged["mean_layers"], rtol=1e-9)
    # test_vit2 has no [cls]: only the patch metrics are compared, as differences of per-image values
    diffs = intervals[intervals["minus"].notna()]
    assert set(diffs["metric"]) == {"patch_patch_entropy_norm", "attn_distance_px"}
    assert (diffs["model"] == "test_vit").all() and (diffs["minus"] == "test_vit2").all()
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    for _, row in diffs.iterrows():
        column = f"{row['metric']}_{row['scope']}"
        expected = summary.loc["test_vit", column] - summary.loc["test_vit2", column]
        assert row["mean"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    boot = json.loads((out / "run.json").read_text())["bootstrap"]
    assert boot["seed"] == 3 and boot["n_images"] == 7 and boot["confidence_level"] == 0.95
    assert boot["method"] == "percentile" and boot["n_resamples"] == 2000


def test_compare_interval_widths_shrink_with_more_images(comparison):
    """The same 7 images' values three times over (21 images, the same spread): every
    interval narrows by about sqrt(3)."""
    from dataclasses import replace

    from attnscope.compare import interval_table

    _, result = comparison
    tripled = []
    for run in result.runs:
        copies = [run.images.assign(image=run.images["image"] + f"#{k}") for k in range(3)]
        tripled.append(replace(run, images=pd.concat(copies, ignore_index=True)))
    seven, _ = interval_table(result.runs, seed=0)
    twenty_one, _ = interval_table(tripled, seed=0)
    assert (twenty_one["n_images"] == 21).all()
    np.testing.assert_allclose(twenty_one["mean"], seven["mean"], rtol=1e-12, atol=1e-15)
    w7 = (seven["ci_high"] - seven["ci_low"]).to_numpy()
    w21 = (twenty_one["ci_high"] - twenty_one["ci_low"]).to_numpy()
    varying = w7 > 1e-12
    ratio = w7[varying] / w21[varying]
    assert varying.sum() > 20 and np.median(ratio) == pytest.approx(np.sqrt(3), rel=0.15)
    assert (ratio > 1.2).all()


def test_report_shows_intervals_in_the_summary_and_the_band_caption(comparison):
    out, result = comparison
    html = (out / "report.html").read_text()
    assert "95% bootstrap interval of the mean over the 7 images" in html
    iv = pd.read_csv(out / "intervals.csv")
    row = iv[(iv["model"] == "test_vit") & (iv["scope"] == "last") & (iv["metric"] == "cls_self_attn")].iloc[
        0
    ]
    from attnscope.report.content import _num

    assert f"[{_num(row['ci_low'], 'cls_self_attn')}, {_num(row['ci_high'], 'cls_self_attn')}]" in html
    md = (out / "report.md").read_text()
    assert "intervals.csv" in md and "images.csv" in md
    assert any("95% CI" in s or "no interval" in s for s in result.findings)


def test_depth_panels_draw_the_interval_as_the_band(comparison):
    from matplotlib.collections import PolyCollection

    from attnscope.plots.compare import depth_panels, family_linestyles
    from attnscope.plots.entropy import model_palette

    out, result = comparison
    layers = pd.read_csv(out / "layers.csv")
    fams = {"test_vit": "unknown", "test_vit2": "unknown"}
    kw = dict(palette=model_palette(list(fams)), linestyles=family_linestyles(fams), families=fams)
    fig = depth_panels(layers, ["attn_distance_px"], relative_depth=True, intervals=result.intervals, **kw)
    ax = fig.axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 and "95% bootstrap interval" in fig._suptitle.get_text()
    iv = result.intervals
    own = iv[(iv["model"] == "test_vit") & (iv["scope"] == "block") & (iv["metric"] == "attn_distance_px")]
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(own["ci_low"].min()) and ys.max() == pytest.approx(own["ci_high"].max())
    fig = depth_panels(layers, ["attn_distance_px"], relative_depth=True, **kw)
    assert "± std over images" in fig._suptitle.get_text()


@pytest.mark.slow
def test_reused_runs_reread_images_csv_and_old_folders_are_recomputed(comparison, tmp_path):
    from attnscope.commands.compare import CompareConfig, run

    out, first = comparison
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    again = run(CompareConfig(("test_vit", "test_vit2"), out=copy, random_init=True, gallery=0, seed=3))
    assert [r.status for r in again.runs] == ["reused", "reused"]
    pd.testing.assert_frame_equal(again.intervals, first.intervals)
    assert (copy / "images.csv").read_bytes() == (out / "images.csv").read_bytes()
    # a run folder from before images.csv, or with a damaged one, is recomputed, not trusted
    (copy / "runs" / "test_vit" / "images.csv").unlink()
    damaged = copy / "runs" / "test_vit2" / "images.csv"
    damaged.write_text("\n".join(damaged.read_text().splitlines()[:-5]) + "\n")
    third = run(CompareConfig(("test_vit", "test_vit2"), out=copy, random_init=True, gallery=0, seed=3))
    assert [r.status for r in third.runs] == ["computed", "computed"]
    assert (copy / "runs" / "test_vit" / "images.csv").is_file()
    pd.testing.assert_frame_equal(third.intervals, first.intervals)


@pytest.mark.slow
def test_compare_table_says_random_weights_per_row(tmp_path, tiny):
    import torch

    ckpt = tmp_path / "vit.pth"
    torch.save(tiny("vit", seed=1).state_dict(), ckpt)
    result = invoke(
        "compare", "test_vit", "test_vit2", "--random-init", "--checkpoint", f"test_vit={ckpt}",
        "--max-images", "2", "--gallery", "0", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    output = result.output
    table = output[output.index("2 models, 2 images") : output.index("•")]
    assert table.splitlines()[0].strip() == "2 models, 2 images"  # no RANDOM WEIGHTS for the whole table
    assert table.count("RANDOM WEIGHTS") == 1  # test_vit2's row only
    rows = table.splitlines()
    hit = next(i for i, line in enumerate(rows) if "RANDOM WEIGHTS" in line)
    assert "test_vit2" in rows[hit - 2]
