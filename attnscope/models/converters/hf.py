"""Hugging Face `transformers` checkpoints: a folder (config.json + weights) or a hub id of
a ViTModel, ViTMAEModel, Dinov2Model, BeitModel or Data2VecVisionModel, converted into the
matching timm architecture (VisionTransformer or Beit).

Only config.json and the weight files are read (json + safetensors/torch), so loading needs
no `transformers` install. q/k/v projections are concatenated into timm's `qkv`, Beit's
query/value biases become `q_bias`/`v_bias`, a shared relative-position table is copied
into every block, and the LayerNorm epsilon of config.json is kept (HF's ViT and BEiT
configs say 1e-12 where timm defaults to 1e-6). Preprocessing comes from the folder's
preprocessor_config.json when it has one.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models.checkpoints import Conversion, RawCheckpoint, load_file
from attnscope.models.converters.base import Converter
from attnscope.models.preprocessing import DataConfig, imagenet_eval

if TYPE_CHECKING:
    import torch
    from torch import nn

VIT_TYPES = ("vit", "vit_mae", "dinov2")
BEIT_TYPES = ("beit", "data2vec-vision")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_BACKBONE_PREFIXES = ("vit.", "dinov2.", "beit.", "data2vec_vision.")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def is_hf_source(checkpoint: str | Path) -> bool:
    """A folder, or a hub id (`org/name`) that is no local path."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return True
    text = str(checkpoint)
    weight_file = path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar", ".pkl")
    return not path.exists() and bool(_HUB_ID.fullmatch(text)) and not weight_file


def open_hf(checkpoint: str | Path) -> RawCheckpoint:
    """config.json, the weights and preprocessor_config.json of a folder or hub id."""
    path = Path(checkpoint).expanduser()
    folder = path if path.is_dir() else _hub_snapshot(str(checkpoint))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise AttnscopeError(f"{checkpoint}: a Hugging Face folder needs config.json beside its weights")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    weights = weights_file(folder)
    if weights is None:
        raise AttnscopeError(f"{checkpoint}: no {' or '.join(_WEIGHT_FILES)} in {folder}")
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        config["_preprocessor"] = json.loads(processor.read_text(encoding="utf-8"))
    origin = f"hf:{checkpoint}" + ("" if path.is_dir() else f" ({folder})")
    return RawCheckpoint(weights, load_file(weights), hf_config=config, origin=origin)


def weights_file(folder: Path) -> Path | None:
    """The weights a folder is read from (safetensors first, as transformers does)."""
    return next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)


def hf_files(checkpoint: str | Path) -> list[Path]:
    """config.json and the weights file of a folder, or of a hub id in the local cache (none
    when it is not there): the files whose bytes make the model, and so its identity."""
    path = Path(checkpoint).expanduser()
    folder: Path | None = path
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(checkpoint), "config.json")
        folder = Path(cached).parent if isinstance(cached, str) else None
    if folder is None:
        return []
    weights = weights_file(folder)
    return [folder / "config.json", *([weights] if weights is not None else [])]


