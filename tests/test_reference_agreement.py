"""attnscope's tables equal an independent float64 implementation of docs/metrics.md, on real photos.

The independent side shares nothing with attnscope's capture or metrics: attention maps come
from timm's fx extraction of the softmax nodes, the residual branch is recomputed with the
fused attention kernel, and the formulas are tests/reference_metrics.py (numpy, float64).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import sharpen_qk
from reference_metrics import (
    reference_block_metrics,
    reference_images,
    reference_tables,
    reference_token_metrics,
)
from timm.utils import AttentionExtract

from attnscope.analysis import analyze
from attnscope.data import build_eval_transform, load_rgb

CASES = {
    # plain ViT: cls, no registers
    "plain": ("vit_small_patch16_224", {"depth": 3, "img_size": 96}),
    # registers and no class token
    "noclsreg": ("test_vit2", {}),
    # DINOv2-style: cls + 4 registers + LayerScale, at 518 px (37 x 37 patches)
    "dinov2reg518": ("vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 518, "init_values": 0.3}),
    # non-square input on a dynamic-size model
    "nonsquare": ("test_vit", {"img_size": (160, 96)}),
}


BATCH = 2


def _build(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    sharpen_qk(model, 3.0)  # peaked, trained-looking attention instead of near-uniform
    return model


def _independent_tables(model, paths, label):
    transform, _ = build_eval_transform(model, tuple(model.patch_embed.img_size))
    x = torch.stack([transform(load_rgb(p)) for p in paths])
    h, w = x.shape[-2:]
    ph, pw = model.patch_embed.patch_size
    grid = (h // ph, w // pw)
    has_cls = model.cls_token is not None
    n_reg = model.num_prefix_tokens - int(has_cls)

    for b in model.blocks:
        b.attn.fused_attn = False
    extractor = AttentionExtract(model, method="fx")  # traces now: hooks below must come after
    with torch.no_grad():
        # Same batch partition as attnscope's run: float32 BLAS results depend on batch
        # shape, and that input noise is not what this test is about.
        chunks = [list(extractor(x[i : i + BATCH]).values()) for i in range(0, len(x), BATCH)]
    maps = [torch.cat([c[layer] for c in chunks]) for layer in range(len(chunks[0]))]
    inputs, outputs = {}, {}
    handles = [
        b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone()))
        for i, b in enumerate(model.blocks)
    ] + [
        b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach().clone()))
        for i, b in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            parts, out_parts = {}, {}
            for i in range(0, len(x), BATCH):
                model.forward_features(x[i : i + BATCH])
                for k, v in inputs.items():
                    parts.setdefault(k, []).append(v)
                for k, v in outputs.items():
                    out_parts.setdefault(k, []).append(v)
            inputs = {k: torch.cat(v) for k, v in parts.items()}
            outputs = {k: torch.cat(v) for k, v in out_parts.items()}
    finally:
        for hd in handles:
            hd.remove()
    per_layer = []
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.attn.fused_attn = True  # a different kernel for the branch than the one captured
            y = torch.cat([block.ls1(block.attn(block.norm1(c))) for c in inputs[i].split(BATCH)])
            per_head, per_block = reference_block_metrics(
                maps[i].double().numpy(),
                has_cls=has_cls,
                num_registers=n_reg,
                grid=grid,
                patch_size=(ph, pw),
                x=inputs[i].double().numpy(),
                y=y.double().numpy(),
            )
            tokens = reference_token_metrics(
                outputs[i].numpy(),
                inputs[i].numpy(),
                maps[i].double().numpy(),
                has_cls=has_cls,
                num_registers=n_reg,
                grid=grid,
            )
            per_layer.append((per_head, {**per_block, **tokens}))
    return (*reference_tables(per_layer, label), reference_images(per_layer, label, [str(p) for p in paths]))


def _assert_tables_equal(ours: pd.DataFrame, ref: pd.DataFrame, keys: list[str]):
    ours = ours.sort_values(keys).reset_index(drop=True)
    ref = ref.sort_values(keys).reset_index(drop=True)
    assert list(ours.columns) == list(ref.columns)
    pd.testing.assert_frame_equal(ours[keys], ref[keys], check_dtype=False)
    assert (ours["count"].to_numpy() == ref["count"].to_numpy()).all()
    for col in ("mean", "std"):
        a, b = ours[col].to_numpy(), ref[col].to_numpy()
        bad = ~np.isclose(a, b, rtol=1e-5, atol=1e-6)
        assert not bad.any(), ours.loc[bad, keys].assign(ours=a[bad], ref=b[bad]).head(10).to_string()


@pytest.mark.parametrize("case", list(CASES))
def test_tables_equal_independent_float64_reference(case, sample_paths):
    name, kwargs = CASES[case]
    model = _build(name, kwargs)
    paths = sample_paths[:3] if case != "dinov2reg518" else sample_paths[:2]
    ours = analyze(model, paths, batch_size=BATCH, metrics=("attention", "tokens"))  # several batches
    ref_layers, ref_heads, ref_images = _independent_tables(model, paths, ours.layers["model"].iloc[0])
    _assert_tables_equal(ours.layers, ref_layers, ["model", "layer", "metric"])
    _assert_tables_equal(ours.heads, ref_heads, ["model", "layer", "head", "metric"])
    assert ours.layers["metric"].nunique() >= 7
    assert {"patch_patch_cos", "patch_eff_rank", "patch_hf_amp"} <= set(ours.layers["metric"])
    # images.csv: every image's value, in the reference's row order (image, layer, metric)
    keys = ["model", "image", "layer", "metric"]
    pd.testing.assert_frame_equal(ours.images[keys], ref_images[keys], check_dtype=False)
    a, b = ours.images["value"].to_numpy(), ref_images["value"].to_numpy()
    bad = ~np.isclose(a, b, rtol=1e-5, atol=1e-6)
    assert not bad.any(), ours.images.loc[bad, keys].assign(ours=a[bad], ref=b[bad]).head(10).to_string()
