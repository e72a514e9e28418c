"""What `attnscope models` lists: every alias with its input size and whether its weights
are already on this machine (the local Hugging Face cache), plus the tiny test models.
Aliases whose weights are a file on a project page list its download link instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnscope.models.hub import _cached_hub_file
from attnscope.models.registry import TEST_MODELS, ModelSpec, aliases_of, list_model_specs


@dataclass(frozen=True)
class CatalogueEntry:
    spec: ModelSpec
    also: tuple[str, ...]
    input_size: tuple[int, int] | None
    weights: str | None  # hf-hub:<id> or url:<...>; None when timm knows no pretrained weights
    cached: bool
    section: str  # "aliases" or "test models"

    def as_dict(self) -> dict[str, Any]:
        return {
            "alias": self.spec.alias,
            "also": list(self.also),
            "family": self.spec.family,
            "timm_name": self.spec.timm_name,
            "input_size": list(self.input_size) if self.input_size else None,
            "weights": self.weights,
            "cached": self.cached,
            "notes": self.spec.notes,
            "section": self.section,
            "checkpoint_layout": self.spec.converter,
            "sha256": self.spec.sha256,
        }


def _entry(spec: ModelSpec, section: str) -> CatalogueEntry:
    import timm

    if spec.file_weights:
        link = f"url:{spec.weights_url}" if spec.weights_url else f"page:{spec.weights_page}"
        return CatalogueEntry(spec, tuple(aliases_of(spec)), (224, 224), link, False, section)

    try:
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    except Exception:  # noqa: BLE001 - timm raises various types for unknown tags
        cfg = None
    size, weights, cached = None, None, False
    if cfg is not None:
        size = (int(cfg.input_size[1]), int(cfg.input_size[2]))
        as_dict = cfg.to_dict()
        hub_id, url = as_dict.get("hf_hub_id"), as_dict.get("url")
        weights = f"hf-hub:{hub_id}" if hub_id else (f"url:{url}" if url else None)
        cached = _cached_hub_file(as_dict) is not None
    return CatalogueEntry(spec, tuple(aliases_of(spec)), size, weights, cached, section)


def catalogue() -> list[CatalogueEntry]:
    """Every registered alias, then the tiny test models, in display order."""
    return [_entry(s, "aliases") for s in list_model_specs()] + [
        _entry(s, "test models") for s in TEST_MODELS
    ]
