"""Model resolution, every checkpoint format, strict loading, and the offline Hub."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from attnscope.errors import AttnscopeError
from attnscope.models import (
    MODEL_REGISTRY,
    SHORT_ALIASES,
    load_model,
    read_checkpoint,
    resolve_model_spec,
    token_layout,
)

ARCH = "vit_small_patch16_224"
KW = {"depth": 2, "img_size": 64}


def _source_model(seed=1, **extra):
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, **{**KW, **extra}).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load(path, **kw):
    return load_model(ARCH, checkpoint=path, img_size=(64, 64), model_kwargs={"depth": 2}, **kw).model


def test_every_alias_resolves_to_a_timm_model_with_pretrained_weights():
    for spec in MODEL_REGISTRY.values():
        if spec.file_weights:  # a release file converted by attnscope, not a timm tag
            assert spec.converter is not None and spec.data_config is not None, spec
            assert spec.arch == "capi_vitl14" or timm.is_model(spec.arch), spec
            continue
        assert timm.is_model(spec.arch), spec
        assert spec.timm_name in timm.list_pretrained(spec.timm_name), spec
    for short, full in SHORT_ALIASES.items():
        assert resolve_model_spec(short).alias == full
    assert resolve_model_spec("mae").family == "MIM"
    assert resolve_model_spec("dino").family == "JEA"
    assert resolve_model_spec("vit_tiny_patch16_224").family == "unknown"
    assert resolve_model_spec("vit_tiny_patch16_224", family="JEA").family == "JEA"


def test_unknown_model_suggests_close_names():
    with pytest.raises(AttnscopeError, match="did you mean.*mae_vit_base"):
        resolve_model_spec("mae_vit_bse")


@pytest.mark.parametrize(
    "wrap",
    [
        "plain",
        "model",
        "state_dict_module",
        "teacher_backbone_with_head",
        "mae_with_decoder",
        "safetensors",
    ],
)
def test_checkpoint_formats(tmp_path, wrap):
    src = _source_model()
    sd = src.state_dict()
    path = tmp_path / "ckpt.pth"
    if wrap == "plain":
        torch.save(sd, path)
    elif wrap == "model":
        torch.save({"model": sd, "epoch": 3}, path)
    elif wrap == "state_dict_module":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif wrap == "teacher_backbone_with_head":  # DINO's official training checkpoint
        import argparse

        teacher = {f"backbone.{k}": v for k, v in sd.items()}
        teacher["head.mlp.0.weight"] = torch.randn(8, 384)
        torch.save({"teacher": teacher, "student": {}, "args": argparse.Namespace(arch="vit_small")}, path)
    elif wrap == "mae_with_decoder":  # MAE's pre-training release: decoder + mask token inside
        full = dict(sd)
        full["mask_token"] = torch.zeros(1, 1, 512)
        full["decoder_embed.weight"] = torch.randn(512, 384)
        full["decoder_blocks.0.norm1.weight"] = torch.ones(512)
        torch.save({"model": full}, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_model(ARCH, checkpoint=path, img_size=(64, 64), model_kwargs={"depth": 2})
    assert _same_weights(loaded.model, src)
    assert loaded.weights.startswith("checkpoint:")
    if wrap in ("mae_with_decoder", "teacher_backbone_with_head"):
        assert loaded.checkpoint_report["dropped_keys"]


def test_position_embedding_resampled_to_model_size(tmp_path):
    src = _source_model()
    torch.save(src.state_dict(), tmp_path / "c.pth")
    loaded = load_model(ARCH, checkpoint=tmp_path / "c.pth", img_size=(96, 96), model_kwargs={"depth": 2})
    assert loaded.model.pos_embed.shape[1] == 1 + 6 * 6
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_missing_layerscale_gamma_is_an_error_naming_the_key(tmp_path):
    src = _source_model(init_values=1e-5)
    sd = {k: v for k, v in src.state_dict().items() if k != "blocks.1.ls1.gamma"}
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(AttnscopeError, match=r"lacks 1 weights.*blocks\.1\.ls1\.gamma"):
        timm_kwargs = {"init_values": 1e-5}
        model = timm.create_model(ARCH, pretrained=False, num_classes=0, **KW, **timm_kwargs)
        from attnscope.models import load_checkpoint_into

        load_checkpoint_into(model, tmp_path / "c.pth")


def test_missing_block_weight_through_load_model(tmp_path):
    sd = _source_model().state_dict()
    del sd["blocks.0.attn.proj.weight"]
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(AttnscopeError, match=r"blocks\.0\.attn\.proj\.weight"):
        _load(tmp_path / "c.pth")


def test_wrong_architecture_is_one_line(tmp_path):
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), tmp_path / "c.pth")
    with pytest.raises(AttnscopeError) as info:
        _load(tmp_path / "c.pth")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(AttnscopeError, match="cannot read checkpoint"):
        read_checkpoint(path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(AttnscopeError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_random_init_is_seeded_and_labelled():
    kw = {"img_size": (64, 64), "model_kwargs": {"depth": 2}, "random_init": True}
    a, b, c = load_model(ARCH, seed=5, **kw), load_model(ARCH, seed=5, **kw), load_model(ARCH, seed=6, **kw)
    assert _same_weights(a.model, b.model) and not _same_weights(a.model, c.model)
    assert "RANDOM" in a.weights and a.provenance()["random_init"] is True


def test_alias_keeps_its_tags_data_config():
    loaded = load_model("mae", random_init=True)
    assert tuple(loaded.data_config["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.spec.timm_name == "vit_base_patch16_224.mae"


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import attnscope.models.hub as models

    monkeypatch.setattr(models, "_cached_hub_file", lambda cfg: None)
    start = time.monotonic()
    with pytest.raises(AttnscopeError) as info:
        load_model("dino_vit_small")
    assert time.monotonic() - start < 10
    message = str(info.value)
    # the Python API names its own arguments; the CLI says --checkpoint / --random-init
    assert "cannot be reached" in message and "pass `checkpoint`" in message and "HF_HOME" in message
    assert "random_init" in message and "--" not in message
    assert "\n" not in message


def test_offline_env_cache_miss(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import attnscope.models.hub as models

    monkeypatch.setattr(models, "_cached_hub_file", lambda cfg: None)
    with pytest.raises(AttnscopeError, match="HF_HUB_OFFLINE is set.*checkpoint.*random_init"):
        load_model("mae")


def test_cached_weights_load_without_network(monkeypatch, tmp_path):
    """A file in the HF cache is loaded through timm's own loader with no request at all."""
    import attnscope.models.hub as models

    src = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    monkeypatch.setattr(models, "_cached_hub_file", lambda cfg: str(path))
    monkeypatch.setattr(models, "_hub_endpoint_reachable", lambda: pytest.fail("must not touch the network"))
    loaded = load_model("dino_vit_small")
    assert "local cache" in loaded.weights
    assert _same_weights(loaded.model, src)


