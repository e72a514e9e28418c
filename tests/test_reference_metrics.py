"""Known answers for the float64 reference of the metric spec (tests/reference_metrics.py).

The reference checks attnscope's production metrics, so the reference itself must be right:
every expected value here is computed by hand (closed forms, or brute-force loops that share
nothing with the reference's vectorised code)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from reference_metrics import (
    BLOCK_METRICS,
    HEAD_METRICS,
    outlier_patches,
    reference_block_metrics,
    reference_tables,
)

ALL_HEAD = set(HEAD_METRICS)
CLS_METRICS = {
    "cls_self_attn",
    "cls_patch_mass",
    "cls_register_mass",
    "patch_cls_attn",
    "cls_patch_entropy",
    "cls_patch_entropy_norm",
    "cls_patch_eff_frac",
    "cls_patch_k60_frac",
    "cls_patch_k90_frac",
    "cls_patch_gini",
    "cls_patch_max",
    "cls_self_attn_adj",
}
REG_METRICS = {"cls_register_mass", "patch_register_mass"}


def _one(A2d, **kw):
    """Metrics of a single (T, T) map as plain floats (B = H = 1)."""
    per_head, per_block = reference_block_metrics(np.asarray(A2d, dtype=np.float64)[None, None], **kw)
    for v in per_head.values():
        assert v.shape == (1, 1)
    return {k: float(v[0, 0]) for k, v in per_head.items()}, {k: float(v[0]) for k, v in per_block.items()}


def _brute_mean_pairwise_distance(gh, gw, ph, pw):
    """Mean over all ordered (query, key) patch pairs, self pairs included, by plain loops."""
    total, count = 0.0, 0
    for ri in range(gh):
        for si in range(gw):
            for rj in range(gh):
                for sj in range(gw):
                    total += math.hypot(ph * (ri - rj), pw * (si - sj))
                    count += 1
    return total / count


# --------------------------------------------------------------------------- uniform attention


@pytest.mark.parametrize(
    ("grid", "patch", "n_reg"),
    [((3, 4), (16, 16), 2), ((2, 5), (14, 14), 0), ((4, 3), (8, 12), 1), ((1, 7), (16, 16), 4)],
)
def test_uniform_attention(grid, patch, n_reg):
    gh, gw = grid
    n = gh * gw
    t = 1 + n_reg + n
    m, _ = _one(np.full((t, t), 1.0 / t), has_cls=True, num_registers=n_reg, grid=grid, patch_size=patch)

    expected_keys = ALL_HEAD if n_reg else ALL_HEAD - REG_METRICS
    assert set(m) == expected_keys
    ln_n = math.log(n)
    assert m["cls_self_attn"] == pytest.approx(1 / t, abs=1e-15)
    assert m["cls_patch_mass"] == pytest.approx(n / t, abs=1e-14)
    assert m["patch_cls_attn"] == pytest.approx(1 / t, abs=1e-15)
    assert m["patch_self_attn"] == pytest.approx(1 / t, abs=1e-15)
    if n_reg:
        assert m["cls_register_mass"] == pytest.approx(n_reg / t, abs=1e-14)
        assert m["patch_register_mass"] == pytest.approx(n_reg / t, abs=1e-14)
    assert m["cls_patch_entropy"] == pytest.approx(ln_n, abs=1e-12)
    assert m["cls_patch_entropy_norm"] == pytest.approx(1.0, abs=1e-12)
    assert m["cls_patch_eff_frac"] == pytest.approx(1.0, abs=1e-12)
    assert m["cls_patch_k60_frac"] == math.ceil(0.6 * n - 1e-9) / n
    assert m["cls_patch_k90_frac"] == math.ceil(0.9 * n - 1e-9) / n
    assert m["cls_patch_gini"] == pytest.approx(0.0, abs=1e-12)
    assert m["cls_patch_max"] == pytest.approx(1 / n, abs=1e-15)
    assert m["patch_patch_entropy"] == pytest.approx(ln_n, abs=1e-12)
    assert m["patch_patch_entropy_norm"] == pytest.approx(1.0, abs=1e-12)
    assert m["patch_patch_eff_frac"] == pytest.approx(1.0, abs=1e-12)
    assert m["attn_nmi"] == pytest.approx(0.0, abs=1e-7)  # I ~ 1e-16 over sqrt(ln N * ln N)
    assert m["attn_distance_px"] == pytest.approx(_brute_mean_pairwise_distance(gh, gw, *patch), rel=1e-12)
    # (1/T) / (N/T): self-attention relative to the mass on patch keys
    assert m["cls_self_attn_adj"] == pytest.approx(1 / n, rel=1e-12)
    assert m["patch_self_attn_adj"] == pytest.approx(1 / n, rel=1e-12)


def test_uniform_k_boundary_is_not_broken_by_rounding():
    # N = 10: nine values of 0.1 sum to 0.8999999999999999 < 0.9 in float64; the 1e-6 rule keeps k = 9.
    assert sum([0.1] * 9) < 0.9
    m, _ = _one(np.full((11, 11), 1 / 11), has_cls=True, num_registers=0, grid=(2, 5), patch_size=(16, 16))
    assert m["cls_patch_k90_frac"] == 9 / 10
    assert m["cls_patch_k60_frac"] == 6 / 10


@pytest.mark.parametrize(
    ("top", "k60"),
    [
        (0.5999995, 1),  # within 1e-6 below 0.6: counts as reaching it
        (0.6, 1),
        (0.5999, 2),  # 1e-4 below: does not
        (0.598, 2),
    ],
)
def test_k_threshold_tolerance(top, k60):
    # cls row over 4 patches (no prefix mass): p_c = [top, rest/3 x 3]
    rest = (1 - top) / 3
    cls_row = [0.0, top, rest, rest, rest]
    a = np.array([cls_row] + [[0.0, 0.25, 0.25, 0.25, 0.25]] * 4)
    m, _ = _one(a, has_cls=True, num_registers=0, grid=(2, 2), patch_size=(16, 16))
    assert m["cls_patch_k60_frac"] == k60 / 4


# --------------------------------------------------------------------------- one-hot


@pytest.mark.parametrize("n_reg", [0, 3])
def test_one_hot_dominant_key(n_reg):
    # grid 1 x 4, pw = 16. cls puts all its patch mass on patch 2 (plus some prefix mass, which
    # renormalisation removes); patch i attends only to patch (i + 1) % 4.
    n, pre = 4, 1 + n_reg
    t = pre + n
    a = np.zeros((t, t))
    a[0, 0] = 0.3
    a[0, pre + 2] = 0.7
    a[1:pre, 1] = 1.0  # register rows: irrelevant
    for i in range(n):
        a[pre + i, pre + (i + 1) % n] = 1.0
    m, _ = _one(a, has_cls=True, num_registers=n_reg, grid=(1, 4), patch_size=(16, 16))

    assert m["cls_self_attn"] == pytest.approx(0.3)
    assert m["cls_patch_mass"] == pytest.approx(0.7)
    assert m["cls_self_attn_adj"] == pytest.approx(0.3 / 0.7, rel=1e-14)
    assert m["patch_self_attn_adj"] == 0.0
    assert m["cls_patch_entropy"] == 0.0
    assert m["cls_patch_entropy_norm"] == 0.0
    assert m["cls_patch_eff_frac"] == pytest.approx(1 / n)
    assert m["cls_patch_k60_frac"] == 1 / n
    assert m["cls_patch_k90_frac"] == 1 / n
    assert m["cls_patch_gini"] == pytest.approx((n - 1) / n, abs=1e-15)
    assert m["cls_patch_max"] == pytest.approx(1.0, abs=1e-15)
    assert m["patch_cls_attn"] == 0.0
    assert m["patch_self_attn"] == 0.0
    assert m["patch_patch_entropy"] == 0.0
    assert m["patch_patch_eff_frac"] == pytest.approx(1 / n)
    # distances 16, 16, 16 and 48 (patch 3 -> patch 0)
    assert m["attn_distance_px"] == pytest.approx((16 + 16 + 16 + 48) / 4)
    # a permutation: H(p_i) = 0, key marginal uniform (H_K = ln N), I = ln N -> NMI = 1
    assert m["attn_nmi"] == pytest.approx(1.0, abs=1e-12)
    if n_reg:
        assert m["cls_register_mass"] == 0.0
        assert m["patch_register_mass"] == 0.0


def test_self_attention_identity():
    # every patch attends only to itself: self-attn 1, distance 0, NMI 1
    a = np.zeros((7, 7))
    a[0] = 1 / 7
    a[1:, 1:] = np.eye(6)
    m, _ = _one(a, has_cls=True, num_registers=0, grid=(2, 3), patch_size=(16, 16))
    assert m["patch_self_attn"] == 1.0
    assert m["patch_self_attn_adj"] == 1.0
    assert m["cls_self_attn_adj"] == pytest.approx(1 / 6, rel=1e-14)  # (1/7) / (6/7)
    assert m["attn_distance_px"] == 0.0
    assert m["attn_nmi"] == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------- hand-worked example


def test_hand_worked_cls_register_1x3():
    # tokens: c, r, p0, p1, p2 ; grid 1 x 3, patch (7, 10) -> column spacing 10 px
    a = np.array(
        [
            [0.1, 0.1, 0.4, 0.2, 0.2],  # c : p_c = [.5, .25, .25]
            [0.2, 0.2, 0.2, 0.2, 0.2],  # r : unused
            [0.2, 0.0, 0.8, 0.0, 0.0],  # p0: S = .8,  p = [1, 0, 0]
            [0.1, 0.1, 0.2, 0.4, 0.2],  # p1: S = .8,  p = [.25, .5, .25]
            [0.0, 0.5, 0.25, 0.0, 0.25],  # p2: S = .5,  p = [.5, 0, .5]
        ]
    )
    m, _ = _one(a, has_cls=True, num_registers=1, grid=(1, 3), patch_size=(7, 10))
    assert set(m) == ALL_HEAD
    ln2, ln3 = math.log(2), math.log(3)
    exp = {
        "cls_self_attn": 0.1,
        "cls_patch_mass": 0.8,
        "cls_register_mass": 0.1,
        "patch_cls_attn": (0.2 + 0.1 + 0.0) / 3,
        "patch_self_attn": (0.8 + 0.4 + 0.25) / 3,
        "patch_register_mass": (0.0 + 0.1 + 0.5) / 3,
        # H([.5,.25,.25]) = .5 ln2 + 2 * .25 * 2 ln2 = 1.5 ln2
        "cls_patch_entropy": 1.5 * ln2,
        "cls_patch_entropy_norm": 1.5 * ln2 / ln3,
        "cls_patch_eff_frac": 2**1.5 / 3,
        "cls_patch_k60_frac": 2 / 3,  # .5 < .6, .75 >= .6
        "cls_patch_k90_frac": 3 / 3,  # .75 < .9, 1 >= .9
        # q = [.25, .25, .5]: 2 (.25 + .5 + 1.5) / 3 - 4/3 = 1/6
        "cls_patch_gini": 1 / 6,
        "cls_patch_max": 0.5,
        # H = 0 (0 ln 0 = 0), 1.5 ln2, ln2
        "patch_patch_entropy": 2.5 * ln2 / 3,
        "patch_patch_entropy_norm": 2.5 * ln2 / 3 / ln3,
        "patch_patch_eff_frac": (1 + 2**1.5 + 2) / 9,
        # p0: 0 ; p1: .25*10 + .25*10 = 5 ; p2: .5*20 = 10
        "attn_distance_px": (0 + 5 + 10) / 3,
        "cls_self_attn_adj": 0.1 / 0.8,
        # A[i, i] / S_i = .8/.8, .4/.8, .25/.5
        "patch_self_attn_adj": (1.0 + 0.5 + 0.5) / 3,
    }
    # key marginal k = ([1,0,0] + [.25,.5,.25] + [.5,0,.5]) / 3 = [7/12, 2/12, 3/12]
    h_k = -(7 / 12 * math.log(7 / 12) + 2 / 12 * math.log(2 / 12) + 3 / 12 * math.log(3 / 12))
    exp["attn_nmi"] = (h_k - 2.5 * ln2 / 3) / math.sqrt(ln3 * h_k)
    for k, v in exp.items():
        assert m[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_registers_do_not_count_as_patches():
    # Moving mass between cls/registers and patches (patch proportions fixed) changes the raw
    # masses but none of the renormalised metrics.
    rng = np.random.default_rng(0)
    t, pre = 2 + 6, 2
    patch_rows = rng.dirichlet(np.ones(6), size=t)
    a1 = np.zeros((t, t))
    a2 = np.zeros((t, t))
    for i in range(t):
        a1[i, :pre] = [0.1, 0.1]
        a1[i, pre:] = 0.8 * patch_rows[i]
        a2[i, :pre] = [0.05, 0.6]
        a2[i, pre:] = 0.35 * patch_rows[i]
    kw = dict(has_cls=True, num_registers=1, grid=(2, 3), patch_size=(16, 16))
    m1, _ = _one(a1, **kw)
    m2, _ = _one(a2, **kw)
    renormalised = [
        k for k in HEAD_METRICS if k.startswith(("cls_patch_", "patch_patch_")) and k != "cls_patch_mass"
    ]
    renormalised += ["attn_distance_px", "attn_nmi", "patch_self_attn_adj"]
    for k in renormalised:
        assert m1[k] == pytest.approx(m2[k], rel=1e-12, abs=1e-15), k
    assert m1["cls_patch_mass"] == pytest.approx(0.8)
    assert m2["cls_patch_mass"] == pytest.approx(0.35)
    # the [cls] self-attention is a prefix key: its ratio to the patch mass moves with it
    assert m1["cls_self_attn_adj"] == pytest.approx(0.1 / 0.8, rel=1e-12)
    assert m2["cls_self_attn_adj"] == pytest.approx(0.05 / 0.35, rel=1e-12)


def test_random_maps_against_plain_loops():
    # Random softmax maps; every renormalised metric recomputed with scalar Python loops.
    rng = np.random.default_rng(1)
    gh, gw, ph, pw, n_reg = 3, 2, 14, 9, 2
    n, pre = gh * gw, 1 + n_reg
    t = pre + n
    logits = rng.normal(scale=2.0, size=(2, 3, t, t))
    a = np.exp(logits)
    a /= a.sum(-1, keepdims=True)
    per_head, _ = reference_block_metrics(
        a, has_cls=True, num_registers=n_reg, grid=(gh, gw), patch_size=(ph, pw)
    )
    for b in range(2):
        for h in range(3):
            A = a[b, h].tolist()

            def p_row(i, A=A):
                s = sum(A[i][pre + j] for j in range(n))
                return [A[i][pre + j] / s for j in range(n)]

            def ent(p):
                return -sum(v * math.log(v) for v in p if v > 0)

            rows = [p_row(pre + i) for i in range(n)]
            hs = [ent(p) for p in rows]
            dist = 0.0
            for i in range(n):
                for j in range(n):
                    d = math.hypot(ph * (i // gw - j // gw), pw * (i % gw - j % gw))
                    dist += rows[i][j] * d
            dist /= n
            kmarg = [sum(rows[i][j] for i in range(n)) / n for j in range(n)]
            hk = ent(kmarg)
            nmi = (hk - sum(hs) / n) / math.sqrt(math.log(n) * hk)
            pc = p_row(0)
            q = sorted(pc)
            gini = 2 * sum((r + 1) * q[r] for r in range(n)) / n - (n + 1) / n
            assert per_head["patch_patch_entropy"][b, h] == pytest.approx(sum(hs) / n, rel=1e-12)
            assert per_head["patch_patch_eff_frac"][b, h] == pytest.approx(
                sum(math.exp(v) for v in hs) / n / n, rel=1e-12
            )
            assert per_head["attn_distance_px"][b, h] == pytest.approx(dist, rel=1e-12)
            assert per_head["attn_nmi"][b, h] == pytest.approx(nmi, rel=1e-10)
            assert per_head["cls_patch_entropy"][b, h] == pytest.approx(ent(pc), rel=1e-12)
            assert per_head["cls_patch_gini"][b, h] == pytest.approx(gini, rel=1e-12, abs=1e-15)
            assert per_head["cls_patch_max"][b, h] == pytest.approx(max(pc), rel=1e-15)
            assert per_head["cls_register_mass"][b, h] == pytest.approx(A[0][1] + A[0][2], rel=1e-15)
            assert per_head["patch_self_attn"][b, h] == pytest.approx(
                sum(A[pre + i][pre + i] for i in range(n)) / n, rel=1e-14
            )
            patch_sum = [sum(A[pre + i][pre + j] for j in range(n)) for i in range(n)]
            assert per_head["patch_self_attn_adj"][b, h] == pytest.approx(
                sum(A[pre + i][pre + i] / patch_sum[i] for i in range(n)) / n, rel=1e-12
            )
            assert per_head["cls_self_attn_adj"][b, h] == pytest.approx(
                A[0][0] / sum(A[0][pre + j] for j in range(n)), rel=1e-12
            )


# --------------------------------------------------------------------------- distance geometry


def test_distance_non_square_grid_and_patch():
    # grid 2 x 3 (rows x cols), patch (ph, pw) = (8, 4). Every patch attends only to patch (0, 0):
    # D((r, s), (0, 0)) = sqrt((8 r)^2 + (4 s)^2)
    gh, gw, ph, pw = 2, 3, 8, 4
    t = 1 + gh * gw
    a = np.zeros((t, t))
    a[:, 1] = 1.0
    m, _ = _one(a, has_cls=True, num_registers=0, grid=(gh, gw), patch_size=(ph, pw))
    expected = (0 + 4 + 8 + 8 + math.sqrt(64 + 16) + math.sqrt(64 + 64)) / 6
    assert m["attn_distance_px"] == pytest.approx(expected, rel=1e-14)
    # rows are ph apart, columns pw apart: swapping the patch size changes the answer
    m_swapped, _ = _one(a, has_cls=True, num_registers=0, grid=(gh, gw), patch_size=(pw, ph))
    expected_swapped = (0 + 8 + 16 + 4 + math.sqrt(16 + 64) + math.sqrt(16 + 256)) / 6
    assert m_swapped["attn_distance_px"] == pytest.approx(expected_swapped, rel=1e-14)
    # the grid is the true one, not sqrt(N): a 3 x 2 grid of the same 6 patches differs
    m_t, _ = _one(a, has_cls=True, num_registers=0, grid=(3, 2), patch_size=(ph, pw))
    expected_t = (0 + 4 + 8 + math.sqrt(64 + 16) + 16 + math.sqrt(256 + 16)) / 6
    assert m_t["attn_distance_px"] == pytest.approx(expected_t, rel=1e-14)


@pytest.mark.parametrize(("grid", "patch"), [((2, 5), (16, 8)), ((5, 2), (14, 14)), ((3, 7), (10, 6))])
def test_uniform_distance_non_square(grid, patch):
    t = grid[0] * grid[1]
    m, _ = _one(np.full((t, t), 1 / t), has_cls=False, num_registers=0, grid=grid, patch_size=patch)
    assert m["attn_distance_px"] == pytest.approx(_brute_mean_pairwise_distance(*grid, *patch), rel=1e-12)


# --------------------------------------------------------------------------- absent metrics


@pytest.mark.parametrize(
    ("has_cls", "n_reg", "expected"),
    [
        (True, 0, ALL_HEAD - REG_METRICS),
        (True, 2, ALL_HEAD),
        (False, 0, ALL_HEAD - CLS_METRICS - REG_METRICS),
        (False, 3, (ALL_HEAD - CLS_METRICS) | {"patch_register_mass"}),
    ],
)
def test_absent_metrics(has_cls, n_reg, expected):
    gh, gw = 2, 3
    t = int(has_cls) + n_reg + gh * gw
    a = np.full((2, 3, t, t), 1 / t)
    x = np.ones((2, t, 4))
    y = np.full((2, t, 4), 0.5)
    per_head, per_block = reference_block_metrics(
        a, has_cls=has_cls, num_registers=n_reg, grid=(gh, gw), patch_size=(16, 16)
    )
    assert set(per_head) == expected
    assert all(v.shape == (2, 3) for v in per_head.values())
    assert per_block == {}
    _, per_block = reference_block_metrics(
        a, has_cls=has_cls, num_registers=n_reg, grid=(gh, gw), patch_size=(16, 16), x=x, y=y
    )
    assert set(per_block) == (
        {"cls_residual_ratio", "patch_residual_ratio"} if has_cls else {"patch_residual_ratio"}
    )
    for v in per_block.values():
        assert v.shape == (2,)
        np.testing.assert_allclose(v, 0.5, rtol=1e-15)


def test_no_cls_with_registers_values():
    # no class token, 2 registers, grid 1 x 2: tokens r0, r1, p0, p1
    a = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [0.3, 0.1, 0.3, 0.3],  # p0: registers .4, self .3, p = [.5, .5]
            [0.0, 0.0, 0.2, 0.8],  # p1: registers 0,  self .8, p = [.2, .8]
        ]
    )
    m, _ = _one(a, has_cls=False, num_registers=2, grid=(1, 2), patch_size=(16, 16))
    assert m["patch_register_mass"] == pytest.approx(0.2)
    assert m["patch_self_attn"] == pytest.approx(0.55)
    # S_i leaves the registers out: .3 / .6 and .8 / 1
    assert m["patch_self_attn_adj"] == pytest.approx((0.5 + 0.8) / 2, rel=1e-14)
    h1 = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert m["patch_patch_entropy"] == pytest.approx((math.log(2) + h1) / 2, rel=1e-14)
    assert m["attn_distance_px"] == pytest.approx((0.5 * 16 + 0.2 * 16) / 2, rel=1e-14)


# --------------------------------------------------------------------------- residual ratios


def test_residual_ratios_hand_made():
    # cls + 1 register + 3 patches, C = 2
    x = np.array([[[3, 4], [1, 1], [1, 0], [0, 2], [3, 4]]], dtype=np.float64)
    y = np.array([[[0, 1], [9, 9], [1, 1], [0, 1], [6, 8]]], dtype=np.float64)
    a = np.full((1, 1, 5, 5), 0.2)
    _, per_block = reference_block_metrics(
        a, has_cls=True, num_registers=1, grid=(1, 3), patch_size=(16, 16), x=x, y=y
    )
    assert per_block["cls_residual_ratio"][0] == pytest.approx(1 / 5)
    # patches: sqrt(2)/1, 1/2, 10/5 ; the register token (ratio 9) is not a patch
    assert per_block["patch_residual_ratio"][0] == pytest.approx((math.sqrt(2) + 0.5 + 2.0) / 3)
    # without a class token token 0 is a register: no cls ratio, same patch ratio
    _, per_block = reference_block_metrics(
        a, has_cls=False, num_registers=2, grid=(1, 3), patch_size=(16, 16), x=x, y=y
    )
    assert set(per_block) == {"patch_residual_ratio"}
    assert per_block["patch_residual_ratio"][0] == pytest.approx((math.sqrt(2) + 0.5 + 2.0) / 3)


def test_residual_ratio_per_image():
    x = np.ones((2, 3, 4))
    y = np.stack([np.ones((3, 4)), 3 * np.ones((3, 4))])
    a = np.full((2, 1, 3, 3), 1 / 3)
    _, per_block = reference_block_metrics(
        a, has_cls=True, num_registers=0, grid=(1, 2), patch_size=(16, 16), x=x, y=y
    )
    np.testing.assert_allclose(per_block["cls_residual_ratio"], [1.0, 3.0])
    np.testing.assert_allclose(per_block["patch_residual_ratio"], [1.0, 3.0])


# --------------------------------------------------------------------------- errors and degenerate cases


def test_zero_patch_row_sum_raises():
    a = np.full((1, 1, 5, 5), 0.2)
    a[0, 0, 3] = [0.5, 0.5, 0.0, 0.0, 0.0]  # patch query with all its mass on cls + register
    with pytest.raises(ValueError, match="zero attention mass"):
        reference_block_metrics(a, has_cls=True, num_registers=1, grid=(1, 3), patch_size=(16, 16))
    b = np.full((1, 1, 5, 5), 0.2)
    b[0, 0, 0] = [0.5, 0.5, 0.0, 0.0, 0.0]  # class token with no patch mass
    with pytest.raises(ValueError, match="zero attention mass"):
        reference_block_metrics(b, has_cls=True, num_registers=1, grid=(1, 3), patch_size=(16, 16))
    # the register query row is not used by any metric: zero patch mass there is fine
    c = np.full((1, 1, 5, 5), 0.2)
    c[0, 0, 1] = [0.5, 0.5, 0.0, 0.0, 0.0]
    reference_block_metrics(c, has_cls=True, num_registers=1, grid=(1, 3), patch_size=(16, 16))


def test_layout_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        reference_block_metrics(
            np.full((1, 1, 6, 6), 1 / 6), has_cls=True, num_registers=0, grid=(2, 3), patch_size=(16, 16)
        )


def test_undefined_normalisations_are_nan():
    # Not fixed by the spec: NMI's H_K = 0 (all patch queries on one key) and ln N = 0 (N = 1)
    # make 0/0; the reference reports NaN rather than inventing a value.
    a = np.zeros((1, 1, 4, 4))
    a[0, 0, :, 1] = 1.0
    per_head, _ = reference_block_metrics(a, has_cls=True, num_registers=0, grid=(1, 3), patch_size=(16, 16))
    assert math.isnan(per_head["attn_nmi"][0, 0])
    per_head, _ = reference_block_metrics(
        np.full((1, 1, 2, 2), 0.5), has_cls=True, num_registers=0, grid=(1, 1), patch_size=(16, 16)
    )
    assert math.isnan(per_head["cls_patch_entropy_norm"][0, 0])
    assert math.isnan(per_head["patch_patch_entropy_norm"][0, 0])
    assert per_head["cls_patch_eff_frac"][0, 0] == 1.0


# --------------------------------------------------------------------------- aggregation


def test_reference_tables_by_hand():
    # 2 layers, 2 images, 2 heads; values[image, head]
    layer0 = (
        {
            "patch_self_attn": np.array([[1.0, 3.0], [5.0, 7.0]]),
            "attn_nmi": np.array([[0.0, 0.0], [1.0, 1.0]]),
        },
        {"patch_residual_ratio": np.array([0.5, 1.5])},
    )
    layer1 = (
        {
            "patch_self_attn": np.array([[2.0, 2.0], [2.0, 6.0]]),
            "attn_nmi": np.array([[0.25, 0.75], [0.5, 0.5]]),
        },
        {"patch_residual_ratio": np.array([1.0, 1.0]), "cls_residual_ratio": np.array([0.0, 4.0])},
    )
    layers_df, heads_df = reference_tables([layer0, layer1], "my-vit")
    assert list(layers_df.columns) == ["model", "layer", "metric", "mean", "std", "count"]
    assert list(heads_df.columns) == ["model", "layer", "head", "metric", "mean", "std", "count"]

    # heads: per (layer, head, metric), over images, population std
    exp_heads = {
        (0, 0, "patch_self_attn"): (3.0, 2.0),  # [1, 5]
        (0, 1, "patch_self_attn"): (5.0, 2.0),  # [3, 7]
        (0, 0, "attn_nmi"): (0.5, 0.5),  # [0, 1]
        (0, 1, "attn_nmi"): (0.5, 0.5),
        (1, 0, "patch_self_attn"): (2.0, 0.0),  # [2, 2]
        (1, 1, "patch_self_attn"): (4.0, 2.0),  # [2, 6]
        (1, 0, "attn_nmi"): (0.375, 0.125),  # [.25, .5]
        (1, 1, "attn_nmi"): (0.625, 0.125),  # [.75, .5]
    }
    assert len(heads_df) == len(exp_heads)
    got = {(r.layer, r.head, r.metric): (r.mean, r.std, r.count) for r in heads_df.itertuples()}
    for key, (mean, std) in exp_heads.items():
        assert got[key] == (pytest.approx(mean), pytest.approx(std), 2), key

    # layers: heads averaged within each image first, then over images; per-block straight through
    exp_layers = {
        (0, "patch_self_attn"): (4.0, 2.0),  # image means [2, 6]
        (0, "attn_nmi"): (0.5, 0.5),  # [0, 1]
        (0, "patch_residual_ratio"): (1.0, 0.5),  # [.5, 1.5]
        (1, "patch_self_attn"): (3.0, 1.0),  # [2, 4]
        (1, "attn_nmi"): (0.5, 0.0),  # [.5, .5] (per-head std would not be 0)
        (1, "patch_residual_ratio"): (1.0, 0.0),
        (1, "cls_residual_ratio"): (2.0, 2.0),  # [0, 4]
    }
    assert len(layers_df) == len(exp_layers)
    got = {(r.layer, r.metric): (r.mean, r.std, r.count) for r in layers_df.itertuples()}
    for key, (mean, std) in exp_layers.items():
        assert got[key] == (pytest.approx(mean), pytest.approx(std), 2), key

    assert set(heads_df["metric"]) == {"patch_self_attn", "attn_nmi"}  # per-block metrics never in heads
    assert (layers_df["model"] == "my-vit").all() and (heads_df["model"] == "my-vit").all()
    assert layers_df["count"].dtype == np.int64 and heads_df["head"].dtype == np.int64
    # rows: layer ascending, metric in spec order, head ascending
    assert list(zip(heads_df["layer"], heads_df["metric"], heads_df["head"], strict=True))[:4] == [
        (0, "patch_self_attn", 0),
        (0, "patch_self_attn", 1),
        (0, "attn_nmi", 0),
        (0, "attn_nmi", 1),
    ]
    order = list(HEAD_METRICS) + list(BLOCK_METRICS)
    for _, g in layers_df.groupby("layer"):
        idx = [order.index(m) for m in g["metric"]]
        assert idx == sorted(idx)


def test_reference_tables_end_to_end():
    # block metrics -> tables: a uniform layer and a one-hot layer, 3 images, 2 heads
    t = 1 + 4
    uni = np.full((3, 2, t, t), 1 / t)
    hot = np.zeros((3, 2, t, t))
    hot[..., 2] = 1.0
    layers = [
        reference_block_metrics(a, has_cls=True, num_registers=0, grid=(2, 2), patch_size=(16, 16))
        for a in (uni, hot)
    ]
    layers_df, heads_df = reference_tables(layers, "vit")
    n_metrics = len(ALL_HEAD - REG_METRICS)
    assert len(layers_df) == 2 * n_metrics
    assert len(heads_df) == 2 * 2 * n_metrics
    assert (layers_df["count"] == 3).all() and (heads_df["count"] == 3).all()
    row = layers_df[(layers_df.layer == 0) & (layers_df.metric == "cls_patch_entropy")].iloc[0]
    assert row["mean"] == pytest.approx(math.log(4)) and row["std"] == pytest.approx(0.0, abs=1e-15)
    row = heads_df[
        (heads_df.layer == 1) & (heads_df["head"] == 1) & (heads_df.metric == "cls_patch_gini")
    ].iloc[0]
    assert row["mean"] == pytest.approx(3 / 4)
    assert isinstance(layers_df, pd.DataFrame)


@pytest.mark.parametrize(
    "norms, expected",
    [
        # one patch 8x the rest: above the ratio and alone above an empty band
        ([1, 1, 1, 1, 1, 1, 1, 8], [7]),
        # a tail, not a mode: 4.6 is more than 3x the median (1.4), but every norm is within
        # a factor 1.5 of the next smaller one, so there is no empty band above the median
        ([1.0, 1.0, 1.1, 1.2, 1.4, 2.0, 2.8, 3.6, 4.6], []),
        # alone above a band, but not 3x the median: no outlier; just above 3x: one
        ([1, 1, 1, 1, 1, 1, 1, 2.9], []),
        ([1, 1, 1, 1, 1, 1, 1, 3.1], [7]),
        # the band starts at 2.9 (the lowest band above the median): the mode is 2.9, 4 and 8,
        # of which 4 and 8 are more than 3x the median; 2.9 does not hide the rest
        ([1] * 10 + [2.9, 4.0, 8.0], [11, 12]),
        # a second band inside the mode (5 -> 12) does not split it: the lowest band counts
        ([1] * 10 + [5.0, 12.0], [10, 11]),
        # an even count's median is the mean of the two middle values: (1 + 3) / 2 = 2, so
        # 3.5 is not 3x the median (the lower middle value, 1, would make it one)
        ([1, 1, 1, 3, 3.5, 10], [5]),
        # all equal: no band above the median
        ([2.5] * 9, []),
    ],
)
def test_outlier_patches_by_hand(norms, expected):
    norms = np.asarray(norms, dtype=np.float64)
    want = np.zeros(norms.shape, dtype=bool)
    want[expected] = True
    np.testing.assert_array_equal(outlier_patches(norms), want)
    # ratios only: the same patches at any scale, in any order
    perm = np.random.default_rng(0).permutation(norms.size)
    for scale in (1e-3, 1e3):
        np.testing.assert_array_equal(outlier_patches(norms[perm] * scale), want[perm])
