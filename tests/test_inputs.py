"""What analyze() accepts besides paths: PIL images, arrays, tensors, Datasets, DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from attnscope.data import ImageDataset, MemoryImages, PathImages, image_source
from attnscope.errors import ConfigError


def _identity(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0


def test_paths_pil_arrays_and_tensors_become_sources(sample_paths):
    assert isinstance(image_source(sample_paths[:2]), PathImages)
    assert isinstance(image_source(str(sample_paths[0])), PathImages)
    pil = Image.new("RGB", (8, 6), (255, 0, 0))
    source = image_source([pil, pil.convert("L")])
    assert isinstance(source, MemoryImages) and len(source) == 2
    assert source.describe(1) == "images[1]"
    ds = ImageDataset(source, _identity)
    red, _, _ = ds[0]
    grey, _, _ = ds[1]
    assert red.shape == (3, 6, 8) and float(red[0].mean()) == 1.0 and float(red[1].mean()) == 0.0
    assert torch.equal(grey[0], grey[1])  # converted to RGB like a greyscale file
    batch = torch.rand(4, 3, 6, 8)
    assert len(image_source(batch)) == 4 and len(image_source(batch[0])) == 1
    assert len(image_source(np.zeros((6, 8, 3), dtype=np.uint8))) == 1
    assert len(image_source(batch, max_images=3)) == 3


def test_picture_tensors_are_transformed_and_preprocessed_ones_are_not():
    picture = torch.rand(3, 6, 8)
    transformed, _, _ = ImageDataset(image_source(picture), _identity)[0]
    assert torch.allclose(transformed, (picture * 255).to(torch.uint8).float() / 255)
    given = torch.randn(3, 6, 8)  # normalised model input: negative values and all
    kept, _, _ = ImageDataset(image_source(given, preprocessed=True), _identity)[0]
    assert torch.equal(kept, given)


def test_dataset_items_use_their_first_element_and_bad_items_are_failures():
    ds = TensorDataset(torch.rand(3, 3, 6, 8), torch.arange(3))
    source = image_source(ds)
    assert source.describe(2) == "dataset[2]"
    tensor, index, reason = ImageDataset(source, _identity)[1]
    assert tensor is not None and index == 1 and reason is None
    bad = MemoryImages([torch.rand(6, 8)], False, "images")
    assert ImageDataset(bad, _identity)[0][2].startswith("expected a (3, H, W) tensor")


def test_a_dataloader_contributes_its_dataset_as_model_input():
    items = torch.randn(5, 3, 6, 8)
    loader = DataLoader(TensorDataset(items, torch.arange(5)), batch_size=2)
    source = image_source(loader)
    assert isinstance(source, MemoryImages) and source.preprocessed and len(source) == 5
    kept, _, _ = ImageDataset(source, _identity)[3]
    assert torch.equal(kept, items[3])


def test_analyze_takes_pil_images_and_tensors_and_names_them(sample_paths):
    import attnscope

    picture = Image.open(sample_paths[0]).convert("RGB")
    from_files = attnscope.analyze("test_vit", sample_paths[:1], random_init=True, device="cpu")
    from_pil = attnscope.analyze("test_vit", [picture], random_init=True, device="cpu")
    cols = ["layer", "metric", "mean"]
    assert from_pil.layers[cols].equals(from_files.layers[cols])  # the same picture, the same numbers
    assert from_pil.info["images_used"] == ["images[0]"]
    assert set(from_pil.images["image"]) == {"images[0]"}
    transform_input = torch.randn(2, 3, 160, 160)
    result = attnscope.analyze("test_vit", transform_input, preprocessed=True, random_init=True, device="cpu")
    assert result.info["images_used"] == ["images[0]", "images[1]"]


def test_unsupported_input_names_the_argument():
    with pytest.raises(ConfigError, match="^images takes"):
        image_source(42)
    with pytest.raises(ConfigError, match="got dict"):
        image_source({"a": 1})


def test_public_names_are_listed_and_resolve():
    import attnscope

    for name in attnscope.__all__:
        assert name in dir(attnscope)
        assert getattr(attnscope, name) is not None


@pytest.mark.parametrize("kind", ["list", "tuple", "glob"])
def test_an_empty_image_list_is_an_error_not_the_bundled_samples(kind, tmp_path):
    """`analyze(model, glob.glob("photos/*.tiff"))` with no match must not measure the 7
    bundled photos (None asks for those)."""
    import glob

    import attnscope

    empty = {"list": [], "tuple": (), "glob": glob.glob(str(tmp_path / "*.tiff"))}[kind]
    with pytest.raises(ConfigError, match="images is empty"):
        attnscope.analyze("test_vit", empty, random_init=True)


def test_an_int_img_size_is_a_square_in_python_and_garbage_is_one_line():
    import attnscope
    from attnscope.commands.compare import CompareConfig

    result = attnscope.analyze("test_vit", random_init=True, img_size=64, max_images=1)
    assert result.info["input_size"] == [64, 64] and result.info["token_layout"]["grid"] == [4, 4]
    assert CompareConfig(models=("test_vit", "test_vit2"), img_size=64).img_size == (64, 64)
    for bad in ("64", (64,), (0, 64), 6.4):
        with pytest.raises(ConfigError, match="img_size takes one or two positive integers"):
            CompareConfig(models=("test_vit", "test_vit2"), img_size=bad)


def test_a_tensor_that_is_no_picture_is_refused_before_any_model_loads(monkeypatch):
    import timm

    import attnscope

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("no model may be built"))
    with pytest.raises(ConfigError, match=r"images takes pictures of shape \(3, H, W\).*got \(2, 2\)"):
        attnscope.analyze("test_vit", torch.rand(2, 2), random_init=True)


def test_normalised_tensors_without_preprocessed_get_a_warning():
    import warnings

    normalised = (torch.rand(2, 3, 32, 32) - 0.45) / 0.225
    with pytest.warns(UserWarning, match="pass preprocessed=True"):
        image_source(normalised)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_source(normalised, preprocessed=True)  # declared: no warning
        image_source(torch.rand(2, 3, 32, 32))  # pictures in [0, 1]: no warning
