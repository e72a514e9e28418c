"""How much each metric moves when the position table is resized by timm's rule instead of
the model's own, on random weights (what docs/reproducing.md quotes).

A DINOv2 ViT-S/14 with random weights at its native 518 px (a 37 x 37 table) is saved as a
checkpoint and measured at 224 px on the bundled photos twice: with DINOv2's own rule
(`position_resize="own"`) and with timm's loader (`"timm"`). Prints, per metric, the largest
relative difference over blocks between the two runs (|own - timm| / |own|, blocks whose
value is below 1e-6 in magnitude left out), attention and token families.

    .venv/bin/python benchmarks/position_rules.py          # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/position_rules.py --smooth  # a smooth (low-frequency) table
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--alias", default="dinov2_vit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--smooth", action="store_true", help="a low-frequency table instead of timm's init")
    args = parser.parse_args()

    import timm
    import torch
    import torch.nn.functional as F

    import attnscope

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0)
    if args.smooth:  # trained tables are smooth: a bicubic upsampling of a 5 x 5 random field
        dim, side = model.pos_embed.shape[-1], model.patch_embed.grid_size[0]
        field = F.interpolate(torch.randn(1, dim, 5, 5), size=(side, side), mode="bicubic")
        with torch.no_grad():
            model.pos_embed[0, 1:] = field[0].permute(1, 2, 0).reshape(-1, dim) * 0.1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        torch.save(model.state_dict(), path)
        runs = {
            rule: attnscope.analyze(
                args.alias,
                checkpoint=path,
                img_size=(args.img_size, args.img_size),
                position_resize=rule,
                metrics=("attention", "tokens"),
            ).layers
            for rule in ("own", "timm")
        }
    keys = ["layer", "metric"]
    both = runs["own"].merge(runs["timm"], on=keys, suffixes=("_own", "_timm"))
    both = both[both["mean_own"].abs() > 1e-6]
    both["rel"] = (both["mean_own"] - both["mean_timm"]).abs() / both["mean_own"].abs()
    worst = both.loc[both.groupby("metric")["rel"].idxmax()].sort_values("rel", ascending=False)
    print(f"{args.alias} random weights, 518 -> {args.img_size} px, own rule vs timm's")
    print(f"{'metric':<28} {'worst block':>11} {'own':>12} {'timm':>12} {'rel. diff':>10}")
    for row in worst.itertuples():
        values = f"{row.mean_own:>12.5g} {row.mean_timm:>12.5g} {row.rel:>10.4f}"
        print(f"{row.metric:<28} {row.layer:>11} {values}")


if __name__ == "__main__":
    main()
