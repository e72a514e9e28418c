"""Local weight files: read any common wrapping, load strictly, report what was dropped.

`open_checkpoint` unpickles a release file as published (allowing only the config classes
the official releases pickle beside their weights) into a `RawCheckpoint`; family
converters (`attnscope.models.converters`) read their own layout from it, and
`load_state_strict` loads the result refusing any missing weight.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnscope.models.positions import PositionRule

_WRAPPER_KEYS = ("model", "state_dict", "teacher", "model_ema", "module", "target_encoder", "encoder")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.")
DROP_PREFIXES = ("decoder", "mask_token", "head.", "heads.", "fc_norm_head", "predictor", "projector")


@dataclass
class RawCheckpoint:
    """A weights source as published: the unpickled top-level object and where it came from.

    `obj` is what the file holds (a state dict, or a dict wrapping one beside optimizer
    state and pickled arguments); `hf_config` is config.json for a Hugging Face folder.
    """

    path: Path
    obj: Any
    hf_config: dict[str, Any] | None = None
    origin: str = ""

    @property
    def top(self) -> Mapping[str, Any]:
        return self.obj if isinstance(self.obj, Mapping) else {}

    def section(self, *names: str) -> Mapping[str, Any] | None:
        """The first of `names` that holds a mapping at the top level."""
        for name in names:
            value = self.top.get(name)
            if isinstance(value, Mapping):
                return value
        return None

    def tensors(self, mapping: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of `mapping` (default: the top level), keys unchanged."""
        import torch

        source = self.top if mapping is None else mapping
        return {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}

    def flat(self) -> dict[str, torch.Tensor]:
        """The generic reading: unwrap the usual wrappers, strip the usual prefixes."""
        return flatten_state(self.obj, self.path)

    def extras(self) -> dict[str, str]:
        """Top-level entries that are not weights (epoch, args, optimizer, ...) and their types;
        the weight containers themselves are accounted for key by key."""
        return {
            k: type(v).__name__
            for k, v in self.top.items()
            if not _is_tensor(v) and not (isinstance(v, Mapping) and any(_is_tensor(x) for x in v.values()))
        }


@dataclass
class Conversion:
    """A state dict in the target model's key names and every source key it did not use."""

    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _safe_classes() -> list[Any]:
    """What official releases pickle beside their weights, and nothing else.

    MAE, DINO, iBOT, LUT and BEiT-v2 save their argparse Namespace; SimMIM saves its yacs
    CfgNode, a dict subclass read here as an ordered dict (yacs need not be installed).
    """
    import argparse

    return [argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode")]


def load_file(path: str | Path) -> Any:
    """Unpickle (weights only, allow-listed classes) or read a safetensors file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise AttnscopeError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise AttnscopeError(f"cannot read safetensors checkpoint {path}: {_first_line(exc)}") from exc
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise AttnscopeError(f"cannot read checkpoint {path}: {_unpickle_reason(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_NOT_A_CHECKPOINT = "not a torch checkpoint or safetensors file (unreadable as either)"


def _unpickle_reason(exc: BaseException) -> str:
    """torch's weights-only refusal is a page of text whose first line advises
    `weights_only=False`, which attnscope never does: keep the class it refused, and call a
    file that is no pickle at all what it is."""
    text = str(exc)
    for line in text.splitlines():
        if "Unsupported global" in line or "Can only" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ") + (
                " (attnscope unpickles only tensors, containers, argparse.Namespace and yacs CfgNode)"
            )
    if "Weights only load failed" in text or isinstance(exc, KeyError | EOFError):
        return _NOT_A_CHECKPOINT  # garbage bytes: an unknown opcode, a bad key, a short file
    import pickle

    if isinstance(exc, pickle.UnpicklingError | UnicodeDecodeError):
        return _NOT_A_CHECKPOINT
    return _first_line(exc)


def open_checkpoint(path: str | Path) -> RawCheckpoint:
    """A local weights file as published."""
    return RawCheckpoint(Path(path), load_file(path), origin=f"checkpoint:{Path(path).resolve()}")


def flatten_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap `model`/`state_dict`/`teacher`/..., keep the tensors, strip wrapper prefixes."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise AttnscopeError(f"checkpoint {path} holds no state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if _is_tensor(v)}
    if not state:
        raise AttnscopeError(f"checkpoint {path} holds no tensors")
    return strip_prefixes(state, _PREFIXES, path)


def strip_prefixes(state: dict[str, torch.Tensor], prefixes: Iterable[str], path: Path) -> dict[str, Any]:
    """Strip each prefix from the keys that carry it (DINO keeps `head.*` beside `backbone.*`,
    so "all keys share it" is too strict); refuse if two keys collide."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
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


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weights file into a flat state dict of tensors.

    Accepts .safetensors and torch pickles (.pth/.pt/.bin/.ckpt/.pth.tar), plain or wrapped
    the usual ways (`model`, `state_dict`, `teacher`, ...), with `module.`/`backbone.`/
    `encoder.` prefixes, as MAE's and DINO's official releases are.
    """
    return flatten_state(load_file(path), Path(path))


def generic_conversion(raw: RawCheckpoint) -> Conversion:
    """The flat reading minus decoder/head/mask-token keys, which a backbone never uses."""
    state = raw.flat()
    # timm's filter reads an official DINOv2 file by its `mask_token` (and pops it): an
    # official file with registers needs that cue to become timm's layout
    keep = ("mask_token",) if "register_tokens" in state else ()
    dropped = sorted(k for k in state if k.startswith(DROP_PREFIXES) and k not in keep)
    return Conversion({k: v for k, v in state.items() if k not in dropped}, dropped)


def load_checkpoint_into(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a local checkpoint strictly into `model`; return what was dropped."""
    conversion = generic_conversion(open_checkpoint(path))
    return load_state_strict(model, conversion, str(Path(path).resolve()))


def load_state_strict(
    model: nn.Module, conversion: Conversion, origin: str, rule: PositionRule | None = None
) -> dict[str, Any]:
    """Load converted weights strictly into `model`; return what was dropped.

    Position terms at another grid are first brought to the model's by `rule` (the family's
    own resize, `attnscope.models.positions`; default timm's), so timm's own
    `checkpoint_filter_fn` for the architecture only converts official-format keys. Then any
    missing weight is refused: research code's silent `strict=False` loses LayerScale gammas
    and nobody notices.
    """
    import importlib

    import torch

    from attnscope.models.positions import RULES, resize_positions

    state = dict(conversion.state)
    try:
        resized, resize = resize_positions(state, model, rule or RULES["timm"])
    except AttnscopeError as exc:
        raise AttnscopeError(f"checkpoint {origin}: {exc}") from exc
    state.update(resized)
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None and module.__name__.startswith("timm."):
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001
            raise AttnscopeError(f"checkpoint {origin} does not fit {type(model).__name__}: {exc}") from exc
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    for k in unexpected:
        state.pop(k)
    missing = sorted(k for k in own if k not in state)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise AttnscopeError(f"checkpoint {origin} lacks {len(missing)} weights of the model: {shown}")
    bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape
    ]
    if bad:
        raise AttnscopeError(f"checkpoint {origin} has wrong shapes: {'; '.join(bad[:4])}")
    for key, value in resized.items():  # the filter must not resample them a second time
        if key in state and state[key].shape == value.shape:  # (it may re-lay them: DINOv2-reg)
            state[key] = value
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    report: dict[str, Any] = {
        "path": origin,
        "dropped_keys": sorted(conversion.dropped),
        "unexpected_keys": unexpected,
    }
    if resize is not None:
        report["positions"] = resize.as_dict()
    return report
