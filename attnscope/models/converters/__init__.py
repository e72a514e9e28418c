"""Checkpoint layouts of the papers' model families, one module per family.

`CONVERTERS` maps a converter name to its record (`base.Converter`); `recognise(raw)` finds
the layout of a file. Order matters only where layouts nest: the specific ones (MoCo v3's
two encoders, SimMIM's `encoder.` + shared table, LUT's MAE layout + projection heads) are
tried before the general ones (MAE).
"""

from __future__ import annotations

from attnscope.errors import AttnscopeError
from attnscope.models.checkpoints import RawCheckpoint
from attnscope.models.converters.base import Converter
from attnscope.models.converters.beit import BEITV2, SIMMIM
from attnscope.models.converters.capi import CAPI
from attnscope.models.converters.hf import HF
from attnscope.models.converters.vit import DINO, IBOT, LUT, MAE, MOCOV3

_ORDER = (HF, CAPI, MOCOV3, SIMMIM, BEITV2, LUT, IBOT, DINO, MAE)
CONVERTERS: dict[str, Converter] = {c.name: c for c in _ORDER}


def get_converter(name: str) -> Converter:
    try:
        return CONVERTERS[name]
    except KeyError:
        raise AttnscopeError(f"unknown checkpoint layout {name!r}; known: {', '.join(CONVERTERS)}") from None


def recognise(raw: RawCheckpoint) -> Converter | None:
    """The family layout `raw` has, or None when it is none of the known ones."""
    for converter in _ORDER:
        try:
            if converter.recognise(raw):
                return converter
        except AttnscopeError:
            continue
    return None


__all__ = ["CONVERTERS", "Converter", "get_converter", "recognise"]
