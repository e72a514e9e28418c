"""Hugging Face checkpoints against `transformers` itself, the independent implementation:
a tiny random model of each supported class is saved with `save_pretrained` and loaded
through `load_model`; attention maps and final tokens must agree."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import our_forward

from attnscope.errors import AttnscopeError
from attnscope.models import load_model

transformers = pytest.importorskip("transformers")

SIZE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 32,
    "patch_size": 8,
}
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 4, "patch_size": 8}


def _hf_model(kind: str, **extra):
    classes = {
        "vit": ("ViTConfig", "ViTModel"),
        "vit_mae": ("ViTMAEConfig", "ViTMAEModel"),
        "dinov2": ("Dinov2Config", "Dinov2Model"),
        "beit": ("BeitConfig", "BeitModel"),
        "data2vec": ("Data2VecVisionConfig", "Data2VecVisionModel"),
    }
    config_cls, model_cls = (getattr(transformers, n) for n in classes[kind])
    sizes = dict(SIZE)
    if kind == "dinov2":
        sizes["mlp_ratio"] = sizes.pop("intermediate_size") // sizes["hidden_size"]
    config = config_cls(**sizes, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(11)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF's init is near-uniform attention; spread the weights out
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _hf_forward(model, x, kind):
    kwargs = {"output_attentions": True}
    if kind == "vit_mae":  # keep every patch, in order (noise sorts the patches)
        n = (x.shape[-1] // 8) * (x.shape[-2] // 8)
        kwargs["noise"] = torch.arange(n, dtype=x.dtype).expand(x.shape[0], -1)
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    return [a.double() for a in out.attentions], out.last_hidden_state.double()


CASES = [
    ("vit", "vit_base_patch16_224", {}),
    ("vit_mae", "vit_base_patch16_224", {"mask_ratio": 0.0}),
    ("dinov2", "vit_base_patch14_dinov2", {}),
    ("beit", "beit_base_patch16_224", {"use_shared_relative_position_bias": True, "use_mean_pooling": False}),
    (
        "data2vec",
        "beit_base_patch16_224",
        {
            "use_relative_position_bias": True,
            "use_absolute_position_embeddings": True,
            "use_mean_pooling": True,
        },
    ),
]


@pytest.mark.parametrize(("kind", "timm_name", "extra"), CASES, ids=[c[0] for c in CASES])
def test_hf_checkpoint_matches_transformers(tmp_path, kind, timm_name, extra):
    hf = _hf_model(kind, **extra)
    hf.save_pretrained(tmp_path / kind)
    loaded = load_model(timm_name, checkpoint=tmp_path / kind, model_kwargs=TINY)
    assert loaded.checkpoint_report["layout"] == "Hugging Face transformers"
    x = torch.randn(2, 3, 32, 32)
    ref_maps, ref_tokens = _hf_forward(hf.double(), x.double(), kind)
    maps, _ = our_forward(loaded.model, x)
    assert max((m.double() - r).abs().max().item() for m, r in zip(maps, ref_maps, strict=True)) < 1e-5
    # transformers' eager attention takes its softmax in float32 even in a float64 model
    maps64, tokens64 = our_forward(loaded.model.double(), x.double())
    assert max((m - r).abs().max().item() for m, r in zip(maps64, ref_maps, strict=True)) < 1e-6
    assert (tokens64 - ref_tokens).abs().max().item() < 1e-5


def test_hf_preprocessor_config_sets_the_data_config(tmp_path):
    hf = _hf_model("beit", use_shared_relative_position_bias=True, use_mean_pooling=False)
    hf.save_pretrained(tmp_path / "m")
    proc = {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "do_center_crop": True,
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
    }
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(proc))
    loaded = load_model("beit_base_patch16_224", checkpoint=tmp_path / "m", model_kwargs=TINY)
    cfg = loaded.data_config
    assert (tuple(cfg["mean"]), cfg["interpolation"], cfg["crop_pct"]) == ((0.5, 0.5, 0.5), "bilinear", 0.875)
    assert "preprocessor_config.json" in loaded.data_config_source


def test_hf_wrong_architecture_or_heads_is_one_line(tmp_path):
    hf = _hf_model("vit")
    hf.save_pretrained(tmp_path / "m")
    with pytest.raises(AttnscopeError, match="choose a timm VisionTransformer") as info:
        load_model("beit_base_patch16_224", checkpoint=tmp_path / "m", model_kwargs=TINY)
    assert "\n" not in str(info.value)
    with pytest.raises(AttnscopeError, match="4 attention heads"):
        load_model("vit_base_patch16_224", checkpoint=tmp_path / "m", model_kwargs={**TINY, "num_heads": 2})


def test_hf_hub_id_offline_is_the_one_line_hub_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AttnscopeError) as info:
        load_model("beit_base_patch16_224", checkpoint="facebook/data2vec-vision-base")
    message = str(info.value)
    assert "facebook/data2vec-vision-base is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message and "\n" not in message


def test_beitv2_release_layout_matches_transformers_beit_with_a_shared_bias(tmp_path):
    """The BEiT-v2 release converter against transformers' BeitModel (shared relative bias,
    LayerScale, no absolute positions): the same weights written in BEiT-v2's own key names."""
    hf = _hf_model(
        "beit", use_shared_relative_position_bias=True, use_mean_pooling=False, layer_norm_eps=1e-6
    ).eval()
    hf.save_pretrained(tmp_path / "hf")  # the hub's key names (transformers renames some in memory)
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    release = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": torch.randn(1, 1, 32),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "rel_pos_bias.relative_position_bias_table": sd[
            "encoder.relative_position_bias.relative_position_bias_table"
        ],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
        "lm_head.weight": torch.randn(64, 32),
    }
    for i in range(2):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        release[b + "attn.qkv.weight"] = torch.cat(
            [sd[att + n + ".weight"] for n in ("query", "key", "value")]
        )
        release[b + "attn.q_bias"] = sd[att + "query.bias"]
        release[b + "attn.v_bias"] = sd[att + "value.bias"]
        pairs = {
            "attention.output.dense": "attn.proj",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
        }
        for hf_name, ours in pairs.items():
            for part in ("weight", "bias"):
                release[f"{b}{ours}.{part}"] = sd[f"{h}{hf_name}.{part}"]
        release[b + "gamma_1"], release[b + "gamma_2"] = sd[h + "lambda_1"], sd[h + "lambda_2"]
    torch.save({"model": release}, tmp_path / "beitv2_pt.pth")
    loaded = load_model(
        "beitv2_vit_base_pt", checkpoint=tmp_path / "beitv2_pt.pth", img_size=(32, 32), model_kwargs=TINY
    )
    x = torch.randn(2, 3, 32, 32)
    ref_maps, ref_tokens = _hf_forward(hf.double(), x.double(), "beit")
    maps, _ = our_forward(loaded.model, x)
    assert max((m.double() - r).abs().max().item() for m, r in zip(maps, ref_maps, strict=True)) < 1e-5
    maps64, tokens64 = our_forward(loaded.model.double(), x.double())
    assert max((m - r).abs().max().item() for m, r in zip(maps64, ref_maps, strict=True)) < 1e-6
    assert (tokens64 - ref_tokens).abs().max().item() < 1e-5
