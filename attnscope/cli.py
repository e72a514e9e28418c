"""The `attnscope` command line: parse, call the library, show progress and tables.

No science lives here. Heavy imports (torch, timm, seaborn) happen inside command bodies
so `attnscope --help` answers instantly.
"""

from __future__ import annotations

import functools
import importlib
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from attnscope import __version__, distributed
from attnscope.errors import AttnscopeError

app = typer.Typer(
    name="attnscope",
    help=(
        "Look inside Vision Transformers: where \\[cls] and the patches put their attention, "
        "layer by layer and head by head.\n\n"
        "Examples:\n\n"
        "  attnscope models\n\n"
        "  attnscope entropy --model mae --images photos/ --out runs/mae\n\n"
        "  attnscope entropy --model vit_small_patch16_224 --checkpoint my.pth --img-size 320x256"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=False)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    from rich.markup import escape

    # escaped: messages quote paths and exceptions, e.g. gloo's "[/__w/pytorch/.../pair.cc:561] Connection
    # closed by peer", which rich would otherwise read as a closing tag and fail on
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """User errors become one line and exit 2; Ctrl-C exits 130; bugs keep their traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AttnscopeError as exc:
            if distributed.quiet_on_this_rank(exc):  # under torchrun rank 0 prints it once
                raise typer.Exit(2) from None
            raise fail(str(exc)) from None
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

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------- shared options

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Alias (see `attnscope models`) or any timm ViT name.", show_default=False
    ),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        help="Local weights (.pth/.pt/.bin/.safetensors) for the architecture of --model.",
        dir_okay=False,
    ),
]
RandomInitOpt = Annotated[
    bool, typer.Option("--random-init", help="Random weights (seeded) - for testing pipelines only.")
]
FamilyOpt = Annotated[
    str | None,
    typer.Option(help="Override the family: MIM, 'MIM (fine-tuned)', JEA, supervised, language-supervised."),
]
ImagesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--images",
        "-i",
        help="Folder (recursive), image file or glob; repeatable. Default: bundled sample photos.",
    ),
]
MaxImagesOpt = Annotated[
    int | None, typer.Option(help="Use at most this many images (after sorting).", min=1)
]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per forward pass.", min=1)]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader worker processes for decoding images.", min=0)]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[
    str, typer.Option(help="Forward precision: float32, bfloat16 or float16 (metrics stay float32).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for random init and anything random.")]
ImgSizeOpt = Annotated[
    str | None, typer.Option(help="Run at another input size: H or HxW (e.g. 224 for DINOv2, 320x256).")
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output folder. Default: a new folder under attnscope-runs/."),
]
OverwriteOpt = Annotated[bool, typer.Option(help="Allow writing into a non-empty --out folder.")]
FormatOpt = Annotated[
    list[str] | None,
    typer.Option("--format", help="Figure formats: png, svg, pdf (repeatable). Default: png."),
]


def parse_img_size(value: str | None) -> tuple[int, int] | None:
    """'224' -> (224, 224); '320x256' or '320,256' -> (320, 256)."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        nums = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise AttnscopeError(f"--img-size takes H or HxW, got {value!r}") from None
    if len(nums) not in (1, 2) or min(nums) < 1:
        raise AttnscopeError(f"--img-size takes H or HxW with positive numbers, got {value!r}")
    return (nums[0], nums[-1])


def parse_formats(values: list[str] | None) -> list[str]:
    formats = [f.lower().lstrip(".") for v in (values or ["png"]) for f in v.split(",") if f]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise AttnscopeError(f"--format takes png, svg or pdf, got {', '.join(bad)}")
    return list(dict.fromkeys(formats))


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["attnscope", *sys.argv[1:]])


def make_progress(label: str):
    """A rich progress bar that shows images/s, on stderr so stdout stays clean."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            # rich needs two samples for a speed; one big batch gives one, so fall back
            speed = (
                task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
            )
            return Text(f"{speed:6.1f} img/s" if speed else "  ... img/s", style="cyan")

    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def warn_skip(path: Path, reason: str) -> None:
    err_console.print(f"[yellow]warning:[/] skipped {path}: {reason}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- commands


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"attnscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Look inside Vision Transformers."""


@app.command("models")
@handle_errors
def models_cmd() -> None:
    """List model aliases: family, timm name, default input size.

    Any other timm ViT name works too (family `unknown` unless --family is given).

    Example: attnscope models
    """
    from rich.table import Table

    from attnscope.models import aliases_of, list_model_specs

    try:
        import timm

        def input_size(name: str) -> str:
            cfg = timm.models.get_pretrained_cfg(name)
            return "x".join(str(v) for v in cfg.input_size[1:]) if cfg is not None else "?"
    except ImportError:  # pragma: no cover

        def input_size(name: str) -> str:
            return "?"

    table = Table(title="attnscope model aliases", header_style="bold")
    table.add_column("alias", no_wrap=True)
    table.add_column("also")
    table.add_column("family")
    table.add_column("timm name", overflow="fold")
    table.add_column("input", no_wrap=True)
    show_notes = console.width >= 110  # narrow terminals: the essentials only
    if show_notes:
        table.add_column("notes", min_width=12)
    for spec in list_model_specs():
        row = [
            spec.alias,
            ", ".join(aliases_of(spec)),
            spec.family,
            spec.timm_name,
            input_size(spec.timm_name),
        ]
        table.add_row(*row, *([spec.notes] if show_notes else []))
    console.print(table)


@app.command("entropy")
@handle_errors
def entropy_cmd(
    model: ModelOpt,
    checkpoint: CheckpointOpt = None,
    images: ImagesOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    random_init: RandomInitOpt = False,
    family: FamilyOpt = None,
    img_size: ImgSizeOpt = None,
    max_images: MaxImagesOpt = None,
    batch_size: BatchSizeOpt = 16,
    num_workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    formats: FormatOpt = None,
) -> None:
    """Per-layer and per-head attention statistics of one model.

    Writes layers.csv, heads.csv, run.json and figures/ (line plots per metric, layer x head
    heatmaps), then prints a per-layer table.

    Examples:

      attnscope entropy --model mae --images ~/imagenet/val --max-images 500 --out runs/mae

      attnscope entropy --model dinov2_vit_base --img-size 224 --device cuda --dtype bfloat16

      attnscope entropy --model vit_base_patch16_224 --checkpoint mae_pretrain_vit_base.pth
    """
    from attnscope.pipeline import entropy_run

    fmts = parse_formats(formats)
    size = parse_img_size(img_size)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise AttnscopeError(f"--dtype takes float32, bfloat16 or float16, got {dtype!r}")
    entropy_run(
        model=model,
        checkpoint=checkpoint,
        images=images,
        out=out,
        overwrite=overwrite,
        random_init=random_init,
        family=family,
        img_size=size,
        max_images=max_images,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        seed=seed,
        formats=fmts,
        command=command_line(),
        ui=CliUI(),
    )


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

    def skip(self, path: Path, reason: str) -> None:
        if not self.quiet:
            warn_skip(path, reason)

    def banner(self, text: str) -> None:
        self.err.print(f"[bold white on red] {text} [/]")

    def print(self, *objs: Any) -> None:
        self.console.print(*objs)


# Command groups that live in their own modules (each imports `app` from here and
# registers with @app.command); importing them here makes every entry point see them.
_COMMAND_MODULES: tuple[str, ...] = (
    "attnscope.cli_compare",
    "attnscope.cli_probe",
)
for _module in _COMMAND_MODULES:
    importlib.import_module(_module)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
