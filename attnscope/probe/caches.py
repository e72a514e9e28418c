"""The probe's feature caches on disk: what is there, how big, how old; and removing them.

Each cache is one folder `<model>-<split>-<key>` under the cache directory, with its
`key.json` (what the features depend on), shard files and, once complete, `index.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnscope.errors import ConfigError


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    timm_name: str
    images: int
    complete: bool
    bytes: int
    modified: float  # seconds since the epoch, newest file in the folder

    def age_days(self, now: float | None = None) -> float:
        return ((now or time.time()) - self.modified) / 86400

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "timm_name": self.timm_name,
            "images": self.images,
            "complete": self.complete,
            "bytes": self.bytes,
            "modified": self.modified,
        }


def _entry(folder: Path) -> CacheEntry | None:
    try:
        key = json.loads((folder / "key.json").read_text(encoding="utf-8"))
        files = [p for p in folder.iterdir() if p.is_file()]
        stats = [p.stat() for p in files]
    except (OSError, ValueError):
        return None  # not a cache folder (or one being deleted)
    material = key.get("material", {})
    return CacheEntry(
        path=folder,
        timm_name=str(material.get("timm_name", "?")),
        images=int(material.get("num_images", 0)),
        complete=(folder / "index.json").is_file(),
        bytes=sum(s.st_size for s in stats),
        modified=max((s.st_mtime for s in stats), default=0.0),
    )


def list_caches(cache_dir: str | Path) -> list[CacheEntry]:
    """Every feature cache under `cache_dir`, oldest first (none if the folder does not exist)."""
    root = Path(cache_dir).expanduser()
    if not root.is_dir():
        return []
    entries = [e for e in (_entry(p) for p in sorted(root.iterdir()) if p.is_dir()) if e is not None]
    return sorted(entries, key=lambda e: e.modified)


def parse_age(text: str) -> float:
    """'30d', '12h', '90m' or a plain number of days -> days."""
    units = {"d": 1.0, "h": 1 / 24, "m": 1 / 1440}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "d")
    try:
        days = float(value) * units[unit]
    except ValueError:
        raise ConfigError("older_than", f"takes an age such as 30d, 12h or 90m, got {text!r}") from None
    if days < 0:
        raise ConfigError("older_than", f"must not be negative, got {text!r}")
    return days


def remove_caches(entries: list[CacheEntry]) -> int:
    """Delete the cache folders; returns the bytes freed."""
    freed = 0
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():
            freed += entry.bytes
    return freed
