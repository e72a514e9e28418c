"""maps.py: rollout known answers, query indexing on non-square grids with registers, mass masks,
upsampling, and the `maps` command."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.cli.options import flag_for
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.maps import (
    Query,
    attention_rollout,
    mass_mask,
    parse_heads,
    parse_query,
    query_rows,
    resolve_layer,
    rollout_step,
    select_heads,
    to_grid,
    upsample,
)
from attnscope.models import TokenLayout

runner = CliRunner()
# 1 [cls] + 2 registers + a 3 x 5 grid: every indexing mistake (sqrt, token 0, prefix 1) shows.
LAYOUT = TokenLayout(has_cls=True, num_registers=2, num_prefix=3, grid=(3, 5), patch_size=(16, 8))
T = LAYOUT.num_tokens


def as_cli_says(exc: ConfigError) -> str:
    """The message as the CLI shows it: the library names the field, the CLI its flag."""
    return exc.worded(flag_for)


def random_attention(b: int, h: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, t, t, generator=g) * 3, dim=-1)


# ---------------------------------------------------------------- rollout


def test_identity_attention_gives_identity_rollout():
    eye = torch.eye(T).expand(2, 3, T, T)
    out = attention_rollout([eye] * 4)
    assert torch.allclose(out, torch.eye(T).expand(2, T, T))
    # the class token then has no mass on patches: the map is zero, not NaN
    rows = query_rows(out, LAYOUT, Query("cls"))
    assert torch.equal(rows, torch.zeros(2, LAYOUT.num_patches))


def test_uniform_attention_gives_uniform_rollout_map():
    depth = 5
    uniform = torch.full((2, 3, T, T), 1.0 / T)
    out = attention_rollout([uniform] * depth)
    # M = (U + I) / 2 and U @ U = U, so M^L = 2^-L I + (1 - 2^-L) U exactly
    expected = 0.5**depth * torch.eye(T) + (1 - 0.5**depth) / T
    assert torch.allclose(out, expected.expand(2, T, T), atol=1e-6)
    cls_map = query_rows(out, LAYOUT, Query("cls"))
    assert torch.allclose(cls_map, torch.full_like(cls_map, 1.0 / LAYOUT.num_patches))


def _numpy_rollout(attns: list[np.ndarray], discard: float = 0.0) -> np.ndarray:
    """Independent reference: vit-explain's loop, per image, in float64."""
    result = np.eye(attns[0].shape[-1])
    for a in attns:
        fused = a.mean(0).astype(np.float64)
        if discard:
            flat = fused.ravel().copy()
            k = int(flat.size * discard)
            flat[np.argsort(flat, kind="stable")[:k]] = 0
            fused = flat.reshape(fused.shape)
        m = (fused + np.eye(len(fused))) / 2
        m = m / m.sum(-1, keepdims=True)
        result = m @ result
    return result


@pytest.mark.parametrize("discard", [0.0, 0.6])
def test_rollout_matches_reference_and_is_batched(discard):
    blocks = [random_attention(3, 4, T, seed=s) for s in range(4)]
    out = attention_rollout(blocks, discard_ratio=discard)
    for i in range(3):  # image i alone gives the same answer as inside the batch
        ref = _numpy_rollout([b[i].numpy() for b in blocks], discard)
        assert np.allclose(out[i].numpy(), ref, atol=1e-5)
    assert torch.allclose(out.sum(-1), torch.ones(3, T), atol=1e-5)
    # registers are kept inside the product but never shown as patches
    rows = query_rows(out, LAYOUT, Query("cls"))
    expected = out[:, 0, LAYOUT.patch_slice] / out[:, 0, LAYOUT.patch_slice].sum(-1, keepdim=True)
    assert rows.shape == (3, LAYOUT.num_patches) and torch.allclose(rows, expected)


def test_rollout_step_streams_like_the_whole_product():
    blocks = [random_attention(2, 2, T, seed=s) for s in range(3)]
    running = None
    for b in blocks:
        running = rollout_step(running, b)
    assert torch.allclose(running, attention_rollout(blocks))
    with pytest.raises(AttnscopeError, match="discard"):
        rollout_step(None, blocks[0], discard_ratio=1.0)


# ---------------------------------------------------------------- query indexing


