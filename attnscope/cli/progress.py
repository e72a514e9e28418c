"""Progress bars with a rate and an ETA that work when updates arrive seconds apart.

rich's own speed and time-remaining columns estimate from the updates of the last 30 s;
a ViT-H batch on a CPU can take longer than that, which leaves them at `-:--:--` for a
whole run. These columns use the average since the task started instead, which is what a
steady loop of equal batches needs.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


def _average_rate(task: Task) -> float | None:
    if task.finished_speed:
        return task.finished_speed
    elapsed = task.elapsed
    if not task.completed or not elapsed:
        return None
    return task.completed / elapsed


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item, when slower than one a second)."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = _average_rate(task)
        if rate is None:
            return Text(f"  ... {self.unit}/s", style="cyan")
        if rate >= 1:
            return Text(f"{rate:6.1f} {self.unit}/s", style="cyan")
        return Text(f"{1 / rate:6.1f} s/{self.unit}", style="cyan")


class EtaColumn(ProgressColumn):
    """Time left at the average rate so far; the elapsed time once finished."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(f"done in {_clock(task.finished_time or task.elapsed or 0.0)}", style="green")
        rate = _average_rate(task)
        if rate is None or task.total is None:
            return Text("eta --:--", style="yellow")
        return Text(f"eta {_clock((task.total - task.completed) / rate)}", style="yellow")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def make_progress(label: str, console: Console, *, unit: str = "img", **kwargs: Any) -> Progress:
    """A bar with count, rate, elapsed time and ETA, on `console` (stderr keeps stdout clean)."""
    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        EtaColumn(),
        console=console,
        transient=False,
        **kwargs,
    )
