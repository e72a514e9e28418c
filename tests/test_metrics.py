"""Known-answer models and the streaming aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny

from attnscope.analysis import analyze
from attnscope.capture import AttentionRecorder
from attnscope.metrics import MetricAccumulator, applicable_metrics, block_metrics
from attnscope.models import token_layout


def zero_qk(model) -> None:
    """q = k = 0 makes every logit 0: attention is exactly uniform over all T tokens."""
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.weight.shape[0] // 3
            block.attn.qkv.weight[: 2 * dim] = 0
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias[: 2 * dim] = 0


def mean_pairwise_distance(gh, gw, ph, pw):
    pts = [(r * ph, c * pw) for r in range(gh) for c in range(gw)]
    return float(np.mean([[math.dist(a, b) for b in pts] for a in pts]))


def test_uniform_attention_known_answers(sample_paths):
    model = make_tiny("vit")
    zero_qk(model)
    result = analyze(model, sample_paths, batch_size=3)
    layers = result.layers.set_index(["layer", "metric"])
    n, t = 100, 101  # test_vit at 160 px: 10 x 10 patches + [cls]
    expected = {
        "cls_self_attn": 1 / t,
        "cls_patch_mass": n / t,
        "patch_cls_attn": 1 / t,
        "patch_self_attn": 1 / t,
        "cls_patch_entropy": math.log(n),
        "cls_patch_entropy_norm": 1.0,
        "cls_patch_eff_frac": 1.0,
        "cls_patch_k60_frac": 0.6,
        "cls_patch_k90_frac": 0.9,
        "cls_patch_gini": 0.0,
        "cls_patch_max": 1 / n,
        "patch_patch_entropy": math.log(n),
        "patch_patch_entropy_norm": 1.0,
        "patch_patch_eff_frac": 1.0,
        "attn_distance_px": mean_pairwise_distance(10, 10, 16, 16),
        "cls_self_attn_adj": 1 / n,
        "patch_self_attn_adj": 1 / n,
        "attn_nmi": 0.0,
    }
    for layer in range(6):
        for metric, value in expected.items():
            row = layers.loc[(layer, metric)]
            assert row["mean"] == pytest.approx(value, rel=1e-5, abs=1e-6), (layer, metric)
            assert row["std"] == pytest.approx(0.0, abs=1e-6)
            assert row["count"] == len(sample_paths)
    # no registers in test_vit: register metrics are absent, not NaN
    assert not result.layers["metric"].str.contains("register").any()
    assert result.layers["mean"].notna().all()


@pytest.mark.parametrize("K", [50.0, 1e9])
def test_dominant_key_closed_form(K):
    """Zero q/k plus an additive logit ln K on one patch key: A is known in closed form."""
    model = make_tiny("vit")
    zero_qk(model)
    layout = token_layout(model, (160, 160))
    n, t = layout.num_patches, layout.num_tokens
    star = layout.num_prefix + 37
    mask = torch.zeros(t, t)
    mask[:, star] = math.log(K)
    got = []
    with torch.no_grad(), AttentionRecorder(model, lambda b: got.append(block_metrics(b.attn, layout)[0])):
        model.forward_features(torch.randn(2, 3, 160, 160), attn_mask=mask)
    per_head = got[-1]
    a, b = K / (K + n - 1), 1 / (K + n - 1)
    entropy = -(a * math.log(a) + (n - 1) * b * math.log(b))
    checks = {
        "cls_self_attn": 1 / (K + t - 1),
        "cls_self_attn_adj": b,  # (1 / (K + t - 1)) / ((K + n - 1) / (K + t - 1))
        "cls_patch_max": a,
        "cls_patch_entropy": entropy,
        "cls_patch_eff_frac": math.exp(entropy) / n,
        "cls_patch_k60_frac": next(k for k in range(1, n + 1) if a + (k - 1) * b >= 0.6 - 1e-6) / n,
        "patch_patch_entropy": entropy,
        "patch_self_attn_adj": ((n - 1) * b + a) / n,  # the dominant patch's own row has a
        "attn_nmi": 0.0,  # every query has the same distribution: no mutual information
    }
    for metric, value in checks.items():
        # NMI at K=1e9 is a float32 0/0 (both entropies ~1e-6): absolute error ~1e-5 is rounding
        atol = 1e-4 if metric == "attn_nmi" else 2e-6
        torch.testing.assert_close(
            per_head[metric], torch.full_like(per_head[metric], value), rtol=2e-5, atol=atol
        )
    if K > 1e6:
        assert per_head["cls_patch_entropy"].max() < 1e-5
        assert per_head["cls_patch_gini"].min() == pytest.approx((n - 1) / n, abs=1e-5)


def test_k_fraction_boundary_does_not_add_a_patch():
    """Mass exactly at the threshold in float must not count one patch more."""
    from attnscope.models import TokenLayout

    layout = TokenLayout(True, 0, 1, (1, 10), (16, 16))
    row = torch.tensor([0.0] + [0.1] * 10)  # cls self 0, ten patches of 0.1 each
    A = row.expand(1, 1, 11, 11).clone()
    per_head, _ = block_metrics(A, layout)
    assert per_head["cls_patch_k60_frac"].item() == pytest.approx(0.6)
    assert per_head["cls_patch_k90_frac"].item() == pytest.approx(0.9)


def test_zero_patch_mass_is_an_error():
    from attnscope.errors import AttnscopeError
    from attnscope.models import TokenLayout

    layout = TokenLayout(True, 0, 1, (1, 2), (16, 16))
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]).expand(1, 1, 3, 3)
    with pytest.raises(AttnscopeError, match="zero mass"):
        block_metrics(A, layout)


def test_accumulator_matches_numpy_population_stats_whatever_the_batching():
    layout = token_layout(make_tiny("vit"), (160, 160))
    heads, blocks = applicable_metrics(layout, residual=False)
    rng = torch.Generator().manual_seed(3)
    values = torch.rand(11, 4, generator=rng) * 50  # 11 images, 4 heads
    results = []
    for splits in ([11], [1] * 11, [4, 4, 3]):
        acc = MetricAccumulator("m", 1, 4, ["attn_distance_px"], [])
        start = 0
        for size in splits:
            chunk = values[start : start + size]
            acc.update(0, {"attn_distance_px": chunk}, {})
            start += size
        results.append(acc.tables())
    arr = values.double().numpy()
    for layers, heads_df in results:
        np.testing.assert_allclose(heads_df["mean"], arr.mean(0), rtol=1e-12)
        np.testing.assert_allclose(heads_df["std"], arr.std(0), rtol=1e-9)
        per_image = arr.mean(1)
        assert layers["mean"].item() == pytest.approx(per_image.mean(), rel=1e-12)
        assert layers["std"].item() == pytest.approx(per_image.std(), rel=1e-9)
        assert (heads_df["count"] == 11).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_forward_gives_float32_metrics(dtype, sample_paths):
    model = make_tiny("vit", sharpen=3.0)
    ref = analyze(model, sample_paths[:2]).layers
    low = analyze(model, sample_paths[:2], dtype=dtype).layers
    assert (ref["metric"] == low["metric"]).all()
    norm = ref[ref["metric"] == "cls_patch_entropy_norm"]["mean"].to_numpy()
    norm_low = low[low["metric"] == "cls_patch_entropy_norm"]["mean"].to_numpy()
    np.testing.assert_allclose(norm_low, norm, atol=0.03)


@pytest.mark.parametrize("has_cls,registers", [(True, 2), (False, 0)])
def test_sparse_maps_with_exact_zeros_match_the_reference(has_cls, registers):
    """0 ln 0 = 0 exactly: maps with many exact zeros (as very peaked softmaxes give) and
    the fast path's NaN fallback agree with the float64 reference on every metric."""
    from reference_metrics import reference_block_metrics

    from attnscope.models import TokenLayout

    g = torch.Generator().manual_seed(3)
    grid, patch = (3, 5), (16, 8)
    prefix = int(has_cls) + registers
    t = prefix + grid[0] * grid[1]
    logits = torch.randn(2, 3, t, t, generator=g) * 4
    logits[torch.rand(logits.shape, generator=g) < 0.5] = -float("inf")  # half the keys get exactly 0
    logits[..., prefix:] = torch.where(
        torch.isinf(logits[..., prefix:]).all(-1, keepdim=True), 0.0, logits[..., prefix:]
    )
    A = logits.softmax(-1)
    assert (A[..., prefix:, prefix:] == 0).float().mean() > 0.3
    layout = TokenLayout(has_cls, registers, prefix, grid, patch)
    ours, _ = block_metrics(A, layout)
    ref, _ = reference_block_metrics(
        A.double().numpy(), has_cls=has_cls, num_registers=registers, grid=grid, patch_size=patch
    )
    assert set(ours) == set(ref)
    for name, values in ours.items():
        np.testing.assert_allclose(values.double().numpy(), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_workspace_reuse_across_shapes_gives_the_same_metrics():
    """One Workspace serves blocks and batches of any shape (it grows, and smaller maps use
    a prefix of it) without one call's scratch leaking into another's result."""
    from attnscope.metrics import Workspace
    from attnscope.models import TokenLayout

    g = torch.Generator().manual_seed(5)
    ws = Workspace()
    for batch, heads, grid in ((2, 3, (3, 4)), (5, 2, (4, 4)), (1, 3, (2, 3))):
        layout = TokenLayout(True, 1, 2, grid, (16, 16))
        t = 2 + grid[0] * grid[1]
        A = (torch.randn(batch, heads, t, t, generator=g) * 3).softmax(-1)
        plain, _ = block_metrics(A, layout)
        reused, _ = block_metrics(A, layout, workspace=ws)
        for name in plain:
            torch.testing.assert_close(reused[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_registry_records_drive_names_order_and_absence():
    from attnscope.errors import AttnscopeError
    from attnscope.metrics import (
        ALL_METRICS,
        BLOCK_METRICS,
        HEAD_METRICS,
        HEADLINE_METRICS,
        METRIC_LABELS,
        METRICS,
        absent_reason,
        metric_spec,
    )

    assert ALL_METRICS == tuple(METRICS) == HEAD_METRICS + BLOCK_METRICS  # records in spec order
    from reference_metrics import TOKEN_METRICS

    assert BLOCK_METRICS == ("cls_residual_ratio", "patch_residual_ratio", *TOKEN_METRICS)
    spec_order = ["attn_distance_px", "cls_self_attn_adj", "patch_self_attn_adj", "attn_nmi"]
    assert [m for m in HEAD_METRICS if m in spec_order] == spec_order
    assert HEADLINE_METRICS == (
        "cls_self_attn",
        "cls_patch_entropy_norm",
        "cls_patch_eff_frac",
        "cls_patch_k90_frac",
        "patch_patch_entropy_norm",
        "attn_distance_px",
        "cls_residual_ratio",
    )
    assert METRIC_LABELS["attn_distance_px"] == "mean attention distance (px)"
    assert metric_spec("attn_distance_px").unit == "px" and metric_spec("cls_patch_entropy").unit == "nats"
    assert absent_reason("cls_register_mass", has_cls=False, num_registers=0) == "no class token"
    assert absent_reason("cls_register_mass", has_cls=True, num_registers=0) == "no registers"
    assert absent_reason("patch_register_mass", has_cls=False, num_registers=4) is None
    assert absent_reason("cls_self_attn_adj", has_cls=False, num_registers=4) == "no class token"
    assert absent_reason("patch_self_attn_adj", has_cls=False, num_registers=0) is None
    with pytest.raises(AttnscopeError, match="unknown metric 'nope'"):
        metric_spec("nope")


@pytest.mark.parametrize("has_cls,registers", [(True, 2), (True, 0), (False, 3), (False, 0)])
def test_block_metrics_hold_what_the_records_say(has_cls, registers):
    """Exactly the applicable metrics, with the records' shapes; [0, 1] metrics stay in [0, 1]."""
    from attnscope.metrics import metric_spec
    from attnscope.models import TokenLayout

    g = torch.Generator().manual_seed(11)
    prefix = int(has_cls) + registers
    layout = TokenLayout(has_cls, registers, prefix, (3, 4), (16, 16))
    t = layout.num_tokens
    A = (torch.randn(3, 2, t, t, generator=g) * 4).softmax(-1)
    if has_cls:  # one [cls] that attends mostly to itself: its _adj ratio leaves [0, 1]
        A[0, 0, 0] = 0.0
        A[0, 0, 0, 0] = 0.9
        A[0, 0, 0, prefix:] = 0.1 / layout.num_patches
    x, y = torch.randn(3, t, 8, generator=g), torch.randn(3, t, 8, generator=g)
    per_head, per_block = block_metrics(A, layout, x, y)
    heads, blocks = applicable_metrics(layout)
    assert list(per_head) == heads and list(per_block) == blocks
    for name, values in {**per_head, **per_block}.items():
        spec = metric_spec(name)
        assert values.shape == ((3, 2) if spec.per_head else (3,)), name
        assert bool(torch.isfinite(values).all()), name
        if spec.unit_interval:
            assert 0 <= values.min() and values.max() <= 1 + 1e-6, name
    if has_cls:
        assert per_head["cls_self_attn_adj"][0, 0].item() == pytest.approx(9.0, rel=1e-5)


def test_all_reduce_outside_torchrun_is_the_accumulator_itself():
    acc = MetricAccumulator("m", 1, 2, ["cls_self_attn"], [])
    assert MetricAccumulator.all_reduce(acc) is acc
    assert MetricAccumulator.all_reduce(None) is None
