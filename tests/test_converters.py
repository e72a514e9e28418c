"""Every family converter against an independent float64 forward of the official layout.

Each test writes a tiny release file with the official key names, wrappers and pickled
extras, loads it through `load_model` (the alias, or a bare timm name where the layout is
recognised), and checks that the attention maps the capture sees and the final features
agree with `reference_models` (which reads the official keys directly)."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import _r, _save_with_yacs_config, beit_official, our_forward, vit_official
from reference_models import beit_forward, capi_forward, vit_forward

from attnscope.errors import AttnscopeError
from attnscope.models import list_model_specs, load_model, token_layout
from attnscope.models.checkpoints import open_checkpoint
from attnscope.models.converters import recognise
from attnscope.models.converters.base import sincos_2d

D, HEADS, PATCH, IMG = 32, 4, 8, 32  # a 4x4 grid
GRID = IMG // PATCH
TINY = {"embed_dim": D, "depth": 2, "num_heads": HEADS, "patch_size": PATCH}


def assert_same_function(model, reference, x):
    """float32: maps within 1e-5; float64: maps and features within 1e-9 of the reference."""
    ref_maps, ref_feats = reference(x)
    maps, _ = our_forward(model, x.float())
    assert len(maps) == len(ref_maps)
    assert max((m.double() - r).abs().max().item() for m, r in zip(maps, ref_maps, strict=True)) < 1e-5
    maps64, feats64 = our_forward(model.double(), x.double())
    model.float()
    for m, r in zip(maps64, ref_maps, strict=True):
        assert (m - r).abs().max().item() < 1e-9
    assert feats64.shape == ref_feats.shape
    assert (feats64 - ref_feats).abs().max().item() < 1e-9


@pytest.fixture
def image():
    torch.manual_seed(0)
    return torch.randn(2, 3, IMG, IMG)


def _load(name, path, **kw):
    kwargs = dict(TINY)
    kwargs.update(kw.pop("model_kwargs", {}))
    return load_model(name, checkpoint=path, img_size=(IMG, IMG), model_kwargs=kwargs, **kw)


def test_mocov3_base_encoder_with_fixed_sincos(tmp_path, image):
    torch.manual_seed(1)
    enc = vit_official(pos=sincos_2d(D, (GRID, GRID), rows_first=True)[None].float())
    momentum = vit_official()
    state = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    state.update({f"module.momentum_encoder.{k}": v for k, v in momentum.items()})
    state["module.base_encoder.head.0.weight"] = _r(64, D)
    state["module.predictor.0.weight"] = _r(16, 64)
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"state": {}}}, path)
    assert recognise(open_checkpoint(path)).name == "mocov3"
    loaded = _load("mocov3_vit_small", path)
    assert_same_function(loaded.model, lambda x: vit_forward(enc, x, HEADS), image)
    report = loaded.checkpoint_report
    assert report["layout"] == "MoCo v3"
    assert "module.momentum_encoder.blocks.0.attn.qkv.weight" in report["dropped_keys"]
    assert "module.base_encoder.head.0.weight" in report["dropped_keys"]
    assert "module.predictor.0.weight" in report["dropped_keys"]
    assert loaded.data_config["interpolation"] == "bilinear"
    assert loaded.data_config["crop_pct"] == pytest.approx(0.875)


def test_mocov3_vit_small_has_twelve_heads_also_under_the_bare_timm_name(tmp_path):
    """384 wide: MoCo v3's ViT-S. timm's vit_small has 6 heads; the file's layout says 12."""
    assert (
        load_model("mocov3_vit_small", random_init=True, model_kwargs={"depth": 1})
        .model.blocks[0]
        .attn.num_heads
        == 12
    )
    torch.manual_seed(2)
    enc = vit_official(depth=1, dim=384, pos=sincos_2d(384, (14, 14), rows_first=True)[None].float())
    enc["pos_embed"] = sincos_2d(384, (14, 14), rows_first=True)[None].float()
    torch.save(
        {"state_dict": {f"module.base_encoder.{k}": v for k, v in enc.items()}}, tmp_path / "m.pth.tar"
    )
    loaded = load_model("vit_small_patch16_224", checkpoint=tmp_path / "m.pth.tar", model_kwargs={"depth": 1})
    assert loaded.model.blocks[0].attn.num_heads == 12
    assert "recognised as MoCo v3" in loaded.data_config_source and loaded.notices


