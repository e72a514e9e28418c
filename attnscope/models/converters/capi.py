"""CAPI release files (facebookresearch/capi, `capi_vitl14_*.pth`): a flat state dict whose
`backbone.` keys are the encoder-decoder; the encoder becomes `attnscope.models.capi.CapiViT`.
The decoder, its mask token and every non-backbone key are listed as dropped."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from attnscope.models.checkpoints import Conversion, RawCheckpoint
from attnscope.models.converters.base import Converter
from attnscope.models.preprocessing import imagenet_eval

if TYPE_CHECKING:
    import torch
    from torch import nn

_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.(residual[12])\.(norm|fn)\.(.+)$")
# residual1 is the attention branch, residual2 the MLP branch
_RENAME = {
    ("residual1", "norm"): "norm1",
    ("residual1", "fn"): "attn",
    ("residual2", "norm"): "norm2",
    ("residual2", "fn"): "mlp",
}


def _backbone(raw: RawCheckpoint) -> dict[str, torch.Tensor]:
    section = raw.section("model", "state_dict")
    state = raw.tensors(section if section is not None else raw.top)
    if any(k.startswith("backbone.") for k in state):
        return state
    return {f"backbone.{k}": v for k, v in state.items()}


def _is_capi(raw: RawCheckpoint) -> bool:
    return "backbone.encoder.blocks.0.residual1.fn.q_proj.weight" in _backbone(raw)


def _convert(raw: RawCheckpoint, model: nn.Module | None = None) -> Conversion:
    keep: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in _backbone(raw).items():
        name = key.removeprefix("backbone.")
        match = _BLOCK.match(name)
        if match:
            index, branch, part, rest = match.groups()
            keep[f"blocks.{index}.{_RENAME[(branch, part)]}.{rest}"] = value
        elif name == "registers":
            keep["reg_token"] = value
        elif name in ("patch_embed.weight", "patch_embed.bias"):
            keep[f"patch_embed.proj.{name.rsplit('.', 1)[1]}"] = value
        else:
            dropped.append(key)
    return Conversion(keep, dropped)


def _build(kwargs: Mapping[str, Any]) -> nn.Module:
    from attnscope.models.capi import CapiViT

    return CapiViT(**kwargs)


def _kwargs(raw: RawCheckpoint) -> dict[str, Any]:
    from attnscope.models.capi import capi_kwargs

    return capi_kwargs(_convert(raw).state)


CAPI = Converter(
    "capi",
    "CAPI",
    "MIM",
    imagenet_eval(
        "bicubic", "CAPI eval_classification (resize 256, centre crop 224, bicubic, ImageNet mean/std)"
    ),
    _is_capi,
    convert=_convert,
    arch_kwargs=_kwargs,
    build=_build,
    aliases={1024: "capi_vit_large"},
)
