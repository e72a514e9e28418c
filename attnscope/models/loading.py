"""Build a model from exactly one weights source, with its data config and provenance."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models.checkpoints import (
    Conversion,
    RawCheckpoint,
    generic_conversion,
    load_state_strict,
    open_checkpoint,
)
from attnscope.models.hub import _create_pretrained, pretrained_source
from attnscope.models.layout import _pair
from attnscope.models.preprocessing import DataConfig, apply_data_config, from_timm, parse_data_config
from attnscope.models.registry import ModelSpec
from attnscope.models.source import own_weights, raw_files, resolve_model

if TYPE_CHECKING:
    from torch import nn

    from attnscope.models.converters import Converter
    from attnscope.models.positions import PositionRule


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
    data_config_source: str = ""  # where the preprocessing came from (alias, tag, recognised layout, option)
    # one-line remarks for the user (settings named in backquotes)
    notices: list[str] = field(default_factory=list)
    # the position terms brought to another grid: rule, its source, from/to grid (None: native)
    positions: dict[str, Any] | None = None

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
            "data_config_source": self.data_config_source or None,
            "checkpoint": self.checkpoint_report or None,
            "init_seed": self.init_seed,
            "positions": self.positions,
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
    data_config: str | None = None,
    position_resize: str = "own",
) -> LoadedModel:
    """Build the model `name` (alias, timm name, or a checkpoint file or Hugging Face folder
    whose architecture can be told, see `source`) in eval mode on the CPU.

    Weights come from exactly one place: a local `checkpoint` (a weights file in any
    family's release layout, or a Hugging Face folder / hub id), random initialisation
    (`random_init`, seeded) or timm's hub loading with the local cache. Never falls back
    from one to another: a researcher must know which weights produced a number.
    `model_kwargs` go to the model constructor (e.g. `depth=2` for tiny test models).
    `data_config` (a timm tag or `mean=...,std=...,crop_pct=...,interpolation=...`)
    overrides the preprocessing the model would otherwise get (see `preprocessing`).
    At an `img_size` whose patch grid differs from the weights', position terms are resized
    by the family's own rule (`position_resize` "own"), or by timm's loader ("timm").
    """
    if checkpoint is not None and random_init:
        raise ConfigError("checkpoint", "and `random_init` exclude each other")
    spec = resolve_model(name, family)
    if spec.path is not None:  # a folder or file given as the model: its weights are the checkpoint
        name, checkpoint = spec.alias, own_weights(spec, checkpoint, random_init)
    if img_size is not None and min(img_size) < 1:
        raise ConfigError("img_size", f"must be positive, got {img_size}")
    raw = open_source(checkpoint) if checkpoint is not None else None
    converter = _converter_for(spec, raw)
    if raw is None and not random_init and spec.file_weights:
        raise ConfigError(None, _file_weights_message(spec))
    kwargs: dict[str, Any] = dict(spec.arch_kwargs)
    if raw is not None and converter is not None:
        kwargs.update(converter.arch_kwargs(raw))
    kwargs.update({**(model_kwargs or {}), "num_classes": 0})
    if img_size is not None:
        kwargs["img_size"] = tuple(img_size)
    rule = position_rule(spec, converter, position_resize)
    init_seed = init_seed_for(seed, spec.alias) if random_init else None
    model, weights, report = _build(
        spec,
        converter,
        kwargs,
        pretrained=raw is None and not random_init,
        seed=seed if init_seed is None else init_seed,
        rule=rule,
    )
    if raw is not None:
        report = _load_weights(model, raw, converter, rule, spec.alias)
        weights = raw.origin
    elif random_init:
        weights = f"RANDOM INIT (seed {seed} -> {init_seed} for {spec.alias}) - not pretrained weights"
    model.eval()
    if not hasattr(model, "blocks"):
        raise AttnscopeError(_not_supported(spec.timm_name, model))
    chosen, notices = choose_data_config(spec, model, converter, raw, data_config, name)
    resized = report.pop("positions", None)  # recorded once, as the model's `positions`
    if resized is not None:
        notices.append(f"{name}: {_describe_resize(resized, position_resize)}")
    apply_data_config(model, chosen)
    cfg = model_data_config(model, img_size)
    return LoadedModel(
        model=model,
        name=name,
        spec=spec,
        weights=weights,
        random_init=random_init,
        input_size=(int(cfg["input_size"][1]), int(cfg["input_size"][2])),
        data_config=cfg,
        checkpoint_report=report if raw is not None else {},
        init_seed=init_seed,
        data_config_source=chosen.source,
        notices=notices,
        positions=resized,
    )


def _describe_resize(resized: Mapping[str, Any], option: str) -> str:
    a, b = resized["from"], resized["to"]
    what = f"position terms resized from the weights' {a[0]}x{a[1]} grid to {b[0]}x{b[1]}"
    if option == "timm":
        return f"{what} by timm's loader, as `position_resize` asks (not the model's own rule)"
    if resized["rule"] == "timm":
        return f"{what} by timm's loader, which is this architecture's own code"
    source = resized["source"].split(":")[0]
    return (
        f"{what} by the {resized['rule']} rule ({source}); `position_resize` timm uses timm's loader instead"
    )


def position_rule(spec: ModelSpec, converter: Converter | None, option: str = "own") -> PositionRule:
    """The rule that brings this model's position terms to another grid.

    "timm" is timm's loader, for comparison. Otherwise the family's own: a Hugging Face
    folder's is transformers'; a release file's is its family's (the converter's); an
    alias's is its family's; any other DINOv2 or EVA-02 architecture's is its family's
    (official DINOv2 weights passed with a timm name); every other timm architecture's own
    code is timm's, so its loader's rule is the model's own.
    """
    from attnscope.models.positions import RESIZE_CHOICES, get_rule

    if option not in RESIZE_CHOICES:
        raise ConfigError("position_resize", f"must be one of {', '.join(RESIZE_CHOICES)}, got {option!r}")
    if option == "timm":
        return get_rule("timm")
    if converter is not None and converter.positions is not None:
        return get_rule(converter.positions)
    if spec.positions is not None:
        return get_rule(spec.positions)
    arch = spec.arch
    if "dinov2" in arch:
        return get_rule("dinov2-reg" if "_reg" in arch else "dinov2")
    if arch.startswith("eva02"):
        return get_rule("eva02")
    return get_rule("timm")


def check_grid(model: nn.Module, img_size: int | tuple[int, int] | None, timm_name: str) -> None:
    """An input size must be a whole number of patches: a remainder would be cropped by some
    patch embeddings (timm's DINOv2 runs 96 px as 84) and refused by others."""
    patch = _pair(getattr(getattr(model, "patch_embed", None), "patch_size", 1))
    if img_size is None:
        return
    for side, p in zip(_pair(img_size), patch, strict=True):
        if side % p:
            lower, upper = side // p * p, (side // p + 1) * p
            near = f"{lower} or {upper}" if lower else str(upper)
            raise ConfigError(
                "img_size",
                f"takes whole patches: {side} px is not a multiple of {timm_name}'s {p}-px patch; use {near}",
            )


def open_source(checkpoint: str | Path) -> RawCheckpoint:
    """A weights file as published, or a Hugging Face folder / hub id."""
    from attnscope.models.converters.hf import is_hf_source, open_hf

    return open_hf(checkpoint) if is_hf_source(checkpoint) else open_checkpoint(checkpoint)


def _converter_for(spec: ModelSpec, raw: RawCheckpoint | None) -> Converter | None:
    """A Hugging Face folder converts as such; otherwise the alias's family layout, or the
    layout the file is recognised as."""
    from attnscope.models.converters import get_converter, recognise

    if raw is not None and raw.hf_config is not None:
        return get_converter("hf")
    if spec.converter is not None:
        return get_converter(spec.converter)
    return recognise(raw) if raw is not None else None


def _file_weights_message(spec: ModelSpec) -> str:
    if spec.weights_url:
        checksum = f" (sha256 {spec.sha256})" if spec.sha256 else ""
        return (
            f"the weights of {spec.alias} are a file on the project page, not on a hub: download "
            f"{spec.weights_url}{checksum} and pass it as `checkpoint` (or use `random_init`)"
        )
    return (
        f"{spec.alias}: the project ({spec.weights_page}) publishes no download link for its weights; "
        "pass the checkpoint you obtained as `checkpoint` (or use `random_init`)"
    )


def _build(
    spec: ModelSpec,
    converter: Converter | None,
    kwargs: dict[str, Any],
    *,
    pretrained: bool,
    seed: int,
    rule: PositionRule,
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The architecture, with hub weights when `pretrained`, else seeded random weights; and
    the position resize the hub weights needed (empty when none)."""
    import timm
    import torch

    weights = ""
    report: dict[str, Any] = {}
    img_size = kwargs.get("img_size")
    try:
        if pretrained and img_size is None:
            model, weights = _create_pretrained(spec.timm_name, kwargs)
        else:
            # unreachable weights fail before any build
            found = pretrained_source(spec.timm_name) if pretrained else None
            torch.manual_seed(seed)
            if converter is not None and converter.build is not None:
                model = converter.build({k: v for k, v in kwargs.items() if k != "num_classes"})
            else:
                # The tagged name keeps that tag's pretrained_cfg; preprocessing is chosen after.
                model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
            check_grid(model, img_size, spec.timm_name)
            if pretrained:
                # timm would resample the positions with its own rule while loading: load the
                # weights at their native size, then bring them over with the family's rule
                native, weights = _create_pretrained(
                    spec.timm_name, {k: v for k, v in kwargs.items() if k != "img_size"}, found
                )
                report = load_state_strict(model, Conversion(native.state_dict()), weights, rule)
                del native
    except TypeError as exc:
        if "img_size" in str(exc):
            raise ConfigError("img_size", f"is not accepted by {spec.timm_name}") from exc
        hint = converter.hint() if converter is not None else ""
        raise AttnscopeError(
            f"{spec.timm_name} cannot hold this checkpoint's layout ({_first(exc)}){hint}"
        ) from exc
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise AttnscopeError(f"cannot build {spec.timm_name}: {_first(exc)}") from exc
    return model, weights, report


def _first(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else repr(exc)


def _load_weights(
    model: nn.Module, raw: RawCheckpoint, converter: Converter | None, rule: PositionRule, name: str
) -> dict[str, Any]:
    """Convert (family layout, or the generic reading) and load strictly, positions resized by
    `rule`; the report lists every source key not used and what else the file carried."""
    conversion = converter.convert(raw, model) if converter is not None else generic_conversion(raw)
    try:
        report = load_state_strict(model, conversion, raw.origin.removeprefix("checkpoint:"), rule)
    except AttnscopeError as exc:
        if converter is None or not converter.aliases:
            raise
        from attnscope.models.converters.base import width_of

        width = width_of(conversion.state)
        alias = converter.aliases.get(width) if width is not None else None
        if alias == name:  # the alias that failed cannot be the advice
            alias = None
        hint = f"; load it with --model {alias}" if alias else ""
        if not alias and width:
            hint = f", width {width}: give --model a timm architecture of that width"
        raise AttnscopeError(f"{exc} (the file has {converter.label}'s layout{hint})") from exc
    report["layout"] = converter.label if converter is not None else "generic"
    report["files"] = [str(p.resolve()) for p in raw_files(raw)]  # what identifies these weights
    report["other_entries"] = raw.extras()
    return report


def choose_data_config(
    spec: ModelSpec,
    model: nn.Module,
    converter: Converter | None,
    raw: RawCheckpoint | None,
    option: str | None,
    name: str,
) -> tuple[DataConfig, list[str]]:
    """The eval preprocessing and, when it was not stated by an alias or a tag, a notice.

    Order: the explicit option; a Hugging Face folder's preprocessor_config.json; the
    alias's family config; the timm tag's; the family the checkpoint is recognised as; the
    architecture's timm default, with a notice saying so.
    """
    base, notices = _default_data_config(spec, model, converter, raw, name)
    if option is not None:
        return parse_data_config(option, base, spec.arch), []
    return base, notices


def _default_data_config(
    spec: ModelSpec, model: nn.Module, converter: Converter | None, raw: RawCheckpoint | None, name: str
) -> tuple[DataConfig, list[str]]:
    own = converter.data_config_of(raw) if converter is not None and raw is not None else None
    if raw is not None and raw.hf_config is not None and own is not None:
        return own, []
    if spec.data_config is not None:
        return spec.data_config.with_source(f"alias {spec.alias}: {spec.data_config.source}"), []
    if "." in spec.timm_name:
        return from_timm(dict(getattr(model, "pretrained_cfg", {}) or {}), f"timm tag {spec.timm_name}"), []
    if own is not None and converter is not None:
        chosen = own.with_source(f"checkpoint recognised as {converter.label}: {own.source}")
        note = f"{name}: checkpoint recognised as {converter.label}; preprocessing {chosen.describe()}"
        return chosen, [note + " (choose another with `data_config`)"]
    chosen = from_timm(dict(getattr(model, "pretrained_cfg", {}) or {}), f"timm default for {spec.arch}")
    if raw is None:
        return chosen, []
    # a Hugging Face folder is recognised; what it lacks is its preprocessing
    what = "checkpoint layout not recognised"
    if raw.hf_config is not None:
        what = f"Hugging Face folder ({raw.hf_config.get('model_type')}) has no preprocessor_config.json"
    return chosen, [
        f"{name}: {what}; normalising with timm's default for {spec.arch} "
        f"({chosen.describe()}); choose another with `data_config`"
    ]


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
