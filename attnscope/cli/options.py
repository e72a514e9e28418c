"""Every option shared by several commands, defined once with its help text, and its parsers."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from attnscope.errors import AttnscopeError

# Config fields whose flag is not simply `--` + the field with dashes (see `flag_for`).
_FLAGS: dict[str, str] = {
    "formats": "--format",
    "aggregators": "--aggregator",
    "csv_file": "--csv",
    "models": "MODELS",  # compare's positional model list
    "checkpoints": "--checkpoint",  # compare: NAME=PATH, once per model
    "families": "--family",  # compare: NAME=FAMILY
    "data_configs": "--data-config",  # compare: NAME=SPEC
}


def flag_for(field: str, overrides: Mapping[str, str] | None = None) -> str:
    """The command-line flag that sets the config field `field` (`batch_size` -> `--batch-size`).

    `overrides`: one command's own spellings, for fields whose flag differs in that command."""
    if overrides and field in overrides:
        return overrides[field]
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def with_flags(text: str, overrides: Mapping[str, str] | None = None) -> str:
    """`text` with every config field it names in backquotes (`no_cache`) written as its flag."""
    return _FIELD.sub(lambda m: flag_for(m[1], overrides), text)


# Help panels: `--help` groups each command's options under these headings, a shared option
# under the same one in every command; a command adds panels of its own for its own options.
MODEL_PANEL = "Model"  # which network, with which weights
IMAGES_PANEL = "Images"  # which images, and how they are prepared
EXECUTION_PANEL = "Execution"  # how it runs: device, precision, batches, workers, seed
OUTPUT_PANEL = "Output"  # what is written where
MEASUREMENT_PANEL = "Measurement"  # which statistics (entropy, compare)

_MODEL_HELP = (
    "Alias (see `attnscope models`), any timm ViT name, or the path of a Hugging Face folder "
    "or checkpoint file (its architecture read from it)."
)
# Every command names its model positionally (`attnscope maps mae`), and --model says the same
# thing (`attnscope maps --model mae`); `one_model` reconciles the two.
ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Alias, timm name or weights path (or use --model).",
        show_default=False,
        metavar="MODEL",
    ),
]
OptionalModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help=_MODEL_HELP, show_default=False, rich_help_panel=MODEL_PANEL),
]


def one_model(positional: str | None, option: str | None, command: str, default: str | None = None) -> str:
    """The model named either way (`default` when neither); an error when two different ones
    are given, or none and there is no default."""
    if positional and option and positional != option:
        raise AttnscopeError(f"two models given: {positional!r} and --model {option!r}; give one")
    model = positional or option or default
    if not model:
        raise AttnscopeError(
            f"no model given: name one, e.g. `attnscope {command} mae` (see `attnscope models`)"
        )
    return model


CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        help="Weights for the model: a file (.pth/.pth.tar/.bin/.safetensors, any family's release layout), "
        "a Hugging Face folder (config.json + weights) or hub id (org/name).",
        rich_help_panel=MODEL_PANEL,
    ),
]
RandomInitOpt = Annotated[
    bool,
    typer.Option(
        "--random-init",
        help="Random weights (seeded) - for testing pipelines only.",
        rich_help_panel=MODEL_PANEL,
    ),
]
FamilyOpt = Annotated[
    str | None,
    typer.Option(
        help="Override the family: MIM, 'MIM (fine-tuned)', JEA, supervised, language-supervised.",
        rich_help_panel=MODEL_PANEL,
    ),
]
PositionResizeOpt = Annotated[
    str,
    typer.Option(
        help="How position terms reach an --img-size other than the weights' own: 'own' = the model's "
        "own code (DINOv2's offset rule, MAE's interpolate_pos_embed, BEiT's spline, ...; "
        "docs/models.md), 'timm' = timm's loader, for comparison.",
        rich_help_panel=MODEL_PANEL,
    ),
]
ImagesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--images",
        "-i",
        help="Folder (recursive), image file or glob; repeatable. Default: bundled sample photos.",
        rich_help_panel=IMAGES_PANEL,
    ),
]
MaxImagesOpt = Annotated[
    int | None,
    typer.Option(help="Use at most this many images (after sorting).", min=1, rich_help_panel=IMAGES_PANEL),
]
ImgSizeOpt = Annotated[
    str | None,
    typer.Option(
        help="Run at another input size: H or HxW (e.g. 224 for DINOv2, 320x256).",
        rich_help_panel=IMAGES_PANEL,
    ),
]
DataConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="Preprocessing: a timm pretrained tag (vit_base_patch16_224.mae, or mae) or "
        "mean=R,G,B,std=R,G,B,crop_pct=F,interpolation=bicubic|bilinear. Default: the alias's family, "
        "the recognised checkpoint family, else timm's.",
        show_default=False,
        rich_help_panel=IMAGES_PANEL,
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option(help="Images per forward pass.", min=1, rich_help_panel=EXECUTION_PANEL)
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        help="DataLoader worker processes for decoding images.", min=0, rich_help_panel=EXECUTION_PANEL
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=EXECUTION_PANEL
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Forward precision: float32, bfloat16 or float16 (metrics stay float32).",
        rich_help_panel=EXECUTION_PANEL,
    ),
]
SeedOpt = Annotated[
    int, typer.Option(help="Seed for random init and anything random.", rich_help_panel=EXECUTION_PANEL)
]
MetricsOpt = Annotated[
    str,
    typer.Option(
        help="Metric families, comma-separated: attention (attention maps, residual ratios), tokens "
        "(the block outputs: cosines, norms, outliers, effective rank, frequency; slower, and needed "
        "for compare's CKA). Default: attention.",
        rich_help_panel=MEASUREMENT_PANEL,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output folder. Default: a new folder under attnscope-runs/.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        help="Allow writing into a non-empty --out folder (an interrupted run there starts over).",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the interrupted run in --out from its last committed image "
        "(runs commit every 64 images or 30 s). Not under torchrun.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
FormatOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--format",
        help="Figure formats: png, svg, pdf (repeatable). Default: png.",
        rich_help_panel=OUTPUT_PANEL,
    ),
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


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["attnscope", *sys.argv[1:]])


def resume_command_line() -> str:
    """This command line with --resume (once): what continues an interrupted run."""
    args = list(sys.argv[1:])
    if "--resume" not in args:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in ["attnscope", *args])
