"""Learning curves: every head measured after every epoch, the last epoch being the results."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import mil_bags
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.probe import train
from attnscope.probe.selection import add_best_epochs, select_hyperparameters
from attnscope.probe.train import BankSpec, TensorSource, TrainingData, resolve_recipe, train_bank

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FINAL = {  # results.csv column -> (curves split, curves column)
    "train_top1": ("train", "top1"),
    "train_loss": ("train", "loss"),
    "holdout_top1": ("holdout", "top1"),
    "holdout_loss": ("holdout", "loss"),
    "eval_top1": ("eval", "top1"),
    "eval_top5": ("eval", "top5"),
}


def final_epoch_matches(results: pd.DataFrame, curves: pd.DataFrame) -> None:
    """Every results value equals the curves' value of the same head at the last epoch, exactly."""
    last = curves[curves["epoch"] == curves["epoch"].max()]
    keys = [c for c in ("block", "aggregator", "head") if c in results]
    for column, (split, value) in FINAL.items():
        part = last[last["split"] == split].set_index(keys)[value]
        got = results.set_index(keys)[column]
        assert part.index.sort_values().equals(got.index.sort_values()), column
        np.testing.assert_array_equal(part.loc[got.index].to_numpy(), got.to_numpy(), err_msg=column)


def bank(curves: bool, n_train: int = 300, epochs: int = 4):
    xt, yt, _ = mil_bags(n_train + 60, seed=1, classes=10)
    xe, ye, _ = mil_bags(90, seed=2, classes=10)
    recipe = resolve_recipe(
        "default", n_train=n_train, batch_size=64, epochs=epochs, lrs=[1e-2, 1e-1], wds=[0.0]
    )
    return train_bank(
        TrainingData(
            TensorSource(xt), yt, np.arange(n_train), np.arange(n_train, n_train + 60),
            TensorSource(xe), ye, np.arange(90),
        ),
        BankSpec(["cls", "mean", "abmilp"], 10, 32, 3, True),
        recipe,
        seed=3,
        curves=curves,
    )  # fmt: skip


def test_curves_end_at_the_results_and_leave_the_training_alone(monkeypatch):
    # fewer BatchNorm-pass images than training images: the pass draws its images from the
    # random stream of the epochs' orders, which the per-epoch measurements must not move
    monkeypatch.setattr(train, "BN_PASS_IMAGES", 200)
    with_curves, without = bank(True), bank(False)
    pd.testing.assert_frame_equal(with_curves.results, without.results)
    assert with_curves.losses == without.losses and without.curves is None
    curves = with_curves.curves
    assert len(curves) == 4 * 3 * 2 * 3  # epochs x aggregators x grid x (train, holdout, eval)
    assert list(curves["epoch"].unique()) == [1, 2, 3, 4] and curves["step"].max() == with_curves.steps
    assert (curves["optimistic"] == (curves["split"] == "eval")).all()
    assert set(curves.loc[curves["split"] == "train", "images"]) == {200}  # the BatchNorm pass's images
    final_epoch_matches(with_curves.results, curves)
    # the first epoch is a measurement of its own, not a copy of the last
    first = curves[(curves["epoch"] == 1) & (curves["split"] == "eval")]["top1"].to_numpy()
    assert not np.array_equal(first, curves[(curves["epoch"] == 4) & (curves["split"] == "eval")]["top1"])


def test_best_epoch_is_the_selected_heads_first_maximum_on_the_evaluation_split():
    rows = [
        {"aggregator": "abmilp", "head": h, "epoch": e, "split": s, "top1": top1}
        for h, tops in ((0, [0.2, 0.6, 0.6, 0.5]), (1, [0.9, 0.1, 0.1, 0.1]))
        for e, top1 in enumerate(tops, start=1)
        for s in ("holdout", "eval")
    ]
    summary = pd.DataFrame(
        [
            {
                "aggregator": "abmilp",
                "head": 0,
                "eval_top1": 0.5,
                "best_over_grid_eval_top1": 0.5,
                "baseline": "x",
            }
        ]
    )
    add_best_epochs(summary, pd.DataFrame(rows))
    assert list(summary.columns) == [
        "aggregator", "head", "eval_top1", "best_over_grid_eval_top1", "best_epoch", "best_epoch_top1",
        "baseline",
    ]  # fmt: skip
    assert summary.loc[0, "best_epoch"] == 2 and summary.loc[0, "best_epoch_top1"] == 0.6
    add_best_epochs(none := summary.drop(columns=["best_epoch", "best_epoch_top1"]), None)
    assert none[["best_epoch", "best_epoch_top1"]].isna().all().all()


@pytest.mark.slow
def test_cli_curves_csv_ends_at_results_csv_and_no_curves_writes_none(tmp_path):
    args = [
        "probe", "--model", "test_vit", "--random-init", "--img-size", "48", "--max-images-per-split", "150",
        "--epochs", "3", "--lrs", "0.01,0.1", "--wds", "0", "--maps", "0", "--blocks", "2,5",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "on")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "max*" in result.output and "Max accuracy" in result.output
    out = tmp_path / "on"
    results, curves = pd.read_csv(out / "results.csv"), pd.read_csv(out / "curves.csv")
    assert list(curves.columns[:3]) == ["model", "block", "aggregator"] and set(curves["block"]) == {2, 5}
    final_epoch_matches(results, curves)
    summary = pd.read_csv(out / "summary.csv")
    ev = curves[curves["split"] == "eval"]
    for row in summary.itertuples():
        mine = ev[
            (ev["block"] == row.block) & (ev["aggregator"] == row.aggregator) & (ev["head"] == row.head)
        ]
        assert row.best_epoch_top1 == mine["top1"].max() >= row.eval_top1
        assert row.best_epoch == mine.loc[mine["top1"].idxmax(), "epoch"]
    assert (out / "figures" / "learning_curves.png").stat().st_size > 5000
    info = json.loads((out / "run.json").read_text())["models"]["test_vit"]
    assert info["curves"]["measured"] and info["curves"]["seconds"] > 0 and "curves" in info["timings_s"]
    # --no-curves: the same results, no curves
    result = CliRunner().invoke(app, [*args, "--no-curves", "--out", str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "off" / "curves.csv").exists() and "max*" not in result.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "off" / "results.csv"), results)
    off = pd.read_csv(tmp_path / "off" / "summary.csv")
    assert off[["best_epoch", "best_epoch_top1"]].isna().all().all()
    _, selected = select_hyperparameters(results[results["block"] == 5].drop(columns=["model", "block"]))
    assert list(selected["eval_top1"]) == list(summary.loc[summary["block"] == 5, "eval_top1"])
