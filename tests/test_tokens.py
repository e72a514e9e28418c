"""The token family (docs/metrics.md): known answers and agreement with the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_metrics import (
    OUTLIER_GAP,
    OUTLIER_RATIO,
    TOKEN_METRICS,
    outlier_patches,
    reference_token_metrics,
)

from attnscope.metrics import applicable_metrics, block_metrics
from attnscope.metrics.context import high_norm_mode
from attnscope.metrics.registry import OUTLIER_GAP as PROD_GAP
from attnscope.metrics.registry import OUTLIER_RATIO as PROD_RATIO
from attnscope.models import TokenLayout

FAMILIES = ("attention", "tokens")


def _attn(b: int, t: int, heads: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, heads, t, t, generator=g) * 2, dim=-1)


def _tokens(layout: TokenLayout, out: torch.Tensor, x: torch.Tensor | None = None, seed: int = 0):
    b, t, _ = out.shape
    x = out if x is None else x
    _, per_block = block_metrics(_attn(b, t, seed=seed), layout, x, None, out=out, families=("tokens",))
    return per_block


@pytest.mark.parametrize(
    "has_cls, registers, grid", [(True, 0, (4, 4)), (True, 2, (3, 5)), (False, 0, (4, 6)), (False, 1, (5, 3))]
)
def test_token_metrics_match_the_float64_reference(has_cls, registers, grid):
    prefix = int(has_cls) + registers
    layout = TokenLayout(has_cls, registers, prefix, grid, (16, 16))
    t = prefix + grid[0] * grid[1]
    g = torch.Generator().manual_seed(3)
    out = torch.randn(3, t, 24, generator=g) + 0.5 * torch.randn(1, 1, 24, generator=g)
    x = torch.randn(3, t, 24, generator=g)
    x[:, prefix + 1] *= 20  # one outlier patch in the input: cls_outlier_mass is not 0
    attn = _attn(3, t, seed=1)
    _, ours = block_metrics(attn, layout, x, None, out=out, families=("tokens",))
    ref = reference_token_metrics(
        out.numpy(), x.numpy(), attn.numpy(), has_cls=has_cls, num_registers=registers, grid=grid
    )
    assert list(ours) == [m for m in TOKEN_METRICS if m in ref]
    for name, want in ref.items():
        got = ours[name].double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    if has_cls:
        assert (ref["cls_outlier_mass"] > 0).all()


def test_identical_tokens_known_answers():
    layout = TokenLayout(True, 0, 1, (4, 4), (16, 16))
    out = torch.randn(1, 1, 32).expand(2, 17, 32).contiguous()
    m = _tokens(layout, out)
    assert m["patch_patch_cos"] == pytest.approx(1.0, abs=1e-6)
    assert m["cls_patch_cos"] == pytest.approx(1.0, abs=1e-6)
    assert float(m["patch_outlier_frac"][0]) == 0.0
    # the centred matrix is zero: complete collapse, the measure's floor
    assert float(m["patch_eff_rank"][0]) == 1.0
    # tokens along one direction around a common point: rank one, effective rank exactly 1
    base, direction = torch.randn(32), torch.randn(32)
    line = base + torch.linspace(-1, 1, 17)[:, None] * direction
    m = _tokens(layout, line[None])
    # float32 rounding leaves the other singular values at ~1e-7 of the first
    assert float(m["patch_eff_rank"][0]) == pytest.approx(1.0, abs=1e-4)


def test_gaussian_tokens_are_near_orthogonal_and_near_full_rank():
    layout = TokenLayout(True, 0, 1, (8, 8), (16, 16))
    out = torch.randn(2, 65, 512, generator=torch.Generator().manual_seed(0))
    m = _tokens(layout, out)
    assert m["patch_patch_cos"].abs().max() < 0.01
    assert m["cls_patch_cos"].abs().max() < 0.02
    # the Marchenko-Pastur spread of 64 x 512 Gaussian singular values keeps the effective
    # rank a little below its maximum of 63 (rank after centring)
    assert (m["patch_eff_rank"] > 0.95 * 63).all()
    assert m["patch_norm_mean"].double().sub(math.sqrt(512)).abs().max() < 1.0


@pytest.mark.parametrize("grid, freq", [((8, 8), (3, 3)), ((6, 10), (2, 4)), ((6, 10), (1, 1))])
def test_sinusoid_puts_its_amplitude_at_its_frequency(grid, freq):
    gh, gw = grid
    layout = TokenLayout(False, 0, 0, grid, (16, 16))
    r = torch.arange(gh, dtype=torch.float64)[:, None]
    s = torch.arange(gw, dtype=torch.float64)[None, :]
    wave = torch.cos(2 * math.pi * (freq[0] * r / gh + freq[1] * s / gw)).reshape(-1)
    out = (3.0 + wave[:, None] * torch.ones(1, 4, dtype=torch.float64)).float()[None]  # 4 equal channels
    from attnscope.metrics import BlockContext

    ctx = BlockContext(_attn(1, gh * gw), layout, out, None, None, out)
    amp = ctx.patch_log_amplitude[0]
    peak = sorted(((float(amp[u, v]), (u, v)) for u in range(gh) for v in range(gw)), reverse=True)
    # DC (3 * N) first, then the wave at +freq and its mirror -freq
    assert peak[0][1] == (0, 0)
    assert {peak[1][1], peak[2][1]} == {freq, ((gh - freq[0]) % gh, (gw - freq[1]) % gw)}
    hf = _tokens(layout, out)["patch_hf_amp"]
    if freq == ((gh - 1) // 2, (gw - 1) // 2):  # the metric's own frequency: ln(N/2 / 3N) = ln(1/6)
        assert float(hf[0]) == pytest.approx(math.log(1 / 6), abs=1e-4)
    else:
        assert float(hf[0]) < -10  # nothing there but rounding (ln 1e-6 against ln 3N)


def test_families_select_the_metrics():
    layout = TokenLayout(True, 0, 1, (2, 2), (16, 16))
    heads, blocks = applicable_metrics(layout, families=("tokens",))
    assert heads == [] and blocks == list(TOKEN_METRICS)
    heads, blocks = applicable_metrics(layout, families=FAMILIES)
    assert heads and blocks[:2] == ["cls_residual_ratio", "patch_residual_ratio"]
    no_cls = TokenLayout(False, 0, 0, (2, 2), (16, 16))
    assert "cls_norm" not in applicable_metrics(no_cls, families=FAMILIES)[1]
    from attnscope.errors import AttnscopeError

    with pytest.raises(AttnscopeError, match="unknown metric family"):
        applicable_metrics(layout, families=("tokenz",))


def _outlier_frac(norms: np.ndarray) -> np.ndarray:
    """patch_outlier_frac's production rule on (B, N) float64 norms: (B,)."""
    return high_norm_mode(torch.from_numpy(norms), PROD_RATIO, PROD_GAP).double().mean(-1).numpy()


