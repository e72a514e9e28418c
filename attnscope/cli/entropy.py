"""`attnscope entropy`: one model's per-layer and per-head statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnscope.cli.options import (
    BatchSizeOpt,
    CheckpointOpt,
    DataConfigOpt,
    DeviceOpt,
    DtypeOpt,
    FamilyOpt,
    FormatOpt,
    ImagesOpt,
    ImgSizeOpt,
    MaxImagesOpt,
    MetricsOpt,
    ModelArg,
    OptionalModelOpt,
    OutOpt,
    OverwriteOpt,
    PositionResizeOpt,
    RandomInitOpt,
    ResumeOpt,
    SeedOpt,
    WorkersOpt,
    command_line,
    one_model,
    parse_img_size,
)
from attnscope.cli.ui import CliUI, handle_errors

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table


@handle_errors
def entropy_cmd(
    model_arg: ModelArg = None,
    model_opt: OptionalModelOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    family: FamilyOpt = None,
    position_resize: PositionResizeOpt = "own",
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = None,
    img_size: ImgSizeOpt = None,
    data_config: DataConfigOpt = None,
    metrics: MetricsOpt = "attention",
    batch_size: BatchSizeOpt = 16,
    num_workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    formats: FormatOpt = None,
) -> None:
    """Per-layer and per-head attention statistics of one model.

    Writes layers.csv, heads.csv, images.csv (each image's value per block and metric),
    run.json and figures/ (line plots per metric, layer x head heatmaps), then prints a
    per-layer table. Ctrl-C keeps what is committed; --resume continues from there.
    The model is named positionally or with --model; both say the same.

    Examples:

      attnscope entropy mae_vit_base

      attnscope entropy mae --images ~/imagenet/val --max-images 500 --out runs/mae

      attnscope entropy dinov2_vit_base --img-size 224 --device cuda --dtype bfloat16

      attnscope entropy vit_base_patch16_224 --checkpoint mae_pretrain_vit_base.pth

      attnscope entropy mocov3_vit_small --checkpoint vit-s-300ep.pth.tar

      attnscope entropy ./dinov2-small/
    """
    from attnscope.commands.entropy import EntropyConfig, run
    from attnscope.models import display_name

    model = one_model(model_arg, model_opt, "entropy")
    config = EntropyConfig(
        model=model,
        checkpoint=checkpoint,
        images=tuple(images) if images else None,
        out=out,
        overwrite=overwrite,
        resume=resume,
        random_init=random_init,
        family=family,
        data_config=data_config,
        img_size=parse_img_size(img_size),
        position_resize=position_resize,
        max_images=max_images,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        metrics=(metrics,),
        seed=seed,
        formats=tuple(formats or ("png",)),
    )
    ui = CliUI()
    out_dir, result = run(config, ui, command=command_line())
    if result is None:  # torchrun: rank 0 shows the table
        return
    n_used, n_skipped = len(result.info["images_used"]), len(result.info["images_skipped"])
    name = display_name(result.info["name"], random_init)  # a path's short name
    ui.print(layer_table(result.layers, f"{name}: mean over {n_used} images"))
    if n_skipped:
        ui.warn(f"{n_skipped} file(s) skipped; listed in run.json")
    ui.print(f"results: {out_dir}")


TABLE_METRICS = ("cls_self_attn", "cls_patch_entropy_norm", "patch_patch_entropy_norm", "attn_distance_px")


def layer_table(layers: pd.DataFrame, title: str) -> Table:
    """Rich table of the headline metrics per block; missing metrics shown as a dash."""
    from rich.table import Table

    pivot = layers.pivot_table(index="layer", columns="metric", values="mean", aggfunc="first")
    table = Table(title=title, header_style="bold")
    table.add_column("block", justify="right")
    for m in TABLE_METRICS:
        table.add_column(m, justify="right")
    for layer, row in pivot.iterrows():
        cells = []
        for m in TABLE_METRICS:
            v = row.get(m)
            cells.append("—" if v is None or v != v else (f"{v:.1f}" if m.endswith("_px") else f"{v:.3f}"))
        table.add_row(str(layer), *cells)
    return table
