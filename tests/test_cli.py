"""The `entropy` and `models` commands through Typer's CliRunner: outputs and every user error."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.metrics import ALL_METRICS, METRICS

runner = CliRunner()
TINY = ["--model", "test_vit", "--random-init", "--max-images", "2"]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles: str):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    assert "Traceback" not in result.output
    assert "error" in text.lower()
    for needle in needles:
        assert needle in text, text


@pytest.mark.slow
def test_entropy_writes_spec_files(tmp_path):
    out = tmp_path / "run"
    result = invoke("entropy", *TINY, "--out", str(out), "--format", "png", "--format", "svg")
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    heads = pd.read_csv(out / "heads.csv")
    assert list(layers.columns) == ["model", "layer", "metric", "mean", "std", "count"]
    assert list(heads.columns) == ["model", "layer", "head", "metric", "mean", "std", "count"]
    assert set(layers["layer"]) == set(range(6)) and (layers["count"] == 2).all()
    attention = {m for m in ALL_METRICS if METRICS[m].family == "attention"}  # the default family
    assert set(layers["metric"]) == {m for m in attention if "register" not in m}
    assert (layers["model"] == "test_vit").all()
    meta = json.loads((out / "run.json").read_text())
    info = meta["models"]["test_vit"]
    assert info["random_init"] is True and "RANDOM" in info["weights"]
    assert info["token_layout"]["grid"] == [10, 10] and info["token_layout"]["has_cls"] is True
    assert len(info["images_used"]) == 2 and meta["seed"] == 0
    assert meta["versions"]["torch"] and meta["versions"]["timm"]
    for name in (
        "layers_cls_self_attn",
        "heads_cls_self_attn",
        "heads_cls_patch_entropy_norm",
        "heads_attn_distance_px",
    ):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.svg").exists()
    assert "cls_self_attn" in result.output and str(out) in result.output.replace("\n", "")
    assert not list(out.rglob(".*.tmp")) and not [p for p in out.rglob(".*") if p.is_file()]
    assert (out / "layers.csv").stat().st_mode & 0o044 == 0o044  # readable by others, like any file


def test_no_cls_model_has_no_cls_rows_and_register_rows(tmp_path):
    out = tmp_path / "run"
    assert (
        invoke(
            "entropy", "--model", "test_vit2", "--random-init", "--max-images", "1", "--out", str(out)
        ).exit_code
        == 0
    )
    metrics = set(pd.read_csv(out / "layers.csv")["metric"])
    assert not any(m.startswith("cls_") or m == "patch_cls_attn" for m in metrics)
    assert "patch_register_mass" in metrics and "patch_residual_ratio" in metrics


@pytest.mark.slow
def test_non_empty_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = invoke("entropy", *TINY, "--out", str(out))
    assert_one_line_error(result, "not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    result = invoke("entropy", *TINY, "--out", str(out), "--overwrite")
    assert result.exit_code == 0 and (out / "layers.csv").exists() and (out / "precious.txt").exists()


@pytest.mark.slow
def test_non_square_img_size(tmp_path):
    out = tmp_path / "run"
    assert invoke("entropy", *TINY, "--img-size", "160x96", "--out", str(out)).exit_code == 0
    info = json.loads((out / "run.json").read_text())["models"]["test_vit"]
    assert info["token_layout"]["grid"] == [10, 6] and info["input_size"] == [160, 96]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--model", "mae_vit_bse", "--random-init"], ["unknown model", "mae_vit_base"]),
        ([*TINY, "--img-size", "big"], ["--img-size"]),
        ([*TINY, "--dtype", "float8"], ["--dtype"]),
        ([*TINY, "--device", "cuda"], ["CUDA is not available"]),
        ([*TINY, "--images", "/no/such/folder"], ["/no/such/folder"]),
        ([*TINY, "--format", "gif"], ["--format"]),
        (["--model", "test_vit", "--checkpoint", "/no/such.pth"], ["checkpoint not found"]),
        (["--model", "test_vit", "--random-init", "--checkpoint", "x.pth"], ["exclude each other"]),
        (["--model", "resnet18", "--random-init"], ["not a Vision Transformer"]),
        (["--model", "mae"], ["not in the local cache", "--checkpoint"]),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, needles):
    if "--checkpoint" in args and "x.pth" in args:
        (tmp_path / "x.pth").write_bytes(b"")
        args = [a if a != "x.pth" else str(tmp_path / "x.pth") for a in args]
    out = tmp_path / "out"
    result = invoke("entropy", *args, "--out", str(out))
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_all_images_corrupt_is_an_error_and_each_is_warned(tmp_path):
    bad = tmp_path / "imgs"
    bad.mkdir()
    for i in range(3):
        (bad / f"b{i}.jpg").write_bytes(b"not a jpeg")
    result = invoke(
        "entropy", "--model", "test_vit", "--random-init", "--images", str(bad), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, "none of the 3 images")
    assert result.output.count("skipped") == 3


@pytest.mark.slow
def test_some_images_corrupt_are_listed_in_run_json(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(imgs / "good.png")
    (imgs / "bad.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "o"
    result = invoke(
        "entropy", "--model", "test_vit", "--random-init", "--images", str(imgs), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())["models"]["test_vit"]
    assert [p.endswith("good.png") for p in meta["images_used"]] == [True]
    assert meta["images_skipped"][0]["path"].endswith("bad.png") and meta["images_skipped"][0]["reason"]


def test_models_lists_aliases():
    result = invoke("models")
    assert result.exit_code == 0
    for alias in (
        "mae_vit_base",
        "dino_vit_base",
        "dinov2_reg_vit_base",
        "ijepa_vit_huge",
        "beitv2_vit_base",
    ):
        assert alias in result.output
    assert "fine-tuned" in result.output and "language-" in result.output


def test_help_is_instant_and_python_m_works():
    """--help must not import torch/timm (checked in a clean interpreter)."""
    code = (
        "import sys; from typer.testing import CliRunner; from attnscope.cli.app import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
        "heavy = [m for m in ('torch', 'timm', 'seaborn', 'pandas') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "attnscope", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("attnscope ")
