"""The interface through which a command shows a person anything.

Commands take a `ui` argument; the CLI passes a rich implementation, notebooks and tests
get `NullUI`, which shows nothing, so library code never prints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol


class UI(Protocol):
    """What a command may show: a status line, progress bars, warnings, banners, tables."""

    def status(self, text: str) -> Any: ...
    def progress(self, label: str) -> Any: ...
    def warn(self, text: str) -> None: ...
    def notice(self, detail: str) -> None: ...
    def skip(self, path: Path, reason: str) -> None: ...
    def banner(self, text: str) -> None: ...
    def print(self, *objs: Any) -> None: ...


class NullUI:
    """Shows nothing."""

    def status(self, text: str):
        return contextlib.nullcontext()

    def progress(self, label: str):
        return _NullProgress()

    def warn(self, text: str) -> None:
        pass

    def notice(self, detail: str) -> None:
        """A library remark whose backquoted settings the CLI spells as flags."""

    def skip(self, path: Path, reason: str) -> None:
        pass

    def banner(self, text: str) -> None:
        pass

    def print(self, *objs: Any) -> None:
        pass


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass
