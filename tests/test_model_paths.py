"""A Hugging Face folder works everywhere a checkpoint does, and as the model itself.

Tiny random `transformers` models (Dinov2, ViT) are saved with `save_pretrained`; each
command is run with the folder as `--checkpoint` under a timm name and as `--model PATH`,
and the two routes must give exactly the same numbers. A path that cannot tell its
architecture must say, in one line, to name it (`--model ARCH --checkpoint PATH`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models import load_model
from attnscope.models.source import resolve_model, short_name

transformers = pytest.importorskip("transformers")

runner = CliRunner()
ONE_IMAGE = ["--max-images", "1"]
# model_type -> the timm name `--model PATH` resolves a 32-wide folder to (the family's name
# nearest in width; config.json's sizes are what is built)
ARCH = {"dinov2": "vit_small_patch14_dinov2", "vit": "vit_tiny_patch16_224"}


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def save_hf(kind: str, folder, seed: int = 0):
    """A tiny random transformers model (32 wide, 2 blocks, 4 heads, 8 px patches, 32 px),
    its weights spread so that attention is far from uniform, saved as a hub folder."""
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    sizes |= {"image_size": 32, "patch_size": 8}
    if kind == "dinov2":
        config = transformers.Dinov2Config(**sizes, mlp_ratio=4)
        model_cls = transformers.Dinov2Model
    else:
        config = transformers.ViTConfig(**sizes, intermediate_size=128)
        model_cls = transformers.ViTModel
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_hf(kind, root / f"tiny-{kind}") for kind in ARCH}


def numbers(out) -> pd.DataFrame:
    """layers.csv without the model column (the two routes name the model differently)."""
    return pd.read_csv(out / "layers.csv").drop(columns="model")


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- entropy and maps


@pytest.mark.slow  # whole CLI runs in subprocesses
@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_entropy_folder_as_model_equals_folder_as_checkpoint(folders, tmp_path, kind):
    folder = folders[kind]
    by_path = invoke("entropy", "--model", folder, *ONE_IMAGE, "--out", tmp_path / "path")
    assert by_path.exit_code == 0, by_path.output
    # recognised; what it lacks is its preprocessing, and the notice says so
    notice = f"{folder.name}: Hugging Face folder ({kind}) has no preprocessor_config.json"
    assert notice in by_path.output and "--data-config" in by_path.output
    assert "layout not recognised" not in by_path.output
    meta = json.loads((tmp_path / "path" / "run.json").read_text())
    assert meta["config"]["model"] == str(folder)  # run.json keeps the path
    info = meta["models"][str(folder)]
    assert info["name"] == folder.name and info["timm_name"] == ARCH[kind]
    assert info["checkpoint"]["files"] == [str(folder / "config.json"), str(folder / "model.safetensors")]
    assert set(pd.read_csv(tmp_path / "path" / "layers.csv")["model"]) == {folder.name}

    by_name = invoke(
        "entropy", "--model", ARCH[kind], "--checkpoint", folder, *ONE_IMAGE, "--out", tmp_path / "name"
    )
    assert by_name.exit_code == 0, by_name.output
    pd.testing.assert_frame_equal(numbers(tmp_path / "path"), numbers(tmp_path / "name"), check_exact=True)
    # the numbers are the folder's weights, not whatever the name would have drawn
    assert (
        json.loads((tmp_path / "name" / "run.json").read_text())["models"][ARCH[kind]]["num_params"] < 50_000
    )


@pytest.mark.parametrize("kind", list(ARCH))
def test_maps_folder_as_model_equals_folder_as_checkpoint(folders, tmp_path, kind):
    folder = folders[kind]
    assert invoke("maps", "--model", folder, *ONE_IMAGE, "--out", tmp_path / "path").exit_code == 0
    routed = invoke(
        "maps", "--model", ARCH[kind], "--checkpoint", folder, *ONE_IMAGE, "--out", tmp_path / "name"
    )
    assert routed.exit_code == 0, routed.output
    with np.load(tmp_path / "path" / "maps.npz") as a, np.load(tmp_path / "name" / "maps.npz") as b:
        assert a["maps"].shape == (1, 1, 4, 4) and np.array_equal(a["maps"], b["maps"])
    meta = json.loads((tmp_path / "path" / "run.json").read_text())
    assert meta["config"]["model"] == str(folder) and meta["models"][str(folder)]["name"] == folder.name


def test_analyze_takes_a_folder_as_the_model(folders):
    from pathlib import Path

    import attnscope

    folder = folders["dinov2"]
    by_path = attnscope.analyze(Path(folder), max_images=1)
    by_name = attnscope.analyze(ARCH["dinov2"], checkpoint=folder, max_images=1)
    assert by_path.info["name"] == folder.name and set(by_path.layers["model"]) == {folder.name}
    pd.testing.assert_frame_equal(
        by_path.layers.drop(columns="model"), by_name.layers.drop(columns="model"), check_exact=True
    )


# ---------------------------------------------------------------- compare


def hub_cache(root, repo_id: str, folder):
    """A Hugging Face cache holding `folder` as the snapshot of `repo_id` (no network)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    return root


@pytest.mark.slow
def test_compare_takes_folders_as_models_and_as_checkpoints_and_hub_ids(folders, tmp_path, monkeypatch):
    import huggingface_hub.constants

    dinov2, vit = folders["dinov2"], folders["vit"]
    cache = hub_cache(tmp_path / "hub", "acme/tiny-dinov2", dinov2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "cmp"
    result = invoke(
        "compare", dinov2, ARCH["dinov2"], "vit_base_patch14_dinov2", vit, ARCH["vit"],
        "--checkpoint", f"{ARCH['dinov2']}={dinov2}",
        "--checkpoint", "vit_base_patch14_dinov2=acme/tiny-dinov2",  # a hub id, from the local cache
        "--checkpoint", f"{ARCH['vit']}={vit}",
        *ONE_IMAGE, "--gallery", "0", "--out", out,
        "--random-init",  # the baseline for models without weights: here every model has its own
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    shown = [dinov2.name, ARCH["dinov2"], "vit_base_patch14_dinov2", vit.name, ARCH["vit"]]
    assert list(dict.fromkeys(layers["model"])) == shown  # a path is shown by its folder's name

    def of(model):
        return layers[layers["model"] == model].drop(columns=["model", "family"]).reset_index(drop=True)

    for same in ([dinov2.name, ARCH["dinov2"], "vit_base_patch14_dinov2"], [vit.name, ARCH["vit"]]):
        for other in same[1:]:
            pd.testing.assert_frame_equal(of(same[0]), of(other), check_exact=True)
    meta = json.loads((out / "run.json").read_text())
    assert (
        meta["config"]["models"][0] == str(dinov2)
        and meta["runs"][dinov2.name]["folder"] == "runs/tiny-dinov2"
    )
    assert meta["models"][dinov2.name]["family"] == "JEA"  # Dinov2 is joint-embedding by its model_type


def test_compare_reuse_hash_follows_the_folders_weights(folders, tmp_path, sample_paths):
    """A compared model's run folder is reused while its config hash stays; for a folder, as
    the model or as a checkpoint, the hash must change when the folder's weights do."""
    from attnscope.compare import config_inputs, plan_models
    from attnscope.inputs import config_hash

    folder = tmp_path / "mine"
    shutil.copytree(folders["dinov2"], folder)
    plans = plan_models([str(folder), ARCH["dinov2"]], checkpoints={ARCH["dinov2"]: folder})

    def hashes():
        return [
            config_hash(
                config_inputs(p, sample_paths[:1], random_init=True, seed=0, img_size=None, dtype="float32")
            )
            for p in plans
        ]

    before = hashes()
    assert hashes() == before
    assert config_inputs(plans[0], [], random_init=True, seed=0, img_size=None, dtype="float32")[
        "weights"
    ] == {
        "checkpoint": [
            str(folder),
            [[str(folder / f), *_stat(folder / f)] for f in ("config.json", "model.safetensors")],
        ]
    }  # with `random_init` too: a folder given as the model keeps its weights
    save_hf("dinov2", folder, seed=1)
    after = hashes()
    assert after[0] != before[0] and after[1] != before[1]


def _stat(path):
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def test_compare_checkpoint_map_accepts_folders_and_hub_ids(folders, tmp_path):
    from attnscope.compare import plan_models

    plans = plan_models(
        ["vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "test_vit"],
        checkpoints={
            "vit_small_patch14_dinov2": folders["dinov2"],
            "vit_base_patch14_dinov2": "facebook/dinov2-small",
        },
    )
    assert [str(p.checkpoint) for p in plans[:2]] == [str(folders["dinov2"]), "facebook/dinov2-small"]
    with pytest.raises(ConfigError, match="checkpoint not found"):
        plan_models(["test_vit", "test_vit2"], checkpoints={"test_vit": tmp_path / "none.pth"})
    with pytest.raises(ConfigError, match="given as its weights already"):
        plan_models([str(folders["vit"]), "test_vit"], checkpoints={str(folders["vit"]): folders["vit"]})
    copy = tmp_path / "elsewhere" / folders["vit"].name
    shutil.copytree(folders["vit"], copy)
    with pytest.raises(ConfigError, match="both shown as 'tiny-vit'"):
        plan_models([str(folders["vit"]), str(copy)])


# ---------------------------------------------------------------- probe


PROBE = [
    "--max-images-per-split", "40", "--epochs", "2", "--lrs", "0.01", "--wds", "0",
    "--aggregator", "cls,mean", "--maps", "1", "--embedding", "none",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_probe_takes_a_folder_and_its_cache_follows_the_folders_weights(folders, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(folders["dinov2"], folder)
    cache = tmp_path / "cache"
    first = invoke(
        "probe", "--model", ARCH["dinov2"], "--checkpoint", folder, *PROBE, "--cache-dir", cache,
        "--out", tmp_path / "first",
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "Traceback" not in first.output
    caches = {p.name for p in cache.iterdir()}
    assert len(caches) == 2  # the train and eval features

    as_model = invoke(
        "probe", "--model", folder, *PROBE, "--cache-dir", tmp_path / "cache2", "--out", tmp_path / "path"
    )
    assert as_model.exit_code == 0, as_model.output
    pd.testing.assert_frame_equal(  # the same numbers; only the model's name differs
        pd.read_csv(tmp_path / "first" / "results.csv").drop(columns="model"),
        pd.read_csv(tmp_path / "path" / "results.csv").drop(columns="model"),
    )

    save_hf("dinov2", folder, seed=1)  # other weights in the same folder: the features must be new
    again = invoke(
        "probe", "--model", ARCH["dinov2"], "--checkpoint", folder, *PROBE, "--cache-dir", cache,
        "--out", tmp_path / "again",
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert len({p.name for p in cache.iterdir()} - caches) == 2
    info = json.loads((tmp_path / "again" / "run.json").read_text())["models"][ARCH["dinov2"]]
    assert info["cache"]["train"]["reused"] == 0


def test_feature_identity_of_a_folder_is_its_config_and_weights_files(folders, tmp_path):
    from attnscope.probe.features import weights_identity

    folder = tmp_path / "mine"
    shutil.copytree(folders["vit"], folder)

    def identity():
        return weights_identity(load_model(ARCH["vit"], checkpoint=folder), seed=0)

    base = identity()
    assert base["kind"] == "hf" and [f["path"] for f in base["files"]] == [
        str(folder / "config.json"),
        str(folder / "model.safetensors"),
    ]
    assert identity() == base
    stat = (folder / "config.json").stat()
    os.utime(folder / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = identity()
    assert touched != base
    save_hf("vit", folder, seed=1)  # rewrites the weights file (and config.json)
    assert identity() != touched


# ---------------------------------------------------------------- what a path resolves to


def test_a_weights_file_inside_a_folder_is_the_folder(folders):
    folder = folders["vit"]
    spec = resolve_model(str(folder / "model.safetensors"))
    assert (spec.path, spec.alias, spec.timm_name) == (folder, folder.name, ARCH["vit"])
    assert resolve_model(f"{folder}/").path == folder


def test_registered_and_timm_names_win_over_files_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mae").mkdir()
    (tmp_path / "test_vit").mkdir()
    assert resolve_model("mae").path is None and resolve_model("test_vit").path is None
    with pytest.raises(ConfigError, match="must be a Hugging Face folder"):
        resolve_model("./test_vit")


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("runs/vit-s-300ep.pth.tar", "vit-s-300ep"),
        ("x/checkpoint-0799.pth", "checkpoint-0799"),
        ("mae", "mae"),
    ],
)
def test_short_names(name, short):
    assert short_name(name) == short


def test_a_release_file_resolves_to_the_alias_of_its_width(tmp_path):
    """DINO's layout (teacher, student, args) at width 384 is dino_vit_small's file; the spec
    keeps the alias's architecture, family and preprocessing."""
    backbone = {"backbone.patch_embed.proj.weight": torch.zeros(384, 3, 16, 16)}
    torch.save(
        {"teacher": backbone, "student": backbone, "args": argparse.Namespace()}, tmp_path / "teacher.pth"
    )
    spec = resolve_model(str(tmp_path / "teacher.pth"))
    assert (spec.alias, spec.timm_name, spec.family, spec.converter) == (
        "teacher",
        "vit_small_patch16_224.dino",
        "JEA",
        "dino",
    )
    assert spec.data_config is not None and "DINO" in spec.data_config.source
    backbone = {"backbone.patch_embed.proj.weight": torch.zeros(192, 3, 16, 16)}
    torch.save(
        {"teacher": backbone, "student": backbone, "args": argparse.Namespace()}, tmp_path / "dino_t.pth"
    )
    with pytest.raises(ConfigError, match="width 192, which no DINO alias has; name the architecture"):
        resolve_model(str(tmp_path / "dino_t.pth"))


def test_a_timm_beit_state_dict_tells_its_heads_and_loads_as_its_model(tmp_path):
    """Per-block relative-position tables show the head count; the path then builds the same
    model the architecture's name and sizes do, with the same attention."""
    from conftest import our_forward

    sizes = {"embed_dim": 32, "depth": 2, "num_heads": 4, "patch_size": 8, "img_size": 32}
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **sizes)
    torch.save({"model": beit.state_dict()}, tmp_path / "beit_tiny.pth")
    by_path = load_model(str(tmp_path / "beit_tiny.pth"))
    by_name = load_model("beit_base_patch16_224", checkpoint=tmp_path / "beit_tiny.pth", model_kwargs=sizes)
    assert by_path.name == "beit_tiny" and dict(by_path.spec.arch_kwargs)["num_heads"] == 4
    x = torch.randn(1, 3, 32, 32)
    maps_path, tokens_path = our_forward(by_path.model, x)
    maps_name, tokens_name = our_forward(by_name.model, x)
    assert all(torch.equal(a, b) for a, b in zip(maps_path, maps_name, strict=True))
    assert torch.equal(tokens_path, tokens_name)


# ---------------------------------------------------------------- what cannot be told


def test_an_unrecognisable_file_as_model_asks_for_the_architecture(tmp_path):
    (tmp_path / "somefile").write_text("not weights")
    result = invoke("entropy", "--model", tmp_path / "somefile", "--out", tmp_path / "o")
    assert_one_line_error(result, "--model ARCH", f"--checkpoint {tmp_path / 'somefile'}")


def test_a_plain_vit_state_dict_says_its_heads_cannot_be_told(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    torch.save(vit.state_dict(), tmp_path / "plain.pth")
    result = invoke("entropy", "--model", tmp_path / "plain.pth", "--out", tmp_path / "o")
    line = assert_one_line_error(result, "do not show how many heads", "--checkpoint")
    assert "--model vit_tiny_patch16_224 with --checkpoint" in line  # the shapes' timm name, as a start


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--model", "./none.pth"], ["no such file or folder", "--model takes"]),
        (["--model", "{empty}"], ["must be a Hugging Face folder", "config.json"]),
        (
            ["--model", "{vit}", "--checkpoint", "{vit}"],
            ["--checkpoint does not go with", "--model vit_tiny"],
        ),
        (["--model", "{vit}", "--random-init"], ["--random-init does not go with", "--model vit_tiny"]),
        (["--model", "nonesuch_model"], ["unknown model", "Hugging Face folder"]),
    ],
)
def test_path_errors_are_one_line(folders, tmp_path, args, needles):
    (tmp_path / "empty").mkdir()
    filled = [a.format(empty=tmp_path / "empty", vit=folders["vit"]) for a in args]
    assert_one_line_error(invoke("entropy", *filled, "--out", tmp_path / "o"), *needles)


def test_library_errors_name_arguments_not_flags(tmp_path):
    (tmp_path / "somefile").write_text("not weights")
    with pytest.raises(AttnscopeError, match="`model` ARCH with `checkpoint`"):
        load_model(str(tmp_path / "somefile"))