def test_ibot_teacher_backbone_and_full_checkpoint(tmp_path, image):
    torch.manual_seed(3)
    teacher = vit_official()
    torch.save({"state_dict": teacher}, tmp_path / "checkpoint_teacher.pth")
    full = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, "head.mlp.0.weight": _r(8, D)},
        "student": {
            **{f"module.backbone.{k}": v + 1 for k, v in teacher.items()},
            "module.backbone.masked_embed": _r(1, D),
        },
        "args": argparse.Namespace(arch="vit_small", patch_size=PATCH),
        "ibot_loss": {"center": torch.zeros(1, 8)},
        "epoch": 800,
    }
    torch.save(full, tmp_path / "checkpoint.pth")
    for name in ("checkpoint_teacher.pth", "checkpoint.pth"):
        assert recognise(open_checkpoint(tmp_path / name)).name == "ibot"
        loaded = _load("ibot_vit_small", tmp_path / name)
        assert_same_function(loaded.model, lambda x: vit_forward(teacher, x, HEADS), image)
    assert loaded.checkpoint_report["dropped_keys"] == ["head.mlp.0.weight"]
    assert loaded.checkpoint_report["other_entries"]["args"] == "Namespace"


def test_mae_and_lut_layouts(tmp_path, image):
    torch.manual_seed(4)
    enc = vit_official(pos=sincos_2d(D, (GRID, GRID), rows_first=False)[None].float())
    lut = {**enc, "decoder_embed.weight": _r(16, D), "mask_token": _r(1, 1, 16)}
    lut.update({"predictor.0.weight": _r(8, D), "head.1.running_mean": torch.zeros(8)})
    torch.save({"model": lut, "args": argparse.Namespace(model="lut_vit_base_patch16")}, tmp_path / "lut.pth")
    assert recognise(open_checkpoint(tmp_path / "lut.pth")).name == "lut"
    loaded = _load("lut_vit_base", tmp_path / "lut.pth")
    assert_same_function(loaded.model, lambda x: vit_forward(enc, x, HEADS), image)
    assert {"predictor.0.weight", "decoder_embed.weight", "mask_token"} <= set(
        loaded.checkpoint_report["dropped_keys"]
    )
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")  # MAE's encoder-only release
    assert recognise(open_checkpoint(tmp_path / "mae_pretrain.pth")).name == "mae"