def test_token_layout_from_model_not_sqrt():
    m = timm.create_model("test_vit2", pretrained=False)  # register, no class token
    layout = token_layout(m, (160, 96))
    assert (layout.has_cls, layout.num_registers, layout.grid) == (False, 1, (10, 6))
    assert layout.cls_index is None and layout.patch_slice == slice(1, 61)
    m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=1, img_size=70)
    layout = token_layout(m, (70, 70))
    assert (layout.has_cls, layout.num_registers, layout.num_prefix) == (True, 4, 5)
    assert layout.register_slice == slice(1, 5)


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"hello\n", b""], ids=["bytes", "text", "empty"])
def test_a_file_that_is_no_checkpoint_says_so_without_torchs_advice(tmp_path, content):
    """torch's refusal advises weights_only=False, which attnscope never does; the one line
    says the file is not a checkpoint instead (#20)."""
    from attnscope.errors import AttnscopeError

    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(AttnscopeError) as info:
        load_model("test_vit", checkpoint=path)
    message = str(info.value)
    assert "not a torch checkpoint or safetensors file" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_layout_of_another_width_does_not_advise_the_alias_that_failed(tmp_path):
    """`entropy mae --checkpoint <an MAE ViT-S>` must not say "load it with --model
    mae_vit_base", which is what was run (#20)."""
    from attnscope.errors import AttnscopeError

    small = timm.create_model("vit_small_patch16_224", num_classes=0, depth=1)
    state = {**small.state_dict(), "decoder_embed.weight": torch.zeros(4, 384)}
    torch.save({"model": state}, tmp_path / "mae_vits.pth")
    with pytest.raises(AttnscopeError) as info:
        load_model("mae", checkpoint=tmp_path / "mae_vits.pth", model_kwargs={"depth": 1})
    assert "MAE's layout, width 384" in str(info.value)
    assert "mae_vit_base" not in str(info.value)
