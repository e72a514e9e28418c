"""The eval preprocessing a model is measured with, and where that choice came from.

Every attention statistic depends on the pixels the model sees, so the normalisation,
interpolation and crop are part of the model, never a guess: an alias carries its family's
published eval transform, a checkpoint recognised by its layout (MAE, MoCo v3, ...) brings
its family's, and an explicit `data_config` overrides both. The chosen config is written
onto the model as timm's `pretrained_cfg`, so every transform built from the model
(`timm.data.resolve_model_data_config`) uses it, and run.json records it with its source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from attnscope.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
_KEYS = ("mean", "std", "crop_pct", "interpolation", "crop_mode")
_KEY_AT = re.compile(r"(?:^|[,;\s])(" + "|".join(_KEYS) + r")\s*=")


@dataclass(frozen=True)
class DataConfig:
    """Normalisation, interpolation and crop of the eval transform, and where they came from.

    `crop_pct` is the centre crop as a fraction of the resized shorter side: 0.875 is the
    "resize 256, centre crop 224" of the official eval scripts.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str
    crop_mode: str = "center"
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values = values * 3
            if len(values) != 3:
                raise ConfigError("data_config", f"{name} takes 1 or 3 numbers, got {len(values)}")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ConfigError("data_config", f"std must be positive, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError("data_config", f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                "data_config",
                f"interpolation takes {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}",
            )
        if self.crop_mode not in ("center", "squash", "border"):
            raise ConfigError(
                "data_config", f"crop_mode takes center, squash or border, got {self.crop_mode!r}"
            )

    def timm_fields(self) -> dict[str, Any]:
        """The fields as timm's data config spells them."""
        return {
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "crop_mode": self.crop_mode,
        }

    def describe(self) -> str:
        """One line: 'ImageNet mean/std, bicubic, crop 0.875 (resize 256 / crop 224)'."""
        if self.mean == IMAGENET_MEAN and self.std == IMAGENET_STD:
            norm = "ImageNet mean/std"
        else:
            norm = f"mean {_fmt(self.mean)} std {_fmt(self.std)}"
        resize = round(224 / self.crop_pct)
        return (
            f"{norm}, {self.interpolation}, crop_pct {self.crop_pct:g} (224 px: resize {resize} / crop 224)"
        )

    def with_source(self, source: str) -> DataConfig:
        return replace(self, source=source)


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def imagenet_eval(interpolation: str = "bicubic", source: str = "") -> DataConfig:
    """Resize 256 / centre crop 224 with ImageNet mean/std: what MAE, DINO, iBOT, MoCo v3,
    BEiT-v2, SimMIM, CAPI and LUT evaluate with (MoCo v3 bilinear, the others bicubic)."""
    return DataConfig(IMAGENET_MEAN, IMAGENET_STD, 224 / 256, interpolation, "center", source)


#: OpenAI CLIP's normalisation (clip/clip.py), which EVA-02 also evaluates with by default
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: `data_config` names for a paper's transform, applied to any model (`--data-config beyond_cls`)
PRESETS = {
    "beyond_cls": lambda: imagenet_eval(
        "bicubic",
        "Beyond [cls] code (util/datasets.py build_dataset_v2, every model): resize int(size * 16 / 14), "
        "centre crop, bicubic, ImageNet mean/std",
    ),
    "cl_vs_mim": lambda: imagenet_eval(
        "bilinear",
        "cl-vs-mim notebooks (timm 0.5.4 transforms_imagenet_eval): resize 256, centre crop 224, "
        "bilinear, ImageNet mean/std",
    ),
}


def from_timm(cfg: dict[str, Any], source: str) -> DataConfig:
    """A DataConfig from a timm data/pretrained config dict."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return DataConfig(
        tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
        float(cfg.get("crop_pct") or 0.875),
        str(cfg.get("interpolation") or "bicubic"),
        str(cfg.get("crop_mode") or "center"),
        source,
    )


def parse_data_config(text: str, base: DataConfig, arch: str) -> DataConfig:
    """`--data-config` / `data_config`: a paper's preset (`PRESETS`), a timm pretrained tag or
    explicit fields.

    A tag is a full timm name (`vit_base_patch16_224.mae`) or a tag of the model's own
    architecture (`mae`); explicit fields are `mean=0.485,0.456,0.406,std=...,crop_pct=0.875,
    interpolation=bicubic` (any subset; the rest comes from `base`).
    """
    text = text.strip()
    if not text:
        raise ConfigError("data_config", "is empty")
    if text in PRESETS:
        return PRESETS[text]()
    if "=" not in text:
        return _from_tag(text, arch)
    found = list(_KEY_AT.finditer(text))
    if not found or found[0].start() != 0 and text[: found[0].start()].strip(" ,;"):
        raise ConfigError("data_config", f"takes a timm tag or {'=..., '.join(_KEYS[:4])}=..., got {text!r}")
    fields: dict[str, Any] = {}
    for i, match in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        key, value = match.group(1), text[match.end() : end].strip(" ,;")
        if key in fields:
            raise ConfigError("data_config", f"gives {key} twice")
        fields[key] = _value(key, value)
    return replace(base, **fields, source=f"data_config {text!r}")


def _value(key: str, value: str) -> Any:
    if key in ("interpolation", "crop_mode"):
        return value.lower()
    try:
        numbers = [float(v) for v in re.split(r"[,\s/]+", value) if v]
    except ValueError:
        raise ConfigError("data_config", f"{key} takes numbers, got {value!r}") from None
    if not numbers:
        raise ConfigError("data_config", f"{key} has no value")
    if key == "crop_pct":
        if len(numbers) != 1:
            raise ConfigError("data_config", f"crop_pct takes one number, got {value!r}")
        return numbers[0]
    return tuple(numbers)


def _from_tag(tag: str, arch: str) -> DataConfig:
    import timm

    names = [tag] if "." in tag else [f"{arch}.{tag}", tag]
    for name in names:
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - timm raises various types for unknown names
            cfg = None
        if cfg is not None and ("." in name or name != arch):
            return from_timm(cfg.to_dict(), f"data_config: timm tag {name}")
    raise ConfigError(
        "data_config",
        f"{tag!r} is neither a timm pretrained tag (e.g. vit_base_patch16_224.mae, or mae for {arch}) "
        "nor mean=...,std=...,crop_pct=...,interpolation=...",
    )


def apply_data_config(model: nn.Module, config: DataConfig) -> None:
    """Make `config` the model's own: timm's resolvers read `pretrained_cfg` (and
    `default_cfg`), so every eval transform built from this model follows it."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(config.timm_fields())
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg  # type: ignore[assignment]
