"""Families whose encoder is timm's plain VisionTransformer: MAE, LUT, DINO, iBOT, MoCo v3.

MAE, LUT, DINO and iBOT use timm's own key names (their repositories were built on timm's
ViT), so conversion is choosing the right part of the file: MAE/LUT's `model` without the
decoder (and LUT's projection heads), DINO/iBOT's teacher backbone without its head. MoCo v3
keeps two encoders under `module.base_encoder.` / `module.momentum_encoder.`; its ViT-S has
12 heads (timm's 6), which the weights' shapes cannot show, and a fixed 2-D sin-cos
position embedding stored in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from attnscope.models.checkpoints import Conversion, RawCheckpoint, strip_prefixes
from attnscope.models.converters.base import Converter, sincos_order, width_of
from attnscope.models.preprocessing import imagenet_eval

if TYPE_CHECKING:
    import torch
    from torch import nn

_VIT_KEY = "blocks.0.attn.qkv.weight"


def _plain_vit(state: Mapping[str, Any]) -> bool:
    return _VIT_KEY in state and not any("rel_pos_bias" in k or "relative_position" in k for k in state)


def _is_mae(raw: RawCheckpoint) -> bool:
    state = raw.flat()
    if not _plain_vit(state) or any(k.startswith("predictor.") for k in state):
        return False
    if "decoder_embed.weight" in state:
        return True
    pos = state.get("pos_embed")
    return raw.section("model") is not None and pos is not None and sincos_order(pos) == "cols"


def _is_lut(raw: RawCheckpoint) -> bool:
    state = raw.flat()
    return (
        _plain_vit(state)
        and "decoder_embed.weight" in state
        and any(k.startswith("predictor.") for k in state)
    )


def _is_dino(raw: RawCheckpoint) -> bool:
    top = raw.top
    if "ibot_loss" in top:
        return False
    return "dino_loss" in top or ("teacher" in top and "student" in top and "args" in top)


def _is_ibot(raw: RawCheckpoint) -> bool:
    top = raw.top
    if "ibot_loss" in top:
        return True
    # iBOT's published backbones (checkpoint_teacher.pth) are {"state_dict": backbone}
    section = raw.section("state_dict")
    return set(top) == {"state_dict"} and section is not None and _plain_vit(section)


def _moco_state(raw: RawCheckpoint) -> dict[str, torch.Tensor]:
    section = raw.section("state_dict")
    return strip_prefixes(raw.tensors(section if section is not None else raw.top), ("module.",), raw.path)


def _is_moco(raw: RawCheckpoint) -> bool:
    return any(k.startswith("base_encoder.") for k in _moco_state(raw))


def _moco_convert(raw: RawCheckpoint, model: nn.Module) -> Conversion:
    """The base encoder, as MoCo v3's linear evaluation takes it (its MLP head excluded)."""
    keep, dropped = {}, []
    for key, value in _moco_state(raw).items():
        if key.startswith("base_encoder.") and not key.startswith("base_encoder.head."):
            keep[key.removeprefix("base_encoder.")] = value
        else:
            dropped.append(f"module.{key}")
    return Conversion(keep, dropped)


# MoCo v3's vits.py: 12 heads for ViT-S and ViT-B, 16 for ViT-L and ViT-H.
MOCO_HEADS = {384: 12, 768: 12, 1024: 16, 1280: 16}


def _moco_kwargs(raw: RawCheckpoint) -> dict[str, Any]:
    state = {k.removeprefix("base_encoder."): v for k, v in _moco_state(raw).items()}
    heads = MOCO_HEADS.get(width_of(state) or 0)
    return {"num_heads": heads} if heads else {}


MAE = Converter(
    "mae",
    "MAE",
    "MIM",
    imagenet_eval(
        "bicubic", "MAE eval (main_finetune: resize 256, centre crop 224, bicubic, ImageNet mean/std)"
    ),
    _is_mae,
    aliases={768: "mae_vit_base", 1024: "mae_vit_large", 1280: "mae_vit_huge"},
    positions="mae",
)
LUT = Converter(
    "lut",
    "LUT",
    "MIM",
    imagenet_eval("bicubic", "LUT eval (MAE's: resize 256, centre crop 224, bicubic, ImageNet mean/std)"),
    _is_lut,
    aliases={768: "lut_vit_base"},
    positions="mae",
)
DINO = Converter(
    "dino",
    "DINO",
    "JEA",
    imagenet_eval("bicubic", "DINO eval_linear (resize 256, centre crop 224, bicubic, ImageNet mean/std)"),
    _is_dino,
    aliases={384: "dino_vit_small", 768: "dino_vit_base"},
    positions="dino",
)
IBOT = Converter(
    "ibot",
    "iBOT",
    "JEA",
    imagenet_eval("bicubic", "iBOT eval_linear (resize 256, centre crop 224, bicubic, ImageNet mean/std)"),
    _is_ibot,
    aliases={384: "ibot_vit_small", 768: "ibot_vit_base"},
    positions="dino",
)
MOCOV3 = Converter(
    "mocov3",
    "MoCo v3",
    "JEA",
    imagenet_eval(
        "bilinear", "MoCo v3 main_lincls (resize 256, centre crop 224, bilinear, ImageNet mean/std)"
    ),
    _is_moco,
    convert=_moco_convert,
    arch_kwargs=_moco_kwargs,
    aliases={384: "mocov3_vit_small", 768: "mocov3_vit_base"},
    positions="mocov3",
)
