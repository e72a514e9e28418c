"""Model registry, weight loading and token layout.

Everything that knows *which* ViT a name means and *how* its tokens are laid out lives
here, so capture and metrics never guess (no `sqrt(N)`, no "token 0 is the class token").
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import torch
    from torch import nn

FAMILIES = ("MIM", "MIM (fine-tuned)", "JEA", "supervised", "language-supervised", "unknown")


@dataclass(frozen=True)
class ModelSpec:
    """One registered alias: the timm name it stands for and what kind of training made it."""

    alias: str
    timm_name: str
    family: str
    notes: str = ""

    @property
    def arch(self) -> str:
        return self.timm_name.split(".", 1)[0]


_SPECS = [
    ModelSpec("mae_vit_base", "vit_base_patch16_224.mae", "MIM", "MAE pre-training, no fine-tuning"),
    ModelSpec("mae_vit_large", "vit_large_patch16_224.mae", "MIM", "MAE pre-training"),
    ModelSpec("mae_vit_huge", "vit_huge_patch14_224.mae", "MIM", "MAE pre-training"),
    ModelSpec("ijepa_vit_huge", "vit_huge_patch14_gap_224.in1k_ijepa", "MIM", "I-JEPA; no class token"),
    ModelSpec(
        "eva02_mim_vit_base", "eva02_base_patch14_224.mim_in22k", "MIM", "EVA-02 MIM; rotary positions"
    ),
    ModelSpec(
        "beitv2_vit_base",
        "beitv2_base_patch16_224.in1k_ft_in22k_in1k",
        "MIM (fine-tuned)",
        "only fine-tuned BEiT-v2 weights are public; relative position bias",
    ),
    ModelSpec("dino_vit_small", "vit_small_patch16_224.dino", "JEA", "DINO"),
    ModelSpec("dino_vit_base", "vit_base_patch16_224.dino", "JEA", "DINO"),
    ModelSpec("dino_vit_small8", "vit_small_patch8_224.dino", "JEA", "DINO, patch 8"),
    ModelSpec("dino_vit_base8", "vit_base_patch8_224.dino", "JEA", "DINO, patch 8"),
    ModelSpec("dinov2_vit_small", "vit_small_patch14_dinov2.lvd142m", "JEA", "DINOv2; LayerScale; 518 px"),
    ModelSpec("dinov2_vit_base", "vit_base_patch14_dinov2.lvd142m", "JEA", "DINOv2; LayerScale; 518 px"),
    ModelSpec("dinov2_vit_large", "vit_large_patch14_dinov2.lvd142m", "JEA", "DINOv2; LayerScale; 518 px"),
    ModelSpec(
        "dinov2_reg_vit_small", "vit_small_patch14_reg4_dinov2.lvd142m", "JEA", "DINOv2 + 4 registers; 518 px"
    ),
    ModelSpec(
        "dinov2_reg_vit_base", "vit_base_patch14_reg4_dinov2.lvd142m", "JEA", "DINOv2 + 4 registers; 518 px"
    ),
    ModelSpec(
        "dinov2_reg_vit_large", "vit_large_patch14_reg4_dinov2.lvd142m", "JEA", "DINOv2 + 4 registers; 518 px"
    ),
    ModelSpec("dinov3_vit_small", "vit_small_patch16_dinov3.lvd1689m", "JEA", "DINOv3; 4 registers; rotary"),
    ModelSpec("dinov3_vit_base", "vit_base_patch16_dinov3.lvd1689m", "JEA", "DINOv3; 4 registers; rotary"),
    ModelSpec(
        "clip_vit_base", "vit_base_patch16_clip_224.openai", "language-supervised", "OpenAI CLIP image tower"
    ),
    ModelSpec(
        "supervised_vit_base",
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "supervised",
        "ImageNet-21k -> 1k supervised (AugReg2)",
    ),
]

MODEL_REGISTRY: dict[str, ModelSpec] = {s.alias: s for s in _SPECS}

# Short names researchers type; each points at a registry entry.
SHORT_ALIASES: dict[str, str] = {
    "mae": "mae_vit_base",
    "ijepa": "ijepa_vit_huge",
    "eva02": "eva02_mim_vit_base",
    "eva02_mim": "eva02_mim_vit_base",
    "beitv2": "beitv2_vit_base",
    "dino": "dino_vit_base",
    "dinov2": "dinov2_vit_base",
    "dinov2_reg": "dinov2_reg_vit_base",
    "dinov3": "dinov3_vit_base",
    "clip": "clip_vit_base",
    "supervised": "supervised_vit_base",
}


def list_model_specs() -> list[ModelSpec]:
    """Registered aliases in display order."""
    return list(_SPECS)


def aliases_of(spec: ModelSpec) -> list[str]:
    return [short for short, full in SHORT_ALIASES.items() if full == spec.alias]


def resolve_model_spec(name: str, family: str | None = None) -> ModelSpec:
    """Map an alias or any timm model name to a ModelSpec.

    Unknown names are checked against timm so a typo fails here, with suggestions,
    instead of deep inside model construction.
    """
    import timm

    if family is not None and family not in FAMILIES:
        raise AttnscopeError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    key = SHORT_ALIASES.get(name, name)
    spec = MODEL_REGISTRY.get(key)
    if spec is None:
        arch = name.split(".", 1)[0]
        if not timm.is_model(arch):
            choices = list(MODEL_REGISTRY) + list(SHORT_ALIASES) + timm.list_models()
            close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise AttnscopeError(
                f"unknown model {name!r}{hint}; see `attnscope models` or any timm model name"
            )
        spec = ModelSpec(alias=name, timm_name=name, family="unknown")
    if family is not None:
        spec = ModelSpec(spec.alias, spec.timm_name, family, spec.notes)
    return spec


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in the sequence: `[cls?] [registers R] [patches P]`.

    Built from the model's own attributes and the real input size, because the papers'
    reference code that assumed `sqrt(N)` grids or a class token at index 0 breaks on
    non-square inputs, registers and I-JEPA.
    """

    has_cls: bool
    num_registers: int
    num_prefix: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def cls_index(self) -> int | None:
        return 0 if self.has_cls else None

    @property
    def register_slice(self) -> slice:
        start = 1 if self.has_cls else 0
        return slice(start, start + self.num_registers)

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_patches)

    def as_dict(self) -> dict[str, Any]:
        return {
            "has_cls": self.has_cls,
            "num_registers": self.num_registers,
            "num_prefix_tokens": self.num_prefix,
            "grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "num_patches": self.num_patches,
            "num_tokens": self.num_tokens,
        }


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def token_layout(model: nn.Module, input_hw: tuple[int, int]) -> TokenLayout:
    """Token layout of `model` for an input of `input_hw` pixels."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "patch_size"):
        raise AttnscopeError(f"{type(model).__name__} has no patch embedding attnscope understands")
    patch = _pair(patch_embed.patch_size)
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid = _pair(patch_embed.dynamic_feat_size(tuple(input_hw)))
    else:
        grid = (input_hw[0] // patch[0], input_hw[1] // patch[1])
    has_cls = getattr(model, "cls_token", None) is not None
    num_prefix = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))
    num_registers = num_prefix - (1 if has_cls else 0)
    if num_registers < 0:
        raise AttnscopeError(
            f"{type(model).__name__}: inconsistent prefix tokens ({num_prefix}) and class token"
        )
    return TokenLayout(has_cls, num_registers, num_prefix, grid, patch)


@dataclass
class LoadedModel:
    """A model ready for analysis and the provenance that goes into run.json."""

    model: nn.Module
    name: str
    spec: ModelSpec
    weights: str
    random_init: bool
    input_size: tuple[int, int]
    data_config: dict[str, Any]
    checkpoint_report: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "timm_name": self.spec.timm_name,
            "family": self.spec.family,
            "weights": self.weights,
            "random_init": self.random_init,
            "input_size": list(self.input_size),
            "num_params": self.num_params,
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()},
            "checkpoint": self.checkpoint_report or None,
        }


# ---------------------------------------------------------------- hub access

_HUB_HINT = (
    "use --checkpoint PATH for a local weights file, or fill the Hugging Face cache "
    "(HF_HOME / HF_HUB_CACHE) on a machine with access and set HF_HUB_OFFLINE=1"
)


def _hub_endpoint_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's minute of retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """Path of the weights file in the local HF cache, if timm's hub source is cached."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    filenames = [pretrained_cfg.get("hf_hub_filename")] if pretrained_cfg.get("hf_hub_filename") else []
    filenames += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    for filename in filenames:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.exists(found):
            return found
    return None


