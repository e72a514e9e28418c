"""The Typer app: registers every command; each command lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from attnscope import __version__
from attnscope.cli.cache import cache_app
from attnscope.cli.compare import compare_cmd
from attnscope.cli.entropy import entropy_cmd
from attnscope.cli.maps import maps_cmd
from attnscope.cli.models import models_cmd
from attnscope.cli.probe import probe_cmd
from attnscope.cli.ui import console

app = typer.Typer(
    name="attnscope",
    help=(
        "Look inside Vision Transformers: where \\[cls] and the patches put their attention, "
        "layer by layer and head by head.\n\n"
        "Examples:\n\n"
        "  attnscope models\n\n"
        "  attnscope entropy mae --images photos/ --out runs/mae\n\n"
        "  attnscope entropy vit_small_patch16_224 --checkpoint my.pth --img-size 320x256"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


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


app.command("models")(models_cmd)
app.command("entropy")(entropy_cmd)
app.command("compare")(compare_cmd)
app.command("maps")(maps_cmd)
app.command("probe")(probe_cmd)
app.add_typer(cache_app, name="cache")


def main() -> None:
    app()
