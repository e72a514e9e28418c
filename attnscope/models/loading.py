"""Build a model from exactly one weights source, with its data config and provenance."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models.checkpoints import load_checkpoint_into
from attnscope.models.hub import _create_pretrained
from attnscope.models.layout import _pair
from attnscope.models.registry import ModelSpec, resolve_model_spec

if TYPE_CHECKING:
    from torch import nn


def init_seed_for(seed: int, alias: str) -> int:
    """The torch seed of a model's random weights: `seed` and the resolved name together, so
    two models of one architecture (mae and dino are both ViT-B/16) never draw the same
    weights by accident, while a rerun with the same seed draws them again."""
    digest = hashlib.sha256(f"{seed}:{alias}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def display_name(name: str, random_init: bool) -> str:
    """The name shown beside any number: a random-weights model is never shown as pretrained."""
    return f"{name} (RANDOM WEIGHTS)" if random_init else name


def random_weights_warning(name: str, seed: int, what: str = "numbers") -> str:
    """The one-line banner a command shows before measuring a random-weights model."""
    return f"{name}: RANDOM WEIGHTS (seed {seed}) - these {what} say nothing about a pretrained model"


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
    init_seed: int | None = None  # the torch seed random weights were drawn with

    @property
    def label(self) -> str:
        return display_name(self.name, self.random_init)

    @property
    def num_blocks(self) -> int:
        return len(cast(Sized, self.model.blocks))

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
            "init_seed": self.init_seed,
        }


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
        raise ConfigError("checkpoint", "and `random_init` exclude each other")
    spec = resolve_model_spec(name, family)
    kwargs: dict[str, Any] = {**(model_kwargs or {}), "num_classes": 0}
    if img_size is not None:
        if min(img_size) < 1:
            raise ConfigError("img_size", f"must be positive, got {img_size}")
        kwargs["img_size"] = tuple(img_size)
    init_seed = init_seed_for(seed, spec.alias) if random_init else None
    try:
        if random_init or checkpoint is not None:
            torch.manual_seed(seed if init_seed is None else init_seed)
            # The tagged name keeps that tag's data config (mean/std, crop) for the transform.
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        else:
            model, weights = _create_pretrained(spec.timm_name, kwargs)
    except TypeError as exc:
        if "img_size" in str(exc):
            raise ConfigError("img_size", f"is not accepted by {spec.timm_name}") from exc
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
        weights = f"RANDOM INIT (seed {seed} -> {init_seed} for {spec.alias}) - not pretrained weights"
    model.eval()
    if not hasattr(model, "blocks"):
        raise AttnscopeError(_not_supported(spec.timm_name, model))

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
        init_seed=init_seed,
    )


def _not_supported(timm_name: str, model: nn.Module) -> str:
    """Why a timm model that is not a plain ViT cannot be measured, in one line."""
    if any(hasattr(m, "window_size") for m in model.modules()):
        return (
            f"{timm_name} uses windowed attention (Swin-style): each map covers a local window, not "
            "the whole image, so the global [cls]/patch statistics do not apply; attnscope supports "
            "ViTs with global attention"
        )
    return f"{timm_name} is not a Vision Transformer with attention blocks"


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
