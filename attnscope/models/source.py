"""A model given as its weights: a Hugging Face folder or a checkpoint file where a model
name is expected (`--model PATH`, `analyze("weights.pth")`).

The architecture comes from what the weights say about themselves, never from a guess: a
folder's config.json (model_type and sizes -> a timm name; `converters.hf` reads the
rest), a release file's layout (its family converter and the alias registered for its
embedding width), or a bare timm-layout state dict's shapes when they show the number of
heads (BEiT's per-block relative-position tables do; a plain ViT's weights do not: MoCo v3's
ViT-S has 12 heads where timm's has 6, with identical shapes). Anything else is refused in
one line that asks for the architecture by name, with the file as the checkpoint.

`resolve_model` is where every command resolves a model name; the spec of a path carries
it in `ModelSpec.path` and its short name (folder or file name) as `alias`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models.checkpoints import RawCheckpoint, generic_conversion, open_checkpoint
from attnscope.models.registry import (
    MODEL_REGISTRY,
    SHORT_ALIASES,
    ModelSpec,
    check_family,
    resolve_model_spec,
)

if TYPE_CHECKING:
    import torch

    from attnscope.models.converters import Converter

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar", ".pkl")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_WIDTHS = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280, "giant": 1536}
# model_type -> (the timm name of standard sizes, the family's name at 224 px / its usual patch)
_HF_NAMES = {
    "vit": ("vit_{size}_patch{patch}_{image}", "vit_{size}_patch16_224"),
    "vit_mae": ("vit_{size}_patch{patch}_{image}", "vit_{size}_patch16_224"),
    "dinov2": ("vit_{size}_patch{patch}_dinov2", "vit_{size}_patch14_dinov2"),
    "beit": ("beit_{size}_patch{patch}_{image}", "beit_{size}_patch16_224"),
    "data2vec-vision": ("beit_{size}_patch{patch}_{image}", "beit_{size}_patch16_224"),
}
# Only where the model_type implies the training: a HF "vit" may be DINO or supervised, a
# "beit" pre-trained or fine-tuned.
_HF_FAMILIES = {"vit_mae": "MIM", "dinov2": "JEA"}


def resolve_model(name: str | Path, family: str | None = None) -> ModelSpec:
    """What `name` means: an alias or timm name (`registry.resolve_model_spec`), or a file
    or folder given as the model (its spec has `path` set)."""
    if not is_model_path(name):
        return resolve_model_spec(str(name), family)
    check_family(family)
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(
            None,
            f"{name}: no such file or folder; `model` takes an alias, a timm name, "
            "a checkpoint file or a Hugging Face folder",
        )
    spec = _spec_of(path.resolve(), _stamps(path))
    return spec if family is None else replace(spec, family=family)


def is_model_path(name: str | Path) -> bool:
    """`name` means a file or folder rather than an alias or a timm name.

    Registered names win over a file of the same name in the working directory; so does a
    timm name unless it is written as a path (`./vit_base_patch16_224`)."""
    if isinstance(name, os.PathLike):
        return True
    if name in MODEL_REGISTRY or name in SHORT_ALIASES or ":" in name.split("/", 1)[0]:
        return False  # `hf-hub:org/name` is timm's spelling, not a path
    if "/" in name or os.sep in name or name.startswith(("~", ".")) or name.lower().endswith(WEIGHT_SUFFIXES):
        return True
    if not Path(name).exists():
        return False
    import timm

    return not timm.is_model(name.split(".", 1)[0])


def short_name(name: str | Path) -> str:
    """How a model is shown: a path by its folder's or file's name without the weight
    suffixes (`vit-s-300ep.pth.tar` -> `vit-s-300ep`), anything else as given."""
    if not is_model_path(name):
        return str(name)
    path = Path(name).expanduser()
    folder = _hf_folder(path)
    path = (folder or path).resolve() if path.exists() else path
    stem = path.name
    while Path(stem).suffix.lower() in WEIGHT_SUFFIXES:
        stem = Path(stem).stem
    return stem or str(name)


def own_weights(spec: ModelSpec, checkpoint: str | Path | None, random_init: bool) -> Path:
    """The checkpoint of a model given as its weights; they leave no room for other weights."""
    assert spec.path is not None
    if checkpoint is not None:
        raise ConfigError(
            "checkpoint",
            f"does not go with a model given as its weights ({spec.path}): give that path alone, "
            f"or `model` {spec.timm_name} with `checkpoint` {checkpoint}",
        )
    if random_init:
        raise ConfigError(
            "random_init",
            f"does not go with a model given as its weights ({spec.path}); for random weights of "
            f"its architecture give `model` {spec.timm_name}",
        )
    return spec.path


def weights_files(checkpoint: str | Path) -> list[Path]:
    """The files whose bytes are the weights, which a cache or a reused run is keyed on: a
    file itself; a Hugging Face folder's (or cached hub id's) config.json and weights file."""
    from attnscope.models.converters.hf import hf_files, is_hf_source

    return hf_files(checkpoint) if is_hf_source(checkpoint) else [Path(checkpoint).expanduser()]


def raw_files(raw: RawCheckpoint) -> list[Path]:
    """`weights_files` of a source already opened (a folder's config.json sits beside its weights)."""
    return [raw.path.parent / "config.json", raw.path] if raw.hf_config is not None else [raw.path]


def _stamps(path: Path) -> tuple[tuple[int, int], ...]:
    target = _hf_folder(path) or path  # a folder's weights file alone: its config.json counts too
    stats = [f.stat() for f in (weights_files(target) if target.is_dir() else [target]) if f.exists()]
    return tuple((st.st_size, st.st_mtime_ns) for st in stats)


def _hf_folder(path: Path) -> Path | None:
    """The Hugging Face folder `path` is, or whose weights file it is."""
    folder = path if path.is_dir() else path.parent if path.name in _HF_WEIGHTS else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


@lru_cache(maxsize=16)
def _spec_of(path: Path, stamps: tuple[tuple[int, int], ...]) -> ModelSpec:
    """The spec of a resolved path. `stamps` (sizes and mtimes) only key the cache: commands
    resolve a model several times (plan, hash, load), and a release file is read to tell
    its layout, but a file rewritten in between must be read again."""
    name = short_name(path)
    folder = _hf_folder(path)
    if folder is not None:
        return _hf_spec(folder, name)
    if path.is_dir():
        raise ConfigError(
            None,
            f"{path}: a folder given as `model` must be a Hugging Face folder "
            f"(config.json beside {' or '.join(_HF_WEIGHTS)})",
        )
    return _file_spec(path, name)


def _ask(path: Path, arch: str = "ARCH") -> str:
    return f"name the architecture: `model` {arch} with `checkpoint` {path}"


# ---------------------------------------------------------------- Hugging Face folders


def _hf_spec(folder: Path, name: str) -> ModelSpec:
    from attnscope.models.converters.hf import BEIT_TYPES, VIT_TYPES

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(None, f"{folder}/config.json cannot be read: {exc}") from exc
    kind = str(config.get("model_type", ""))
    if kind not in _HF_NAMES:
        raise ConfigError(
            None,
            f"{folder}: model_type {kind!r} is not supported; attnscope converts "
            f"{', '.join(VIT_TYPES + BEIT_TYPES)}",
        )
    return ModelSpec(
        name,
        _hf_arch(config, kind),
        _HF_FAMILIES.get(kind, "unknown"),
        f"Hugging Face {kind} folder {folder}",
        path=folder,
    )


def _hf_arch(config: dict[str, Any], kind: str) -> str:
    """The timm name for a folder: the standard one when its width is standard
    (dinov2-small -> vit_small_patch14_dinov2), else the family's name nearest in width.
    Either way config.json's sizes are what is built (`converters.hf.hf_kwargs`); the name
    brings the class and, without preprocessor_config.json, timm's preprocessing."""
    import timm

    exact, family = _HF_NAMES[kind]
    width = int(config.get("hidden_size", 768))
    by_width = sorted(_WIDTHS, key=lambda size: abs(_WIDTHS[size] - width))
    patch, image = config.get("patch_size", 16), config.get("image_size", 224)
    names = [exact.format(size=s, patch=patch, image=image) for s in by_width if _WIDTHS[s] == width]
    names += [family.format(size=s) for s in by_width]
    return next((n for n in names if timm.is_model(n)), family.format(size="base"))


# ---------------------------------------------------------------- checkpoint files


def _file_spec(path: Path, name: str) -> ModelSpec:
    from attnscope.models.converters import recognise

    try:
        raw = open_checkpoint(path)
        converter = recognise(raw)
        if converter is not None:
            return _release_spec(raw, converter, path, name)
        return _state_dict_spec(raw, path, name)
    except ConfigError:
        raise
    except AttnscopeError as exc:  # unreadable, no tensors, colliding keys: still say what to do
        raise ConfigError(None, f"{exc}; to load it into a model timm knows, {_ask(path)}") from exc


def _release_spec(raw: RawCheckpoint, converter: Converter, path: Path, name: str) -> ModelSpec:
    """A family's release file: the alias registered for its width, which carries the
    architecture settings (MoCo v3's heads, BEiT's LayerScale) and the family's preprocessing."""
    width = next(
        (
            int(v.shape[0])
            for k, v in raw.flat().items()
            if k.endswith(("patch_embed.proj.weight", "patch_embed.weight"))
        ),
        None,
    )
    alias = converter.aliases.get(width) if width is not None else None
    if alias is None:
        raise ConfigError(
            None,
            f"{path} has {converter.label}'s layout with embedding width {width}, which no "
            f"{converter.label} alias has; {_ask(path)}",
        )
    notes = f"{converter.label} release file {path}, loaded as {alias}"
    return replace(MODEL_REGISTRY[alias], alias=name, notes=notes, path=path)


def _state_dict_spec(raw: RawCheckpoint, path: Path, name: str) -> ModelSpec:
    """A bare state dict in timm's layout, when its shapes tell the whole architecture."""
    state = generic_conversion(raw).state
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
        raise ConfigError(
            None, f"{path} holds Hugging Face weights: give the folder, with config.json beside them"
        )
    shapes = _shapes(state)
    if shapes is None:
        raise ConfigError(None, f"{path}: no layout attnscope can tell an architecture from; {_ask(path)}")
    if shapes["heads"] is None or "blocks.0.attn.q_bias" not in state:
        what = f"a timm-layout ViT ({_describe(shapes)})"
        if shapes["heads"] is None:
            why = "its weights do not show how many heads it has"
        else:  # qk-norm ViTs show their heads, not their other switches
            why = f"{shapes['heads']} heads, but attnscope reads only BEiT layouts from shapes alone"
        return _refuse(path, what, why, shapes)
    return _beit_spec(state, shapes, path, name)


def _refuse(path: Path, what: str, why: str, shapes: dict[str, Any]) -> ModelSpec:
    import timm

    size = next((s for s, w in _WIDTHS.items() if w == shapes["width"]), None)
    guess = f"vit_{size}_patch{shapes['patch']}_{shapes['image']}"
    arch = guess if size is not None and timm.is_model(guess) else "ARCH"
    same = f" (timm's {guess} has this width and patch size)" if arch != "ARCH" else ""
    raise ConfigError(None, f"{path}: {what} - {why}; {_ask(path, arch)}{same}")


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Width, depth, patch, grid side, heads (None: not shown) of a timm-layout state dict."""
    proj = state.get("patch_embed.proj.weight")
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2] or not blocks:
        return None
    width = int(proj.shape[0])
    table = state.get("blocks.0.attn.relative_position_bias_table")
    q_norm = state.get("blocks.0.attn.q_norm.weight")
    heads = (
        int(table.shape[1])
        if table is not None
        else width // int(q_norm.shape[0])
        if q_norm is not None
        else None
    )
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    side = _grid_side(state, table)
    return {
        "width": width,
        "depth": max(blocks) + 1,
        "patch": int(proj.shape[-1]),
        "side": side,
        "image": side * int(proj.shape[-1]) if side else None,
        "heads": heads,
        "mlp_ratio": int(fc1.shape[0]) / width if fc1 is not None else 4.0,
    }


def _grid_side(state: dict[str, torch.Tensor], table: torch.Tensor | None) -> int | None:
    """The square patch grid the weights were trained at: from the position table (with or
    without its prefix rows), else from the relative table's (2g-1)^2 + 3 rows."""
    prefix = ("cls_token" in state) + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0)
    pos = state.get("pos_embed")
    for rows in [pos.shape[1] - prefix, pos.shape[1]] if pos is not None and pos.ndim == 3 else []:
        if rows > 0 and math.isqrt(rows) ** 2 == rows:
            return math.isqrt(rows)
    if table is not None:
        span = math.isqrt(int(table.shape[0]) - 3)
        if span * span == table.shape[0] - 3 and span % 2:
            return (span + 1) // 2
    return None