def _log_normal(rng: np.random.Generator, sigma: float, shape: tuple[int, int]) -> np.ndarray:
    return np.exp(sigma * rng.standard_normal(shape))


def test_outlier_rule_matches_the_float64_reference():
    assert (PROD_RATIO, PROD_GAP) == (OUTLIER_RATIO, OUTLIER_GAP)
    rng = np.random.default_rng(7)
    for n in (2, 3, 49, 196, 200):  # odd and even counts (two kinds of median)
        norms = _log_normal(rng, 0.4, (300, n))
        k = max(1, n // 25)
        norms[::2, :k] *= rng.uniform(2, 12, size=(150, 1))  # a planted mode in every other image
        ours = high_norm_mode(torch.from_numpy(norms), PROD_RATIO, PROD_GAP).numpy()
        want = np.stack([outlier_patches(row) for row in norms])
        np.testing.assert_array_equal(ours, want, err_msg=f"N = {n}")
        if n > 2:  # two patches never have one 3x their mean
            assert ours[::2].any()
    assert not high_norm_mode(torch.ones(2, 1), PROD_RATIO, PROD_GAP).any()  # one patch: no mode


@pytest.mark.parametrize("n", [196, 1024])
@pytest.mark.parametrize("sigma", [0.1, 0.25, 0.35, 0.5])
def test_unimodal_log_normal_norms_have_almost_no_outliers(sigma, n):
    """The upper tail of one mode is not a second mode: median + 5 MAD flagged 0.8% of these
    patches at sigma 0.25 and 2.7% at sigma 0.5; the rule flags under 0.1%."""
    norms = _log_normal(np.random.default_rng(int(sigma * 100) + n), sigma, (4000 if n < 1000 else 1000, n))
    frac = _outlier_frac(norms)
    assert frac.mean() < 1e-3
    if sigma <= 0.25:  # no image's tail reaches 3x its median across a factor-1.5 band
        assert frac.mean() < 1e-5


@pytest.mark.parametrize("sigma, exact_share", [(0.1, 1.0), (0.25, 0.99)])
@pytest.mark.parametrize("n", [200, 400, 1000])
def test_a_planted_high_norm_mode_is_recovered(sigma, exact_share, n):
    """2% of the patches at 8x the typical norm, the artefacts' several-fold separation: the
    fraction is 0.02 in (nearly) every image; a bulk that wide very rarely lends the mode a
    token of its own tail."""
    rng = np.random.default_rng(n)
    norms = _log_normal(rng, sigma, (2000, n))
    k = n // 50
    for row in norms:
        row[rng.choice(n, k, replace=False)] = 8.0
    frac = _outlier_frac(norms)
    assert (frac == 0.02).mean() >= exact_share
    assert frac.mean() == pytest.approx(0.02, abs=2e-5)


@pytest.mark.parametrize("share", [0.02, 0.05, 0.10])
@pytest.mark.parametrize("spread", [0.0, 0.3])
def test_a_mode_of_up_to_a_tenth_of_the_patches_is_recovered(share, spread):
    """A mode at ~10x whose own norms spread like the artefacts' (150-500 in the registers
    paper: sigma ~0.3 in log), over a bulk as tight as a trained ViT's (the largest norm ~1.8x
    the median at N = 256: sigma 0.2); the median stays the bulk's while the mode is a minority."""
    rng = np.random.default_rng(int(share * 100))
    n, k = 1000, int(share * 1000)
    norms = _log_normal(rng, 0.2, (1000, n))
    norms[:, :k] = 10 * _log_normal(rng, spread, (1000, k))
    frac = _outlier_frac(norms)
    assert (frac == share).mean() >= 0.98
    assert frac.mean() == pytest.approx(share, rel=0.01)


def test_outlier_metrics_on_a_planted_mode_end_to_end():
    """patch_outlier_frac on the block output and cls_outlier_mass on the block input, through
    block_metrics: 8 of 400 patches at 8x the norm of the others."""
    grid, b, c = (20, 20), 3, 32
    layout = TokenLayout(True, 0, 1, grid, (16, 16))
    t = 1 + grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)

    def tokens(planted: torch.Tensor) -> torch.Tensor:  # norms e^(0.2 N(0, 1)), 8 at `planted`
        z = torch.randn(b, t, c, generator=g)
        norms = torch.exp(0.2 * torch.randn(b, t, 1, generator=g))
        norms[torch.arange(b)[:, None], 1 + planted] = 8.0
        return z / z.norm(dim=-1, keepdim=True) * norms

    out_mode = torch.stack([torch.randperm(400, generator=g)[:8] for _ in range(b)])
    in_mode = torch.stack([torch.randperm(400, generator=g)[:8] for _ in range(b)])
    out, x = tokens(out_mode), tokens(in_mode)
    attn = _attn(b, t, heads=3, seed=4)
    _, m = block_metrics(attn, layout, x, None, out=out, families=("tokens",))
    assert m["patch_outlier_frac"].tolist() == [0.02] * b
    want = torch.stack([attn[i, :, 0, 1 + in_mode[i]].sum(-1).mean() for i in range(b)])
    torch.testing.assert_close(m["cls_outlier_mass"].float(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_random_vit_small_has_no_high_norm_patches():
    """At initialisation the patch norms of every block are one tight mode (largest / median
    at most 2.4 on photographs): no outliers, where median + 5 MAD flagged 2-3% of patches."""
    from attnscope import analyze

    result = analyze("vit_small_patch16_224", random_init=True, metrics=("tokens",), batch_size=8)
    images = result.images
    for metric in ("patch_outlier_frac", "cls_outlier_mass"):
        values = images[images["metric"] == metric]["value"]
        assert len(values) == 12 * images["image"].nunique() and (values == 0).all(), metric


def test_threaded_eigensolver_equals_one_call():
    from attnscope.metrics.context import eigvalsh_cpu

    gen = torch.Generator().manual_seed(3)
    for batch in (1, 3, 16):  # one matrix, an uneven split, an even one
        x = torch.randn(batch, 20, 33, generator=gen, dtype=torch.float64)
        gram = x @ x.transpose(1, 2)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            ours = eigvalsh_cpu(gram)
            assert torch.get_num_threads() == 2  # the caller's thread count comes back
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(ours, torch.linalg.eigvalsh(gram))
