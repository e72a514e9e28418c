"""BEiT-style encoders with one relative-position table shared by all blocks: BEiT-v2's
pre-training release (microsoft/unilm beit2) and SimMIM's ViT (microsoft/SimMIM).

Both add the same learned bias `B[h, i, j]` to every block's attention logits, read from a
single `rel_pos_bias.relative_position_bias_table`; timm's Beit holds one table per block,
so the shared table is copied into each block (the function is the same). Neither has an
absolute position embedding; both have LayerScale (`gamma_1`, `gamma_2`) and q/v biases
without a k bias. Masked-token, tokenizer-head ([cls] pre-training blocks, lm_head) and
SimMIM decoder weights are listed as dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnscope.models.checkpoints import Conversion, RawCheckpoint, strip_prefixes
from attnscope.models.converters.base import Converter
from attnscope.models.preprocessing import imagenet_eval

if TYPE_CHECKING:
    import torch
    from torch import nn

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
# Pre-training parts no encoder forward uses: BEiT-v2's tokenizer head and [cls]
# pre-training blocks, the mask token, SimMIM's pixel decoder.
_UNUSED = ("lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.", "mask_token", "decoder.")


def _source(raw: RawCheckpoint) -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors with `module.` stripped, and the prefix of the encoder's keys."""
    section = raw.section("model", "module", "state_dict")
    state = strip_prefixes(raw.tensors(section if section is not None else raw.top), ("module.",), raw.path)
    prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
    return state, prefix


def _encoder(raw: RawCheckpoint) -> dict[str, torch.Tensor]:
    state, prefix = _source(raw)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _is_simmim(raw: RawCheckpoint) -> bool:
    state, prefix = _source(raw)
    return prefix == "encoder." and f"encoder.{SHARED_TABLE}" in state


def _is_beitv2(raw: RawCheckpoint) -> bool:
    state, prefix = _source(raw)
    return prefix == "" and SHARED_TABLE in state and "blocks.0.attn.q_bias" in state


def beit_kwargs(raw: RawCheckpoint) -> dict[str, Any]:
    """timm Beit settings the weights need: no absolute position term unless the file has
    one, per-block relative bias, LayerScale when gammas are stored, the final norm."""
    state = _encoder(raw)
    per_block = any(k.endswith("attn.relative_position_bias_table") for k in state)
    return {
        "use_abs_pos_emb": "pos_embed" in state,
        "use_rel_pos_bias": SHARED_TABLE in state or per_block,
        "use_shared_rel_pos_bias": False,
        "init_values": 0.1 if "blocks.0.gamma_1" in state else None,
        "qkv_bias": "blocks.0.attn.q_bias" in state,
        "global_pool": "token" if "norm.weight" in state else "avg",
    }


def _convert(raw: RawCheckpoint, model: nn.Module) -> Conversion:
    state, prefix = _source(raw)
    keep: dict[str, torch.Tensor] = {}
    dropped = []
    table = None
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is None or name.startswith(_UNUSED) or name.endswith("relative_position_index"):
            dropped.append(key)  # the index is a buffer timm recomputes from the grid
        elif name == SHARED_TABLE:
            table = value
        else:
            keep[name] = value
    if table is not None:
        for i in range(len(model.blocks)):  # type: ignore[arg-type]
            keep[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return Conversion(keep, dropped)


BEITV2 = Converter(
    "beitv2",
    "BEiT-v2",
    "MIM",
    imagenet_eval("bicubic", "BEiT-v2 eval (crop_pct 224/256, bicubic, --imagenet_default_mean_and_std)"),
    _is_beitv2,
    convert=_convert,
    arch_kwargs=beit_kwargs,
    aliases={768: "beitv2_vit_base_pt", 1024: "beitv2_vit_large_pt"},
    positions="beit",
)
SIMMIM = Converter(
    "simmim",
    "SimMIM",
    "MIM",
    imagenet_eval("bicubic", "SimMIM eval (resize 256, centre crop 224, bicubic, ImageNet mean/std)"),
    _is_simmim,
    convert=_convert,
    arch_kwargs=beit_kwargs,
    aliases={768: "simmim_vit_base"},
    positions="beit",
)