def test_mae_layout_under_a_bare_timm_name_gets_imagenet_preprocessing(tmp_path):
    torch.manual_seed(5)
    enc = vit_official(pos=sincos_2d(D, (GRID, GRID), rows_first=False)[None].float())
    torch.save({"model": enc}, tmp_path / "mae.pth")
    loaded = _load("vit_base_patch16_224", tmp_path / "mae.pth")
    assert tuple(loaded.data_config["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(loaded.data_config["std"]) == pytest.approx((0.229, 0.224, 0.225))
    assert loaded.data_config["crop_pct"] == pytest.approx(0.875)
    assert "recognised as MAE" in loaded.data_config_source
    assert loaded.provenance()["data_config_source"] == loaded.data_config_source
    assert any("recognised as MAE" in n and "`data_config`" in n for n in loaded.notices)
    over = _load("vit_base_patch16_224", tmp_path / "mae.pth", data_config="mean=0.5,std=0.5,crop_pct=1")
    assert tuple(over.data_config["mean"]) == (0.5, 0.5, 0.5) and over.data_config["crop_pct"] == 1.0
    assert over.data_config["interpolation"] == "bicubic"  # the rest from the recognised family
    assert over.data_config_source.startswith("data_config") and not over.notices
    # the transform built from the model follows the choice
    from attnscope.data import build_eval_transform

    _, cfg = build_eval_transform(loaded.model, loaded.input_size)
    assert tuple(cfg["mean"]) == pytest.approx((0.485, 0.456, 0.406)) and cfg["crop_pct"] == 0.875


def test_unrecognised_layout_says_which_normalisation(tmp_path):
    torch.manual_seed(6)
    torch.save(vit_official(), tmp_path / "plain.pth")  # a learned pos_embed, no wrapper: no family
    loaded = _load("vit_base_patch16_224", tmp_path / "plain.pth")
    assert tuple(loaded.data_config["mean"]) == (0.5, 0.5, 0.5)
    (notice,) = loaded.notices
    assert "not recognised" in notice and "mean 0.5,0.5,0.5" in notice and "`data_config`" in notice


@pytest.mark.parametrize("family", ["beitv2", "simmim"])
def test_shared_relative_position_bias_families(tmp_path, image, family):
    torch.manual_seed(7)
    enc = beit_official()
    if family == "beitv2":
        model = {**enc, "lm_head.weight": _r(64, D), "lm_head.bias": _r(64)}
        model.update({f"cls_pt_layers.0.{k[9:]}": v for k, v in enc.items() if k.startswith("blocks.0.")})
        torch.save({"model": model, "args": argparse.Namespace(model="beit_base")}, tmp_path / "pt.pth")
        alias, dropped = "beitv2_vit_base_pt", {"lm_head.weight", "mask_token", "cls_pt_layers.0.attn.q_bias"}
    else:
        model = {f"encoder.{k}": v for k, v in enc.items()}
        model.update({"decoder.0.weight": _r(3 * 16 * 16, D, 1, 1), "decoder.0.bias": _r(3 * 16 * 16)})
        _save_with_yacs_config(tmp_path / "pt.pth", model)
        alias, dropped = "simmim_vit_base", {"decoder.0.weight", "encoder.mask_token"}
    raw = open_checkpoint(tmp_path / "pt.pth")
    assert recognise(raw).name == family
    loaded = _load(alias, tmp_path / "pt.pth")
    assert loaded.model.pos_embed is None
    table = loaded.model.blocks[1].attn.relative_position_bias_table
    assert torch.equal(table, enc["rel_pos_bias.relative_position_bias_table"])
    assert_same_function(loaded.model, lambda x: beit_forward(enc, x, HEADS), image)
    assert dropped <= set(loaded.checkpoint_report["dropped_keys"])
    bare = _load("beitv2_base_patch16_224", tmp_path / "pt.pth")  # recognised without the alias
    assert bare.checkpoint_report["layout"] == ("BEiT-v2" if family == "beitv2" else "SimMIM")


def test_a_pickled_class_outside_the_allow_list_is_refused_in_one_line(tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}, "odd": torch.nn.Linear(1, 1)}, tmp_path / "odd.pth")
    with pytest.raises(AttnscopeError) as info:
        open_checkpoint(tmp_path / "odd.pth")
    assert "\n" not in str(info.value) and "Unsupported global" in str(info.value)


def capi_official(depth=2, n_reg=8, dim=D, heads=HEADS):
    from attnscope.models.capi import CapiRope

    hd = dim // heads
    sd = {
        "backbone.patch_embed.weight": _r(dim, 3, PATCH, PATCH, scale=0.1),
        "backbone.patch_embed.bias": _r(dim),
        "backbone.registers": _r(1, n_reg, dim),
        "backbone.mask_token": _r(1, dim),
        "backbone.decoder.blocks.0.residual1.norm.weight": torch.ones(dim),
        "clustering.layer.weight": _r(16, dim),
    }
    for i in range(depth):
        p = f"backbone.encoder.blocks.{i}."
        sd[p + "residual1.norm.weight"] = 1 + _r(dim, scale=0.1)
        sd[p + "residual2.norm.weight"] = 1 + _r(dim, scale=0.1)
        for n in "qkv":
            sd[p + f"residual1.fn.{n}_proj.weight"] = _r(dim, dim)
        sd[p + "residual1.fn.proj.weight"] = _r(dim, dim)
        # trained frequencies differ from the initial ones: perturb them
        sd[p + "residual1.fn.rope.freqs"] = CapiRope.default_freqs(hd, 7, 7e-4) * (1 + _r(2, hd, scale=0.2))
        sd[p + "residual2.fn.fc1.weight"] = _r(4 * dim, dim)
        sd[p + "residual2.fn.fc2.weight"] = _r(dim, 4 * dim)
    return sd


