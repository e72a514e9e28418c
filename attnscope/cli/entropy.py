"""`attnscope entropy`: one model's per-layer and per-head statistics."""

from __future__ import annotations

from attnscope.cli.options import (
    BatchSizeOpt,
    CheckpointOpt,
    DeviceOpt,
    DtypeOpt,
    FamilyOpt,
    FormatOpt,
    ImagesOpt,
    ImgSizeOpt,
    MaxImagesOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    RandomInitOpt,
    SeedOpt,
    WorkersOpt,
    command_line,
    parse_formats,
    parse_img_size,
)
from attnscope.cli.ui import CliUI, handle_errors
from attnscope.errors import AttnscopeError


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
    from attnscope.commands.entropy import entropy_run

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
