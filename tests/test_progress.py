"""Progress columns: a rate and an ETA even when updates arrive minutes apart."""

from __future__ import annotations

from rich.console import Console

from attnscope.cli.progress import EtaColumn, RateColumn, make_progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _bar(clock: Clock):
    progress = make_progress("test", Console(quiet=True), get_time=clock)
    task_id = progress.add_task("test", total=10)
    return progress, progress.tasks[0], task_id


def test_eta_from_the_average_rate_when_batches_are_minutes_apart():
    clock = Clock()
    progress, task, task_id = _bar(clock)
    assert EtaColumn().render(task).plain == "eta --:--"
    clock.now += 120.0  # one batch of 2 images took two minutes: rich's 30 s window has one sample
    progress.update(task_id, completed=2)
    assert EtaColumn().render(task).plain == "eta 08:00"  # 8 images left at 1 per minute
    assert RateColumn().render(task).plain.strip() == "60.0 s/img"
    clock.now += 480.0
    progress.update(task_id, completed=10)
    assert EtaColumn().render(task).plain.startswith("done in 10:00")


def test_fast_rate_in_images_per_second_and_hours_in_the_eta():
    clock = Clock()
    progress, task, task_id = _bar(clock)
    progress.update(task_id, total=100_000)
    clock.now += 10.0
    progress.update(task_id, completed=25)
    assert RateColumn().render(task).plain.strip() == "2.5 img/s"
    assert EtaColumn().render(task).plain == "eta 11:06:30"
