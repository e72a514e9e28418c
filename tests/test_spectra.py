"""The token profiles (spectrum.csv, frequency.csv; docs/metrics.md): known answers, the float64
reference, the streamed tables and their files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from reference_metrics import reference_frequency_profile, reference_spectrum, reference_token_metrics

from attnscope.metrics import MetricAccumulator, block_measures
from attnscope.metrics.profiles import (
    FREQUENCY_COLUMNS,
    SPECTRUM_COLUMNS,
    frequency_lattice,
    frequency_table,
    radial_frequency,
    spectrum_table,
)
from attnscope.models import TokenLayout


def _attn(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, 2, t, t, generator=g) * 2, dim=-1)


def _measures(layout: TokenLayout, out: torch.Tensor, seed: int = 0):
    return block_measures(
        _attn(out.shape[0], out.shape[1], seed), layout, out, None, out=out, families=("tokens",)
    )


def _layout(has_cls: bool, registers: int, grid: tuple[int, int]) -> TokenLayout:
    return TokenLayout(has_cls, registers, int(has_cls) + registers, grid, (16, 16))


def _random_tokens(layout: TokenLayout, b: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = layout.num_prefix + layout.grid[0] * layout.grid[1]
    return torch.randn(b, t, c, generator=g) + 0.5 * torch.randn(1, 1, c, generator=g)


# ---------------------------------------------------------------- the frequency lattice


def test_the_lattice_is_the_notebook_diagonal_on_square_grids_and_ends_at_patch_hf_amp():
    assert frequency_lattice((14, 14)) == [(t, t) for t in range(7)]  # h - h // 2 points, as the notebook
    assert frequency_lattice((7, 7)) == [(t, t) for t in range(4)]
    assert frequency_lattice((6, 10)) == [(0, 0), (1, 1), (1, 2), (2, 3), (2, 4)]
    assert frequency_lattice((2, 9)) == [(0, t) for t in range(5)]
    assert frequency_lattice((1, 1)) == [(0, 0)]
    for grid in [(14, 14), (6, 10), (16, 9), (3, 2)]:
        assert frequency_lattice(grid)[-1] == ((grid[0] - 1) // 2, (grid[1] - 1) // 2)
    assert radial_frequency(3, 3, (14, 14)) == pytest.approx(2 * math.pi * 3 / 14)
    assert radial_frequency(0, 0, (6, 10)) == 0.0


# ---------------------------------------------------------------- per image: the float64 reference


@pytest.mark.parametrize(
    "has_cls, registers, grid, channels",
    [(True, 0, (4, 4), 24), (True, 2, (3, 5), 24), (False, 0, (6, 6), 8), (False, 1, (5, 7), 40)],
)
def test_profiles_match_the_float64_reference(has_cls, registers, grid, channels):
    layout = _layout(has_cls, registers, grid)
    out = _random_tokens(layout, 3, channels, seed=4)
    _, per_block, profiles = _measures(layout, out)
    p0 = layout.num_prefix
    z = out.double().numpy()[:, p0:]
    sv, energy = zip(*(reference_spectrum(zi) for zi in z), strict=True)
    freq = np.stack([reference_frequency_profile(zi, grid) for zi in z])
    assert profiles["sv_share"].shape == (3, min(grid[0] * grid[1], channels))
    np.testing.assert_allclose(profiles["sv_share"].numpy(), np.stack(sv), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(profiles["energy_share"].numpy(), np.stack(energy), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(profiles["rel_log_amplitude"].numpy(), freq, rtol=1e-5, atol=1e-7)
    # the metric is the profile's last point, and agrees with the reference metric too
    assert torch.equal(per_block["patch_hf_amp"], profiles["rel_log_amplitude"][:, -1])
    ref = reference_token_metrics(
        out.numpy(),
        out.numpy(),
        _attn(3, out.shape[1]).numpy(),
        has_cls=has_cls,
        num_registers=registers,
        grid=grid,
    )
    np.testing.assert_allclose(freq[:, -1], ref["patch_hf_amp"], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- known answers


def test_tokens_equal_up_to_scale_have_one_singular_value():
    layout = _layout(True, 0, (4, 4))
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    scales = torch.linspace(0.5, 3.0, 17)
    out = (scales[:, None] * direction)[None]  # every token a multiple of one vector
    profiles = _measures(layout, out)[2]
    want = np.zeros(16)
    want[0] = 1.0
    # float32 tokens: the other singular values are rounding, ~1e-7 of the first
    np.testing.assert_allclose(profiles["sv_share"][0].numpy(), want, atol=1e-5)
    np.testing.assert_allclose(profiles["energy_share"][0].numpy(), want, atol=1e-10)
    same = torch.randn(1, 1, 32).expand(1, 17, 32).contiguous()  # no spread at all: no spectrum
    assert float(_measures(layout, same)[2]["sv_share"].abs().max()) == 0.0


@pytest.mark.parametrize("grid, step", [((8, 8), 3), ((8, 8), 1), ((14, 14), 6), ((6, 10), 2), ((6, 10), 4)])
def test_a_sinusoid_puts_its_amplitude_in_its_frequency_bin(grid, step):
    gh, gw = grid
    u, v = frequency_lattice(grid)[step]
    r = torch.arange(gh, dtype=torch.float64)[:, None]
    s = torch.arange(gw, dtype=torch.float64)[None, :]
    wave = torch.cos(2 * math.pi * (u * r / gh + v * s / gw)).reshape(-1)
    out = (3.0 + wave[:, None] * torch.ones(1, 4, dtype=torch.float64)).float()[None]  # 4 equal channels
    profile = _measures(_layout(False, 0, grid), out)[2]["rel_log_amplitude"][0]
    assert float(profile[0]) == 0.0  # DC against itself
    # |F| at the wave's frequency is N/2 against 3N at DC: ln(1/6); elsewhere only rounding
    assert float(profile[step]) == pytest.approx(math.log(1 / 6), abs=1e-4)
    others = [float(p) for t, p in enumerate(profile) if t not in (0, step)]
    assert others and max(others) < -10


# ---------------------------------------------------------------- the streamed tables


def _stream(layout: TokenLayout, batches: list[torch.Tensor], num_layers: int = 2) -> MetricAccumulator:
    acc = None
    for i, out in enumerate(batches):
        for layer in range(num_layers):
            per_head, per_block, profiles = _measures(layout, out * (1 + layer), seed=i)
            if acc is None:
                acc = MetricAccumulator("m", num_layers, 2, list(per_head), list(per_block))
            acc.update(layer, per_head, per_block, profiles=profiles)
    assert acc is not None
    return acc


def test_tables_are_the_mean_over_images_of_the_reference_vectors():
    layout = _layout(True, 1, (5, 7))
    batches = [_random_tokens(layout, b, 24, seed=b) for b in (3, 2, 4)]  # uneven batches
    acc = _stream(layout, batches)
    spectrum = spectrum_table("m", 2, acc.profile_sums())
    frequency = frequency_table("m", 2, layout.grid, acc.profile_sums())
    assert tuple(spectrum.columns) == SPECTRUM_COLUMNS and tuple(frequency.columns) == FREQUENCY_COLUMNS
    z = np.concatenate([b.double().numpy() for b in batches])[:, layout.num_prefix :]
    for layer in (0, 1):
        zs = z * (1 + layer)
        sv, energy = (np.mean(v, axis=0) for v in zip(*(reference_spectrum(zi) for zi in zs), strict=True))
        freq = np.mean([reference_frequency_profile(zi, layout.grid) for zi in zs], axis=0)
        s = spectrum[spectrum["block"] == layer]
        f = frequency[frequency["block"] == layer]
        assert list(s["k"]) == list(range(1, 25)) and list(f["step"]) == list(range(4))
        np.testing.assert_allclose(s["sv_share"], sv, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(s["energy_share"], energy, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(s["energy_cum"], np.cumsum(energy), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(f["rel_log_amplitude"], freq, rtol=1e-5, atol=1e-8)
        assert s["relative_depth"].eq(float(layer)).all()
    assert list(frequency["freq_row"][:4]) == [0, 1, 1, 2] and list(frequency["freq_col"][:4]) == [0, 1, 2, 3]


def test_profile_sums_survive_snapshot_and_restore_exactly():
    layout = _layout(False, 0, (4, 6))
    acc = _stream(layout, [_random_tokens(layout, 3, 16, seed=s) for s in (0, 1)])
    meta, arrays = acc.snapshot()
    again = MetricAccumulator.restore(meta, arrays)
    assert again.profile_sums().keys() == acc.profile_sums().keys()
    for key, sums in acc.profile_sums().items():
        np.testing.assert_array_equal(again.profile_sums()[key], sums)
        assert sums[0] == 6  # the image count
    meta.pop("profiles")  # a state saved before the profiles existed cannot be continued
    with pytest.raises(ValueError, match="profile sums"):
        MetricAccumulator.restore(meta, arrays)


def test_entropy_writes_the_profiles_and_their_last_point_is_mean_patch_hf_amp(tmp_path):
    from attnscope.commands.entropy import EntropyConfig, run
    from attnscope.results import read_profiles

    config = EntropyConfig(
        "test_vit",
        random_init=True,
        max_images=3,
        batch_size=2,
        metrics=("attention", "tokens"),
        out=tmp_path,
    )
    run(config)
    profiles = read_profiles(tmp_path)
    assert profiles is not None
    spectrum, frequency = profiles
    assert list(spectrum.columns) == list(SPECTRUM_COLUMNS) and list(frequency.columns) == list(
        FREQUENCY_COLUMNS
    )
    layers = pd.read_csv(tmp_path / "layers.csv")
    hf = layers[layers["metric"] == "patch_hf_amp"].set_index("layer")["mean"]
    last = frequency.groupby("block")["rel_log_amplitude"].last()
    np.testing.assert_allclose(last.to_numpy(), hf.loc[last.index].to_numpy(), rtol=0, atol=1e-9)
    assert sorted(set(spectrum["block"])) == list(range(6)) and (spectrum["k"].max() == 64)
    np.testing.assert_allclose(spectrum.groupby("block")["sv_share"].sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(spectrum.groupby("block")["energy_cum"].last(), 1.0, atol=1e-12)
    assert (tmp_path / "figures" / "spectrum.png").is_file() and (
        tmp_path / "figures" / "frequency.png"
    ).is_file()


def test_attention_only_runs_write_no_profiles(tmp_path):
    from attnscope.commands.entropy import EntropyConfig, run

    run(EntropyConfig("test_vit", random_init=True, max_images=1, out=tmp_path))
    assert not (tmp_path / "spectrum.csv").exists() and not (tmp_path / "frequency.csv").exists()
    assert not (tmp_path / "figures" / "spectrum.png").exists()
