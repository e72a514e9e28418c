"""Position terms at a grid other than the weights': each family's own rule, held to an
independent side (transformers where it has the class, else a float64 restatement of the
official function in `reference_positions`), at sizes where the rules differ.

Random weights at their native size cannot tell the rules apart; these tests never run at
the native size, and check first that the rules really differ on random tables."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from conftest import _save_with_yacs_config, beit_official, our_forward, vit_official
from reference_models import beit_forward, vit_forward
from reference_positions import (
    antialias_rule,
    beit_geometric,
    mae_sincos,
    mocov3_sincos,
    offset_rule,
    size_rule,
)

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models import load_model
from attnscope.models.positions import RULES, resize_positions

D, HEADS = 32, 4
TINY8 = {"embed_dim": D, "depth": 2, "num_heads": HEADS, "patch_size": 8}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _model(grid: tuple[int, int], **kw):
    import timm

    kwargs = {"embed_dim": D, "depth": 1, "num_heads": HEADS, "patch_size": 8, "num_classes": 0, **kw}
    return timm.create_model("vit_base_patch16_224", img_size=(8 * grid[0], 8 * grid[1]), **kwargs)


RESTATED = {
    "dinov2": offset_rule,
    "dino": offset_rule,
    "mae": size_rule,
    "eva02": size_rule,
    "transformers": size_rule,
    "dinov2-reg": antialias_rule,
    "timm": antialias_rule,
}
GRIDS = [((37, 37), (16, 16)), ((14, 14), (28, 28)), ((14, 14), (10, 20))]


@pytest.mark.parametrize(("old", "new"), GRIDS, ids=["37to16", "14to28", "14to10x20"])
@pytest.mark.parametrize("rule", sorted(RESTATED))
def test_learned_table_rules_equal_their_float64_restatement(rule, old, new):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + old[0] * old[1], D) * 0.02
    out, resize = resize_positions({"pos_embed": pos}, _model(new), RULES[rule])
    assert resize is not None and (resize.grid_from, resize.grid_to) == (old, new)
    table = out["pos_embed"]
    assert table.shape == (1, 1 + new[0] * new[1], D) and table.dtype == pos.dtype
    assert torch.equal(table[:, :1], pos[:, :1])  # the class row is not on the grid
    assert _relative_error(table[0, 1:], RESTATED[rule](pos[0, 1:], old, new)) < 1e-6


@pytest.mark.parametrize(
    ("rule", "formula"), [("mocov3", mocov3_sincos), ("ijepa", mae_sincos)], ids=["mocov3", "ijepa"]
)
@pytest.mark.parametrize("new", [(28, 28), (10, 20)], ids=["28", "10x20"])
def test_fixed_sincos_tables_are_computed_for_the_new_grid(rule, formula, new):
    old = (14, 14)
    prefix = 1 if rule == "mocov3" else 0
    pos = formula(D, old).float()[None]
    if prefix:
        pos = torch.cat([torch.zeros(1, 1, D), pos], dim=1)
    model = _model(new) if prefix else _model(new, class_token=False, global_pool="avg")
    out, _ = resize_positions({"pos_embed": pos}, model, RULES[rule])
    assert _relative_error(out["pos_embed"][0, prefix:], formula(D, new)) < 1e-6


def test_a_learned_table_is_not_replaced_by_a_sincos_formula():
    pos = torch.randn(1, 1 + 14 * 14, D)
    with pytest.raises(AttnscopeError, match="not MoCo v3's fixed sin-cos table") as info:
        resize_positions({"pos_embed": pos}, _model((28, 28)), RULES["mocov3"])
    assert "\n" not in str(info.value)


def test_the_rules_differ_on_random_tables():
    """DINOv2's offset rule, transformers' size rule and timm's antialiased loader are three
    networks: their 16 x 16 tables differ by a large fraction of the table."""
    torch.manual_seed(0)
    rows = torch.randn(37 * 37, D, dtype=torch.float64)
    tables = {name: RULES[name].absolute(rows, (37, 37), (16, 16)) for name in ("dinov2", "mae", "timm")}
    for a, b in (("dinov2", "mae"), ("dinov2", "timm"), ("mae", "timm")):
        assert _relative_error(tables[a], tables[b]) > 0.05, (a, b)
    up = {name: RULES[name].absolute(rows[:196], (14, 14), (28, 28)) for name in ("dinov2", "mae")}
    assert _relative_error(up["dinov2"], up["mae"]) > 0.05


@pytest.mark.parametrize("new", [(16, 16), (20, 12)], ids=["224", "280x168"])
def test_transformers_rule_is_transformers_dinov2(new):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, patch_size=14, image_size=518
    )
    emb = transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings(config)
    torch.manual_seed(0)
    with torch.no_grad():
        emb.position_embeddings.normal_(0, 0.02)
    theirs = emb.interpolate_pos_encoding(torch.zeros(1, 1 + new[0] * new[1], D), 14 * new[0], 14 * new[1])
    table = emb.position_embeddings.detach()
    ours, _ = resize_positions({"pos_embed": table}, _model(new), RULES["transformers"])
    # transformers interpolates in float32, whose source coordinates on a 12-wide grid
    # (scale 37/12) are off by ~1e-7 each: within 1e-6 of the table, not of its largest value
    assert (ours["pos_embed"] - theirs.detach()).abs().max().item() < 1e-6


@pytest.mark.parametrize(("old", "new"), [((4, 4), (8, 8)), ((14, 14), (24, 24)), ((14, 14), (7, 7))])
def test_beit_relative_bias_rule_equals_the_spline_restatement(old, new):
    torch.manual_seed(0)
    table = torch.randn((2 * old[0] - 1) * (2 * old[1] - 1) + 3, HEADS)
    state = {"blocks.0.attn.relative_position_bias_table": table}
    import timm

    model = timm.create_model(
        "beit_base_patch16_224",
        img_size=8 * new[0],
        patch_size=8,
        embed_dim=D,
        depth=1,
        num_heads=HEADS,
        num_classes=0,
    )
    out, resize = resize_positions(state, model, RULES["beit"])
    resized = out["blocks.0.attn.relative_position_bias_table"]
    assert resized.shape == model.blocks[0].attn.relative_position_bias_table.shape
    assert torch.equal(resized[-3:], table[-3:])  # the three [cls] entries are kept
    assert _relative_error(resized[:-3], beit_geometric(table[:-3], old, new)) < 1e-6
    timm_way, _ = resize_positions(state, model, RULES["timm"])
    assert _relative_error(timm_way["blocks.0.attn.relative_position_bias_table"], resized) > 1e-3


# ---------------------------------------------------------------- whole networks


def _dinov2_checkpoint(tmp_path, **kw):
    """A tiny DINOv2 (patch 14, native 518 px: a 37 x 37 table) in timm's layout."""
    import timm

    torch.manual_seed(3)
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        embed_dim=D,
        depth=2,
        num_heads=HEADS,
        init_values=None,
        num_classes=0,
        **kw,
    )
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)  # large enough that the rules move the maps
    path = tmp_path / "dinov2.pth"
    torch.save(model.state_dict(), path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


DINOV2_KW = {"embed_dim": D, "depth": 2, "num_heads": HEADS, "init_values": None}


def test_dinov2_at_224_is_the_official_network(tmp_path):
    """The papers' setting: 518-px DINOv2 weights measured at 224 px. The positions are the
    official offset rule's, and every attention map equals a float64 forward built on them."""
    path, sd = _dinov2_checkpoint(tmp_path)
    loaded = load_model("dinov2_vit_small", checkpoint=path, img_size=(224, 224), model_kwargs=DINOV2_KW)
    assert loaded.positions is not None
    assert (loaded.positions["rule"], loaded.positions["from"], loaded.positions["to"]) == (
        "dinov2",
        [37, 37],
        [16, 16],
    )
    assert any(
        "resized from the weights' 37x37 grid to 16x16 by the dinov2 rule" in n for n in loaded.notices
    )
    pos = sd["pos_embed"]
    expected = torch.cat([pos[0, :1].double(), offset_rule(pos[0, 1:], (37, 37), (16, 16))])[None]
    assert _relative_error(loaded.model.pos_embed, expected) < 1e-6
    x = torch.randn(2, 3, 224, 224)
    ref_maps, _ = vit_forward({**sd, "pos_embed": expected}, x, HEADS)
    maps, _ = our_forward(loaded.model, x)
    assert max((m.double() - r).abs().max().item() for m, r in zip(maps, ref_maps, strict=True)) < 1e-5
    # timm's loader is another network: its maps are 20x the agreement tolerance away
    other = load_model(
        "dinov2_vit_small",
        checkpoint=path,
        img_size=(224, 224),
        model_kwargs=DINOV2_KW,
        position_resize="timm",
    )
    assert other.positions["rule"] == "timm"
    timm_maps, _ = our_forward(other.model, x)
    assert max((m - r).abs().max().item() for m, r in zip(timm_maps, maps, strict=True)) > 2e-4


def test_timm_option_is_timms_own_loader(tmp_path):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    path, sd = _dinov2_checkpoint(tmp_path)
    ours = load_model(
        "vit_small_patch14_dinov2",
        checkpoint=path,
        img_size=(224, 224),
        model_kwargs=DINOV2_KW,
        position_resize="timm",
    )
    theirs = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, **DINOV2_KW)
    theirs.load_state_dict(checkpoint_filter_fn(dict(sd), theirs))
    assert _relative_error(ours.model.pos_embed, theirs.pos_embed) < 1e-6