def test_capi_encoder(tmp_path, image):
    torch.manual_seed(8)
    sd = capi_official()
    torch.save(sd, tmp_path / "capi_vitl14_lvd.pth")
    raw = open_checkpoint(tmp_path / "capi_vitl14_lvd.pth")
    assert recognise(raw).name == "capi"
    loaded = load_model("capi_vit_large", checkpoint=tmp_path / "capi_vitl14_lvd.pth", img_size=(IMG, IMG))
    model = loaded.model
    assert (len(model.blocks), model.blocks[0].attn.num_heads, model.num_prefix_tokens) == (2, HEADS, 8)
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    assert_same_function(model, lambda x: capi_forward(backbone, x, HEADS), image)
    assert set(loaded.checkpoint_report["dropped_keys"]) == {
        "backbone.mask_token",
        "backbone.decoder.blocks.0.residual1.norm.weight",
        "clustering.layer.weight",
    }
    from attnscope.models import token_layout

    layout = token_layout(model, (IMG, IMG))
    assert (layout.has_cls, layout.num_registers, layout.grid) == (False, 8, (GRID, GRID))
    # a non-square input: the rotary positions follow the real grid
    wide = torch.randn(1, 3, IMG, 2 * IMG)
    maps, _ = our_forward(loaded.model, wide)
    ref_maps, _ = capi_forward(backbone, wide, HEADS)
    assert (maps[-1].double() - ref_maps[-1]).abs().max() < 1e-5


def test_capi_fused_and_unfused_agree():
    loaded = load_model("capi_vit_large", random_init=True, img_size=(28, 28), model_kwargs={"depth": 1})
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        fused = loaded.model.forward_features(x)
        loaded.model.blocks[0].attn.fused_attn = False
        plain = loaded.model.forward_features(x)
    assert (fused - plain).abs().max() < 1e-4


def test_file_alias_without_checkpoint_names_the_download(monkeypatch):
    with pytest.raises(AttnscopeError) as info:
        load_model("mocov3_vit_base")
    message = str(info.value)
    assert "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar" in message
    assert "checkpoint" in message and "\n" not in message
    with pytest.raises(AttnscopeError, match="publishes no download link"):
        load_model("lut_vit_base")


def test_data_config_option_forms():
    from attnscope.errors import ConfigError

    tagged = load_model(
        "vit_small_patch16_224", random_init=True, model_kwargs={"depth": 1}, data_config="dino"
    )
    assert tuple(tagged.data_config["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert tagged.data_config_source == "data_config: timm tag vit_small_patch16_224.dino"
    full = load_model(
        "mae", random_init=True, model_kwargs={"depth": 1}, data_config="vit_base_patch16_224.augreg_in21k"
    )
    assert tuple(full.data_config["mean"]) == (0.5, 0.5, 0.5)
    explicit = load_model(
        "mae",
        random_init=True,
        model_kwargs={"depth": 1},
        data_config="mean=0.4,0.4,0.4 std=0.2,0.2,0.2 crop_pct=0.9 interpolation=bilinear",
    )
    cfg = explicit.data_config
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]) == (
        (0.4, 0.4, 0.4),
        (0.2, 0.2, 0.2),
        0.9,
        "bilinear",
    )
    for bad in ("nosuchtag", "mean=a,b,c", "crop_pct=2", "interpolation=cubic", "mean=0.5,0.5"):
        with pytest.raises(ConfigError) as info:
            load_model("mae", random_init=True, model_kwargs={"depth": 1}, data_config=bad)
        assert info.value.field == "data_config" and "\n" not in str(info.value)


@pytest.mark.parametrize("alias", [s.alias for s in list_model_specs() if s.file_weights])
def test_every_release_file_alias_builds_and_runs_with_random_weights(alias):
    loaded = load_model(alias, random_init=True, model_kwargs={"depth": 1})
    assert loaded.data_config["crop_pct"] == pytest.approx(0.875)
    assert tuple(loaded.data_config["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    size = loaded.input_size
    maps, feats = our_forward(loaded.model, torch.randn(1, 3, *size))
    layout = token_layout(loaded.model, size)
    assert len(maps) == 1 and maps[0].shape[-1] == layout.num_tokens == feats.shape[1]
    assert torch.allclose(maps[0].sum(-1), torch.ones(()), atol=1e-5)
