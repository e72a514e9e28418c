"""`augment`: cached augmented views of the training images, one shown per image and epoch."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import attnscope.measure
from attnscope.commands.probe import ProbeConfig, run
from attnscope.errors import ConfigError
from attnscope.probe import datasets as ds
from attnscope.probe import features as feat
from attnscope.probe.train import TensorSource, ViewSource

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def paper_view(image: Image.Image, size: int, rng: np.random.Generator) -> tuple[Image.Image, bool]:
    """util/crop.RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3) with the draws taken
    from `rng` in its order, then torchvision's resized_crop (bicubic) and RandomHorizontalFlip."""
    width, height = image.size
    target_area = width * height * rng.uniform(0.08, 1.0)
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
    h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
    i = int(rng.integers(0, height - h + 1))
    j = int(rng.integers(0, width - w + 1))
    out = TF.resized_crop(image, i, j, h, w, [size, size], InterpolationMode.BICUBIC)
    flip = rng.uniform() < 0.5
    return (TF.hflip(out) if flip else out), flip


def picture(seed: int, size=(57, 41)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def test_an_augmented_view_is_the_paper_recipes_crop_and_flip():
    flips = 0
    for k in range(200):
        image = picture(k)
        ours = feat.augmented_view(image, (32, 32), np.random.default_rng(k))
        ref, flipped = paper_view(image, 32, np.random.default_rng(k))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
        flips += flipped
    assert ours.size == (32, 32) and 70 <= flips <= 130  # both branches, about half each


def test_a_view_depends_on_its_image_view_and_seed_only():
    base = ds.DigitsSource(np.random.default_rng(0).integers(0, 16, (6, 8, 8)).astype(float), (32, 32))
    a = feat.AugmentedSource(base, 1, 0, (32, 32))
    assert np.array_equal(
        np.asarray(a.load(3)), np.asarray(feat.AugmentedSource(base, 1, 0, (32, 32)).load(3))
    )
    for other in (feat.AugmentedSource(base, 2, 0, (32, 32)), feat.AugmentedSource(base, 1, 7, (32, 32))):
        assert not np.array_equal(np.asarray(a.load(3)), np.asarray(other.load(3)))
    assert a.item_ids() == base.item_ids() and a.key()["view"] == 1
    tensor = feat.augment_transform({"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})(a.load(0))
    expected = (TF.to_tensor(a.load(0)) - 0.5) / 0.25
    torch.testing.assert_close(tensor, expected)


def test_each_epoch_shows_one_seeded_view_per_image():
    n, views = 10, 3
    # row v * n + p holds the number 100 * v + p
    stacked = torch.tensor([[[100.0 * v + p]] for v in range(views) for p in range(n)])
    source = ViewSource(TensorSource(stacked), n, views, seed=4)
    seen = []
    for epoch in range(4):
        source.set_epoch(epoch)
        (tokens, pos), *_ = list(source.iterate(np.arange(n)[::-1], batch_size=n))
        got = tokens[:, 0, 0].numpy()
        assert list(pos) == list(range(n))[::-1]
        np.testing.assert_array_equal(got % 100, pos)  # every image shows its own tokens ...
        view = got // 100
        assert set(view) <= {0, 1, 2}
        seen.append(view)
    assert len({tuple(v) for v in seen}) == 4  # ... in a view drawn anew each epoch
    source.set_epoch(2)
    np.testing.assert_array_equal(
        next(source.iterate(np.arange(n)[::-1], n))[0][:, 0, 0].numpy() // 100, seen[2]
    )


def test_augment_needs_the_cache():
    with pytest.raises(ConfigError, match="augment"):
        ProbeConfig(augment=2, no_cache=True)
    with pytest.raises(ConfigError, match="augment"):
        ProbeConfig(augment=-1)


@pytest.mark.slow
def test_more_views_reuse_the_cached_ones_and_training_reads_the_views(tmp_path, monkeypatch):
    forwards: list[int] = []
    real = attnscope.measure.forward_features
    monkeypatch.setattr(
        attnscope.measure, "forward_features", lambda m, x, **k: (forwards.append(len(x)), real(m, x, **k))[1]
    )
    config = ProbeConfig(
        model="test_vit", random_init=True, img_size=(32, 32), max_images=60, epochs=3, lrs=(1e-2,),
        wds=(0.0,), map_images=0, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    _, plain = run(replace(config, out=tmp_path / "plain"))
    forwards.clear()
    _, two = run(replace(config, augment=2, out=tmp_path / "two"))
    assert sum(forwards) == 1 + 2 * 60  # the token-shape probe, then 2 views of the 60 training images
    forwards.clear()
    _, three = run(replace(config, augment=3, out=tmp_path / "three"))
    assert sum(forwards) == 1 + 60  # views 0 and 1 are cached: only view 2 is extracted
    assert three.info["cache"]["train-view2"]["extracted"] == 60
    assert three.info["cache"]["train-view0"]["reused"] == 60 and three.info["augment"]["views"] == 3
    # the views change what the heads learn; the plain caches are shared
    assert not np.allclose(two.results["train_loss"], plain.results["train_loss"])
    assert two.info["cache"]["train"]["key"] == plain.info["cache"]["train"]["key"]
    pd.testing.assert_frame_equal(
        run(replace(config, augment=2, out=tmp_path / "again"))[1].results, two.results
    )  # same views, same seeded choice of a view per epoch: the same heads