@pytest.mark.parametrize(("row", "col"), [(0, 0), (2, 4), (1, 3), (2, 0)])
def test_patch_query_indexes_the_right_patch_on_a_non_square_grid(row, col):
    attn = torch.eye(T).expand(1, 2, T, T)  # every token attends to itself
    grid = to_grid(query_rows(attn, LAYOUT, Query("patch", row, col)), LAYOUT)
    assert grid.shape == (1, 2, 3, 5)
    hot = np.argwhere(grid[0, 0] == 1.0)
    assert hot.tolist() == [[row, col]]


def test_cls_map_is_renormalised_over_patches_only():
    attn = torch.zeros(1, 1, T, T)
    attn[..., 0, 0] = 0.5  # [cls] on itself
    attn[..., 0, 1] = 0.3  # and a register
    target = LAYOUT.num_prefix + 1 * 5 + 2  # patch (1, 2)
    attn[..., 0, target] = 0.2
    grid = to_grid(query_rows(attn, LAYOUT, Query("cls")), LAYOUT)[0, 0]
    assert grid[1, 2] == pytest.approx(1.0) and grid.sum() == pytest.approx(1.0)


def test_mean_query_averages_patch_rows():
    attn = random_attention(2, 3, T)
    rows = query_rows(attn, LAYOUT, Query("mean"))
    P = LAYOUT.patch_slice
    p = attn[..., P, P] / attn[..., P, P].sum(-1, keepdim=True)
    assert torch.allclose(rows, p.mean(-2))


def test_query_errors():
    with pytest.raises(AttnscopeError, match="outside the 3x5 patch grid"):
        query_rows(torch.eye(T).expand(1, 1, T, T), LAYOUT, Query("patch", 3, 0))
    no_cls = TokenLayout(False, 1, 1, (2, 2), (16, 16))
    with pytest.raises(AttnscopeError, match="no class token"):
        query_rows(torch.eye(5).expand(1, 1, 5, 5), no_cls, Query("cls"))
    assert parse_query("patch:2,4") == Query("patch", 2, 4)
    assert parse_query("CLS") == Query("cls")
    for bad in ("patch:1", "patch:a,b", "token", "patch:-1,2"):
        with pytest.raises(ConfigError) as info:
            parse_query(bad)
        assert re.search("--query", as_cli_says(info.value))
    assert parse_heads("0,3,5") == (0, 3, 5) and parse_heads("all") == "all"
    with pytest.raises(ConfigError) as info:
        parse_heads("x")
    assert re.search("--heads", as_cli_says(info.value))
    with pytest.raises(AttnscopeError, match="2 heads"):
        select_heads(torch.zeros(1, 2, 4), (0, 2))
    assert resolve_layer(None, 6) == 5 and resolve_layer(-2, 6) == 4
    with pytest.raises(AttnscopeError, match="6 blocks"):
        resolve_layer(6, 6)


# ---------------------------------------------------------------- mass masks and upsampling


def test_mass_mask_is_the_k60_definition():
    from attnscope.metrics import block_metrics

    attn = random_attention(2, 3, T, seed=3)
    per_head, _ = block_metrics(attn, LAYOUT)
    grids = to_grid(query_rows(attn, LAYOUT, Query("cls")), LAYOUT)
    for t, name in ((0.6, "cls_patch_k60_frac"), (0.9, "cls_patch_k90_frac")):
        mask = mass_mask(grids, t)
        frac = mask.reshape(2, 3, -1).mean(-1)
        assert np.allclose(frac, per_head[name].numpy())
        held = (grids * mask).reshape(2, 3, -1).sum(-1)
        assert (held >= t - 1e-6).all()
    assert mass_mask(np.array([[0.5, 0.3], [0.1, 0.1]]), 0.6).tolist() == [[True, True], [False, False]]
    assert not mass_mask(np.zeros((2, 2)), 0.6).any()


def test_upsample_nearest_fills_patches_and_marks_uncovered_pixels():
    grid = np.arange(15, dtype=np.float32).reshape(3, 5)
    up = upsample(grid, (16, 8), (50, 41), "nearest")  # 3x16=48 rows, 5x8=40 cols covered
    assert up.shape == (50, 41)
    assert up[0, 0] == 0 and up[15, 7] == 0 and up[16, 8] == 6 and up[47, 39] == 14
    assert np.isnan(up[48:]).all() and np.isnan(up[:, 40]).all()
    smooth = upsample(grid[None], (16, 8), (48, 40), "bilinear")
    assert smooth.shape == (1, 48, 40) and np.isfinite(smooth).all()
    assert smooth.min() >= 0 and smooth.max() <= 14
    with pytest.raises(ConfigError) as info:
        upsample(grid, (16, 8), (48, 40), "cubic")
    assert re.search("--upsample", as_cli_says(info.value))


