"""`attnscope models`: the alias table."""

from __future__ import annotations

from attnscope.cli.ui import console, handle_errors


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