def test_hub_weights_are_loaded_at_their_size_then_resized_by_the_family_rule(tmp_path, monkeypatch):
    """Hub tags go through timm's loader at their native size (no resampling there), then the
    family's rule brings them to the measured grid: the same network as from a file."""
    import timm

    from attnscope.models import loading

    path, sd = _dinov2_checkpoint(tmp_path)

    def fake_pretrained(name, kwargs, found=None):
        assert "img_size" not in kwargs  # native size: timm has nothing to resample
        assert found == ("hf-hub:timm/fake", None)  # the source resolved once, not asked again
        model = timm.create_model(name.split(".")[0], **kwargs)
        model.load_state_dict(sd)
        return model, "hf-hub:timm/fake"

    monkeypatch.setattr(loading, "_create_pretrained", fake_pretrained)
    monkeypatch.setattr(loading, "pretrained_source", lambda name: ("hf-hub:timm/fake", None))
    hub = load_model("dinov2_vit_small", img_size=(224, 224), model_kwargs=DINOV2_KW)
    from_file = load_model("dinov2_vit_small", checkpoint=path, img_size=(224, 224), model_kwargs=DINOV2_KW)
    assert torch.equal(hub.model.pos_embed, from_file.model.pos_embed)
    assert hub.positions["rule"] == "dinov2" and hub.checkpoint_report == {}
    assert hub.provenance()["positions"]["to"] == [16, 16]