def _describe(shapes: dict[str, Any]) -> str:
    side = shapes["side"]
    grid = f", {side}x{side} patches" if side else ""
    return f"width {shapes['width']}, {shapes['depth']} blocks, patch {shapes['patch']}{grid}"


def _beit_spec(state: dict[str, torch.Tensor], shapes: dict[str, Any], path: Path, name: str) -> ModelSpec:
    """timm's Beit with the sizes and switches the weights show (per-block relative tables
    give the heads; stored gammas mean LayerScale; fc_norm means mean pooling)."""
    pooled = "fc_norm.weight" in state
    kwargs = {
        "embed_dim": shapes["width"],
        "depth": shapes["depth"],
        "num_heads": shapes["heads"],
        "patch_size": shapes["patch"],
        "mlp_ratio": shapes["mlp_ratio"],
        "use_abs_pos_emb": "pos_embed" in state,
        "use_rel_pos_bias": True,
        "use_shared_rel_pos_bias": False,
        # the value is any non-zero one: the stored gammas replace it
        "init_values": 0.1 if "blocks.0.gamma_1" in state else None,
        "global_pool": "avg" if pooled else "token",
        "use_fc_norm": pooled,
    }
    if shapes["image"]:
        kwargs["img_size"] = shapes["image"]
    size = min(("base", "large"), key=lambda s: abs(_WIDTHS[s] - shapes["width"]))
    notes = f"timm-layout BEiT state dict {path} ({_describe(shapes)}, {shapes['heads']} heads)"
    return ModelSpec(
        name, f"beit_{size}_patch16_224", "unknown", notes, arch_kwargs=tuple(kwargs.items()), path=path
    )
