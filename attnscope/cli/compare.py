"""`attnscope compare`: several models on the same images, one report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from attnscope.cli.options import (
    IMAGES_PANEL,
    MODEL_PANEL,
    OUTPUT_PANEL,
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ImagesOpt,
    ImgSizeOpt,
    MaxImagesOpt,
    MetricsOpt,
    OverwriteOpt,
    PositionResizeOpt,
    RandomInitOpt,
    ResumeOpt,
    SeedOpt,
    WorkersOpt,
    command_line,
    parse_img_size,
)
from attnscope.cli.ui import CliUI, handle_errors
from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    from rich.table import Table

    from attnscope.commands.compare import Comparison

ModelsArg = Annotated[
    list[str],
    typer.Argument(
        help="Two or more models: aliases (see `attnscope models`), timm ViT names, or paths of "
        "Hugging Face folders / checkpoint files whose architecture they tell.",
        show_default=False,
    ),
]
CheckpointsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--checkpoint",
        help="NAME=PATH: weights for the model NAME of the list: a file, a Hugging Face folder or hub id "
        "(repeatable, one per model). "
        "With --random-init, models without a checkpoint get random weights (a baseline).",
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
DataConfigsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data-config",
        help="NAME=SPEC: a model's preprocessing, a timm tag or mean=R,G,B,std=R,G,B,crop_pct=F,"
        "interpolation=I (repeatable). Default: its alias's family, its recognised checkpoint family, "
        "else timm's.",
        show_default=False,
        rich_help_panel=IMAGES_PANEL,
    ),
]
FamiliesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--family",
        help="NAME=FAMILY: override a model's family (MIM, JEA, supervised, ...); sets its line style.",
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
CompareOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Report folder. An existing compare folder is refreshed (its runs reused). "
        "Default: a new folder under attnscope-runs/.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
ReuseOpt = Annotated[
    bool,
    typer.Option(
        "--reuse/--no-reuse",
        help="Re-read a model's run in OUT/runs/ when its configuration hash matches instead of recomputing.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
GalleryOpt = Annotated[
    int,
    typer.Option(
        "--gallery", help="Images in the attention gallery (0: none).", min=0, rich_help_panel=OUTPUT_PANEL
    ),
]


def parse_assignments(values: Sequence[str] | None, option: str) -> dict[str, str]:
    """`["a=x", "b=y"]` -> `{"a": "x", "b": "y"}`; each NAME once, both sides non-empty."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target:
            raise AttnscopeError(f"{option} takes NAME=VALUE (e.g. {option} mae=mae.pth), got {value!r}")
        if name in out:
            raise AttnscopeError(f"{option} is given twice for {name!r}")
        out[name] = target
    return out


@handle_errors
def compare_cmd(
    models: ModelsArg,
    checkpoint: CheckpointsOpt = None,
    random_init: RandomInitOpt = False,
    family: FamiliesOpt = None,
    position_resize: PositionResizeOpt = "own",
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = None,
    img_size: ImgSizeOpt = None,
    data_config: DataConfigsOpt = None,
    metrics: MetricsOpt = "attention",
    batch_size: BatchSizeOpt = 16,
    num_workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    out: CompareOutOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    reuse: ReuseOpt = True,
    gallery: GalleryOpt = 4,
    formats: FormatOpt = None,
) -> None:
    """Compare two or more models on the same images: tables, figures and one report.

    Writes layers.csv and heads.csv (every model, with a family column), images.csv (each
    image's values), intervals.csv (95% bootstrap intervals, also of the differences between
    models, which decide the findings), summary.csv (one row per model), run.json, figures/
    and report.html (self-contained) + report.md. Each model's own run is kept in OUT/runs/
    and reused when nothing that changes its numbers changed; Ctrl-C keeps what is committed
    and --resume continues it.

    Examples:

      attnscope compare mae dino --out report/

      attnscope compare mae dinov2 ijepa --img-size 224 --images ~/imagenet/val --max-images 500

      attnscope compare vit_base_patch16_224 dino --checkpoint vit_base_patch16_224=mae.pth --format pdf

      attnscope compare ./dinov2-small/ dino
    """
    from attnscope.commands.compare import CompareConfig, run

    config = CompareConfig(
        models=tuple(models),
        checkpoints=parse_assignments(checkpoint, "--checkpoint"),
        families=parse_assignments(family, "--family"),
        data_configs=parse_assignments(data_config, "--data-config"),
        reuse=reuse,
        overwrite=overwrite,
        resume=resume,
        formats=tuple(formats or ("png",)),
        out=out,
        images=tuple(images) if images else None,
        max_images=max_images,
        img_size=parse_img_size(img_size),
        position_resize=position_resize,
        random_init=random_init,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        metrics=(metrics,),
        gallery=gallery,
    )
    ui = CliUI()
    result = run(config, ui, command=command_line())
    if result is not None:  # torchrun: rank 0 alone reports
        _show_result(ui, result)


def _show_result(ui: CliUI, result: Comparison) -> None:
    """Which runs were reused, the summary table, the findings and where the report is."""
    from rich.markup import escape

    reused = [r.name for r in result.runs if r.status.startswith("reused")]
    if reused:
        ui.print(
            escape(f"reused from {result.out_dir / 'runs'} (same configuration hash): {', '.join(reused)}")
        )
    ui.print(_summary_table(result))
    for sentence in result.findings:
        ui.print(escape(f"• {sentence}"))
    ui.print(escape(f"report: {result.report_html}"))


def _summary_table(result: Comparison) -> Table:
    """Headline numbers per model, narrow enough for an 80-column terminal; missing is —.

    RANDOM WEIGHTS is said in the row of each model that has them, not over the whole table.
    """
    from rich.markup import escape
    from rich.table import Table

    columns = [
        ("cls_self_attn_last", "\\[cls] self\nlast"),
        ("cls_patch_entropy_norm_last", "\\[cls] H/lnN\nlast"),
        ("patch_patch_entropy_norm_mean", "patch H/lnN\nmean"),
        ("attn_distance_px_mean", "dist. px\nmean"),
    ]
    title = f"{len(result.runs)} models, {int(result.summary['num_images'].max())} images"
    table = Table(title=title, header_style="bold")
    table.add_column("model", overflow="fold", min_width=14)
    for _, label in columns:
        table.add_column(label, justify="right", no_wrap=True)
    for _, row in result.summary.iterrows():
        cells = []
        for col, _ in columns:
            v = row[col]
            cells.append("—" if v != v else (f"{v:.1f}" if col.startswith("attn_distance") else f"{v:.3f}"))
        name = (
            f"{escape(str(row['model']))}\n[dim]{escape(str(row['family']))}, {row['num_blocks']} blocks[/]"
        )
        if bool(row["random_init"]):
            name += "\n[bold red]RANDOM WEIGHTS[/]"
        table.add_row(name, *cells)
    return table
