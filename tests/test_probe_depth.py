"""`probe` across depth: block selection, one extraction for every block, results per block."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import attnscope.measure
from attnscope.commands.probe import ProbeConfig, run
from attnscope.errors import ConfigError
from attnscope.probe import datasets as ds
from attnscope.probe import features as feat

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_loaded():
    from attnscope.models import load_model

    return load_model("test_vit", random_init=True, img_size=(32, 32))


def reference_blocks(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output, written out in float64 from timm's ViT forward (no hooks)."""
    m = copy.deepcopy(model).double().eval()
    x = images.double()
    with torch.no_grad():
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        out = []
        for block in m.blocks:
            x = block(x)
            out.append(x)
        out.append(m.norm(x))  # the final norm of the last block, at index num_blocks
    return out


def write_image(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- the extractor


def test_every_block_is_its_output_and_only_the_last_gets_the_final_norm(tiny_loaded):
    x = torch.randn(3, 3, 32, 32)
    ref = reference_blocks(tiny_loaded.model, x)
    n = len(tiny_loaded.model.blocks)
    normed = feat.TokenExtractor(tiny_loaded, blocks="all")
    assert normed.blocks == list(range(1, n + 1)) and normed.num_blocks == n
    got = normed.extract(x)
    assert sorted(got) == normed.blocks
    for b in range(1, n):
        torch.testing.assert_close(got[b].double(), ref[b - 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-4)  # normed
    pre = feat.TokenExtractor(tiny_loaded, prenorm=True, blocks=[2, n]).extract(x)
    torch.testing.assert_close(pre[n].double(), ref[n - 1], rtol=1e-4, atol=1e-4)  # the raw last block
    torch.testing.assert_close(pre[2], got[2])  # prenorm changes only the last block
    # the default extractor is the last block, normed, as before blocks could be chosen
    torch.testing.assert_close(feat.TokenExtractor(tiny_loaded)(x), got[n])


def test_the_forward_stops_after_the_deepest_block_asked_for(tiny_loaded):
    ran: list[int] = []
    handles = [
        blk.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
        for k, blk in enumerate(tiny_loaded.model.blocks, start=1)
    ]
    try:
        out = feat.TokenExtractor(tiny_loaded, blocks=[1, 2]).extract(torch.randn(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == [1, 2] and ran == [1, 2]  # blocks 3.. and the final norm never ran


def test_block_specs():
    assert feat.normalise_blocks("last") == "last" and feat.normalise_blocks(" ALL ") == "all"
    assert feat.normalise_blocks("3, 6,9,12") == (3, 6, 9, 12) and feat.normalise_blocks([2, -1]) == (2, -1)
    assert feat.parse_blocks("last", 12) == [12] and feat.parse_blocks("all", 3) == [1, 2, 3]
    assert feat.parse_blocks((12, 3, -1, 6), 12) == [3, 6, 12]  # sorted, distinct; -1 is the last
    for bad in ("0,3", "first", "", "3,x"):
        with pytest.raises(ConfigError, match="blocks"):
            feat.normalise_blocks(bad)
    with pytest.raises(ConfigError, match="blocks 1 to 12"):
        feat.parse_blocks((3, 13), 12)
    with pytest.raises(ConfigError, match="blocks"):
        ProbeConfig(blocks="0")


def test_cache_keys_per_block_and_the_last_block_keeps_the_old_key(tmp_path, tiny_loaded):
    source = ds.FileSource([write_image(tmp_path / f"{i}.png", i) for i in range(3)])
    ex = feat.TokenExtractor(tiny_loaded)
    n = ex.num_blocks

    def key(**kw):
        args = {"transform_config": ex.transform_config, "prenorm": False, "dtype": "float32", "seed": 0}
        return feat.cache_key(feat.feature_key_material(tiny_loaded, item_ids=source.item_ids(), **args | kw))

    old = key()  # what every cache written before blocks could be chosen is keyed by
    assert key(block=n, num_blocks=n) == old
    assert len({key(block=b, num_blocks=n) for b in range(1, n + 1)}) == n
    # an intermediate block never passes the final norm, so prenorm cannot change its tokens
    assert key(block=2, num_blocks=n, prenorm=True) == key(block=2, num_blocks=n)
    assert key(block=n, num_blocks=n, prenorm=True) != old


def test_one_forward_fills_every_block_that_lacks_an_image(tmp_path, tiny_loaded, monkeypatch):
    paths = [write_image(tmp_path / "img" / f"{i}.png", i) for i in range(9)]
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = ds.FileSource([*paths[:4], tmp_path / "img" / "broken.png", *paths[4:]])
    ex = feat.TokenExtractor(tiny_loaded, blocks=[2, 4, ex_last := len(tiny_loaded.model.blocks)])

    def cache(block):
        material = feat.feature_key_material(
            tiny_loaded, transform_config=ex.transform_config, prenorm=False, dtype="float32", seed=0,
            item_ids=source.item_ids(), block=block, num_blocks=ex.num_blocks,
        )  # fmt: skip
        return feat.open_cache(tmp_path / "cache", f"b{block}", material, len(source), 5, 64)

    caches = {b: cache(b) for b in (2, 4, ex_last)}
    forwards = []
    real = attnscope.measure.forward_features
    monkeypatch.setattr(
        attnscope.measure, "forward_features", lambda *a, **k: (forwards.append(len(a[1])), real(*a, **k))[1]
    )
    first = feat.extract_shards(ex, source, {2: caches[2]}, range(6), batch_size=4)  # block 2, images 0..5
    assert first.extracted == 5 and forwards == [4, 1]  # image 4 is unreadable: no forward for it
    forwards.clear()
    report = feat.extract_shards(ex, source, caches, range(len(source)), batch_size=4)
    # every image once: 0..5 for blocks 4 and last, 6..9 for all three, in batches of 4
    assert sum(forwards) == len(source) - 1 and len(forwards) == 3
    assert report.extracted == 9 and report.rows == {2: 4, 4: 9, ex_last: 9} and list(report.failures) == [4]
    assert len(caches[2].shards()) == 2  # block 2's first shard was not rewritten
    for b, c in caches.items():
        feat.write_cache_index(c)
        got = feat.FeatureStore(c).gather([0, 7]).astype(np.float32)
        with torch.no_grad():
            direct = ex.extract(torch.stack([ex.transform(source.load(i)) for i in (0, 7)]), [b])[b]
        np.testing.assert_allclose(got, direct.numpy(), rtol=2e-3, atol=2e-3)
        assert feat.FeatureStore(c).failures.keys() == {4}
    forwards.clear()
    assert feat.extract_shards(ex, source, caches, range(len(source))).extracted == 0 and forwards == []


# ---------------------------------------------------------------- the command


def count_forwards(monkeypatch) -> list[int]:
    """Images per backbone forward, for every forward the probe runs."""
    seen: list[int] = []
    real = attnscope.measure.forward_features

    def counted(model, images, **kw):
        seen.append(len(images))
        return real(model, images, **kw)

    monkeypatch.setattr(attnscope.measure, "forward_features", counted)
    return seen


@pytest.mark.slow
def test_blocks_all_extracts_once_and_writes_a_row_per_block_and_aggregator(tmp_path, monkeypatch):
    config = ProbeConfig(
        model="test_vit", random_init=True, img_size=(48, 48), max_images=120, epochs=2, lrs=[1e-2, 1e-1],
        wds=[0.0], map_images=2,
    )  # fmt: skip
    forwards = count_forwards(monkeypatch)
    _, last = run(replace(config, cache_dir=tmp_path / "c1", out=tmp_path / "last"))
    once = list(forwards)
    forwards.clear()
    _, every = run(replace(config, blocks="all", cache_dir=tmp_path / "c2", out=tmp_path / "all"))
    # token-shape probe + 120 train + 120 eval images + the maps: as many forwards for 6 blocks as for 1
    assert forwards == once and sum(once) == 1 + 240 + 2
    n = every.info["num_blocks"]
    assert n == 6 and every.info["features"]["blocks"] == list(range(1, n + 1))
    assert len(every.results) == n * 3 * 2 and len(every.summary) == n * 3
    assert every.results.groupby(["block", "aggregator"]).size().eq(2).all()
    assert list(every.summary["relative_depth"]) == [b / n for b in range(1, n + 1) for _ in range(3)]
    # the last block of `all` is the default run: same cache key, same numbers
    pd.testing.assert_frame_equal(
        every.results[every.results["block"] == n].reset_index(drop=True), last.results, check_dtype=False
    )
    assert every.info["cache"]["train"]["blocks"][str(n)]["key"] == last.info["cache"]["train"]["key"]
    out = tmp_path / "all"
    assert (out / "figures" / "accuracy_by_depth.png").stat().st_size > 5000
    assert not (tmp_path / "last" / "figures" / "accuracy_by_depth.png").exists()
    assert set(pd.read_csv(out / "results.csv")["block"]) == set(range(1, n + 1))
    meta = json.loads((out / "run.json").read_text())
    assert (
        meta["config"]["blocks"] == "all"
        and "1-based" in meta["models"]["test_vit"]["features"]["block_numbering"]
    )
    # adding blocks later: the cached ones are reused, only the missing one costs forwards
    forwards.clear()
    _, more = run(
        replace(config, blocks=(2, 4), cache_dir=tmp_path / "c1", out=tmp_path / "more", map_images=0)
    )
    assert sum(forwards) == 1 + 240  # blocks 2 and 4 were not cached there; one forward fills both
    assert more.info["cache"]["train"]["blocks"]["4"]["written"] == 120
    forwards.clear()
    _, again = run(
        replace(config, blocks=(4, 6), cache_dir=tmp_path / "c1", out=tmp_path / "again", map_images=0)
    )
    assert forwards == [1]  # the token-shape probe only: blocks 4 and 6 are both cached
    assert again.info["cache"]["train"]["extracted"] == 0


def write_marked_patches(root: Path, n: int, seed: int, grid: int = 3, patch: int = 16) -> None:
    """Images whose class is the colour of ONE marked patch at a random place.

    Every patch of the grid is filled with a random class colour (so the image's mean
    colour barely tells the class), and one carries the true class colour with a
    checkerboard added (the same pixels whatever the colour, so one direction of the patch
    embedding); only a head that finds the marked patch can read the label reliably."""
    colours = np.array([[220, 30, 30], [30, 200, 30], [40, 40, 230], [220, 210, 30]], dtype=np.float64)
    g = np.random.default_rng(seed)
    checker = (np.indices((patch, patch)).sum(0) % 2).astype(np.float64)[..., None]
    for i in range(n):
        label = int(g.integers(0, 4))
        img = np.zeros((grid * patch, grid * patch, 3))
        cells = g.integers(0, 4, grid * grid)
        key = int(g.integers(0, grid * grid))
        cells[key] = label
        for c in range(grid * grid):
            r, q = divmod(c, grid)
            tile = np.broadcast_to(colours[cells[c]] * 0.7, (patch, patch, 3)).copy()
            if c == key:
                tile = tile + 70 * (checker - 0.5)
            img[r * patch : (r + 1) * patch, q * patch : (q + 1) * patch] = tile
        img += g.normal(0, 8, img.shape)
        path = root / str(label) / f"{seed}-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


@pytest.mark.slow
def test_abmilp_beats_cls_at_every_block_on_the_one_marked_patch_task(tmp_path):
    """A random-weight ViT keeps a patch's own content in its token at every block (the
    residual stream), while [cls] mixes all patches: AbMILP finds the marked patch.
    (crop_pct 1: the patch grid of the image is the model's.)"""
    write_marked_patches(tmp_path / "data" / "train", 480, seed=1)
    write_marked_patches(tmp_path / "data" / "val", 240, seed=2)
    _, result = run(
        ProbeConfig(
            model="test_vit",
            random_init=True,
            img_size=(48, 48),
            data_config="crop_pct=1.0",
            data=tmp_path / "data",
            blocks=(1, 3, 6),
            aggregators=("cls", "abmilp"),
            epochs=30,
            batch_size=32,
            lrs=(1e-2, 1e-1),
            wds=(0.0,),
            map_images=0,
            curves=False,  # not what this test is about; they would double its time
            cache_dir=tmp_path / "cache",
            out=tmp_path / "run",
        )  # fmt: skip
    )
    acc = result.summary.pivot(index="block", columns="aggregator", values="eval_top1")
    assert (acc["abmilp"] > acc["cls"] + 0.2).all(), acc
    assert (acc["abmilp"] > 0.9).all(), acc  # chance is 0.25


def test_depth_figure_of_one_run_and_of_several_models():
    from attnscope.plots.probe import accuracy_by_depth

    def summary(blocks: int, gain: float) -> pd.DataFrame:
        rows = [
            {"block": b, "relative_depth": b / blocks, "aggregator": a,
             "eval_top1": 0.3 + 0.05 * b + gain * (a == "abmilp"),
             "eval_top1_ci_low": 0.2, "eval_top1_ci_high": 0.9}
            for b in range(1, blocks + 1) for a in ("cls", "abmilp")
        ]  # fmt: skip
        return pd.DataFrame(rows)

    one = accuracy_by_depth(summary(6, 0.1), label="mae", num_classes=10)
    assert len(one.axes) == 1 and len(one.axes[0].get_lines()) == 3  # two aggregators and chance
    several = accuracy_by_depth({"mae (12 blocks)": summary(12, 0.1), "dino (6 blocks)": summary(6, 0.0)})
    assert [ax.get_title() for ax in several.axes] == ["cls", "abmilp"]
    xs = [line.get_xdata() for line in several.axes[0].get_lines()]
    assert [len(x) for x in xs] == [12, 6] and all(max(x) == 1.0 for x in xs)  # relative depth
