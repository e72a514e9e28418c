"""Capture: the maps we see are timm's own, and the model is untouched afterwards."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_tiny
from timm.utils import AttentionExtract

from attnscope.capture import AttentionRecorder
from attnscope.errors import AttnscopeError


def _input(model, batch=2, hw=None):
    h, w = hw or model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def _timm_maps(model, x):
    """Independent path: timm's fx extraction of the softmax nodes (fused off)."""
    flags = [b.attn.fused_attn for b in model.blocks]
    for b in model.blocks:
        b.attn.fused_attn = False
    try:
        extractor = AttentionExtract(model, method="fx")
        with torch.no_grad():
            maps = extractor(x)
    finally:
        for b, f in zip(model.blocks, flags, strict=True):
            b.attn.fused_attn = f
    return list(maps.values())


@pytest.mark.parametrize("kind", list(TINY))
def test_maps_equal_timm_attention_extract(kind):
    model = make_tiny(kind, sharpen=4.0)
    x = _input(model)
    seen = {}

    def consumer(block):
        seen[block.index] = block.attn.detach().clone()

    with torch.no_grad(), AttentionRecorder(model, consumer) as rec:
        model.forward_features(x)
        rec.check()
    reference = _timm_maps(model, x)
    assert len(seen) == len(reference) == len(model.blocks)
    for i, ref in enumerate(reference):
        assert seen[i].shape == ref.shape
        torch.testing.assert_close(seen[i], ref, rtol=0, atol=0)
        torch.testing.assert_close(seen[i].sum(-1), torch.ones_like(seen[i][..., 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "dinov3", "beit"])
def test_hooks_removed_and_outputs_identical(kind):
    model = make_tiny(kind)
    x = _input(model)
    flags_before = [b.attn.fused_attn for b in model.blocks]
    with torch.no_grad():
        before = model.forward_features(x)
    with torch.no_grad(), AttentionRecorder(model, lambda b: None):
        model.forward_features(x)
    with torch.no_grad():
        after = model.forward_features(x)
    assert torch.equal(before, after)
    assert [b.attn.fused_attn for b in model.blocks] == flags_before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_residual_branch_is_what_the_block_adds():
    """x + y must be the stream after the attention half of the block (LayerScale included)."""
    model = make_tiny("dinov2reg", sharpen=2.0)
    with torch.no_grad():
        for b in model.blocks:
            b.ls1.gamma.fill_(0.37)  # non-trivial LayerScale
    x = _input(model)
    got = {}
    with (
        torch.no_grad(),
        AttentionRecorder(model, lambda b: got.__setitem__(b.index, (b.x.clone(), b.y.clone()))),
    ):
        model.forward_features(x)
    block = model.blocks[1]
    bx, by = got[1]
    with torch.no_grad():
        expected_y = block.ls1(block.attn(block.norm1(bx)))
    torch.testing.assert_close(by, expected_y)
    assert by.abs().max() > 0


def test_only_one_block_alive_at_a_time():
    model = make_tiny("vit")
    alive = []

    with AttentionRecorder(model, lambda b: alive.append(len(rec._pending))) as rec, torch.no_grad():
        model.forward_features(_input(model))
    assert alive and max(alive) == 0  # the block's own slot is popped before the consumer runs


def test_block_that_bypasses_softmax_is_named():
    model = make_tiny("vit")

    def fused_only(self, x, *args, **kwargs):  # a custom kernel that never calls attn_drop
        return x

    model.blocks[2].attn.forward = fused_only.__get__(model.blocks[2].attn)
    with (
        pytest.raises(AttnscopeError, match=r"blocks\.2"),
        torch.no_grad(),
        AttentionRecorder(model, lambda b: None),
    ):
        model.forward_features(_input(model))


def test_non_square_input_dynamic_size():
    model = make_tiny("vit", sharpen=3.0)  # test_vit has dynamic_img_size
    x = _input(model, hw=(160, 96))
    shapes = []
    with torch.no_grad(), AttentionRecorder(model, lambda b: shapes.append(tuple(b.attn.shape))):
        model.forward_features(x)
    assert shapes[0][-1] == 1 + 10 * 6
