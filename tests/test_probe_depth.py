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
        out.append(m.norm(x))  # the final norm of the last block's output, at index num_blocks
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
    last = n - 1  # blocks are counted from 0: block b is timm's blocks[b]
    assert normed.blocks == list(range(n)) and normed.num_blocks == n and normed.last_block == last
    got = normed.extract(x)
    assert sorted(got) == normed.blocks
    for b in range(last):
        torch.testing.assert_close(got[b].double(), ref[b], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[last].double(), ref[n], rtol=1e-4, atol=1e-4)  # normed
    pre = feat.TokenExtractor(tiny_loaded, prenorm=True, blocks=[0, last]).extract(x)
    torch.testing.assert_close(pre[last].double(), ref[last], rtol=1e-4, atol=1e-4)  # the raw last block
    torch.testing.assert_close(pre[0], got[0])  # prenorm changes only the last block
    # the default extractor is the last block, normed, as before blocks could be chosen
    torch.testing.assert_close(feat.TokenExtractor(tiny_loaded)(x), got[last])


def test_the_forward_stops_after_the_deepest_block_asked_for(tiny_loaded):
    ran: list[int] = []
    handles = [
        blk.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
        for k, blk in enumerate(tiny_loaded.model.blocks)
    ]
    try:
        out = feat.TokenExtractor(tiny_loaded, blocks=[0, 1]).extract(torch.randn(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == [0, 1] and ran == [0, 1]  # blocks 2.. and the final norm never ran


def test_block_specs_count_from_0_as_timm_and_entropy_do(tiny_loaded):
    assert feat.normalise_blocks("last") == "last" and feat.normalise_blocks(" ALL ") == "all"
    assert feat.normalise_blocks("2, 5,8,11") == (2, 5, 8, 11) and feat.normalise_blocks([0, -1]) == (0, -1)
    assert feat.normalise_blocks("0") == (0,) and ProbeConfig(blocks="0").blocks == (0,)
    assert feat.parse_blocks("last", 12) == [11] and feat.parse_blocks(None, 12) == [11]
    assert feat.parse_blocks("all", 3) == [0, 1, 2]
    assert feat.parse_blocks((0,), 12) == [0] and feat.parse_blocks((-1,), 12) == [11]  # first; last
    assert feat.parse_blocks((-12,), 12) == [0]  # negative counts from the end, as in Python
    assert feat.parse_blocks((11, 2, -1, 5), 12) == [2, 5, 11]  # sorted, distinct; -1 is the last
    for bad in ("first", "", "3,x", "1.5"):
        with pytest.raises(ConfigError, match="counted from 0"):
            feat.normalise_blocks(bad)
    for out_of_range in ((3, 12), (-13,)):
        with pytest.raises(ConfigError, match=r"the model has blocks 0 to 11 \(counted from 0"):
            feat.parse_blocks(out_of_range, 12)
    # test_vit has 6 blocks: 0 to 5, and 6 is one past the last
    with pytest.raises(ConfigError, match=r"names blocks \[6\]; the model has blocks 0 to 5"):
        feat.TokenExtractor(tiny_loaded, blocks=ProbeConfig(blocks="6").blocks)


def test_cache_keys_per_block_and_the_last_block_keeps_the_old_key(tmp_path, tiny_loaded):
    source = ds.FileSource([write_image(tmp_path / f"{i}.png", i) for i in range(3)])
    ex = feat.TokenExtractor(tiny_loaded)
    n = ex.num_blocks

    def key(**kw):
        args = {"transform_config": ex.transform_config, "prenorm": False, "dtype": "float32", "seed": 0}
        return feat.cache_key(feat.feature_key_material(tiny_loaded, item_ids=source.item_ids(), **args | kw))

    old = key()  # what every cache written before blocks could be chosen is keyed by
    assert key(block=n - 1, num_blocks=n) == old  # the last block, counted from 0
    assert len({key(block=b, num_blocks=n) for b in range(n)}) == n
    # the key names timm's module (block b is blocks[b]), not a number of ours: how blocks are
    # counted cannot make a cache serve another block's tokens
    for b in range(n - 1):
        material = feat.feature_key_material(
            tiny_loaded, transform_config=ex.transform_config, prenorm=False, dtype="float32", seed=0,
            item_ids=source.item_ids(), block=b, num_blocks=n,
        )  # fmt: skip
        assert tiny_loaded.model.get_submodule(material["layer"]) is tiny_loaded.model.blocks[b]
    # an intermediate block never passes the final norm, so prenorm cannot change its tokens
    assert key(block=2, num_blocks=n, prenorm=True) == key(block=2, num_blocks=n)
    assert key(block=n - 1, num_blocks=n, prenorm=True) != old


def test_one_forward_fills_every_block_that_lacks_an_image(tmp_path, tiny_loaded, monkeypatch):
    paths = [write_image(tmp_path / "img" / f"{i}.png", i) for i in range(9)]
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = ds.FileSource([*paths[:4], tmp_path / "img" / "broken.png", *paths[4:]])
    ex = feat.TokenExtractor(tiny_loaded, blocks=[2, 4, ex_last := len(tiny_loaded.model.blocks) - 1])

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
    assert n == 6 and every.info["features"]["blocks"] == list(range(n))  # 0 .. 5
    assert len(every.results) == n * 3 * 2 and len(every.summary) == n * 3
    assert every.results.groupby(["block", "aggregator"]).size().eq(2).all()
    # relative depth as spectrum.csv's: block / last block, the first block at 0, the last at 1
    assert list(every.summary["relative_depth"]) == [b / (n - 1) for b in range(n) for _ in range(3)]
    # the last block of `all` is the default run: same cache key, same numbers
    assert set(last.results["block"]) == {n - 1} and last.info["features"]["blocks"] == [n - 1]
    pd.testing.assert_frame_equal(
        every.results[every.results["block"] == n - 1].reset_index(drop=True), last.results, check_dtype=False
    )
    assert every.info["cache"]["train"]["blocks"][str(n - 1)]["key"] == last.info["cache"]["train"]["key"]
    out = tmp_path / "all"
    assert (out / "figures" / "accuracy_by_depth.png").stat().st_size > 5000
    assert not (tmp_path / "last" / "figures" / "accuracy_by_depth.png").exists()
    assert set(pd.read_csv(out / "results.csv")["block"]) == set(range(n))
    meta = json.loads((out / "run.json").read_text())
    assert (
        meta["config"]["blocks"] == "all"
        and "counted from 0" in meta["models"]["test_vit"]["features"]["block_numbering"]
    )
    # adding blocks later: the cached ones are reused, only the missing one costs forwards
    forwards.clear()
    _, more = run(
        replace(config, blocks=(1, 3), cache_dir=tmp_path / "c1", out=tmp_path / "more", map_images=0)
    )
    assert sum(forwards) == 1 + 240  # blocks 1 and 3 were not cached there; one forward fills both
    assert more.info["cache"]["train"]["blocks"]["3"]["written"] == 120
    forwards.clear()
    _, again = run(
        replace(config, blocks=(3, -1), cache_dir=tmp_path / "c1", out=tmp_path / "again", map_images=0)
    )
    assert forwards == [1]  # the token-shape probe only: blocks 3 and 5 (the last) are both cached
    assert again.info["features"]["blocks"] == [3, 5]
    assert again.info["cache"]["train"]["extracted"] == 0


@pytest.mark.slow
def test_probe_and_entropy_give_the_same_block_the_same_number(tmp_path):
    """`probe --blocks 0,2` and entropy's layers.csv on the same model and images: probe's
    block b holds the tokens whose [cls] norm entropy reports for its layer b (`cls_norm`
    is measured on each block's output), and every probe table calls that block b."""
    from typer.testing import CliRunner

    from attnscope.cli.app import app

    data = tmp_path / "data"
    for i in range(12):
        write_image(data / "ab"[i % 2] / f"{i}.png", i, size=40)
    model = ["--model", "test_vit", "--random-init", "--img-size", "64"]

    def invoke(*args: str):
        result = CliRunner().invoke(app, [*args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    invoke("entropy", *model, "--images", str(data), "--metrics", "tokens", "--out", str(tmp_path / "e"))
    invoke(
        "probe", *model, "--data", str(data), "--val-fraction", "0.5", "--blocks", "0,2", "--epochs", "1",
        "--lrs", "0.1", "--wds", "0", "--aggregator", "mean,abmilp", "--maps", "1", "--embedding", "pca",
        "--no-curves", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "p"),
    )  # fmt: skip
    layers = pd.read_csv(tmp_path / "e" / "layers.csv")
    cls_norm = layers[layers["metric"] == "cls_norm"].set_index("layer")["mean"]
    assert list(cls_norm.index) == list(range(6))  # entropy: layers 0 to 5
    info = json.loads((tmp_path / "p" / "run.json").read_text())["models"]["test_vit"]
    for block in (0, 2):
        norms = []
        for split in ("train", "eval"):  # every image is in one of the two
            folder = Path(info["cache"][split]["blocks"][str(block)]["path"])
            assert f"-b{block}-{split}-" in folder.name  # the cache folder carries the same number
            layer = json.loads((folder / "key.json").read_text())["material"]["layer"]
            assert layer == f"blocks.{block}"  # timm's module blocks[block]
            for shard in json.loads((folder / "index.json").read_text())["shards"]:
                tokens = np.load(folder / f"{shard['name']}.npy").astype(np.float64)
                norms.extend(np.linalg.norm(tokens[:, 0], axis=-1))
        assert len(norms) == 12
        # float16 tokens: 1e-3 relative, while every other layer is more than 10% away
        assert np.mean(norms) == pytest.approx(cls_norm[block], rel=2e-3)
        assert (abs(cls_norm.drop(block) - cls_norm[block]) > 0.1 * cls_norm[block]).all()
    # every probe table numbers the blocks as entropy does
    for name in ("results.csv", "summary.csv"):
        assert set(pd.read_csv(tmp_path / "p" / name)["block"]) == {0, 2}, name
    summary = pd.read_csv(tmp_path / "p" / "summary.csv")
    assert dict(zip(summary["block"], summary["relative_depth"], strict=False)) == {0: 0.0, 2: 0.4}
    assert set(pd.read_csv(tmp_path / "p" / "maps.csv")["block"]) == {2}  # the deepest probed block
    assert set(pd.read_csv(tmp_path / "p" / "embedding.csv")["block"]) == {2}
    assert info["features"]["blocks"] == [0, 2] and info["embedding"]["block"] == 2


def test_an_out_of_range_block_is_a_one_line_error_with_the_valid_range(tmp_path):
    from typer.testing import CliRunner

    from attnscope.cli.app import app

    args = ["probe", "--model", "test_vit", "--random-init", "--img-size", "32", "--blocks", "2,6"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--blocks" in text and "names blocks [6]; the model has blocks 0 to 5" in text, text
    assert "Traceback" not in result.output


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
            blocks=(0, 2, 5),
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
    from attnscope.plots.probe import accuracy_by_depth, block_label

    assert block_label(11, 12) == "block 11 (last)" and block_label(0, 12) == "block 0 of 0-11"

    def summary(blocks: int, gain: float) -> pd.DataFrame:
        rows = [
            {"block": b, "relative_depth": b / (blocks - 1), "aggregator": a,
             "eval_top1": 0.3 + 0.05 * b + gain * (a == "abmilp"),
             "eval_top1_ci_low": 0.2, "eval_top1_ci_high": 0.9}
            for b in range(blocks) for a in ("cls", "abmilp")
        ]  # fmt: skip
        return pd.DataFrame(rows)

    one = accuracy_by_depth(summary(6, 0.1), label="mae", num_classes=10)
    assert len(one.axes) == 1 and len(one.axes[0].get_lines()) == 3  # two aggregators and chance
    several = accuracy_by_depth({"mae (12 blocks)": summary(12, 0.1), "dino (6 blocks)": summary(6, 0.0)})
    assert [ax.get_title() for ax in several.axes] == ["cls", "abmilp"]
    xs = [line.get_xdata() for line in several.axes[0].get_lines()]
    # relative depth: the first block of either model at 0, the last at 1
    assert [len(x) for x in xs] == [12, 6] and all(min(x) == 0.0 and max(x) == 1.0 for x in xs)
    assert several.axes[0].get_xlabel() == "relative depth (block / last block)"  # as compare's figures
    assert several.axes[0].get_xlim()[0] < 0  # block 0's point is not cut at the edge
