"""Local weight files: read any common wrapping, load strictly, report what was dropped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import torch
    from torch import nn

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