def _family_file(tmp_path, family):
    """A release file of `family` on a 4 x 4 grid (32 px, patch 8) and its encoder's keys."""
    torch.manual_seed(5)
    path = tmp_path / f"{family}.pth"
    if family in ("beitv2", "simmim"):
        enc = beit_official()
        if family == "beitv2":
            torch.save({"model": enc, "args": argparse.Namespace(model="beit_base")}, path)
        else:
            _save_with_yacs_config(path, {f"encoder.{k}": v for k, v in enc.items()})
        return path, enc
    enc = vit_official()
    if family == "mocov3":
        from attnscope.models.converters.base import sincos_2d

        enc["pos_embed"] = sincos_2d(D, (4, 4), rows_first=True)[None].float()
        torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in enc.items()}}, path)
    elif family == "ibot":
        torch.save({"state_dict": enc}, path)
    else:
        torch.save({"model": enc} if family == "mae" else enc, path)
    return path, enc


FAMILIES = {
    "mae": ("mae_vit_base", "mae"),
    "dino": ("dino_vit_small", "dino"),
    "ibot": ("ibot_vit_small", "dino"),
    "mocov3": ("mocov3_vit_small", "mocov3"),
    "beitv2": ("beitv2_vit_base_pt", "beit"),
    "simmim": ("simmim_vit_base", "beit"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_release_files_at_twice_their_size_are_their_familys_network(tmp_path, family):
    """Each family's weights at 64 px (an 8 x 8 grid from their 4 x 4 one): the position
    terms are the family's own rule's, and the attention maps those of a float64 forward
    of the official layout with those terms."""
    alias, rule = FAMILIES[family]
    path, enc = _family_file(tmp_path, family)
    loaded = load_model(alias, checkpoint=path, img_size=(64, 64), model_kwargs=TINY8)
    assert (loaded.positions["rule"], loaded.positions["to"]) == (rule, [8, 8])
    assert loaded.provenance()["positions"] == loaded.positions
    x = torch.randn(2, 3, 64, 64)
    if family in ("beitv2", "simmim"):
        key = "rel_pos_bias.relative_position_bias_table"
        table = enc[key]
        expected = torch.cat([beit_geometric(table[:-3], (4, 4), (8, 8)), table[-3:].double()])
        assert _relative_error(loaded.model.blocks[1].attn.relative_position_bias_table, expected) < 1e-6
        reference = beit_forward({**enc, key: expected}, x, HEADS)
    else:
        pos = enc["pos_embed"]
        if rule == "mocov3":
            rows = mocov3_sincos(D, (8, 8))
        else:
            rows = (offset_rule if rule == "dino" else size_rule)(pos[0, 1:], (4, 4), (8, 8))
        expected = torch.cat([pos[0, :1].double(), rows])[None]
        assert _relative_error(loaded.model.pos_embed, expected) < 1e-6
        reference = vit_forward({**enc, "pos_embed": expected}, x, HEADS)
    maps, _ = our_forward(loaded.model, x)
    assert max((m.double() - r).abs().max().item() for m, r in zip(maps, reference[0], strict=True)) < 1e-5


# ---------------------------------------------------------------- Hugging Face folders


def _hf(kind, **config):
    transformers = pytest.importorskip("transformers")
    names = {
        "vit": ("ViTConfig", "ViTModel"),
        "dinov2": ("Dinov2Config", "Dinov2Model"),
        "beit": ("BeitConfig", "BeitModel"),
        "data2vec": ("Data2VecVisionConfig", "Data2VecVisionModel"),
    }[kind]
    cfg_cls, model_cls = (getattr(transformers, n) for n in names)
    sizes = {"hidden_size": D, "num_hidden_layers": 2, "num_attention_heads": HEADS}
    if kind == "dinov2":
        sizes["mlp_ratio"] = 4
    else:
        sizes["intermediate_size"] = 4 * D
    cfg = cfg_cls(**sizes, **config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(11)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


HF_CASES = [
    # the papers' DINOv2 setting: a 518-px folder at 224 px
    ("dinov2", "vit_small_patch14_dinov2", {"patch_size": 14, "image_size": 518}, 224),
    # 224-px families at 448 px
    ("vit", "vit_base_patch16_224", {"patch_size": 16, "image_size": 224}, 448),
    (
        "beit",
        "beit_base_patch16_224",
        {
            "patch_size": 16,
            "image_size": 224,
            "use_shared_relative_position_bias": True,
            "use_mean_pooling": False,
        },
        448,
    ),
    (
        "data2vec",
        "beit_base_patch16_224",
        {
            "patch_size": 16,
            "image_size": 224,
            "use_relative_position_bias": True,
            "use_absolute_position_embeddings": True,
        },
        448,
    ),
]


@pytest.mark.parametrize(("kind", "timm_name", "config", "size"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_folder_at_another_size_matches_transformers_forward(tmp_path, kind, timm_name, config, size):
    hf = _hf(kind, **config)
    hf.save_pretrained(tmp_path / kind)
    tiny = {"embed_dim": D, "depth": 2, "num_heads": HEADS, "patch_size": config["patch_size"]}
    loaded = load_model(timm_name, checkpoint=tmp_path / kind, img_size=(size, size), model_kwargs=tiny)
    assert loaded.positions["rule"] == "transformers"
    x = torch.randn(1, 3, size, size)
    kwargs = {"output_attentions": True}
    if kind != "dinov2":
        kwargs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        ref = hf(pixel_values=x, **kwargs).attentions
    maps, _ = our_forward(loaded.model, x)
    assert max((m - r).abs().max().item() for m, r in zip(maps, ref, strict=True)) < 1e-5


# ---------------------------------------------------------------- grids, records, CLI


@pytest.mark.parametrize(
    ("name", "size", "hint"),
    [("vit_small_patch14_dinov2", 96, "use 84 or 98"), ("vit_small_patch16_224", 100, "use 96 or 112")],
)
def test_a_size_that_is_not_whole_patches_is_refused_on_every_model(name, size, hint):
    with pytest.raises(ConfigError, match=hint) as info:
        load_model(name, random_init=True, img_size=(size, size), model_kwargs={"depth": 1})
    assert info.value.field == "img_size"


def test_the_rule_is_an_input_of_every_resizable_run(tmp_path):
    """Folders written before the family rules resampled with timm's: they lack the key and
    are recomputed; a model at its own size on the hub, or random weights, keeps its hash."""
    from attnscope.inputs import run_inputs
    from attnscope.models import resolve_model_spec

    spec = resolve_model_spec("dinov2_vit_small")
    common = {"model_kwargs": None, "seed": 0, "dtype": "float32"}
    at_224 = run_inputs(spec, [], checkpoint=None, random_init=False, img_size=(224, 224), **common)
    assert at_224["position_resize"] == "own"
    timm_way = run_inputs(
        spec, [], checkpoint=None, random_init=False, img_size=(224, 224), position_resize="timm", **common
    )
    assert timm_way["position_resize"] == "timm"
    native = run_inputs(spec, [], checkpoint=None, random_init=False, img_size=None, **common)
    random = run_inputs(spec, [], checkpoint=None, random_init=True, img_size=(224, 224), **common)
    assert "position_resize" not in native and "position_resize" not in random


@pytest.mark.slow  # a whole CLI run in a subprocess
def test_entropy_says_and_records_the_resize(tmp_path):
    import timm

    model = timm.create_model("test_vit", num_classes=0)  # native 160 px: a 10 x 10 grid
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "attnscope", "entropy", "test_vit", "--checkpoint", str(tmp_path / "w.pth")]
    cmd += ["--img-size", "64", "--max-images", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        "resized from the weights' 10x10 grid to 4x4 by timm's loader, which is this architecture's own"
        in (done.stdout + done.stderr)
    )
    positions = json.loads((out / "run.json").read_text())["models"]["test_vit"]["positions"]
    assert (positions["from"], positions["to"], positions["rule"]) == ([10, 10], [4, 4], "timm")
    bad = subprocess.run(
        cmd[:-6] + ["--img-size", "100", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "use 96 or 112" in bad.stderr


# ---------------------------------------------------------------- the papers' preprocessing


def _resize_and_crop(loaded) -> tuple[int, int, str]:
    """The eval transform's resize (shorter side), centre crop and interpolation."""
    from torchvision import transforms as T

    from attnscope.data import build_eval_transform

    transform, _ = build_eval_transform(loaded.model, loaded.input_size)
    resize = next(t for t in transform.transforms if isinstance(t, T.Resize))
    crop = next(t for t in transform.transforms if isinstance(t, T.CenterCrop))
    size = resize.size if isinstance(resize.size, int) else min(resize.size)
    return size, crop.size[0], resize.interpolation.value


@pytest.mark.parametrize(
    ("alias", "kw", "expected"),
    [
        ("dinov2_vit_small", DINOV2_KW, (256, 224, "bicubic")),  # DINOv2's eval, not the tag's 224/224
        ("dinov2_reg_vit_small", DINOV2_KW, (256, 224, "bicubic")),
        ("ijepa_vit_huge", {"embed_dim": D, "depth": 1, "num_heads": HEADS}, (256, 224, "bicubic")),
        ("mocov3_vit_small", {"embed_dim": D, "depth": 1, "num_heads": HEADS}, (256, 224, "bilinear")),
        ("clip_vit_base", {"embed_dim": D, "depth": 1, "num_heads": HEADS}, (224, 224, "bicubic")),
    ],
)
def test_aliases_take_their_familys_eval_transform_at_224(alias, kw, expected):
    loaded = load_model(alias, random_init=True, img_size=(224, 224), model_kwargs=kw)
    assert _resize_and_crop(loaded) == expected


def test_the_papers_transform_is_a_preset_for_any_model():
    loaded = load_model(
        "clip_vit_base",
        random_init=True,
        img_size=(224, 224),
        model_kwargs={"embed_dim": D, "depth": 1, "num_heads": HEADS},
        data_config="beyond_cls",
    )
    assert _resize_and_crop(loaded) == (256, 224, "bicubic")
    assert tuple(loaded.data_config["mean"]) == (0.485, 0.456, 0.406)
    assert "Beyond [cls]" in loaded.data_config_source


def test_an_official_dinov2_register_file_is_resized_before_timm_folds_its_class_row(tmp_path):
    """DINOv2-reg release files carry a class position row and `register_tokens`; timm's
    filter folds the row into the class token. The rule (antialiased bicubic, the register
    models' own) resizes the grid rows, and the class row is folded unchanged."""
    import timm

    torch.manual_seed(4)
    kw = {"embed_dim": D, "depth": 1, "num_heads": HEADS, "init_values": None}
    model = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **kw)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    pos = torch.randn(1, 1 + 37 * 37, D) * 0.5
    cls = torch.randn(1, 1, D)
    official.update({"register_tokens": sd["reg_token"], "pos_embed": pos, "cls_token": cls})
    official["mask_token"] = torch.zeros(1, D)  # every official file has one (timm's cue for the layout)
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = load_model(
        "dinov2_reg_vit_small",
        checkpoint=tmp_path / "dinov2_vits14_reg4_pretrain.pth",
        img_size=(224, 224),
        model_kwargs=kw,
    )
    assert loaded.positions["rule"] == "dinov2-reg"
    assert _relative_error(loaded.model.pos_embed[0], antialias_rule(pos[0, 1:], (37, 37), (16, 16))) < 1e-6
    assert torch.allclose(loaded.model.cls_token, cls + pos[:, :1])


def test_folders_of_the_timm_tag_transforms_are_not_reused():
    from attnscope.inputs import run_inputs
    from attnscope.models import resolve_model_spec

    inputs = run_inputs(
        resolve_model_spec("dinov2_vit_small"),
        [],
        checkpoint=None,
        model_kwargs=None,
        random_init=False,
        seed=0,
        img_size=None,
        dtype="float32",
    )
    assert inputs["inputs_version"] == 3  # 2: DINOv2 measured with timm's 224/224 transform
