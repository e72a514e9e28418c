"""Checks shared by every command's config dataclass, raising `ConfigError` on the field.

Configs are validated where they are built (`__post_init__`), so a bad value fails before
any model is loaded or any file is written, with a message that names the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from attnscope.errors import ConfigError

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
FIGURE_FORMATS: tuple[str, ...] = ("png", "svg", "pdf")
#: The metric families (docs/metrics.md): attention maps and residual ratios, and the tokens.
METRIC_FAMILIES: tuple[str, ...] = ("attention", "tokens")


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(field, f"takes {', '.join(map(str, choices))}, got {value!r}")


def check_at_least(field: str, value: float | None, low: float) -> None:
    """`value >= low` (None passes: an unset optional)."""
    if value is not None and value < low:
        raise ConfigError(field, f"must be at least {low:g}, got {value}")


def check_fraction(field: str, value: float, *, closed: bool = False) -> None:
    """`value` in [0, 1) (or [0, 1] with `closed`)."""
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ConfigError(field, f"must be in [0, 1{']' if closed else ')'}, got {value}")


def check_dtype(value: str, field: str = "dtype") -> None:
    check_choice(field, value, DTYPES)


def normalise_img_size(value: int | Sequence[int] | None, field: str = "img_size") -> tuple[int, int] | None:
    """(H, W) from one side (a square, as notebooks write it) or two; None stays None."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
    ):
        raise ConfigError(field, f"takes one or two positive integers (H, W), got {value!r}")
    return (int(pair[0]), int(pair[1]))


def normalise_formats(values: Iterable[str], field: str = "formats") -> tuple[str, ...]:
    """Lower-cased, without dots, de-duplicated in order; each one png, svg or pdf."""
    formats = [f.lower().lstrip(".") for v in values for f in str(v).split(",") if f]
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise ConfigError(field, f"takes png, svg or pdf, got {', '.join(bad) or 'nothing'}")
    return tuple(dict.fromkeys(formats))


def normalise_families(values: Iterable[str], field: str = "metrics") -> tuple[str, ...]:
    """Metric families named in `values` (comma lists allowed), in the canonical order."""
    named = {f.strip().lower() for v in values for f in str(v).split(",") if f.strip()}
    bad = sorted(named - set(METRIC_FAMILIES))
    if bad or not named:
        raise ConfigError(field, f"takes {', '.join(METRIC_FAMILIES)}, got {', '.join(bad) or 'nothing'}")
    return tuple(f for f in METRIC_FAMILIES if f in named)


def plain(value: Any) -> Any:
    """JSON-ready form of a config value (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def config_dict(config: Any, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """A config dataclass as run.json's `config` block, field by field."""
    assert is_dataclass(config)
    left_out = set(skip)
    return {f.name: plain(getattr(config, f.name)) for f in fields(config) if f.name not in left_out}