def _create_pretrained(timm_name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    import timm

    arch, _, tag = timm_name.partition(".")
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name if tag else arch)
    except Exception:  # noqa: BLE001 - timm raises various types for unknown tags
        cfg = None
    if cfg is None:
        raise AttnscopeError(
            f"timm has no pretrained weights for {timm_name!r}; use --checkpoint PATH or --random-init"
        )
    cfg_dict = cfg.to_dict()
    hub_id = cfg_dict.get("hf_hub_id")
    source = f"hf-hub:{hub_id}" if hub_id else f"url:{cfg_dict.get('url')}"
    cached = _cached_hub_file(cfg_dict)
    if cached is not None:
        # Loading through the file override keeps timm's own filter/resampling but makes no
        # network request at all, so a cached model works offline.
        model = timm.create_model(
            timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs
        )
        return model, f"{source} (local cache: {cached})"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_endpoint_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise AttnscopeError(f"weights for {timm_name} are not in the local cache and {why}; {_HUB_HINT}")
    try:
        model = timm.create_model(timm_name, pretrained=True, **kwargs)
    except OSError as exc:  # network dropped mid-download, gated repo, ...
        raise AttnscopeError(
            f"could not download weights for {timm_name}: {str(exc).splitlines()[0]}; {_HUB_HINT}"
        ) from exc
    return model, source


