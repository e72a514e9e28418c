"""Atomic file writes: a crash or Ctrl-C leaves the old file or the new one, never half.

Used by the run-folder writer (`results.RunWriter`) and by the probe's feature cache.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of `text` (at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "run"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; results are meant to be shared like any other file
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9]+)$")


def is_stale_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file `atomic_path` made and a killed process left behind."""
    m = _TEMPORARY.match(path.name)
    return m is not None and m.group("suffix") in (Path(m.group("target")).suffix, ".tmp")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what killed writers left in `folder` (and below): only `atomic_path`'s own
    temporary names, never a file a person could have made. Call it when no writer runs."""
    if not folder.is_dir():
        return
    for path in folder.rglob(".*"):
        if path.is_file() and is_stale_temporary(path):
            path.unlink(missing_ok=True)
