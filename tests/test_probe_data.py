"""Probe data sources (folders, CSV, torchvision, digits, shots) and the feature cache."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnscope.cli.ui import user_message
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.probe import datasets as ds
from attnscope.probe import features as feat

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def write_image(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_tree(root: Path, counts: dict[str, int], seed: int = 0) -> list[Path]:
    paths = []
    for k, (c, n) in enumerate(counts.items()):
        for i in range(n):
            paths.append(write_image(root / c / f"{i:03d}.png", seed + 1000 * k + i))
    return paths


# ---------------------------------------------------------------- folders and CSV


def test_imagefolder_with_train_and_val(tmp_path):
    make_tree(tmp_path / "train", {"cat": 4, "dog": 3})
    make_tree(tmp_path / "val", {"cat": 2, "dog": 1})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    data = ds.load_probe_data(data=tmp_path)
    assert data.classes == ["cat", "dog"]
    assert len(data.train) == 7 and len(data.eval) == 3 and data.eval.name == "val"
    assert Counter(data.train.labels.tolist()) == {0: 4, 1: 3}
    assert data.eval.source.describe(0).endswith(os.path.join("val", "cat", "000.png"))


def test_imagefolder_with_test_dir_and_class_folders_only(tmp_path):
    make_tree(tmp_path / "a" / "train", {"x": 3, "y": 3})
    make_tree(tmp_path / "a" / "test", {"x": 1, "y": 1})
    assert ds.load_probe_data(data=tmp_path / "a").eval.name == "test"

    make_tree(tmp_path / "b", {"x": 10, "y": 20, "z": 5})
    one = ds.load_probe_data(data=tmp_path / "b", val_fraction=0.2, seed=3)
    two = ds.load_probe_data(data=tmp_path / "b", val_fraction=0.2, seed=3)
    other = ds.load_probe_data(data=tmp_path / "b", val_fraction=0.2, seed=4)
    assert len(one.eval) == 7 and len(one.train) == 28
    assert Counter(one.eval.labels.tolist()) == {0: 2, 1: 4, 2: 1}  # stratified
    assert one.eval.source.item_ids() == two.eval.source.item_ids()  # seeded
    assert one.eval.source.item_ids() != other.eval.source.item_ids()
    assert not set(one.eval.source.item_ids()) & set(one.train.source.item_ids())
    assert any("held out for evaluation" in n for n in one.notes)


def test_train_val_dirs_and_their_errors(tmp_path):
    make_tree(tmp_path / "tr", {"a": 2, "b": 2})
    make_tree(tmp_path / "va", {"a": 1, "c": 1})
    with pytest.raises(AttnscopeError, match="no counterpart"):
        ds.load_probe_data(train=tmp_path / "tr", val=tmp_path / "va")
    make_tree(tmp_path / "va2", {"b": 2})
    data = ds.load_probe_data(train=tmp_path / "tr", val=tmp_path / "va2")
    assert data.eval.labels.tolist() == [1, 1]
    with pytest.raises(ConfigError) as err:  # the library names the field; the CLI says the flags
        ds.load_probe_data(val=tmp_path / "va2")
    assert "needs --train" in user_message(err.value)
    with pytest.raises(AttnscopeError, match="exclude each other"):
        ds.load_probe_data(data=tmp_path / "tr", csv_file=tmp_path / "x.csv")
    with pytest.raises(AttnscopeError, match="no class sub-folders"):
        ds.load_probe_data(data=tmp_path / "tr" / "a")
    with pytest.raises(AttnscopeError, match="no such folder"):
        ds.load_probe_data(data=tmp_path / "missing")


def test_csv_with_and_without_split(tmp_path):
    imgs = [write_image(tmp_path / "img" / f"{i}.png", i) for i in range(8)]
    rows = ["path,label,split"] + [
        f"img/{p.name},{'ant' if i % 2 else 'bee'},{'train' if i < 6 else 'val'}" for i, p in enumerate(imgs)
    ]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    data = ds.load_probe_data(csv_file=tmp_path / "list.csv")
    assert data.classes == ["ant", "bee"] and len(data.train) == 6 and len(data.eval) == 2
    assert Path(data.train.source.describe(0)) == imgs[0]  # relative to the CSV's folder
    (tmp_path / "nosplit.csv").write_text("\n".join(f"{p},{i % 2}" for i, p in enumerate(imgs)) + "\n")
    data = ds.load_probe_data(csv_file=tmp_path / "nosplit.csv", val_fraction=0.25)
    assert len(data.eval) == 2 and sorted(data.eval.labels.tolist()) == [0, 1]
    (tmp_path / "bad.csv").write_text(f"{imgs[0]},a,holdout\n{imgs[1]},b,train\n")
    with pytest.raises(AttnscopeError, match="split must be"):
        ds.load_probe_data(csv_file=tmp_path / "bad.csv")


def test_shots_and_max_images_are_seeded_and_leave_eval_alone(tmp_path):
    make_tree(tmp_path / "train", {"a": 10, "b": 10, "c": 3})
    make_tree(tmp_path / "val", {"a": 4, "b": 4, "c": 4})
    data = ds.load_probe_data(data=tmp_path, shots=4, seed=1)
    assert Counter(data.train.labels.tolist()) == {0: 4, 1: 4, 2: 3}
    assert len(data.eval) == 12 and any("fewer than 4" in n for n in data.notes)
    again = ds.load_probe_data(data=tmp_path, shots=4, seed=1)
    assert data.train.source.item_ids() == again.train.source.item_ids()
    capped = ds.load_probe_data(data=tmp_path, max_images=6)
    assert len(capped.train) == 6 and len(capped.eval) == 6
    assert Counter(capped.eval.labels.tolist()) == {0: 2, 1: 2, 2: 2}


def test_stratified_split_keeps_a_training_image_per_class():
    labels = np.array([0] * 2 + [1] * 1 + [2] * 30)
    kept, held = ds.stratified_split(labels, 0.5, seed=0)
    assert len(held) == 16 and set(labels[kept]) == {0, 1, 2}
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(33))
    kept, held = ds.stratified_split(labels, 0.0, seed=0)
    assert len(held) == 0


# ---------------------------------------------------------------- built-in and torchvision


def test_builtin_digits_need_no_network():
    data = ds.load_probe_data(input_size=(40, 48))
    assert data.classes == [str(d) for d in range(10)]
    assert len(data.train) + len(data.eval) == 1797
    img = data.train.source.load(0)
    assert img.mode == "RGB" and img.size == (48, 40)
    assert np.asarray(img).min() < 100 < np.asarray(img).max()  # ink on paper, not a blank image
    ids = data.train.source.item_ids()
    assert len(set(ids)) > 1700 * 0.7 and "40x48" in ids[0]


def test_named_dataset_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "host_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(AttnscopeError) as err:
        ds.load_probe_data(dataset="cifar10", data_root=tmp_path)
    msg = user_message(err.value)  # as the CLI words it: the library names the field
    assert "\n" not in msg and "--data-root" in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg
    with pytest.raises(AttnscopeError, match="unknown dataset"):
        ds.load_probe_data(dataset="imagenet-22k", data_root=tmp_path)
    assert set(ds.NAMED_DATASETS) >= {
        "cifar10",
        "cifar100",
        "stl10",
        "flowers102",
        "oxford_pets",
        "food101",
        "dtd",
    }


def test_named_dataset_adapter_reads_a_local_copy(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class FakeCIFAR10:
        classes = [f"c{i}" for i in range(10)]

        def __init__(self, root, train=True, download=False):
            assert not download, "a local copy must not be downloaded again"
            n = 30 if train else 10
            self.data = np.random.default_rng(int(train)).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return Image.fromarray(self.data[i]), self.targets[i]

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    data = ds.load_probe_data(data="cifar10", data_root=tmp_path)  # a known name given to --data
    assert data.classes[:2] == ["c0", "c1"] and len(data.train) == 30 and len(data.eval) == 10
    assert data.train.source.load(3).size == (32, 32)
    assert data.eval.source.describe(2) == "cifar10/test/2"


# ---------------------------------------------------------------- feature cache


@pytest.fixture(scope="module")
def tiny_loaded():
    from attnscope.models import load_model

    return load_model("test_vit", random_init=True, img_size=(32, 32))


def material_for(loaded, source, extractor, **kw):
    args = {
        "transform_config": extractor.transform_config,
        "prenorm": extractor.prenorm,
        "dtype": "float32",
        "seed": 0,
    }
    args.update(kw)
    return feat.feature_key_material(loaded, item_ids=source.item_ids(), **args)


def test_tokens_normed_by_default_prenorm_on_request_and_frozen(tiny_loaded):
    tiny_loaded.model.train()
    normed = feat.TokenExtractor(tiny_loaded)
    assert not tiny_loaded.model.training  # a frozen backbone runs in eval mode
    pre = feat.TokenExtractor(tiny_loaded, prenorm=True)
    x = torch.randn(2, 3, 32, 32)
    a, b = normed(x), pre(x)
    assert a.shape == (2, 5, 64) and normed.token_shape() == (5, 64)
    torch.testing.assert_close(a, tiny_loaded.model.norm(b))
    assert not torch.allclose(a, b)
    assert "final norm" in normed.norm_label and "pre-norm" in pre.norm_label


def test_cache_key_changes_with_everything_that_changes_features(tmp_path, tiny_loaded):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(3)]
    source = ds.FileSource(paths)
    ex = feat.TokenExtractor(tiny_loaded)
    base = feat.cache_key(material_for(tiny_loaded, source, ex))
    assert base == feat.cache_key(material_for(tiny_loaded, source, ex))
    assert base != feat.cache_key(material_for(tiny_loaded, source, ex, prenorm=True))
    assert base != feat.cache_key(material_for(tiny_loaded, source, ex, dtype="bfloat16"))
    assert base != feat.cache_key(
        material_for(tiny_loaded, source, ex, transform_config={**ex.transform_config, "crop_pct": 1.0})
    )
    assert base != feat.cache_key(material_for(tiny_loaded, ds.FileSource(paths[:2]), ex))
    assert base != feat.cache_key(
        material_for(tiny_loaded, source, ex, seed=1)
    )  # random init seed = other weights
    st = paths[0].stat()
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert base != feat.cache_key(material_for(tiny_loaded, source, ex))


def test_extraction_is_resumable_atomic_and_indexed(tmp_path, tiny_loaded):
    paths = [write_image(tmp_path / "img" / f"{i}.png", i) for i in range(10)]
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths.insert(4, tmp_path / "img" / "broken.png")
    source = ds.FileSource(paths)
    ex = feat.TokenExtractor(tiny_loaded)
    material = material_for(tiny_loaded, source, ex)
    cache = feat.open_cache(tmp_path / "cache", "tiny", material, len(source), 5, 64, shard_images=4)

    # An extraction that dies inside its second shard leaves one complete shard and no debris.
    calls = {"n": 0}
    real_call = feat.TokenExtractor.__call__

    def dying(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_call(self, images)

    feat.TokenExtractor.__call__ = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            feat.extract_shards(ex, source, cache, range(len(source)), batch_size=2)
    finally:
        feat.TokenExtractor.__call__ = real_call
    assert len(cache.shards()) == 1 and sorted(cache.done_positions()) == [0, 1, 2, 3]
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]
    assert len(list(cache.root.glob("*.npy"))) == 1
    with pytest.raises(AttnscopeError, match="incomplete"):
        feat.write_cache_index(cache)

    skipped = []
    report = feat.extract_shards(
        ex, source, cache, range(len(source)), batch_size=2, on_skip=lambda p, r: skipped.append(p)
    )
    assert report.extracted == 6 and list(report.failures) == [4] and skipped == [paths[4]]
    index = feat.write_cache_index(cache)
    assert cache.is_complete() and index.failures.keys() == {4}
    store = feat.FeatureStore(cache)
    assert store.valid.tolist() == [i != 4 for i in range(11)]
    got = store.gather([7, 0, 10])
    assert got.dtype == np.float16 and got.shape == (3, 5, 64)
    with torch.no_grad():
        direct = ex(torch.stack([ex.transform(source.load(i)) for i in (7, 0, 10)]))
    np.testing.assert_allclose(got.astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)
    assert feat.extract_shards(ex, source, cache, range(len(source))).extracted == 0  # nothing left to do
    doc = json.loads(cache.index_path.read_text())
    assert doc["key"] == cache.key and doc["dtype"] == "float16"


def test_interrupted_extraction_keeps_every_commit_whatever_the_shard_size(tmp_path, tiny_loaded):
    """Commits come every few images (or seconds) even when a shard could hold the whole split;
    Ctrl-C says how much is committed and a rerun extracts only the rest."""
    paths = [write_image(tmp_path / "img" / f"{i}.png", i) for i in range(12)]
    source = ds.FileSource(paths)
    ex = feat.TokenExtractor(tiny_loaded)
    cache = feat.open_cache(tmp_path / "cache", "tiny", material_for(tiny_loaded, source, ex), 12, 5, 64)
    assert cache.shard_images >= 12  # one shard could hold everything
    calls = {"n": 0}
    real_call = feat.TokenExtractor.__call__

    def dying(self, images):
        calls["n"] += 1
        if calls["n"] == 5:  # after 4 batches of 2 images
            raise KeyboardInterrupt
        return real_call(self, images)

    feat.TokenExtractor.__call__ = dying
    try:
        with pytest.raises(feat.ExtractionInterrupted, match="8 of 12 images"):
            feat.extract_shards(ex, source, cache, range(12), batch_size=2, commit_images=4)
    finally:
        feat.TokenExtractor.__call__ = real_call
    assert sorted(cache.done_positions()) == list(range(8))
    report = feat.extract_shards(ex, source, cache, range(12), batch_size=2, commit_images=4)
    assert report.extracted == 4  # only the rest
    feat.write_cache_index(cache)
    resumed = feat.FeatureStore(cache).load_all()

    fresh = feat.open_cache(tmp_path / "fresh", "tiny", material_for(tiny_loaded, source, ex), 12, 5, 64)
    feat.extract_shards(ex, source, fresh, range(12), batch_size=2, commit_seconds=0.0)
    assert len(fresh.shards()) == 6  # a commit after every batch when the time limit is 0
    feat.write_cache_index(fresh)
    np.testing.assert_array_equal(resumed, feat.FeatureStore(fresh).load_all())


def test_disk_space_refusal_suggests_no_cache(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(feat.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(AttnscopeError) as err:
        feat.ensure_disk_space(tmp_path / "not" / "yet", 5 * 10**8)
    msg = user_message(err.value)  # as the CLI words it: the library names the fields
    assert "--no-cache" in msg and "476.8 MiB" in msg
    assert feat.ensure_disk_space(tmp_path, 0) == 10**6


def test_streaming_source_skips_bad_images_once(tmp_path, tiny_loaded):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"nope")
    source = ds.FileSource([*paths[:2], tmp_path / "bad.png", *paths[2:]])
    skipped = []
    stream = feat.StreamSource(
        feat.TokenExtractor(tiny_loaded), source, on_skip=lambda p, r: skipped.append(p)
    )
    batches = list(stream.iterate(range(6), 2))
    assert [len(p) for _, p in batches] == [2, 2, 1] and 2 not in np.concatenate([p for _, p in batches])
    list(stream.iterate(range(6), 4, shuffle=True, rng=np.random.default_rng(0)))
    assert skipped == [tmp_path / "bad.png"] and stream.failures.keys() == {2}


def test_probe_library_messages_name_no_command_line_flag():
    """attnscope.probe names config fields (the CLI words them as flags), never a flag itself."""
    import ast
    import re

    import attnscope.probe

    flag = re.compile(r"(?<![\w-])--[a-z]")
    found = []
    for path in sorted(Path(attnscope.probe.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and flag.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    assert found == []
