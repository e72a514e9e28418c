"""`attnscope probe`: parse, call attnscope.probe.run, show the plan, progress and the summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from attnscope.cli.options import (
    CheckpointOpt,
    DataConfigOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    ImgSizeOpt,
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
from attnscope.models.loading import display_name, random_weights_warning

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="ImageFolder tree: DIR/train/<class>/ and DIR/val/ (or test/), or DIR/<class>/ only "
        "(then a stratified --val-fraction split). Default: built-in handwritten digits (no network needed).",
        show_default=False,
    ),
]
TrainDirOpt = Annotated[
    Path | None,
    typer.Option("--train", help="Training class folders (with --val, or a split).", show_default=False),
]
ValDirOpt = Annotated[
    Path | None, typer.Option("--val", help="Evaluation class folders (needs --train).", show_default=False)
]
CsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv",
        help="CSV of path,label[,split] rows (split: train, val or test); paths relative to the file.",
        dir_okay=False,
        show_default=False,
    ),
]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="torchvision dataset: cifar10, cifar100, stl10, flowers102, oxford_pets, food101, dtd "
        "(downloaded into --data-root where the network allows).",
        show_default=False,
    ),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="Folder holding (or receiving) --dataset. Default: ~/.local/share/attnscope/datasets.",
        show_default=False,
    ),
]
ValFractionOpt = Annotated[
    float, typer.Option(help="Evaluation share when the data has no evaluation split.", min=0.0, max=0.9)
]
HoldoutOpt = Annotated[
    float,
    typer.Option(
        help="Share of the training split held out (stratified, seeded) to select lr / wd. 0: select on training accuracy.",
        min=0.0,
        max=0.9,
    ),
]
ShotsOpt = Annotated[
    int | None,
    typer.Option(
        help="Keep K training images per class (seeded): few-shot probing.", min=1, show_default=False
    ),
]
MaxImgOpt = Annotated[
    int | None,
    typer.Option(help="At most N images per split (stratified, seeded).", min=2, show_default=False),
]
AggregatorOpt = Annotated[
    str,
    typer.Option(
        "--aggregator", "-a", help="Comma list of: cls, mean, cls_mean, abmilp, abmilp_gated, attentive."
    ),
]
DepthOpt = Annotated[
    int,
    typer.Option(
        help="AbMILP scorer depth: 1 = one Linear(D,1) (the paper); k adds k-1 Linear(D,D)+ReLU.", min=1
    ),
]
RecipeOpt = Annotated[
    str,
    typer.Option(
        help="default: AdamW + lr/wd grid + cosine with warm-up. paper: LARS, base lr 0.1 x batch/256, 90 epochs, 10 warm-up, no wd."
    ),
]
EpochsOpt = Annotated[
    int | None,
    typer.Option(
        help="Epochs. Default: about 1,000 steps (10-100 epochs); paper: 90.", min=1, show_default=False
    ),
]
TrainBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Images per optimizer step. Default 256; paper 16384 (capped at the training set).",
        min=2,
        show_default=False,
    ),
]
LrsOpt = Annotated[
    str | None,
    typer.Option(
        "--lrs",
        help="Comma list of learning rates (paper recipe: base lrs, scaled by batch/256). Default: 1e-3,3e-3,1e-2,3e-2,1e-1.",
        show_default=False,
    ),
]
WdsOpt = Annotated[
    str | None,
    typer.Option(
        "--wds", help="Comma list of weight decays. Default: 1e-4,5e-2 (paper: 0).", show_default=False
    ),
]
PrenormOpt = Annotated[
    bool,
    typer.Option(
        "--prenorm", help="Tokens before the model's final norm (the paper's code) instead of after it."
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Feature cache folder. Default: ~/.cache/attnscope/probe ($ATTNSCOPE_CACHE/probe).",
        show_default=False,
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Do not cache features: stream the backbone every epoch (for data larger than the disk).",
    ),
]
ExtractBatchOpt = Annotated[
    int,
    typer.Option(
        help="Images per backbone forward (feature extraction, or streaming with --no-cache).", min=1
    ),
]
MapsOpt = Annotated[
    int, typer.Option("--maps", help="Evaluation images in the AbMILP-vs-[cls] figure (0: none).", min=0)
]


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


class _StageProgress:
    """One rich progress bar per stage (feature extraction per split, then training)."""

    def __init__(self, ui: CliUI) -> None:
        self.ui = ui
        self.stage: str | None = None
        self.progress = None
        self.task = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            if stage == "train":
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    TextColumn("[bold]training heads[/] epoch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=self.ui.err,
                )  # fmt: skip
            else:
                self.progress = self.ui.progress(stage)
            self.progress.start()
            self.task = self.progress.add_task(stage, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress = None


def _show_plan(ui: CliUI, plan: dict[str, Any]) -> None:
    from attnscope.probe.features import format_bytes

    d = plan["data"]
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
        f"({plan['holdout_images']} held out for selection), {d['eval_images']} evaluation images ({d['eval_split']})",
        highlight=False,
    )
    lay = plan["token_layout"]
    ui.err.print(
        f"features: last block of {plan['model']}, {plan['norm']}; {plan['tokens']} tokens "
        f"({lay['num_prefix_tokens']} prefix kept out of the patch bag, {lay['grid'][0]}x{lay['grid'][1]} patches) x {plan['dim']}",
        highlight=False,
    )
    if plan.get("cache") is None:
        ui.err.print("features: not cached (--no-cache): the backbone runs every epoch", highlight=False)
        return
    total = sum(c["bytes"] for c in plan["cache"].values())
    todo = plan["bytes_to_write"]
    state = "complete, reused" if todo == 0 else f"{format_bytes(todo)} to extract"
    ui.err.print(
        f"feature cache: {format_bytes(total)} fp16 ({format_bytes(plan['bytes_per_image'])} per image), {state}; "
        f"{format_bytes(plan['disk_free'])} free in {plan['cache_dir']}",
        highlight=False,
    )


def _show_recipe(ui: CliUI, recipe: Any, info: dict[str, Any]) -> None:
    opt = "LARS (momentum 0.9, trust 0.001)" if recipe.optimizer == "lars" else "AdamW"
    accum = f" = {recipe.accumulation} x {recipe.micro_batch}" if recipe.accumulation > 1 else ""
    lrs = ", ".join(_num(v) for v in recipe.lrs)
    if recipe.base_lrs:
        lrs += f" (base {', '.join(_num(v) for v in recipe.base_lrs)} x {recipe.batch_size}/256)"
    ui.err.print(
        f"training: {info['heads']} heads ({len(info['aggregators'])} aggregators x {len(recipe.lrs)} lr x {len(recipe.wds)} wd) "
        f"in one pass per epoch; recipe {recipe.name}: {opt}, cosine, {recipe.warmup_epochs:g} warm-up epochs",
        highlight=False,
    )
    auto = (
        f" (auto: {recipe.epochs * info['steps_per_epoch']} steps, aiming at 1,000 within 10-100 epochs)"
        if recipe.epochs_auto
        else ""
    )
    dp = info.get("data_parallel")
    if dp:  # torchrun --no-cache: the batch is global, each rank takes a share of it
        lo, hi = dp["images_per_rank_per_step"]
        share = f"{lo}" if lo == hi else f"{lo}-{hi}"
        accum += f", summed over {dp['ranks']} ranks x {share} images (gradients and BatchNorm statistics all-reduced)"
    ui.err.print(
        f"effective batch size {recipe.batch_size}{accum}; {recipe.epochs} epochs{auto} x {info['steps_per_epoch']} steps; "
        f"learning rates: {lrs}; weight decays: {', '.join(_num(v) for v in recipe.wds)}",
        highlight=False,
    )


def _summary_table(summary, title: str):
    from rich import box
    from rich.table import Table

    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD)
    baseline = summary["baseline"].iloc[0] if len(summary) else None
    table.add_column("aggregator", no_wrap=True)
    for col in ("lr", "wd", "params", "hold", "top-1", "top-5", "best*"):
        table.add_column(col, justify="right", no_wrap=True)
    if isinstance(baseline, str):
        table.add_column(f"Δ {baseline}", justify="right", no_wrap=True)
    for _, row in summary.iterrows():
        cells = [
            row["aggregator"], _num(row["lr"]), _num(row["wd"]), f"{int(row['params']):,}",
            _pct(row["holdout_top1"]) if row["selected_on"] == "holdout" else f"{_pct(row['train_top1'])} (train)",
            _pct(row["eval_top1"]), _pct(row["eval_top5"]), _pct(row["best_over_grid_eval_top1"]),
        ]  # fmt: skip
        if isinstance(baseline, str):
            delta = 100 * float(row["delta_top1_vs_baseline"])
            cells.append("—" if row["aggregator"] == baseline else f"{delta:+.1f}")
        table.add_row(*cells)
    table.caption = (
        "hold: hold-out top-1 used for selection; top-1 / top-5: evaluation split (%); "
        "best*: best head of the lr x wd grid on the evaluation split itself (optimistic)"
    )
    return table


@handle_errors
def probe_cmd(
    model: ModelOpt,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    data_config: DataConfigOpt = None,
    seed: SeedOpt = 0,
    img_size: ImgSizeOpt = None,
    data: DataOpt = None,
    train: TrainDirOpt = None,
    val: ValDirOpt = None,
    csv: CsvOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    holdout_fraction: HoldoutOpt = 0.1,
    shots: ShotsOpt = None,
    max_images: MaxImgOpt = None,
    aggregator: AggregatorOpt = "cls,mean,abmilp",
    abmilp_depth: DepthOpt = 1,
    recipe: RecipeOpt = "default",
    epochs: EpochsOpt = None,
    batch_size: TrainBatchOpt = None,
    lrs: LrsOpt = None,
    wds: WdsOpt = None,
    prenorm: PrenormOpt = False,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    num_workers: WorkersOpt = 0,
    extract_batch_size: ExtractBatchOpt = 64,
    maps: MapsOpt = 6,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    formats: FormatOpt = None,
) -> None:
    """How much accuracy does selective aggregation of patch tokens recover over \\[cls]?

    Trains probe heads (cls, mean, abmilp, ...) on frozen last-block tokens, each at every point of an lr x wd grid, all in one pass over cached features; selects each aggregator's head on a hold-out of the training split and reports its evaluation accuracy.

    Writes results.csv (every head), summary.csv (the selected head per aggregator), maps.csv, run.json and figures/ (accuracy by aggregator, the lr grid, AbMILP weights beside the model's last-block \\[cls] attention).

    Examples:

      attnscope probe --model test_vit --random-init --img-size 64   (built-in digits: no data, no network)

      attnscope probe --model mae --data ~/data/cub --aggregator cls,mean,abmilp,attentive

      attnscope probe --model mae --dataset cifar100 --data-root ~/datasets --shots 10

      attnscope probe --model dinov2_vit_base --img-size 224 --train tr/ --val va/ --prenorm --recipe paper
    """
    from attnscope.probe.heads import parse_aggregators
    from attnscope.probe.run import ProbeCallbacks, ProbeConfig, run_probe, write_probe_run
    from attnscope.results import RunWriter, default_run_dir, run_metadata

    ui = CliUI()
    fmts = parse_formats(formats)
    config = ProbeConfig(
        model=model,
        checkpoint=checkpoint,
        random_init=random_init,
        data_config=data_config,
        seed=seed,
        img_size=parse_img_size(img_size),
        data=data,
        train=train,
        val=val,
        csv=csv,
        dataset=dataset,
        data_root=data_root,
        val_fraction=val_fraction,
        holdout_fraction=holdout_fraction,
        shots=shots,
        max_images=max_images,
        aggregators=parse_aggregators(aggregator),
        abmilp_depth=abmilp_depth,
        recipe=recipe,
        epochs=epochs,
        batch_size=batch_size,
        lrs=_floats(lrs, "--lrs"),
        wds=_floats(wds, "--wds"),
        prenorm=prenorm,
        cache_dir=cache_dir,
        no_cache=no_cache,
        device=device,
        dtype=dtype,
        num_workers=num_workers,
        extract_batch_size=extract_batch_size,
        map_images=maps,
    )
    if recipe not in ("default", "paper"):
        raise AttnscopeError(f"--recipe takes default or paper, got {recipe!r}")
    writer = RunWriter(
        out or default_run_dir(f"probe-{model}"), overwrite=overwrite
    )  # refuse before any work
    if random_init:
        ui.banner(random_weights_warning(model, seed, "accuracies"))
    skipped: list[tuple[Path, str]] = []

    def on_skip(path: Path, reason: str) -> None:
        skipped.append((path, reason))
        ui.skip(path, reason)

    stages = _StageProgress(ui)
    callbacks = ProbeCallbacks(
        on_plan=lambda plan: _show_plan(ui, plan),
        on_recipe=lambda r, info: (stages.close(), _show_recipe(ui, r, info)),
        progress=stages,
        on_skip=on_skip,
        on_note=lambda text: ui.err.print(f"note: {text}", highlight=False),
    )
    try:
        result = run_probe(config, callbacks)
    finally:
        stages.close()
    if result is None:  # torchrun: a rank other than 0; rank 0 trains, writes and reports
        return
    meta = run_metadata(
        command_line(), {"command": "probe", **config.as_dict(), "formats": fmts}, {model: result.info}, seed
    )
    write_probe_run(writer, result, meta, fmts)

    name = display_name(model, random_init)
    # images actually measured: a streamed (--no-cache) split learns of unreadable files only while reading
    n_eval = (
        int(result.summary["eval_images"].iloc[0])
        if "eval_images" in result.summary
        else result.info["splits"]["eval"]
    )
    ui.print(_summary_table(result.summary, f"{name}: probe accuracy on {n_eval} evaluation images"))
    if result.maps:
        rhos = [m.spearman for m in result.maps if not math.isnan(m.spearman)]
        if rhos:
            shown = ", ".join(f"{r:+.2f}" for r in rhos)
            ui.print(
                f"{result.maps[0].aggregator} weights vs last-block \\[cls] attention, Spearman ρ per image: {shown} "
                f"(mean {sum(rhos) / len(rhos):+.2f})"
            )
    if skipped:
        ui.warn(f"{len(skipped)} image(s) skipped; listed in run.json")
    ui.print(f"results: {writer.out_dir}")