# ---------------------------------------------------------------- against a real model


def test_collect_maps_indexes_the_real_attention_on_a_non_square_input(sample_paths):
    """End to end on test_vit at 160x96 (a 10x6 grid): the map equals the captured row."""
    from timm.utils import AttentionExtract

    from attnscope.maps import collect_maps
    from attnscope.models import load_model

    loaded = load_model("test_vit", random_init=True, img_size=(160, 96))
    maps = collect_maps(loaded, sample_paths[:2], query="patch:7,4", heads="all", layer=-2, device="cpu")
    assert maps.maps.shape == (2, 2, 10, 6) and maps.layout.grid == (10, 6) and maps.layer == 4
    assert maps.views.shape == (2, 160, 96, 3) and maps.views.dtype == np.uint8

    from attnscope.data import build_eval_transform, load_rgb

    transform, _ = build_eval_transform(loaded.model, loaded.input_size)
    x = torch.stack([transform(load_rgb(p)) for p in sample_paths[:2]])
    for block in loaded.model.blocks:  # fused attention never materialises the softmax
        block.attn.fused_attn = False
    extract = AttentionExtract(loaded.model, method="fx")
    with torch.no_grad():
        attn = list(extract(x).values())[4]  # (B, H, T, T), block 4
    row = attn[:, :, 1 + 7 * 6 + 4, 1:]
    expected = (row / row.sum(-1, keepdim=True)).reshape(2, 2, 10, 6).numpy()
    assert np.allclose(maps.maps, expected, atol=1e-5)


# ---------------------------------------------------------------- CLI


def test_maps_command_writes_one_figure_per_image(tmp_path):
    out = tmp_path / "maps"
    result = runner.invoke(
        app,
        [
            "maps",
            "--model",
            "test_vit2",
            "--random-init",
            "--max-images",
            "2",
            "--heads",
            "all",
            "--query",
            "mean",
            "--out",
            str(out),
            "--format",
            "svg",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["astronaut.png", "camera.png"] and (out / "astronaut.svg").exists()
    data = np.load(out / "maps.npz")
    assert data["maps"].shape == (2, 2, 10, 10)
    assert np.allclose(data["maps"].sum((-1, -2)), 1.0, atol=1e-5)
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["query"] == "mean" and meta["config"]["layer"] == 7
    assert meta["models"]["test_vit2"]["random_init"] is True


def test_maps_rollout_command(tmp_path):
    out = tmp_path / "maps"
    result = runner.invoke(
        app,
        [
            "maps",
            "--model",
            "test_vit",
            "--random-init",
            "--max-images",
            "1",
            "--rollout",
            "--discard-ratio",
            "0.5",
            "--upsample",
            "bilinear",
            "--contour",
            "0",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert (out / "astronaut.png").stat().st_size > 1000
    assert "rollout" in json.loads((out / "run.json").read_text())["models"]["test_vit"]["maps"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "test_vit", "--query", "patch:10,0"], "outside the 10x10 patch grid"),
        (["--model", "test_vit2", "--query", "cls"], "no class token"),
        (["--model", "test_vit", "--rollout", "--heads", "all"], "--heads mean"),
        (["--model", "test_vit", "--discard-ratio", "0.5"], "--rollout"),
        (["--model", "test_vit", "--layer", "6"], "6 blocks"),
        (["--model", "test_vit", "--heads", "0,9"], "2 heads"),
        (["--model", "test_vit", "--upsample", "cubic"], "--upsample"),
        (["--model", "test_vit", "--contour", "1.5"], "--contour"),
    ],
)
def test_maps_errors_are_one_line_and_write_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["maps", *args, "--random-init", "--max-images", "1", "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_overlay_figure_has_colourbar_and_query_box():
    from attnscope.plots.maps import overlay_figure

    view = np.zeros((48, 40, 3), dtype=np.uint8)
    maps = np.random.default_rng(0).dirichlet(np.ones(15), size=3).reshape(3, 3, 5)
    fig = overlay_figure(view, maps, ["head 0", "head 1", "head 2"], (16, 8), title="t", query_cell=(1, 2))
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "attention (fraction of patch mass)" in labels
    assert math.isclose(maps.sum(), 3.0)
