"""`attnscope models`: the aliases, their weights' whereabouts, and the tiny test models."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from attnscope.cli.ui import console, handle_errors

if TYPE_CHECKING:
    from rich.table import Table

    from attnscope.models.catalogue import CatalogueEntry

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the list as JSON (one object per model).")]


def _table(title: str, entries: list[CatalogueEntry]) -> Table:
    """Two lines per model (name, then timm name and notes) so 80 columns break no name."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    width = max(len(e.spec.timm_name) for e in entries) + 2
    table = Table(
        title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, show_lines=True
    )
    table.add_column("alias - family / timm name / notes", min_width=width, max_width=max(width, 60))
    table.add_column("input", no_wrap=True)
    table.add_column("cached", no_wrap=True)
    for e in entries:
        cell = Text(e.spec.alias, style="bold")
        if e.also:
            cell.append(f" ({', '.join(e.also)})")
        cell.append(f" - {e.spec.family}", style="magenta")
        if e.spec.timm_name != e.spec.alias:
            cell.append(f"\n{e.spec.timm_name}", style="cyan")
        if e.spec.notes:
            cell.append(f"\n{e.spec.notes}", style="dim")
        size = "x".join(map(str, e.input_size)) if e.input_size else "?"
        table.add_row(cell, size, "file" if e.spec.file_weights else "yes" if e.cached else "no")
    return table


@handle_errors
def models_cmd(as_json: JsonOpt = False) -> None:
    """List model aliases: family, timm name, input size, whether the weights are cached here.

    Any other timm ViT name works too (family `unknown` unless --family is given). Weights
    not in the local Hugging Face cache are downloaded on first use; offline, use
    --checkpoint PATH or --random-init. Weights published as a file (SimMIM, BEiT-v2
    pre-training, CAPI, iBOT, MoCo v3, LUT) are listed with their download link: download
    the file and pass it with --checkpoint under the alias.

    Examples:

      attnscope models

      attnscope models --json | jq '.[] | select(.cached) | .alias'
    """
    from attnscope.models.catalogue import catalogue

    entries = catalogue()
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    for section in ("aliases", "test models"):
        chosen = [e for e in entries if e.section == section]
        title = "attnscope model aliases" if section == "aliases" else "tiny test models (timm names)"
        console.print(_table(title, chosen))
    files = [e for e in entries if e.spec.file_weights]
    if files:  # links in full, one per line (a table cell would fold them)
        console.print(
            "[bold]weights published as files[/] "
            "(download, then e.g. attnscope entropy ALIAS --checkpoint FILE):"
        )
        for e in files:
            kind, _, where = (e.weights or "").partition(":")
            what = where if kind == "url" else f"no public link; ask the authors ({where})"
            checksum = f"  sha256 {e.spec.sha256}" if e.spec.sha256 else ""
            console.print(f"  {e.spec.alias}{checksum}:", highlight=False)
            console.print(f"    {what}", highlight=False, soft_wrap=True)
