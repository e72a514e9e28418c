"""What a new user meets first: offline messages, ignored files, unsupported models."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from attnscope.cli.app import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_offline_alias_names_checkpoint_and_random_init_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _invoke("entropy", "--model", "mae_vit_base", "--out", str(out))
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    text = " ".join(lines)
    assert "--checkpoint" in text and "--random-init" in text and "Traceback" not in text
    assert not out.exists()


def test_non_image_file_in_a_folder_is_warned_and_listed(tmp_path, sample_paths):
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(sample_paths[0], images / "a.jpg")
    (images / "notes.txt").write_text("not a picture")
    (images / ".hidden").write_text("never mentioned")
    out = tmp_path / "out"
    result = _invoke(
        "entropy", "--model", "test_vit", "--random-init", "--images", str(images), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "notes.txt" in result.output and ".hidden" not in result.output
    meta = json.loads((out / "run.json").read_text())
    assert [p.endswith("notes.txt") for p in meta["models"]["test_vit"]["files_ignored"]] == [True]
    assert len(meta["models"]["test_vit"]["images_used"]) == 1


def test_swin_is_refused_for_its_windowed_attention(tmp_path):
    result = _invoke("entropy", "--model", "swin_tiny_patch4_window7_224", "--random-init")
    assert result.exit_code == 2
    assert "windowed attention" in result.output and "Traceback" not in result.output


def test_random_weights_differ_per_model_and_repeat_per_seed():
    """`compare mae dino --random-init` must not compare a network with itself."""
    import torch

    from attnscope.models import load_model

    def first_weight(name: str, seed: int) -> torch.Tensor:
        loaded = load_model(name, random_init=True, seed=seed, model_kwargs={"depth": 1})
        assert loaded.provenance()["init_seed"] is not None
        return loaded.model.blocks[0].attn.qkv.weight

    mae, dino = first_weight("mae", 0), first_weight("dino", 0)  # both ViT-B/16
    assert not torch.equal(mae, dino)
    assert torch.equal(mae, first_weight("mae_vit_base", 0))  # the alias resolves first
    assert not torch.equal(mae, first_weight("mae", 1))


def test_entropy_takes_the_model_positionally_or_as_an_option(tmp_path):
    out = tmp_path / "pos"
    result = _invoke("entropy", "test_vit", "--random-init", "--max-images", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["config"]["model"] == "test_vit"
    assert _invoke("entropy", "--max-images", "1").exit_code == 2
    both = _invoke("entropy", "test_vit", "--model", "test_vit2", "--random-init")
    assert both.exit_code == 2 and "two models given" in both.output


def test_probe_usage_line_offline_is_one_line_and_writes_nothing(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = _invoke("probe", "--aggregator", "abmilp", "--out", str(out), "--cache-dir", str(cache))
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "vit_base_patch16_224.mae" in lines[0]  # the paper's model by default
    assert "--checkpoint" in lines[0] and "--random-init" in lines[0]
    assert not out.exists() and not cache.exists()


@pytest.mark.slow
def test_a_random_weights_report_says_what_a_real_comparison_needs(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "test_vit", "test_vit2", "--random-init", "--max-images", "1", "--gallery", "0"]
    result = _invoke(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    for report in ("report.html", "report.md"):
        text = (out / report).read_text()
        assert "RANDOM WEIGHTS" in text and "A real comparison needs the pretrained weights" in text
    (hint,) = [ln for ln in (out / "report.md").read_text().splitlines() if "Once they are there" in ln]
    assert "--random-init" not in hint  # the command to run then is this one without it


def test_the_hint_drops_random_init_from_the_command():
    from attnscope.report.content import real_comparison_hint

    hint = real_comparison_hint("attnscope compare mae dino --random-init --out r")
    assert hint.endswith("run: attnscope compare mae dino --out r")
