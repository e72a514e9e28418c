"""The preprocessing contract on the command line: a recognised checkpoint under a bare timm
name is measured with its family's normalisation, run.json says so and where it came from,
--data-config overrides it, and `attnscope models` prints the release files' links."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.models.converters.base import sincos_2d

runner = CliRunner()


def _model_info(out):
    meta = json.loads((out / "run.json").read_text())
    return meta, next(iter(meta["models"].values()))


@pytest.mark.slow
def test_entropy_with_an_mae_layout_file_records_imagenet_normalisation(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    state["pos_embed"] = sincos_2d(192, (14, 14), rows_first=False)[None].float()  # MAE's fixed table
    torch.save({"model": state}, tmp_path / "mae_layout.pth")
    base = ["entropy", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "mae_layout.pth")]
    result = runner.invoke(app, [*base, "--max-images", "1", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "recognised as MAE" in result.output and "--data-config" in result.output
    _, info = _model_info(tmp_path / "a")
    assert info["data_config"]["mean"] == [0.485, 0.456, 0.406]
    assert info["data_config"]["std"] == [0.229, 0.224, 0.225]
    assert info["data_config"]["crop_pct"] == 0.875
    assert info["data_config_source"].startswith("checkpoint recognised as MAE")
    assert info["checkpoint"]["layout"] == "MAE"
    spec = "mean=0.5,0.5,0.5,std=0.5,0.5,0.5"
    result = runner.invoke(
        app, [*base, "--max-images", "1", "--out", str(tmp_path / "b"), "--data-config", spec]
    )
    assert result.exit_code == 0, result.output
    meta, info = _model_info(tmp_path / "b")
    assert (
        info["data_config"]["mean"] == [0.5, 0.5, 0.5]
        and info["data_config_source"] == f"data_config {spec!r}"
    )
    assert meta["config"]["data_config"] == spec


def test_bad_data_config_is_one_line_naming_the_flag(tmp_path):
    result = runner.invoke(
        app, ["entropy", "--model", "test_vit", "--random-init", "--data-config", "crop_pct=3"]
    )
    assert result.exit_code == 2
    assert "--data-config crop_pct must be in (0, 1]" in result.output and "Traceback" not in result.output


def test_file_alias_without_checkpoint_prints_the_link():
    result = runner.invoke(app, ["entropy", "--model", "capi_vit_large"])
    assert result.exit_code == 2
    assert "https://dl.fbaipublicfiles.com/capi/capi_vitl14_lvd.pth" in result.output
    assert "--checkpoint" in result.output


def test_models_lists_download_links():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar" in result.output
    listed = json.loads(runner.invoke(app, ["models", "--json"]).output)
    simmim = next(e for e in listed if e["alias"] == "simmim_vit_base")
    assert (
        simmim["weights"].startswith("url:https://drive.google.com/")
        and simmim["checkpoint_layout"] == "simmim"
    )
