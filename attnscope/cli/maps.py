"""`attnscope maps`: attention maps of one model over images."""

from __future__ import annotations

from typing import Annotated

import typer

from attnscope.cli.options import (
    BatchSizeOpt,
    CheckpointOpt,
    DataConfigOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ImagesOpt,
    ImgSizeOpt,
    MaxImagesOpt,
    ModelArg,
    OptionalModelOpt,
    OutOpt,
    OverwriteOpt,
    PositionResizeOpt,
    RandomInitOpt,
    SeedOpt,
    command_line,
    one_model,
    parse_img_size,
)
from attnscope.cli.ui import CliUI, handle_errors

MAP_PANEL = "Map"  # whose attention, which block and heads, how it is drawn

QueryOpt = Annotated[
    str,
    typer.Option(
        help="Whose attention: cls, mean (average over patch queries) or patch:ROW,COL (0-based grid cell).",
        rich_help_panel=MAP_PANEL,
    ),
]
LayerOpt = Annotated[
    int | None,
    typer.Option(
        help="Block to show (0-based; negative counts from the end). Default: the last.",
        rich_help_panel=MAP_PANEL,
    ),
]
HeadsOpt = Annotated[
    str,
    typer.Option(help="mean, all (a grid of heads) or a list such as 0,3,5.", rich_help_panel=MAP_PANEL),
]
RolloutOpt = Annotated[
    bool,
    typer.Option(
        "--rollout",
        help="Attention rollout through blocks 0..--layer instead of one block.",
        rich_help_panel=MAP_PANEL,
    ),
]
DiscardOpt = Annotated[
    float,
    typer.Option(
        help="With --rollout: zero this fraction of the smallest attention weights per block.",
        rich_help_panel=MAP_PANEL,
    ),
]
UpsampleOpt = Annotated[
    str, typer.Option(help="Map to image: nearest (patch blocks) or bilinear.", rich_help_panel=MAP_PANEL)
]
ContourOpt = Annotated[
    float,
    typer.Option(
        help="Draw the smallest patch set holding this fraction of the mass (0: no contour).",
        rich_help_panel=MAP_PANEL,
    ),
]


@handle_errors
def maps_cmd(
    model_arg: ModelArg = None,
    model_opt: OptionalModelOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    position_resize: PositionResizeOpt = "own",
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = None,
    img_size: ImgSizeOpt = None,
    data_config: DataConfigOpt = None,
    query: QueryOpt = "cls",
    layer: LayerOpt = None,
    heads: HeadsOpt = "mean",
    rollout: RolloutOpt = False,
    discard_ratio: DiscardOpt = 0.0,
    upsample: UpsampleOpt = "nearest",
    contour: ContourOpt = 0.6,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    formats: FormatOpt = None,
) -> None:
    """Attention overlays: one figure per image of where a query token looks.

    Writes one PNG per image (a grid of heads with --heads all), maps.npz with the maps on the
    patch grid, and run.json. The model is named positionally or with --model; both say the same.

    Examples:

      attnscope maps dino --images photos/ --out maps/

      attnscope maps dino --heads all --layer 11 --contour 0.6

      attnscope maps mae --query patch:7,7 --upsample bilinear

      attnscope maps dinov2_reg_vit_base --rollout --discard-ratio 0.9
    """
    from rich.markup import escape

    from attnscope.commands.maps import MapsConfig, run

    config = MapsConfig(
        model=one_model(model_arg, model_opt, "maps"),
        checkpoint=checkpoint,
        images=tuple(images) if images else None,
        out=out,
        overwrite=overwrite,
        random_init=random_init,
        data_config=data_config,
        query=query,
        layer=layer,
        heads=heads,
        rollout=rollout,
        discard_ratio=discard_ratio,
        upsample=upsample,
        contour=contour,
        img_size=parse_img_size(img_size),
        position_resize=position_resize,
        max_images=max_images,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
        formats=tuple(formats or ("png",)),
    )
    ui = CliUI()
    out_dir, _ = run(config, ui, command=command_line())
    ui.print(escape(f"maps: {out_dir}"))