def _hub_snapshot(repo_id: str) -> Path:
    """The repo's files from the local cache, or downloaded when the hub can be reached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from attnscope.models.hub import _HUB_HINT, _hub_endpoint_reachable

    names = ("config.json", *_WEIGHT_FILES, "preprocessor_config.json")
    cached = {n: try_to_load_from_cache(repo_id, n) for n in names}
    found = {n: p for n, p in cached.items() if isinstance(p, str) and os.path.exists(p)}
    if "config.json" in found and any(f in found for f in _WEIGHT_FILES):
        return Path(found["config.json"]).parent
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_endpoint_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise ConfigError(None, f"{repo_id} is not in the local Hugging Face cache and {why}; {_HUB_HINT}")
    try:
        config = hf_hub_download(repo_id, "config.json")
        for name in _WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, name)
                break
            except Exception:  # noqa: BLE001 - the next file name may exist
                continue
        try:
            hf_hub_download(repo_id, "preprocessor_config.json")
        except Exception:  # noqa: BLE001 - optional file
            pass
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            None, f"could not download {repo_id}: {str(exc).splitlines()[0]}; {_HUB_HINT}"
        ) from exc
    return Path(config).parent


def _model_type(raw: RawCheckpoint) -> str:
    return str((raw.hf_config or {}).get("model_type", ""))


def _recognise(raw: RawCheckpoint) -> bool:
    return raw.hf_config is not None


def _norm_layer(cfg: dict[str, Any]) -> Any:
    from torch import nn

    return partial(nn.LayerNorm, eps=float(cfg.get("layer_norm_eps", 1e-6)))


def _sizes(cfg: dict[str, Any]) -> dict[str, Any]:
    """The architecture's sizes as config.json states them: the folder, not the timm name
    it is loaded under, says how wide and deep the model is (a 2-block test folder under
    vit_small_patch14_dinov2 is still 2 blocks)."""
    names = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "num_heads",
        "patch_size": "patch_size",
    }
    sizes = {
        ours: tuple(cfg[theirs]) if isinstance(cfg[theirs], list) else cfg[theirs]
        for theirs, ours in names.items()
        if theirs in cfg
    }
    if "mlp_ratio" in cfg:  # Dinov2Config
        sizes["mlp_ratio"] = float(cfg["mlp_ratio"])
    elif "intermediate_size" in cfg and cfg.get("hidden_size"):
        sizes["mlp_ratio"] = cfg["intermediate_size"] / cfg["hidden_size"]
    return sizes


def hf_kwargs(raw: RawCheckpoint) -> dict[str, Any]:
    """timm settings from config.json (the weights' shapes are checked on loading)."""
    cfg = raw.hf_config or {}
    kind = _model_type(raw)
    size = cfg.get("image_size", 224)
    common = {
        **_sizes(cfg),
        "img_size": size if isinstance(size, int) else tuple(size),
        "norm_layer": _norm_layer(cfg),
    }
    if kind in ("vit", "vit_mae"):
        return {**common, "qkv_bias": bool(cfg.get("qkv_bias", True))}
    if kind == "dinov2":
        if cfg.get("use_swiglu_ffn"):
            raise AttnscopeError("Dinov2 checkpoints with a SwiGLU MLP (giant) are not supported")
        return {
            **common,
            "qkv_bias": bool(cfg.get("qkv_bias", True)),
            "init_values": cfg.get("layerscale_value", 1.0),
        }
    if kind in BEIT_TYPES:
        scale = float(cfg.get("layer_scale_init_value", 0.1) or 0.0)
        return {
            **common,
            "use_abs_pos_emb": bool(cfg.get("use_absolute_position_embeddings", False)),
            "use_rel_pos_bias": bool(
                cfg.get("use_relative_position_bias") or cfg.get("use_shared_relative_position_bias")
            ),
            "use_shared_rel_pos_bias": False,
            "init_values": scale if scale > 0 else None,
            "global_pool": "avg" if cfg.get("use_mean_pooling", True) else "token",
            # the pooled norm exists only when the checkpoint kept the pooling layer
            "use_fc_norm": any(k.endswith("pooler.layernorm.weight") for k in raw.top),
        }
    raise AttnscopeError(
        f"{raw.origin}: model_type {kind!r} is not supported; attnscope converts "
        f"{', '.join(VIT_TYPES + BEIT_TYPES)}"
    )


# Per-layer renames, HF -> timm (after `encoder.layer.{i}.` -> `blocks.{i}.`).
_VIT_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.output.dense": "attn.proj",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_BEIT_LAYER = {**_VIT_LAYER, "lambda_1": "gamma_1", "lambda_2": "gamma_2"}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(\.weight|\.bias)?$")
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight",
    "pooler.layernorm.bias": "fc_norm.bias",
}


def _strip_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {
                k.removeprefix(prefix) if k.startswith(prefix) else f"<outside>{k}": v
                for k, v in state.items()
            }
    return dict(state)


def _check_model(raw: RawCheckpoint, model: nn.Module) -> None:
    cfg = raw.hf_config or {}
    want = "Beit" if _model_type(raw) in BEIT_TYPES else "VisionTransformer"
    if type(model).__name__ != want:
        example = "beit_base_patch16_224" if want == "Beit" else "vit_base_patch16_224"
        raise AttnscopeError(
            f"{raw.origin} is a {cfg.get('model_type')} checkpoint: choose a timm {want} (e.g. {example})"
        )
    heads = int(cfg.get("num_attention_heads", 0))
    blocks: Any = model.blocks
    have = int(getattr(blocks[0].attn, "num_heads", heads))
    if heads and heads != have:
        raise AttnscopeError(f"{raw.origin} has {heads} attention heads per block; the model has {have}")


