"""`attnscope compare`: files, stacked tables equal to single runs, reuse, report, findings, errors."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from attnscope.cli.app import app

runner = CliRunner()
MODELS = ["test_vit", "test_vit2"]  # 6 blocks with [cls] vs 8 blocks, no [cls], one register
COMMON = ["--random-init", "--max-images", "2", "--gallery", "4"]  # 4 of 2 images: still cached


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "report"
    result = invoke("compare", *MODELS, *COMMON, "--out", str(out), "--format", "svg")
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_compare_writes_every_file(report):
    out, output = report
    for name in (
        "layers.csv",
        "heads.csv",
        "images.csv",
        "intervals.csv",
        "summary.csv",
        "run.json",
        "report.html",
        "report.md",
    ):
        assert (out / name).stat().st_size > 100, name
    figures = {p.name for p in (out / "figures").iterdir()}
    for stem in (
        "depth_panels",
        "depth_panels_all",
        "heads_attn_distance",
        "heatmaps_cls_self_attn",
        "heatmaps_cls_patch_entropy_norm",
        "heatmaps_attn_distance_px",
        "gallery",
    ):
        assert f"{stem}.png" in figures and f"{stem}.svg" in figures, stem
    for slug in MODELS:
        for name in ("layers.csv", "heads.csv", "images.csv", "run.json", "gallery.npz"):
            assert (out / "runs" / slug / name).is_file()
        assert not (out / "runs" / slug / ".attnscope-partial").exists()  # a finished run keeps no state
    meta = json.loads((out / "run.json").read_text())
    assert list(meta["models"]) == MODELS and meta["config"]["command"] == "compare"
    assert {r["status"] for r in meta["runs"].values()} == {"computed"}
    assert meta["models"]["test_vit"]["num_blocks"] == 6 and meta["models"]["test_vit2"]["num_blocks"] == 8
    assert "report.html" in output and "RANDOM" in output
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp files left behind


@pytest.mark.slow
def test_stacked_tables_equal_the_single_model_runs(report, tmp_path):
    out, _ = report
    layers = pd.read_csv(out / "layers.csv")
    heads = pd.read_csv(out / "heads.csv")
    assert list(layers.columns) == ["model", "family", "layer", "metric", "mean", "std", "count"]
    assert list(heads.columns) == ["model", "family", "layer", "head", "metric", "mean", "std", "count"]
    assert list(dict.fromkeys(layers["model"])) == MODELS
    # the same model through `attnscope entropy` gives the very same numbers
    single = tmp_path / "single"
    assert (
        invoke(
            "entropy", "--model", "test_vit", "--random-init", "--max-images", "2", "--out", str(single)
        ).exit_code
        == 0
    )
    for name, table in (("layers.csv", layers), ("heads.csv", heads)):
        mine = table[table["model"] == "test_vit"].drop(columns="family").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, pd.read_csv(single / name))
        other = table[table["model"] == "test_vit2"].drop(columns="family").reset_index(drop=True)
        pd.testing.assert_frame_equal(other, pd.read_csv(out / "runs" / "test_vit2" / name))


def test_summary_marks_missing_metrics_as_missing_not_zero(report):
    out, _ = report
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    assert list(summary.index) == MODELS
    for metric in (
        "cls_self_attn",
        "cls_patch_entropy_norm",
        "cls_patch_eff_frac",
        "cls_patch_k90_frac",
        "patch_patch_entropy_norm",
        "attn_distance_px",
        "cls_residual_ratio",
    ):
        for which in ("last", "mean"):
            assert math.isfinite(summary.loc["test_vit", f"{metric}_{which}"])
    assert summary.loc["test_vit2", ["cls_self_attn_last", "cls_residual_ratio_mean"]].isna().all()
    assert summary.loc["test_vit2", "num_blocks"] == 8 and summary.loc["test_vit", "num_blocks"] == 6
    layers = pd.read_csv(out / "layers.csv")
    last = layers[
        (layers["model"] == "test_vit") & (layers["layer"] == 5) & (layers["metric"] == "cls_self_attn")
    ]
    assert summary.loc["test_vit", "cls_self_attn_last"] == pytest.approx(float(last["mean"].iloc[0]))
    text = (out / "summary.csv").read_text().splitlines()[2]
    assert ",," in text and ",0.0," not in text


def test_report_html_is_self_contained_and_embeds_every_figure(report):
    out, _ = report
    html = (out / "report.html").read_text()
    pngs = sorted((out / "figures").glob("*.png"))
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(pngs) == 7
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html and "<link" not in html
    for model in MODELS:
        assert html.count(model) >= 3
    assert "RANDOM WEIGHTS" in html and "no class token" in html and "test_vit" in html
    assert "Findings" in html and "Summary" in html and "timm name" in html


def test_report_md_links_every_png(report):
    out, _ = report
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[(?:[^\]\\]|\\.)*\]\((figures/[^)]+\.png)\)", md)
    assert sorted(links) == sorted(f"figures/{p.name}" for p in (out / "figures").glob("*.png"))
    assert all((out / link).is_file() for link in links)
    assert "| model | family | timm name |" in md and "— (no class token)" in md


@pytest.mark.slow
def test_second_compare_reuses_runs_and_no_reuse_recomputes(report):
    out, _ = report
    stamp = (out / "runs" / "test_vit" / "layers.csv").stat().st_mtime_ns
    before = (out / "layers.csv").read_bytes()
    result = invoke("compare", *MODELS, *COMMON, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "test_vit, test_vit2" in result.output
    assert (out / "runs" / "test_vit" / "layers.csv").stat().st_mtime_ns == stamp
    assert (out / "layers.csv").read_bytes() == before
    meta = json.loads((out / "run.json").read_text())
    assert {r["status"] for r in meta["runs"].values()} == {"reused"}
    assert not list((out / "figures").glob("*.svg"))  # this run asked for PNG only: no stale SVGs

    # a different image set changes the configuration hash: recomputed, not reused
    result = invoke(
        "compare", *MODELS, "--random-init", "--max-images", "1", "--gallery", "1", "--out", str(out)
    )
    assert result.exit_code == 0 and "reused" not in result.output
    assert (out / "runs" / "test_vit" / "layers.csv").stat().st_mtime_ns != stamp
    assert set(pd.read_csv(out / "layers.csv")["count"]) == {1}


def test_relative_depth_aligns_models_of_different_depths(report):
    from attnscope.plots.compare import depth_panels, family_linestyles
    from attnscope.plots.style import model_palette

    out, _ = report
    layers = pd.read_csv(out / "layers.csv")
    fams = dict.fromkeys(MODELS, "unknown")
    fig = depth_panels(
        layers,
        ["patch_patch_entropy_norm"],
        palette=model_palette(MODELS),
        linestyles=family_linestyles(fams),
        families=fams,
        relative_depth=True,
    )
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) > 1]
    assert len(lines) == 2
    for line in lines:
        x = np.asarray(line.get_xdata(), dtype=float)
        assert x[0] == 0.0 and x[-1] == 1.0
    assert sorted(len(ln.get_xdata()) for ln in lines) == [6, 8]
    assert "relative depth" in fig.axes[0].get_xlabel()
    fig = depth_panels(
        layers,
        ["cls_self_attn"],
        palette=model_palette(MODELS),
        linestyles=family_linestyles(fams),
        families=fams,
        relative_depth=False,
        missing_reasons={"cls_self_attn": {"test_vit2": "no class token"}},
    )
    assert [len(ln.get_xdata()) for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) > 1] == [6]
    assert "no line for test_vit2 (no class token)" in fig.axes[0].get_xlabel()


def _summary(**columns):
    n = len(columns["model"])
    base = {"random_init": [False] * n, "input_size": ["224x224"] * n, "num_images": [50] * n}
    return pd.DataFrame({**base, **columns})


FINDINGS_SUMMARY = dict(
    model=["mae", "dino", "ijepa"],
    cls_self_attn_last=[0.42, 0.08, float("nan")],
    cls_patch_entropy_norm_last=[0.97, 0.81, float("nan")],
    cls_patch_k90_frac_last=[0.8, 0.3, float("nan")],
    patch_patch_entropy_norm_mean=[0.7, 0.7, 0.6],
    attn_distance_px_mean=[40.0, 80.0, 60.0],
    cls_residual_ratio_last=[0.5, 0.5, float("nan")],
)


def test_findings_sentences_from_numbers_thresholds_alone():
    """Without intervals (no per-image values) the thresholds alone decide."""
    from attnscope.compare import findings

    infos = {"ijepa": {"token_layout": {"has_cls": False, "num_registers": 0}}}
    sentences, notes = findings(_summary(**FINDINGS_SUMMARY), infos)
    text = " ".join(sentences)
    assert (
        "In the last block, mae's [cls] keeps 0.42 of its attention on itself vs 0.080 for dino (5.2x)."
        in text
    )
    assert (
        "mae's [cls]→patch attention is closer to uniform in the last block "
        "(normalised entropy 0.97 vs 0.81 for dino)." in text
    )
    assert "dino's [cls] is the more selective" in text
    assert (
        "dino's patches look farther: mean attention distance 80 px vs 40 px for mae (2.0x) "
        "(others: ijepa 60 px)." in text
    )
    # 0.5 vs 0.5 residual ratio: no winner is invented
    assert "mae and dino do not differ measurably in [cls] residual update ratio (0.50 vs 0.50" in text
    assert "ijepa" not in sentences[0]
    assert any("ijepa" in n and "no class token" in n for n in notes)


def _intervals(rows):
    """intervals.csv rows of differences: (a, b, scope, metric, mean, low, high)."""
    return pd.DataFrame(
        [(a, b, scope, None, m, mean, lo, hi, 50) for a, b, scope, m, mean, lo, hi in rows],
        columns=["model", "minus", "scope", "layer", "metric", "mean", "ci_low", "ci_high", "n_images"],
    )


def test_findings_call_a_difference_only_when_the_paired_interval_excludes_zero():
    from attnscope.compare import findings

    summary = _summary(
        model=["mae", "dino"],
        cls_self_attn_last=[0.42, 0.08],
        cls_patch_entropy_norm_last=[0.97, 0.81],
        cls_patch_k90_frac_last=[0.8, 0.3],
        patch_patch_entropy_norm_mean=[0.7, 0.6],
        attn_distance_px_mean=[40.0, 80.0],
        cls_residual_ratio_last=[0.5, 0.45],
    )
    intervals = _intervals(
        [
            ("mae", "dino", "last", "cls_self_attn", 0.34, 0.30, 0.38),  # called
            ("mae", "dino", "last", "cls_patch_entropy_norm", 0.16, -0.01, 0.3),  # crosses zero
            ("mae", "dino", "last", "cls_patch_k90_frac", 0.5, 0.45, 0.55),
            ("mae", "dino", "mean", "patch_patch_entropy_norm", 0.1, 0.05, 0.15),
            # stored as mae - dino: the sentence names dino first, so the sign flips
            ("mae", "dino", "mean", "attn_distance_px", -40.0, -45.0, -35.0),
            ("mae", "dino", "last", "cls_residual_ratio", 0.05, 0.04, 0.06),
        ]
    )
    sentences, _ = findings(summary, {}, intervals)
    text = " ".join(sentences)
    assert (
        "In the last block, mae's [cls] keeps 0.42 of its attention on itself vs 0.080 for dino (5.2x); "
        "difference +0.34, 95% CI +0.30 to +0.38 over 50 images." in text
    )
    assert (
        "In the last block, mae and dino do not differ measurably in [cls]->patch entropy / ln N "
        "(0.97 vs 0.81; difference +0.16, 95% CI -0.010 to +0.30 over 50 images)." in text
    )
    assert (
        "mean attention distance 80 px vs 40 px for mae (2.0x); difference +40 px, 95% CI +35 px to +45 px"
        in text
    )
    assert "attention changes mae's [cls] the most" in text and "about" not in text


def test_findings_name_a_large_ratio_between_small_values():
    """0.0099 vs 0.0055 (1.8x) with an interval away from zero is a difference, not 'about the same'."""
    from attnscope.compare import difference_thresholds, findings

    summary = _summary(
        model=["mae", "dino"],
        cls_self_attn_last=[0.0099, 0.0055],
        cls_patch_entropy_norm_last=[0.9, 0.9],
        cls_patch_k90_frac_last=[0.8, 0.8],
        patch_patch_entropy_norm_mean=[0.7, 0.7],
        attn_distance_px_mean=[40.0, 40.0],
        cls_residual_ratio_last=[0.5, 0.5],
    )
    intervals = _intervals([("dino", "mae", "last", "cls_self_attn", -0.0044, -0.0050, -0.0038)])
    sentences, _ = findings(summary, {}, intervals)
    assert (
        "In the last block, mae's [cls] keeps 0.0099 of its attention on itself vs 0.0055 for dino (1.8x); "
        "difference +0.0044, 95% CI +0.0038 to +0.0050 over 50 images." in sentences
    )
    # the other metrics have no interval row: never called, and never "about the same"
    assert all("about the same" not in s for s in sentences)
    assert sum("do not differ measurably" in s for s in sentences) == 5
    # thresholds come from the metric registry: [0, 1] metrics vs pixels vs ratios
    assert difference_thresholds("cls_self_attn") == (0.001, 0.02)
    assert difference_thresholds("attn_distance_px") == (0.5, 0.02)
    assert difference_thresholds("cls_residual_ratio") == (0.001, 0.02)


def test_a_consistent_but_tiny_difference_is_not_called():
    from attnscope.compare import findings

    summary = _summary(
        model=["mae", "dino"],
        cls_self_attn_last=[0.5003, 0.5],
        cls_patch_entropy_norm_last=[0.9, 0.9],
        cls_patch_k90_frac_last=[0.8, 0.8],
        patch_patch_entropy_norm_mean=[0.7, 0.7],
        attn_distance_px_mean=[40.0, 40.0],
        cls_residual_ratio_last=[0.5, 0.5],
    )
    intervals = _intervals([("mae", "dino", "last", "cls_self_attn", 0.0003, 0.0002, 0.0004)])
    sentences, _ = findings(summary, {}, intervals)
    assert (
        "In the last block, mae and dino do not differ measurably in [cls] self-attention (0.50 vs 0.50; "
        "difference +0.00030, 95% CI +0.00020 to +0.00040 over 50 images: consistent across images, "
        "but below the 0.001 / 2% threshold)." in sentences
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["test_vit"], "two or more models"),
        (["test_vit", "test_vit"], "listed twice"),
        (["test_vit", "mae_vit_bse"], "unknown model"),
        (["test_vit", "test_vit2", "--checkpoint", "test_vit"], "NAME=VALUE"),
        (["test_vit", "test_vit2", "--checkpoint", "dino=/x.pth"], "not one of the compared models"),
        (["test_vit", "test_vit2", "--checkpoint", "test_vit=/no/such.pth"], "checkpoint not found"),
        (
            ["test_vit", "test_vit2", "--checkpoint", "test_vit=a", "--checkpoint", "test_vit=b"],
            "given twice",
        ),
        (["test_vit", "test_vit2", "--family", "test_vit=alien"], "unknown family"),
        (["test_vit", "test_vit2", "--format", "gif"], "--format"),
        (["test_vit", "test_vit2", "--dtype", "float8"], "--dtype"),
        (["test_vit", "test_vit2", "--images", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    result = invoke("compare", *args, "--random-init", "--out", str(out))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert needle in text and "Traceback" not in result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) <= 2
    assert not out.exists()


def test_foreign_non_empty_folder_needs_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = invoke("compare", *MODELS, "--random-init", "--out", str(out))
    assert result.exit_code == 2 and "--overwrite" in " ".join(result.output.split())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_per_model_checkpoints_and_families(tmp_path, tiny):
    import torch

    from attnscope.commands.compare import CompareConfig, run

    paths = {}
    for name, seed in (("test_vit", 1), ("test_vit2", 2)):
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(tiny("vit" if name == "test_vit" else "noclsreg", seed=seed).state_dict(), paths[name])
    result = run(
        CompareConfig(
            MODELS,
            out=tmp_path / "out",
            max_images=1,
            gallery=0,
            checkpoints=paths,
            families={"test_vit": "MIM", "test_vit2": "JEA"},
        )
    )
    assert [r.info["weights"] for r in result.runs] == [f"checkpoint:{paths[m].resolve()}" for m in MODELS]
    layers = pd.read_csv(tmp_path / "out" / "layers.csv")
    assert layers.groupby("model")["family"].first().to_dict() == {"test_vit": "MIM", "test_vit2": "JEA"}
    assert not (tmp_path / "out" / "figures" / "gallery.png").exists()
    # a new family needs no recompute (it changes no number); new weights do
    again = run(
        CompareConfig(
            MODELS,
            out=tmp_path / "out",
            max_images=1,
            gallery=0,
            checkpoints=paths,
            families={"test_vit": "supervised"},
        )
    )
    assert [r.status for r in again.runs] == ["reused", "reused"]
    assert again.runs[0].plan.family == "supervised"
    # new weights for one model, a random-init baseline for the other: both recomputed
    torch.save(tiny("vit", seed=3).state_dict(), paths["test_vit"])
    third = run(
        CompareConfig(
            MODELS,
            out=tmp_path / "out",
            max_images=1,
            gallery=0,
            random_init=True,
            checkpoints={"test_vit": paths["test_vit"]},
        )
    )
    assert [r.status for r in third.runs] == ["computed", "computed"]
    assert [r.info["random_init"] for r in third.runs] == [False, True]


@pytest.mark.slow
def test_file_deleted_after_listing_is_skipped_not_a_crash(tmp_path, monkeypatch):
    """Images are listed before hashing; one vanishing in between must be skipped and listed."""
    import shutil

    from attnscope import compare as compare_mod
    from attnscope.data import bundled_sample_paths

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in bundled_sample_paths()[:3]:
        shutil.copy(p, imgs / p.name)
    victim = sorted(imgs.iterdir())[0]
    real_collect = getattr(compare_mod, "collect_image_paths", None)

    from attnscope import data as data_mod

    original = data_mod.collect_image_paths

    def collect_then_delete(*args, **kwargs):
        paths = original(*args, **kwargs)
        victim.unlink(missing_ok=True)
        return paths

    monkeypatch.setattr(data_mod, "collect_image_paths", collect_then_delete)
    if real_collect is not None:
        monkeypatch.setattr(compare_mod, "collect_image_paths", collect_then_delete)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "test_vit",
            "test_vit2",
            "--random-init",
            "--images",
            str(imgs),
            "--gallery",
            "0",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    for model in ("test_vit", "test_vit2"):
        info = meta["models"][model]
        assert [s["path"] for s in info["images_skipped"]] == [str(victim)]
        assert str(victim) not in info["images_used"] and len(info["images_used"]) == 2


@pytest.mark.slow
def test_compare_writes_cka_for_every_pair_and_reuses_it(tmp_path):
    out = tmp_path / "cka"
    args = [
        "compare",
        *MODELS,
        "--random-init",
        "--max-images",
        "7",
        "--batch-size",
        "4",
        "--gallery",
        "0",
        "--metrics",
        "attention,tokens",
    ]
    assert invoke(*args, "--out", str(out)).exit_code == 0
    cka = pd.read_csv(out / "cka.csv")
    assert list(cka.columns) == ["model_a", "block_a", "model_b", "block_b", "token", "cka"]
    pairs = cka.groupby(["model_a", "model_b", "token"]).size().to_dict()
    # test_vit: 6 blocks with [cls]; test_vit2: 8 blocks, no [cls]
    assert pairs == {
        ("test_vit", "test_vit", "cls"): 36,
        ("test_vit", "test_vit", "patch_mean"): 36,
        ("test_vit", "test_vit2", "patch_mean"): 48,
        ("test_vit2", "test_vit2", "patch_mean"): 64,
    }
    diag = cka[(cka.model_a == cka.model_b) & (cka.block_a == cka.block_b)]
    np.testing.assert_allclose(diag["cka"], 1.0, rtol=1e-9)
    md = (out / "report.md").read_text()
    tokens_section = md[md.index("## What the tokens carry") : md.index("## Summary")]
    for stem in ("tokens_depth", "spectrum", "frequency", "cka_patch_mean", "cka_cls"):
        assert (out / "figures" / f"{stem}.png").is_file(), stem
        assert f"figures/{stem}.png" in tokens_section  # in the tokens family's own section
    assert '<h2 id="tokens">' in (out / "report.html").read_text()
    spectrum, frequency = pd.read_csv(out / "spectrum.csv"), pd.read_csv(out / "frequency.csv")
    assert list(dict.fromkeys(spectrum["model"])) == list(MODELS) == list(dict.fromkeys(frequency["model"]))
    for model in MODELS:  # the stacked tables are each model run's own
        own = pd.read_csv(out / "runs" / model / "spectrum.csv")
        pd.testing.assert_frame_equal(spectrum[spectrum["model"] == model].reset_index(drop=True), own)
    again = out.parent / "again"
    import shutil

    shutil.copytree(out, again)
    assert invoke(*args, "--out", str(again), "--overwrite").exit_code == 0
    meta = json.loads((again / "run.json").read_text())
    assert {r["status"] for r in meta["runs"].values()} == {"reused"}
    pd.testing.assert_frame_equal(pd.read_csv(again / "cka.csv"), cka)
    for name in ("spectrum.csv", "frequency.csv"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # a tokens run without its profile tables (an older attnscope) is recomputed, not reused
    (again / "runs" / MODELS[0] / "frequency.csv").unlink()
    assert invoke(*args, "--out", str(again), "--overwrite").exit_code == 0
    meta = json.loads((again / "run.json").read_text())
    assert meta["runs"][MODELS[0]]["status"] == "computed" and meta["runs"][MODELS[1]]["status"] == "reused"


def test_metric_revisions_enter_the_hash_of_the_runs_that_measure_them(monkeypatch):
    """Raising a metric's revision (its definition changed) changes the hash of every run that
    measures its family, so a folder measured under the old definition is neither reused nor
    resumed (an entropy run cannot be resumed across the change); a run of another family
    keeps its hash, and a run with no revised metric the hash it always had."""
    import dataclasses

    from attnscope.commands.entropy import EntropyConfig
    from attnscope.data import bundled_sample_paths
    from attnscope.inputs import metric_inputs
    from attnscope.metrics import registry

    assert metric_inputs(("attention",)) == {"metrics": ["attention"]}  # the key it always was
    paths = bundled_sample_paths()[:2]
    configs = [EntropyConfig("test_vit", random_init=True, metrics=m) for m in (("attention",), ("tokens",))]
    before = [c.inputs_hash(paths) for c in configs]
    spec = registry.METRICS["patch_norm_mean"]
    monkeypatch.setitem(registry.METRICS, spec.name, dataclasses.replace(spec, revision=spec.revision + 1))
    assert metric_inputs(("tokens",))["metric_revisions"]["patch_norm_mean"] == spec.revision + 1
    after = [c.inputs_hash(paths) for c in configs]
    assert after[0] == before[0] and after[1] != before[1]


def test_the_outlier_pair_is_at_revision_2():
    """Revision 1 of patch_outlier_frac and cls_outlier_mass was median + 5 MAD."""
    from attnscope.inputs import metric_inputs

    revised = {"patch_outlier_frac": 2, "cls_outlier_mass": 2}
    families = ["attention", "tokens"]
    assert metric_inputs(families) == {"metrics": families, "metric_revisions": revised}


@pytest.mark.slow
def test_runs_measured_before_a_metric_was_redefined_are_recomputed(tmp_path, monkeypatch):
    """A tokens run folder written before the outlier pair was redefined (its hash had no
    revisions) holds median + 5 MAD numbers: compare recomputes it instead of reusing it."""
    from attnscope import metrics
    from attnscope.commands.compare import CompareConfig, run

    config = CompareConfig(
        MODELS, out=tmp_path, random_init=True, max_images=1, gallery=0, metrics=("tokens",), overwrite=True
    )
    with monkeypatch.context() as m:  # the folders of an attnscope from before the redefinition
        m.setattr(metrics, "metric_revisions", lambda families: {})
        assert [r.status for r in run(config).runs] == ["computed", "computed"]
    assert [r.status for r in run(config).runs] == ["computed", "computed"]  # not reused
