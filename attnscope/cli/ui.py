"""What the CLI shows a person: one-line errors, progress bars, warnings, tables."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from attnscope import distributed
from attnscope.cli.options import flag_for, resume_command_line, with_flags
from attnscope.errors import AttnscopeError, ConfigError, Interrupted


class OutputConsole(Console):
    """stdout. In a terminal it is rich's console. Elsewhere (a file, a pipe, a SLURM log) its
    width is a guess (80, or $COLUMNS), and rich would cut a table's numbers to `0…` to fit it;
    there each print widens the console as far as the printed thing needs so that nothing is
    cut (its minimum width: whole cells of no-wrap columns, whole words), and text that can
    wrap still wraps at the guess."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.is_terminal or self.quiet or not objects or kwargs.get("width") is not None:
            super().print(*objects, **kwargs)
            return
        from rich.measure import Measurement

        unbounded = self.options.update_width(1_000_000)
        needed = max(Measurement.get(self, unbounded, obj).minimum for obj in objects)
        saved = self._width
        self.width = max(self.width, needed)
        try:
            super().print(*objects, **kwargs)
        finally:
            self._width = saved


console = OutputConsole(stderr=False)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    from rich.markup import escape

    # escaped: messages quote paths and exceptions, e.g. gloo's "[/__w/pytorch/.../pair.cc:561] Connection
    # closed by peer", which rich would otherwise read as a closing tag and fail on
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_message(exc: AttnscopeError, flags: Mapping[str, str] | None = None) -> str:
    """What the CLI says for a user error. A `ConfigError` names config fields (its own, and
    others in backquotes); the CLI says their flags (`flags`: the command's own spellings)."""
    # under torchrun, rank 0's own error reaches here as the RankFailure every rank raises,
    # with the same message; it is worded like the error it carries
    own = exc if isinstance(exc, ConfigError) else exc.__cause__
    if isinstance(own, ConfigError) and str(own) == str(exc):
        return with_flags(own.worded(lambda field: flag_for(field, flags)), flags)
    return str(exc)


def handle_errors(func: F | None = None, *, flags: Mapping[str, str] | None = None) -> Any:
    """User errors become one line and exit 2; Ctrl-C exits 130; bugs keep their traceback.

    `@handle_errors`, or `@handle_errors(flags={field: flag})` for a command whose flags
    for some config fields differ from the shared ones (`flag_for`)."""
    if func is None:
        return functools.partial(handle_errors, flags=flags)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AttnscopeError as exc:
            if distributed.quiet_on_this_rank(exc):  # under torchrun rank 0 prints it once
                raise typer.Exit(2) from None
            raise fail(user_message(exc, flags)) from None
        except Interrupted as exc:  # a command that knows what it committed says so
            what = exc.detail + (f"; to continue: {resume_command_line()}" if exc.resumable else "")
            raise fail(f"interrupted: {what}", 130) from None
        except KeyboardInterrupt:
            raise fail(
                "interrupted; files already written are complete, nothing was half-written", 130
            ) from None
        except MemoryError:
            raise fail("out of memory; lower --batch-size (or --img-size)") from None
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise fail("the device ran out of memory; lower --batch-size (or --img-size)") from None
            lost = distributed.comm_failure_message(exc)  # torchrun: a peer died or a collective timed out
            if lost:
                raise fail(lost) from None
            raise

    return wrapper


def make_progress(label: str):
    """A progress bar with a rate and an ETA, on stderr so stdout stays clean."""
    from attnscope.cli.progress import make_progress as bar

    return bar(label, err_console)


def warn_skip(path: Path, reason: str) -> None:
    err_console.print(f"[yellow]warning:[/] skipped {path}: {reason}", highlight=False, soft_wrap=True)


class CliUI:
    """What the pipeline may show a person: progress, warnings, tables, banners."""

    def __init__(self) -> None:
        # Under torchrun only rank 0 shows anything; the others get consoles that print nothing.
        self.quiet = not distributed.is_main()
        self.console = Console(quiet=True) if self.quiet else console
        self.err = Console(stderr=True, quiet=True) if self.quiet else err_console

    def status(self, text: str):
        return self.err.status(text)

    def progress(self, label: str):
        if self.quiet:
            from rich.progress import Progress

            return Progress(console=self.err)  # a real Progress (start/stop work) that prints nothing
        return make_progress(label)

    def warn(self, text: str) -> None:
        self.err.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    def notice(self, detail: str) -> None:
        from rich.markup import escape

        self.err.print(f"[cyan]note:[/] {escape(with_flags(detail))}", highlight=False, soft_wrap=True)

    def skip(self, path: Path, reason: str) -> None:
        if not self.quiet:
            warn_skip(path, reason)

    def banner(self, text: str) -> None:
        self.err.print(f"[bold white on red] {text} [/]")

    def print(self, *objs: Any) -> None:
        self.console.print(*objs)


# Command groups that live in their own modules (each imports `app` from here and