# ---------------------------------------------------------------- checkpoints

_WRAPPER_KEYS = ("model", "state_dict", "teacher", "model_ema", "module", "target_encoder", "encoder")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.")
_DROP_PREFIXES = ("decoder", "mask_token", "head.", "heads.", "fc_norm_head", "predictor", "projector")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weights file into a flat state dict of tensors.

    Accepts .safetensors and torch pickles (.pth/.pt/.bin/.ckpt), plain or wrapped the
    usual ways (`model`, `state_dict`, `teacher`, ...), with `module.`/`backbone.`/
    `encoder.` prefixes, as MAE's and DINO's official releases are.
    """
    import argparse

    import torch

    path = Path(path)
    if not path.is_file():
        raise AttnscopeError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise AttnscopeError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    else:
        # Official MAE/DINO training checkpoints pickle their argparse Namespace beside
        # the weights; allow exactly that, nothing else arbitrary.
        torch.serialization.add_safe_globals([argparse.Namespace])
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AttnscopeError(f"cannot read checkpoint {path}: {first}") from exc
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise AttnscopeError(f"checkpoint {path} holds no state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise AttnscopeError(f"checkpoint {path} holds no tensors")
    # Strip wrapper prefixes from the keys that carry them (DINO keeps `head.*` beside
    # `backbone.*`, so "all keys share it" is too strict); refuse if two keys collide.
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if any(k.startswith(prefix) for k in state):
                stripped: dict[str, torch.Tensor] = {}
                for k, v in state.items():
                    new_key = k[len(prefix) :] if k.startswith(prefix) else k
                    if new_key in stripped:
                        raise AttnscopeError(
                            f"checkpoint {path}: key {new_key!r} appears with and without {prefix!r}"
                        )
                    stripped[new_key] = v
                state = stripped
                changed = True
    return state


def load_checkpoint_into(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a local checkpoint strictly into `model`; return what was dropped.

    Runs timm's own `checkpoint_filter_fn` for the architecture (official-format key
    conversion and position-embedding resampling) and then refuses any missing weight:
    research code's silent `strict=False` loses LayerScale gammas and nobody notices.
    """
    import importlib

    import torch

    state = read_checkpoint(path)
    dropped = sorted(k for k in state if k.startswith(_DROP_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(_DROP_PREFIXES)}
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001
            raise AttnscopeError(f"checkpoint {path} does not fit {type(model).__name__}: {exc}") from exc
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    for k in unexpected:
        state.pop(k)
    missing = sorted(k for k in own if k not in state)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise AttnscopeError(f"checkpoint {path} lacks {len(missing)} weights of the model: {shown}")
    bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape
    ]
    if bad:
        raise AttnscopeError(f"checkpoint {path} has wrong shapes: {'; '.join(bad[:4])}")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return {"path": str(Path(path).resolve()), "dropped_keys": dropped, "unexpected_keys": unexpected}