def _convert(raw: RawCheckpoint, model: nn.Module) -> Conversion:
    _check_model(raw, model)
    beit = _model_type(raw) in BEIT_TYPES
    layer_map = _BEIT_LAYER if beit else _VIT_LAYER
    state = _strip_backbone(raw.tensors())
    keep: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[str, str, str], torch.Tensor] = {}
    shared = None
    for key, value in state.items():
        match = _LAYER.match(key)
        if key in _TOP:
            keep[_TOP[key]] = value
        elif key == "encoder.relative_position_bias.relative_position_bias_table":
            shared = value
        elif match:
            index, name, suffix = match.group(1), match.group(2), match.group(3) or ""
            part = name.rsplit(".", 1)[-1]
            if name.startswith("attention.attention.") and part in ("query", "key", "value"):
                qkv[(index, part, suffix)] = value
            elif name.endswith("relative_position_bias.relative_position_bias_table"):
                keep[f"blocks.{index}.attn.relative_position_bias_table"] = value
            elif name in layer_map:
                keep[f"blocks.{index}.{layer_map[name]}{suffix}"] = value
            else:
                dropped.append(key)
        else:
            dropped.append(key.removeprefix("<outside>"))
    _merge_qkv(qkv, keep, beit)
    if beit and "norm.weight" not in keep and "fc_norm.weight" not in keep:
        from torch import nn

        # mean pooling without the pooling layer: HF's tokens carry no final norm at all,
        # which no timm Beit setting expresses
        model.norm = nn.Identity()
    if shared is not None:
        for i in range(len(model.blocks)):  # type: ignore[arg-type]
            keep[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    return Conversion(keep, dropped)


def _merge_qkv(parts: dict[tuple[str, str, str], Any], keep: dict[str, Any], beit: bool) -> None:
    """HF's separate query/key/value -> timm's qkv; BEiT keeps q and v biases apart (no k bias)."""
    import torch

    for index in sorted({i for i, _, _ in parts}, key=int):
        keep[f"blocks.{index}.attn.qkv.weight"] = torch.cat(
            [parts[(index, p, ".weight")] for p in ("query", "key", "value")]
        )
        if beit:
            keep[f"blocks.{index}.attn.q_bias"] = parts[(index, "query", ".bias")]
            keep[f"blocks.{index}.attn.v_bias"] = parts[(index, "value", ".bias")]
        elif (index, "query", ".bias") in parts:
            keep[f"blocks.{index}.attn.qkv.bias"] = torch.cat(
                [parts[(index, p, ".bias")] for p in ("query", "key", "value")]
            )


def _preprocessing(raw: RawCheckpoint) -> DataConfig | None:
    """preprocessor_config.json's mean/std, resampling and crop, if the folder has one."""
    proc = (raw.hf_config or {}).get("_preprocessor")
    if not isinstance(proc, dict) or "image_mean" not in proc:
        if _model_type(raw) == "vit_mae":
            return imagenet_eval("bicubic", "MAE eval (no preprocessor_config.json)")
        return None
    size, crop = proc.get("size"), proc.get("crop_size")
    short = size.get("shortest_edge") if isinstance(size, dict) else size
    crop_side = crop.get("height") if isinstance(crop, dict) else crop
    if proc.get("do_center_crop") and short and crop_side:
        crop_pct, mode = float(crop_side) / float(short), "center"
    else:
        crop_pct, mode = (
            1.0,
            ("center" if short and isinstance(size, dict) and "shortest_edge" in size else "squash"),
        )
    return DataConfig(
        tuple(proc["image_mean"]),
        tuple(proc.get("image_std", (1.0, 1.0, 1.0))),
        min(crop_pct, 1.0),
        _RESAMPLE.get(int(proc.get("resample", 3)), "bicubic"),
        mode,
        f"{raw.origin}: preprocessor_config.json",
    )


HF = Converter(
    "hf",
    "Hugging Face transformers",
    "unknown",
    None,
    _recognise,
    convert=_convert,
    arch_kwargs=hf_kwargs,
    preprocessing=_preprocessing,
    positions="transformers",
)
