"""The Python API in a notebook: tables come back as DataFrames, nothing is written.

Run: python examples/python_api.py  (uses a tiny random model, so it runs anywhere)
"""

from __future__ import annotations

import timm
import torch

import attnscope
from attnscope.data import bundled_sample_paths

# 1. Any name attnscope knows, with weights from the Hub/cache, a checkpoint or random init.
result = attnscope.analyze("test_vit", random_init=True, max_images=3)
print(result.layers.query("metric == 'cls_patch_entropy_norm'")[["layer", "mean", "std"]])

# 2. Or a model object you already have (here: timm, sharpened so attention is peaked).
model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=4, img_size=96).eval()
with torch.no_grad():
    for block in model.blocks:
        block.attn.qkv.weight[: 2 * 384] *= 4
result = attnscope.analyze(model, bundled_sample_paths()[:4], batch_size=2)
wide = result.layers.pivot_table(index="layer", columns="metric", values="mean")
print(wide[["cls_self_attn", "cls_patch_entropy_norm", "attn_distance_px"]].round(3))
print(result.info["token_layout"])

# Each image's own values (what images.csv holds), e.g. the spread of the last block's [cls] entropy.
last = result.images.query("metric == 'cls_patch_entropy_norm' and layer == 3")
print(last[["image", "value"]].assign(image=lambda d: d["image"].str.rsplit("/", n=1).str[-1]))

# 3. Lower level: stream one block's maps yourself.
layout = attnscope.token_layout(model, (96, 96))
with torch.no_grad(), attnscope.AttentionRecorder(model, lambda b: print(b.index, tuple(b.attn.shape))):
    model.forward_features(torch.randn(1, 3, 96, 96))
per_head, per_block = attnscope.block_metrics(torch.full((1, 1, 37, 37), 1 / 37), layout)
print("uniform attention -> entropy/ln N =", per_head["cls_patch_entropy_norm"].item())
