"""`attnscope probe`: build a ProbeConfig, run `commands.probe`, show the plan, progress and summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from attnscope.cli.options import (
    EXECUTION_PANEL,
    OUTPUT_PANEL,
    CheckpointOpt,
    DataConfigOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ImgSizeOpt,
    OptionalModelOpt,
    OutOpt,
    OverwriteOpt,
    PositionResizeOpt,
    RandomInitOpt,
    SeedOpt,
    WorkersOpt,
    command_line,
    one_model,
    parse_img_size,
    with_flags,
)
from attnscope.cli.ui import CliUI, handle_errors
from attnscope.commands.probe import ProbeConfig, ProbeHooks
from attnscope.errors import AttnscopeError
from attnscope.models.loading import display_name
from attnscope.probe.catalog import registered_aggregators

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

    from attnscope.commands.probe import BankPlan, FeaturePlan, ProbeResult
    from attnscope.probe.train import Recipe

# ProbeConfig fields whose probe flag differs from the shared spelling (`options.flag_for`):
# run.json keeps the field names, so results stay comparable across versions.
PROBE_FLAGS = {
    "batch_size": "--train-batch-size",
    "extract_batch_size": "--batch-size",
    "max_images": "--max-images-per-split",
    "map_images": "--maps",
}
# Deprecated spellings, still accepted (hidden): flag -> (its parameter, the field it sets).
_ALIASES = {
    "--extract-batch-size": ("extract_batch_size_alias", "extract_batch_size"),
    "--max-images": ("max_images_alias", "max_images"),
}

# probe's own help panels, beside the shared ones (options.MODEL_PANEL, ...)
DATA_PANEL = "Probe data"  # the labelled images: where they are, how they are split
HEADS_PANEL = "Heads"  # which aggregators, on which blocks' tokens
TRAINING_PANEL = "Training"  # how the heads are trained
SELECTION_PANEL = "Selection"  # the lr x wd grid and the hold-out that picks a head from it

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="ImageFolder tree: DIR/train/CLASS/ and DIR/val/ (or test/), or DIR/CLASS/ only "
        "(then a stratified --val-fraction split). Default: built-in handwritten digits (no network needed).",
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
TrainDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--train",
        help="Training class folders (with --val, or a split).",
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
ValDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--val",
        help="Evaluation class folders (needs --train).",
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
CsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv",
        help="CSV of path,label[,split] rows (split: train, val or test); paths relative to the file.",
        dir_okay=False,
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="torchvision dataset: cifar10, cifar100, stl10, flowers102, oxford_pets, food101, dtd "
        "(downloaded into --data-root where the network allows).",
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="Folder holding (or receiving) --dataset. Default: ~/.local/share/attnscope/datasets.",
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
ValFractionOpt = Annotated[
    float,
    typer.Option(
        help="Evaluation share when the data has no evaluation split.",
        min=0.0,
        max=0.9,
        rich_help_panel=DATA_PANEL,
    ),
]
HoldoutOpt = Annotated[
    float,
    typer.Option(
        help="Share of the training split held out (stratified, seeded) to select lr / wd. "
        "0: select on training accuracy.",
        min=0.0,
        max=0.9,
        rich_help_panel=SELECTION_PANEL,
    ),
]
ShotsOpt = Annotated[
    int | None,
    typer.Option(
        help="Keep K training images per class (seeded): few-shot probing.",
        min=1,
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
MaxImgOpt = Annotated[
    int | None,
    typer.Option(
        "--max-images-per-split",
        help="At most N images per split (stratified, seeded).",
        min=2,
        show_default=False,
        rich_help_panel=DATA_PANEL,
    ),
]
AggregatorOpt = Annotated[
    str,
    typer.Option(
        "--aggregator",
        "-a",
        help="Comma list of: "
        + "; ".join(f"{name} ({text})" for name, text in registered_aggregators())
        + ".",
        rich_help_panel=HEADS_PANEL,
    ),
]
DepthOpt = Annotated[
    int,
    typer.Option(
        help="AbMILP scorer depth: 1 = one Linear(D,1) (the paper); k adds k-1 Linear(D,D)+ReLU.",
        min=1,
        rich_help_panel=HEADS_PANEL,
    ),
]
RecipeOpt = Annotated[
    str,
    typer.Option(
        help="default: AdamW + lr/wd grid + cosine with warm-up. "
        "paper: the paper's code: LARS, base lr 0.1 x batch/256, batch 16384 (BatchNorm over 2048), "
        "90 epochs, 10 warm-up, no wd, nn.Linear's initialisation of the classifier.",
        rich_help_panel=TRAINING_PANEL,
    ),
]
EpochsOpt = Annotated[
    int | None,
    typer.Option(
        help="Epochs. Default: about 1,000 steps (10-100 epochs); paper: 90.",
        min=1,
        show_default=False,
        rich_help_panel=TRAINING_PANEL,
    ),
]
WarmupOpt = Annotated[
    float | None,
    typer.Option(
        "--warmup-epochs",
        help="Linear warm-up epochs before the cosine decay. Default: 10% of the epochs; paper: 10, "
        "whatever the epoch count (as its code).",
        min=0.0,
        show_default=False,
        rich_help_panel=TRAINING_PANEL,
    ),
]
TrainBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--train-batch-size",
        help="Images per optimizer step. Default 256; paper 16384 (capped at the training set).",
        min=2,
        show_default=False,
        rich_help_panel=TRAINING_PANEL,
    ),
]
LrsOpt = Annotated[
    str | None,
    typer.Option(
        "--lrs",
        help="Comma list of learning rates (paper recipe: base lrs, scaled by batch/256). "
        "Default: 1e-3,3e-3,1e-2,3e-2,1e-1.",
        show_default=False,
        rich_help_panel=SELECTION_PANEL,
    ),
]
WdsOpt = Annotated[
    str | None,
    typer.Option(
        "--wds",
        help="Comma list of weight decays. Default: 1e-4,5e-2 (paper: 0).",
        show_default=False,
        rich_help_panel=SELECTION_PANEL,
    ),
]
PrenormOpt = Annotated[
    bool,
    typer.Option(
        "--prenorm",
        help="Tokens before the model's final norm (the paper's code) instead of after it.",
        rich_help_panel=HEADS_PANEL,
    ),
]
BlocksOpt = Annotated[
    str,
    typer.Option(
        "--blocks",
        help="Which blocks' tokens to probe: last, all, or block numbers counted from 0 as in entropy and "
        "maps (2,5,8,11 on a 12-block ViT; -1 is the last; the paper code's --return_block k > 0 is block "
        "k). One forward fills every block's cache; the heads are trained on each block in turn. Only the "
        "last block gets the final norm.",
        rich_help_panel=HEADS_PANEL,
    ),
]
CurvesOpt = Annotated[
    bool | None,
    typer.Option(
        "--curves/--no-curves",
        help="Measure every head after every epoch on the training images, the hold-out and the "
        "evaluation split (curves.csv, figures/learning_curves; summary: best_epoch, best_epoch_top1, "
        "the paper code's 'Max accuracy'). Default: on, off with --no-cache (each measurement would "
        "run the backbone again).",
        show_default=False,
        rich_help_panel=TRAINING_PANEL,
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Feature cache folder. Default: ~/.cache/attnscope/probe ($ATTNSCOPE_CACHE/probe).",
        show_default=False,
        rich_help_panel=EXECUTION_PANEL,
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Do not cache features: stream the backbone every epoch (for data larger than the disk).",
        rich_help_panel=EXECUTION_PANEL,
    ),
]
ExtractBatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        help="Images per backbone forward (feature extraction, or streaming with --no-cache).",
        min=1,
        rich_help_panel=EXECUTION_PANEL,
    ),
]
AugmentOpt = Annotated[
    int,
    typer.Option(
        "--augment",
        help="Cache K augmented views of every training image (the paper recipe's RandomResizedCrop + "
        "flip, seeded per image and view) and train on one per image each epoch; views already cached "
        "are reused when K grows. 0: the images as they are.",
        min=0,
        rich_help_panel=TRAINING_PANEL,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="Torch threads for feature extraction and training. Default: the CPUs this process may run "
        "on (its affinity), divided among the processes of the node under torchrun. On a shared, busy "
        "machine fewer threads (even 1) can be much faster.",
        min=1,
        show_default=False,
        rich_help_panel=EXECUTION_PANEL,
    ),
]
MapsOpt = Annotated[
    int,
    typer.Option(
        "--maps",
        help="Evaluation images in the AbMILP-vs-\\[cls] figure (0: none).",
        min=0,
        rich_help_panel=OUTPUT_PANEL,
    ),
]
EmbeddingOpt = Annotated[
    str,
    typer.Option(
        "--embedding",
        help="2-D picture of the evaluation images' \\[cls] and mean-patch features of the deepest probed "
        "block, coloured by class (embedding.csv, figures/embedding), with the k-NN accuracy and "
        "silhouette of the full features: tsne (seeded, after PCA to 50 dims), pca, or none. At most "
        "2,000 images (a seeded subsample). Example: --embedding pca",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
OldExtractBatchOpt = Annotated[int | None, typer.Option("--extract-batch-size", hidden=True, min=1)]
OldMaxImgOpt = Annotated[int | None, typer.Option("--max-images", hidden=True, min=2)]


_DEFAULT_MODEL = ProbeConfig.model  # the paper's MAE ViT-B/16
ProbeModelArg = Annotated[
    str | None,
    typer.Argument(
        help=f"Alias, timm name or weights path (or use --model). Default: {_DEFAULT_MODEL}, the paper's.",
        show_default=False,
        metavar="MODEL",
    ),
]


@handle_errors(flags=PROBE_FLAGS)
def probe_cmd(
    ctx: typer.Context,
    model_arg: ProbeModelArg = None,
    model_opt: OptionalModelOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    position_resize: PositionResizeOpt = "own",
    img_size: ImgSizeOpt = None,
    data_config: DataConfigOpt = None,
    data: DataOpt = None,
    train: TrainDirOpt = None,
    val: ValDirOpt = None,
    csv: CsvOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    shots: ShotsOpt = None,
    max_images: MaxImgOpt = None,
    aggregators: AggregatorOpt = "cls,mean,abmilp",
    abmilp_depth: DepthOpt = 1,
    blocks: BlocksOpt = "last",
    prenorm: PrenormOpt = False,
    recipe: RecipeOpt = "default",
    epochs: EpochsOpt = None,
    warmup_epochs: WarmupOpt = None,
    batch_size: TrainBatchOpt = None,
    augment: AugmentOpt = 0,
    curves: CurvesOpt = None,
    lrs: LrsOpt = None,
    wds: WdsOpt = None,
    holdout_fraction: HoldoutOpt = 0.1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    num_workers: WorkersOpt = 0,
    extract_batch_size: ExtractBatchOpt = 64,
    threads: ThreadsOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    map_images: MapsOpt = 6,
    embedding: EmbeddingOpt = "tsne",
    formats: FormatOpt = None,
    extract_batch_size_alias: OldExtractBatchOpt = None,
    max_images_alias: OldMaxImgOpt = None,
) -> None:
    """How much accuracy does selective aggregation of patch tokens recover over \\[cls]?

    Trains probe heads (cls, mean, abmilp, ...) on frozen last-block tokens, each at every point of
    an lr x wd grid, all in one pass over cached features; selects each aggregator's head on a
    hold-out of the training split and reports its evaluation accuracy. The model is named
    positionally or with --model; without either, the paper's MAE ViT-B/16 (mae_vit_base).

    Writes results.csv (every head), summary.csv (the selected head per aggregator), maps.csv,
    embedding.csv, run.json and figures/ (accuracy by aggregator, the lr grid, AbMILP weights beside
    the model's last-block \\[cls] attention, t-SNE of \\[cls] and mean-patch features by class).

    Examples:

      attnscope probe test_vit --random-init --img-size 64   (built-in digits: no data, no network)

      attnscope probe mae --data ~/data/cub --aggregator cls,mean,abmilp,attentive

      attnscope probe mae --dataset cifar100 --data-root ~/datasets --shots 10

      attnscope probe dinov2_vit_base --img-size 224 --train tr/ --val va/ --prenorm --recipe paper
    """
    from attnscope.commands.probe import run

    ui = CliUI()
    config = _config(ctx, ui)  # the parameters above are named as ProbeConfig's fields
    view = _ProbeView(ui)
    try:
        out_dir, result = run(config, ui, hooks=view, command=command_line())
    finally:
        view.close()
    if result is not None:  # torchrun: rank 0 alone shows the result
        _show_result(ui, config, result, out_dir)


def _config(ctx: typer.Context, ui: CliUI) -> ProbeConfig:
    """The ProbeConfig of the parsed options, after the CLI's own parsing and aliases."""
    from attnscope.commands.probe import ProbeConfig

    options = dict(ctx.params)
    options["model"] = one_model(options.pop("model_arg"), options.pop("model_opt"), "probe", _DEFAULT_MODEL)
    for old, (param, name) in _ALIASES.items():
        value = options.pop(param)
        if value is None:
            continue
        new = PROBE_FLAGS[name]
        given = ctx.get_parameter_source(name)  # typer's own click: compare the source by name
        if given is not None and given.name == "COMMANDLINE":
            raise AttnscopeError(f"{old} is the old name of {new}; give {new} only")
        ui.warn(f"{old} is deprecated; use {new}")
        options[name] = value
    options.update(
        img_size=parse_img_size(options["img_size"]),
        lrs=_floats(options["lrs"], "--lrs"),
        wds=_floats(options["wds"], "--wds"),
        formats=tuple(options["formats"] or ("png",)),
    )
    return ProbeConfig(**options)


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AttnscopeError(f"{what} takes a comma list of numbers, got {text!r}") from None
    if not values:
        raise AttnscopeError(f"{what} takes a comma list of numbers, got {text!r}")
    return values


def _pct(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def _num(v: float) -> str:
    return f"{v:g}"


class _ProbeView(ProbeHooks):
    """Shows the plan, the recipe, a training progress bar and notes (on stderr)."""

    def __init__(self, ui: CliUI) -> None:
        self.ui = ui
        self.bar: Any = None
        self.task: Any = None

    def plan(self, plan: FeaturePlan) -> None:
        _show_plan(self.ui, plan)

    def recipe(self, recipe: Recipe, bank: BankPlan) -> None:
        _show_recipe(self.ui, recipe, bank)

    def epoch(self, done: int, total: int) -> None:
        if self.bar is None:
            from attnscope.cli.progress import make_progress

            self.bar = make_progress("training heads (epochs)", self.ui.err, unit="ep")
            self.bar.start()
            self.task = self.bar.add_task("train", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def note(self, text: str) -> None:
        self.ui.err.print(f"note: {with_flags(text, PROBE_FLAGS)}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar = None


def _show_plan(ui: CliUI, plan: FeaturePlan) -> None:
    from attnscope.probe.features import format_bytes

    d = plan.data
    src = (
        d.get("dataset")
        or d.get("data")
        or d.get("csv")
        or d.get("train_dir")
        or d.get("what")
        or d["source"]
    )
    ui.err.print(
        f"data: {src} — {d['num_classes']} classes, {d['train_images']} training images "
        f"({plan.holdout_images} held out for selection), {d['eval_images']} evaluation images "
        f"({d['eval_split']})",
        highlight=False,
    )
    lay = plan.token_layout
    where = f"last block of {plan.model}, {plan.norm}"
    last = plan.num_blocks - 1
    if plan.blocks and plan.blocks != [last]:
        listed = ", ".join(str(b) for b in plan.blocks)
        where = (
            f"blocks {listed} of {plan.model}'s 0 to {last} (the last block: {plan.norm}, the others: "
            "their raw output)"
        )
    if plan.threads:
        where += f"; {plan.threads} torch thread{'s' if plan.threads > 1 else ''}"
    ui.err.print(
        f"features: {where}; {plan.tokens} tokens "
        f"({lay['num_prefix_tokens']} prefix kept out of the patch bag, {lay['grid'][0]}x{lay['grid'][1]} "
        f"patches) x {plan.dim}",
        highlight=False,
    )
    cache = plan.cache
    if cache is None:
        ui.err.print("features: not cached (--no-cache): the backbone runs every epoch", highlight=False)
        return
    todo = cache.bytes_to_write
    state = "complete, reused" if todo == 0 else f"{format_bytes(todo)} to extract"
    per_image = f"{format_bytes(cache.bytes_per_image)} per image"
    if cache.blocks > 1:
        per_image += f" and block, {cache.blocks} blocks"
    ui.err.print(
        f"feature cache: {format_bytes(cache.bytes_total)} fp16 ({per_image}), {state}; "
        f"{format_bytes(cache.disk_free)} free in {cache.folder}",
        highlight=False,
    )


def _show_recipe(ui: CliUI, recipe: Recipe, bank: BankPlan) -> None:
    opt = "LARS (momentum 0.9, trust 0.001)" if recipe.optimizer == "lars" else "AdamW"
    if recipe.classifier_init == "linear_default":
        opt += ", classifier initialised as nn.Linear"
    accum = f" = {recipe.accumulation} x {recipe.micro_batch}" if recipe.accumulation > 1 else ""
    lrs = ", ".join(_num(v) for v in recipe.lrs)
    if recipe.base_lrs:
        lrs += f" (base {', '.join(_num(v) for v in recipe.base_lrs)} x {recipe.batch_size}/256)"
    ui.err.print(
        f"training: {bank.heads} heads ({len(bank.aggregators)} aggregators x {len(recipe.lrs)} lr x "
        f"{len(recipe.wds)} wd) in one pass per epoch; recipe {recipe.name}: {opt}, cosine, "
        f"{recipe.warmup_epochs:g} warm-up epochs",
        highlight=False,
    )
    auto = (
        f" (auto: {recipe.epochs * bank.steps_per_epoch} steps, aiming at 1,000 within 10-100 epochs)"
        if recipe.epochs_auto
        else ""
    )
    if bank.data_parallel:  # torchrun --no-cache: the batch is global, each rank takes a share of it
        lo, hi = bank.data_parallel["images_per_rank_per_step"]
        share = f"{lo}" if lo == hi else f"{lo}-{hi}"
        accum += (
            f", summed over {bank.data_parallel['ranks']} ranks x {share} images "
            "(gradients and BatchNorm statistics all-reduced)"
        )
    ui.err.print(
        f"effective batch size {recipe.batch_size}{accum}; {recipe.epochs} epochs{auto} x "
        f"{bank.steps_per_epoch} steps; learning rates: {lrs}; weight decays: "
        f"{', '.join(_num(v) for v in recipe.wds)}",
        highlight=False,
    )


def _show_result(ui: CliUI, config: ProbeConfig, result: ProbeResult, out_dir: Path) -> None:
    """The summary table, the maps' rank correlations, skipped files and the run folder."""
    name = display_name(result.info["name"], config.random_init)  # a path's short name
    # images actually measured: a streamed split learns of unreadable files only while reading
    summary = result.summary
    n_eval = (
        int(summary["eval_images"].iloc[0]) if "eval_images" in summary else result.info["splits"]["eval"]
    )
    ui.print(_summary_table(summary, f"{name}: probe accuracy on {n_eval} evaluation images"))
    rhos = [m.spearman for m in result.maps if not math.isnan(m.spearman)]
    if rhos:
        shown = ", ".join(f"{r:+.2f}" for r in rhos)
        last = result.info["num_blocks"] - 1
        blocks = result.info["features"].get("blocks") or [last]
        where = "last-block" if blocks[-1] == last else f"block-{blocks[-1]}"
        ui.print(
            f"{result.maps[0].aggregator} weights vs {where} \\[cls] attention, Spearman ρ per image: "
            f"{shown} (mean {sum(rhos) / len(rhos):+.2f})"
        )
    if result.embedding is not None:
        ui.print(_embedding_line(result))
    skipped = len(result.info["images_skipped"])
    if skipped:
        ui.warn(f"{skipped} image(s) skipped; listed in run.json")
    ui.print(f"results: {out_dir}")


def _embedding_line(result: ProbeResult) -> str:
    """One line: how well each token kind's full features cluster by class (figures/embedding)."""
    from attnscope.probe.clusters import TOKEN_LABELS

    emb = result.embedding
    assert emb is not None
    method = "t-SNE" if emb.method == "tsne" else "PCA"
    parts = []
    for kind, score in emb.scores.items():
        sil = "n/a" if score.silhouette != score.silhouette else f"{score.silhouette:+.2f}"
        name = TOKEN_LABELS[kind].replace("[", "\\[")
        parts.append(f"{name}: {score.k}-NN {100 * score.knn_accuracy:.1f}%, silhouette {sil}")
    return (
        f"embedding ({method} of block {emb.block}, {emb.points:,} evaluation images; scores on the full "
        f"features, cosine): " + "; ".join(parts)
    )


def _with_interval(row: Any, column: str, prefix: str) -> str:
    """'69.5' over '63..76' (percent), or the value alone when there is no interval."""
    value = 100 * float(row[column])
    sign = "+" if column.startswith("delta") else ""
    low, high = row.get(f"{prefix}_low"), row.get(f"{prefix}_high")
    if low is None or high is None or low != low:
        return f"{value:{sign}.1f}"
    return f"{value:{sign}.1f}\n[dim]{100 * low:{sign}.0f}..{100 * high:{sign}.0f}[/]"


def _summary_table(summary: pd.DataFrame, title: str) -> Table:
    from rich import box
    from rich.table import Table

    # one space between columns: 80 columns hold the table with every number whole; the caption
    # left-justified, as rich crops a centred caption's longest line to the terminal's width
    table = Table(
        title=title,
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption_justify="left",
    )
    baseline = summary["baseline"].iloc[0] if len(summary) else None
    by_block = "block" in summary and summary["block"].nunique() > 1
    if by_block:
        table.add_column("block", justify="right", no_wrap=True)
    table.add_column("aggregator", no_wrap=True)
    epochs = "best_epoch_top1" in summary and bool(summary["best_epoch_top1"].notna().any())
    for col in ("lr", "wd", "params", "hold", "top-1", "top-5", "best*") + (("max*",) if epochs else ()):
        table.add_column(col, justify="right", no_wrap=True)
    if isinstance(baseline, str):
        table.add_column(f"Δ {baseline}", justify="right", no_wrap=True, min_width=8)
    for _, row in summary.iterrows():
        cells = [
            row["aggregator"], _num(row["lr"]), _num(row["wd"]), f"{int(row['params']):,}",
            _pct(row["holdout_top1"]) if row["selected_on"] == "holdout"
            else f"{_pct(row['train_top1'])} (train)",
            _with_interval(row, "eval_top1", "eval_top1_ci"), _pct(row["eval_top5"]),
            _pct(row["best_over_grid_eval_top1"]),
        ]  # fmt: skip
        if epochs:
            cells.append(f"{_pct(row['best_epoch_top1'])}\n[dim]ep {int(row['best_epoch'])}[/]")
        if by_block:
            cells.insert(0, str(int(row["block"])))
        if isinstance(baseline, str):
            delta = (
                "—"
                if row["aggregator"] == baseline
                else _with_interval(row, "delta_top1_vs_baseline", "delta_ci")
            )
            cells.append(delta)
        table.add_row(*cells)
    table.caption = (
        "hold: hold-out top-1 used for selection; top-1 / top-5: evaluation split (%), under top-1 "
        "its 95% bootstrap interval over the evaluation images (under the gain: the paired one); "
        "best*: best head of the lr x wd grid on the evaluation split itself (optimistic)"
        + (
            "; max*: the selected head's best epoch on the evaluation split, the paper code's "
            "'Max accuracy' (optimistic)"
            if epochs
            else ""
        )
    )
    return table
