"""`attnscope probe` end to end on the built-in digits with tiny random-init backbones."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.commands.probe import ProbeConfig, run
from attnscope.errors import ConfigError
from attnscope.probe import features as feat
from attnscope.probe.heads import AGGREGATORS

runner = CliRunner()
TINY = ["--model", "test_vit", "--random-init", "--img-size", "48"]


# end-to-end probe runs (slow); one thread: see conftest.py
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_every_aggregator_beats_chance_and_a_second_run_reuses_the_cache(tmp_path, monkeypatch):
    config = ProbeConfig(
        model="test_vit", random_init=True, img_size=(48, 48), cache_dir=tmp_path / "cache",
        aggregators=AGGREGATORS, max_images=400, epochs=15, lrs=[1e-2, 1e-1], wds=[1e-4], map_images=3,
    )  # fmt: skip
    _, first = run(replace(config, out=tmp_path / "first"))
    summary = first.summary.set_index("aggregator")
    assert list(summary.index) == list(AGGREGATORS)
    assert (summary["eval_top1"] > 0.25).all(), summary["eval_top1"]  # chance is 0.10 (10 digits)
    assert (summary["eval_top5"] > summary["eval_top1"]).all()
    assert len(first.results) == len(AGGREGATORS) * 2 and first.results["selected"].sum() == len(AGGREGATORS)
    assert (
        first.info["cache"]["train"]["extracted"]
        == first.info["splits"]["train"] + first.info["splits"]["holdout"]
    )
    assert first.info["features"]["norm"] == "final norm applied" and first.info["token_layout"]["grid"] == [
        3,
        3,
    ]
    assert len(first.maps) == 3 and all(m.weights.shape == (3, 3) for m in first.maps)
    assert all(np.isclose(m.cls_attention.sum(), 1.0) and -1 <= m.spearman <= 1 for m in first.maps)

    def no_extraction(*args, **kwargs):
        raise AssertionError("the second run extracted features again")

    monkeypatch.setattr(feat, "extract_shards", no_extraction)
    _, second = run(replace(config, out=tmp_path / "second"))
    assert (
        second.info["cache"]["train"]["extracted"] == 0 and second.info["cache"]["eval"]["reused"] == 359
    )  # the digits eval split
    pd.testing.assert_frame_equal(first.results, second.results)  # same cache, same seed: same numbers


def test_cli_writes_results_summary_maps_figures_and_run_json(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "probe", *TINY, "--max-images-per-split", "200", "--epochs", "3", "--lrs", "0.01,0.1", "--wds", "0",
        "--aggregator", "cls,mean,abmilp", "--maps", "2", "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out), "--format", "png", "--format", "svg",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in (
        "RANDOM WEIGHTS",
        "feature cache:",
        "effective batch size",
        "learning rates: 0.01, 0.1",
        "abmilp",
        "Δ cls",
    ):
        assert needle in text, needle
    results = pd.read_csv(out / "results.csv")
    assert {
        "aggregator",
        "lr",
        "wd",
        "params",
        "train_top1",
        "holdout_top1",
        "eval_top1",
        "eval_top5",
    } <= set(results.columns)
    assert len(results) == 6
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["aggregator"]) == ["cls", "mean", "abmilp"] and "best_over_grid_eval_top1" in summary
    assert len(pd.read_csv(out / "maps.csv")) == 2
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["command"] == "probe" and meta["config"]["aggregators"] == ["cls", "mean", "abmilp"]
    info = meta["models"]["test_vit"]
    assert info["recipe"]["optimizer"] == "adamw" and info["recipe"]["lrs"] == [0.01, 0.1]
    assert info["recipe"]["batch_size"] == info["splits"]["train"] == 180  # 200 minus a 10% hold-out
    for name in ("accuracy_by_aggregator", "accuracy_by_lr", "selection_vs_cls_attention"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
        assert (out / "figures" / f"{name}.svg").exists()


def test_paper_recipe_no_class_token_and_streaming(tmp_path):
    # test_vit2 has no class token and one register: cls heads are dropped with a note and
    # the register stays out of the patch bag.
    out = tmp_path / "run"
    result = invoke(
        "probe", "--model", "test_vit2", "--random-init", "--img-size", "48", "--max-images-per-split", "120",
        "--recipe", "paper", "--epochs", "3", "--no-cache", "--maps", "1", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no class token" in result.output and "LARS" in result.output
    meta = json.loads((out / "run.json").read_text())
    info = meta["models"]["test_vit2"]
    batch = info["recipe"]["batch_size"]
    assert info["recipe"]["optimizer"] == "lars" and info["recipe"]["lrs"] == [
        pytest.approx(0.1 * batch / 256)
    ]
    assert info["recipe"]["wds"] == [0.0] and info["cache"] is None
    assert list(pd.read_csv(out / "summary.csv")["aggregator"]) == ["mean", "abmilp"]
    assert info["token_layout"]["num_registers"] == 1


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                (tmp_path / "data" / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png"
                )
    bad = tmp_path / "data" / "train" / "a" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "run"
    args = [
        "probe",
        *TINY,
        "--data",
        str(tmp_path / "data"),
        "--epochs",
        "2",
        "--maps",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "zz_broken.jpg" in result.output and "1 image(s) skipped" in result.output
    skipped = json.loads((out / "run.json").read_text())["models"]["test_vit"]["images_skipped"]
    assert [s["item"] for s in skipped] == [str(bad)]
    again = invoke(*args, "--out", str(tmp_path / "run2"))  # from the cache: still listed
    assert again.exit_code == 0 and "zz_broken.jpg" in again.output


def test_cli_refuses_when_the_cache_would_not_fit(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(feat.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    result = invoke(
        "probe",
        *TINY,
        "--max-images-per-split",
        "50",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2
    assert "feature cache:" in result.output  # the estimate is shown before the refusal
    assert "--no-cache" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch):
    from attnscope.probe import datasets as ds

    monkeypatch.setattr(ds, "host_reachable", lambda host, timeout=3.0: False)
    result = invoke(
        "probe", *TINY, "--dataset", "cifar100", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 2 and "--data-root" in result.output and "Traceback" not in result.output
    result = invoke("probe", *TINY, "--aggregator", "cls,magic", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "unknown aggregator" in result.output
    result = invoke("probe", *TINY, "--lrs", "fast", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--lrs" in result.output


def test_cli_help_lists_the_registered_aggregators_and_one_meaning_per_flag():
    result = runner.invoke(app, ["probe", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in AGGREGATORS:
        assert name in result.output, name
    for flag in ("--batch-size", "--train-batch-size", "--max-images-per-split"):
        assert flag in result.output, flag
    assert "--extract-batch-size" not in result.output  # deprecated spellings are hidden
    assert "--max-images " not in result.output


def test_cli_flags_map_to_config_fields_and_old_spellings_still_work(tmp_path, monkeypatch):
    import attnscope.commands.probe as command
    from attnscope.cli.probe import PROBE_FLAGS
    from attnscope.cli.ui import user_message
    from attnscope.errors import ConfigError

    seen = []
    monkeypatch.setattr(command, "run", lambda config, ui, **kw: (seen.append(config), (tmp_path, None))[1])
    result = invoke(
        "probe", *TINY, "--batch-size", "8", "--train-batch-size", "32", "--max-images-per-split", "9"
    )
    assert result.exit_code == 0, result.output
    assert (seen[-1].extract_batch_size, seen[-1].batch_size, seen[-1].max_images) == (8, 32, 9)
    result = invoke("probe", *TINY, "--extract-batch-size", "4", "--max-images", "7")
    assert result.exit_code == 0 and "deprecated" in result.output
    assert (seen[-1].extract_batch_size, seen[-1].max_images) == (4, 7)
    result = invoke("probe", *TINY, "--max-images", "7", "--max-images-per-split", "7")
    assert result.exit_code == 2 and "--max-images-per-split only" in result.output
    # run.json keeps the field names; a message about a field names the probe's own flag
    assert user_message(ConfigError("batch_size", "must be at least 2"), PROBE_FLAGS).startswith(
        "--train-batch-size "
    )
    assert user_message(ConfigError("extract_batch_size", "x"), PROBE_FLAGS).startswith("--batch-size ")
    result = invoke("probe", *TINY, "--lrs", "0", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--lrs takes positive numbers" in result.output


def test_default_threads_are_the_affinity_shared_by_the_local_ranks(monkeypatch):
    import os

    from attnscope.commands.probe import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 7}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == (4, "4 CPUs in this process's affinity")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert default_threads()[0] == 1 and "/ 3 processes on this node" in default_threads()[1]
    with pytest.raises(ConfigError, match="threads"):
        ProbeConfig(threads=0)


def test_threads_hold_for_extraction_and_training_and_are_restored(tmp_path, monkeypatch):
    import torch

    import attnscope.measure
    from attnscope.commands.probe import ProbeHooks

    seen = []
    real = attnscope.measure.forward_features
    monkeypatch.setattr(
        attnscope.measure,
        "forward_features",
        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1],
    )

    class Hooks(ProbeHooks):
        def epoch(self, done, total):
            seen.append(torch.get_num_threads())

    torch.set_num_threads(2)
    config = ProbeConfig(
        model="test_vit", random_init=True, img_size=(32, 32), max_images=30, epochs=2, map_images=0,
        threads=1, cache_dir=tmp_path / "c", out=tmp_path / "run",
    )  # fmt: skip
    _, result = run(config, hooks=Hooks())
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    assert result.info["threads"] == {"torch": 1, "from": "`threads`"}
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["threads"] == 1 and meta["models"]["test_vit"]["threads"]["torch"] == 1
