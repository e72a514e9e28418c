"""`attnscope cache list|clear`: the probe's feature caches on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from attnscope.cli.ui import console, handle_errors

cache_app = typer.Typer(
    help="The probe's feature caches: list them with their sizes, or clear them.",
    no_args_is_help=True,
)

CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache folder. Default: $ATTNSCOPE_CACHE/probe, else ~/.cache/attnscope/probe.",
        show_default=False,
    ),
]
OlderThanOpt = Annotated[
    str | None,
    typer.Option("--older-than", help="Only caches unused for this long: 30d, 12h, 90m.", show_default=False),
]


def _root(cache_dir: Path | None) -> Path:
    from attnscope.probe.features import default_cache_dir

    return cache_dir.expanduser() if cache_dir else default_cache_dir()


@cache_app.command("list")
@handle_errors
def list_cmd(
    cache_dir: CacheDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """Every feature cache: model, images, complete or not, size, age.

    Example: attnscope cache list
    """
    from rich.table import Table

    from attnscope.probe.caches import list_caches
    from attnscope.probe.features import format_bytes

    root = _root(cache_dir)
    entries = list_caches(root)
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    table = Table(title=f"feature caches in {root}", title_justify="left", header_style="bold")
    for column in ("folder", "model", "images", "state", "size", "age"):
        table.add_column(column, justify="right" if column in ("images", "size", "age") else "left")
    for e in entries:
        state = "complete" if e.complete else "partial"
        table.add_row(
            e.path.name, e.timm_name, str(e.images), state, format_bytes(e.bytes), f"{e.age_days():.1f} d"
        )
    console.print(table)
    console.print(f"{len(entries)} caches, {format_bytes(sum(e.bytes for e in entries))}")


@cache_app.command("clear")
@handle_errors
def clear_cmd(
    cache_dir: CacheDirOpt = None,
    older_than: OlderThanOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; delete nothing.")] = False,
) -> None:
    """Delete feature caches (all, or those unused for --older-than); a rerun re-extracts them.

    Examples:

      attnscope cache clear --older-than 30d

      attnscope cache clear --dry-run
    """
    from attnscope.probe.caches import list_caches, parse_age, remove_caches
    from attnscope.probe.features import format_bytes

    root = _root(cache_dir)
    days = parse_age(older_than) if older_than is not None else None
    chosen = [e for e in list_caches(root) if days is None or e.age_days() >= days]
    for e in chosen:
        console.print(f"{'would remove' if dry_run else 'removing'} {e.path} ({format_bytes(e.bytes)})")
    size = format_bytes(sum(e.bytes for e in chosen))
    if dry_run:
        console.print(f"{len(chosen)} caches, {size} would be freed")
        return
    console.print(f"{len(chosen)} caches removed, {format_bytes(remove_caches(chosen))} freed")