# ---------------------------------------------------------------- entry point


def load_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    img_size: tuple[int, int] | None = None,
    family: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build the model `name` (alias or timm name) in eval mode on the CPU.

    Weights come from exactly one place: a local `checkpoint`, random initialisation
    (`random_init`, seeded) or timm's hub loading with the local cache. Never falls
    back from one to another: a researcher must know which weights produced a number.
    `model_kwargs` go to `timm.create_model` (e.g. `depth=2` for tiny test models).
    """
    import timm
    import torch

    if checkpoint is not None and random_init:
        raise AttnscopeError("--checkpoint and --random-init exclude each other")
    spec = resolve_model_spec(name, family)
    kwargs: dict[str, Any] = {**(model_kwargs or {}), "num_classes": 0}
    if img_size is not None:
        if min(img_size) < 1:
            raise AttnscopeError(f"--img-size must be positive, got {img_size}")
        kwargs["img_size"] = tuple(img_size)
    try:
        if random_init or checkpoint is not None:
            torch.manual_seed(seed)
            # The tagged name keeps that tag's data config (mean/std, crop) for the transform.
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        else:
            model, weights = _create_pretrained(spec.timm_name, kwargs)
    except TypeError as exc:
        if "img_size" in str(exc):
            raise AttnscopeError(f"{spec.timm_name} does not accept --img-size") from exc
        raise
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise AttnscopeError(
            f"cannot build {spec.timm_name}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    report: dict[str, Any] = {}
    if checkpoint is not None:
        report = load_checkpoint_into(model, checkpoint)
        weights = f"checkpoint:{report['path']}"
    elif random_init:
        weights = f"RANDOM INIT (seed {seed}) - not pretrained weights"
    model.eval()
    if not hasattr(model, "blocks"):
        raise AttnscopeError(f"{spec.timm_name} is not a Vision Transformer with attention blocks")

    data_config = model_data_config(model, img_size)
    input_size = (int(data_config["input_size"][1]), int(data_config["input_size"][2]))
    return LoadedModel(
        model=model,
        name=name,
        spec=spec,
        weights=weights,
        random_init=random_init,
        input_size=input_size,
        data_config=data_config,
        checkpoint_report=report,
    )


def model_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """timm's data config, with the input size the model was actually built for.

    `resolve_model_data_config` reports the pretrained tag's size; a model built with
    another `img_size` expects its own (and without dynamic size support accepts no other).
    """
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    if img_size is not None:
        cfg["input_size"] = (3, int(img_size[0]), int(img_size[1]))
        return cfg
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        cfg["input_size"] = (3, *_pair(built))
    return cfg


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit choice must exist."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnscopeError(
            "--device cuda requested but CUDA is not available here; use --device auto or cpu"
        )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AttnscopeError(
            "--device mps requested but Apple MPS is not available here; use --device auto or cpu"
        )
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise AttnscopeError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
