"""Image sources, bundled samples, timm eval transforms and bad-file handling.

A measurement run over thousands of user images must not die on the one file that is
truncated, mislabelled or unreadable, and must not silently change the set of images
it measured. So paths are collected deterministically up front, each image is decoded
in a worker, and a bad file becomes a recorded failure (index + reason) that travels
with the batch instead of an exception that kills the loader.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from attnscope.errors import AttnscopeError, ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "ImageDataset",
    "ImageLoadError",
    "ImageSource",
    "MemoryImages",
    "PathImages",
    "build_eval_transform",
    "bundled_sample_paths",
    "collate_images",
    "collect_image_paths",
    "image_source",
    "load_rgb",
    "make_loader",
]

# Formats Pillow decodes without plugins. Directory scans use this list so that
# sidecar files (CSV, JSON, .DS_Store-like junk) are never mistaken for images; an
# explicitly named file bypasses it because the user asked for that file.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".png",
        ".bmp", ".dib",
        ".gif",
        ".tif", ".tiff",
        ".webp",
        ".ppm", ".pgm", ".pbm", ".pnm",
        ".tga",
        ".pcx",
        ".jp2", ".j2k",
    }
)  # fmt: skip

_GLOB_CHARS = frozenset("*?[")
_SAMPLES_PACKAGE = "attnscope"
_SAMPLES_SUBDIR = ("assets", "samples")
_WHITE = (255, 255, 255)


class ImageLoadError(AttnscopeError):
    """A single file could not be turned into an RGB image.

    Kept separate from other user errors so the loader can catch exactly this and
    record ``reason`` per file, while still being an ``AttnscopeError`` for callers
    that load one image directly and want the CLI's one-line message.
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised inside DataLoader workers and pickled back; the default reduce would
        # call __init__ with the formatted message only and fail.
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- paths


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def bundled_sample_paths() -> list[Path]:
    """Paths of the photographs shipped inside the package, sorted.

    Resolved through ``importlib.resources`` so the same call works from a source
    checkout, an editable install and an installed wheel.
    """
    root = resources.files(_SAMPLES_PACKAGE).joinpath(*_SAMPLES_SUBDIR)
    if not isinstance(root, Path):
        # A zipped install has no real files; timm and PIL need paths on disk.
        raise AttnscopeError(
            "attnscope's bundled sample images are not on the file system (zipped install?); "
            "pass image paths explicitly"
        )
    if not root.is_dir():
        raise AttnscopeError(f"bundled sample images are missing ({root}); reinstall attnscope")
    paths = sorted(
        p for p in root.iterdir()
        if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
    )  # fmt: skip
    if not paths:
        raise AttnscopeError(f"no bundled sample images found in {root}; reinstall attnscope")
    return paths


def _scan_directory(root: Path, ignored: list[Path] | None = None) -> list[Path]:
    """Image files under `root`; other visible files go to `ignored` (hidden ones are skipped)."""
    found: list[Path] = []
    # followlinks=False: a symlink loop in a photo folder must not hang the scan.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if _is_hidden(name):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name))
            elif ignored is not None:
                ignored.append(Path(dirpath, name))
    return found


def _expand_source(source: str | Path, ignored: list[Path] | None = None) -> list[Path]:
    text = os.fspath(source)
    if not text.strip():
        raise AttnscopeError("empty image source ''")
    path = Path(text).expanduser()
    # Existence is checked before glob syntax: a real file may be called "img[1].jpg".
    if path.is_dir():
        found = _scan_directory(path, ignored)
        if not found:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise AttnscopeError(f"no image files in directory {text} (looked for: {exts})")
        return found
    if path.exists():
        return [path]
    if any(c in text for c in _GLOB_CHARS):
        matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)]
        files = [m for m in matches if m.is_file()]
        if not files:
            raise AttnscopeError(f"glob pattern matched no files: {text}")
        return files
    raise AttnscopeError(f"image source not found: {text}")


def collect_image_paths(
    sources: Sequence[str | Path] | None,
    max_images: int | None = None,
    *,
    ignored: list[Path] | None = None,
) -> list[Path]:
    """Turn user-supplied sources into the exact, ordered list of files to measure.

    The order is sorted and duplicates are dropped so that two runs over the same
    inputs measure the same images in the same order (results are compared across
    models and must line up), and ``max_images`` keeps a reproducible prefix rather
    than whichever files the file system listed first. Nothing is opened here: a file
    named explicitly that is not an image fails later, per file, at load time. Visible
    files in a scanned folder that are not images by their extension are appended to
    `ignored` (when given), so a caller can say so instead of dropping them silently.
    """
    if max_images is not None and max_images < 1:
        raise ConfigError("max_images", f"must be at least 1, got {max_images}")
    if isinstance(sources, (str, Path)):
        # A bare string would otherwise be iterated character by character.
        sources = [sources]

    if not sources:
        paths = bundled_sample_paths()
    else:
        # Key by resolved path so "a.jpg", "./a.jpg" and a symlink to it count once;
        # keep the lexicographically smallest absolute spelling so the name shown to
        # the user is stable and is not replaced by a symlink target.
        by_target: dict[Path, Path] = {}
        for source in sources:
            for p in _expand_source(source, ignored):
                absolute = Path(os.path.abspath(p))
                key = absolute.resolve()
                current = by_target.get(key)
                if current is None or absolute < current:
                    by_target[key] = absolute
        paths = sorted(by_target.values())

    if max_images is not None:
        paths = paths[:max_images]
    return paths


# --------------------------------------------------------------------------- decoding


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _u8_gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) * (255.0 / (hi - lo))


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grey images to 8 bit without clipping.

    Pillow's own ``convert("L")`` clips such data at 255, which turns an ordinary
    16-bit photograph almost entirely white; the model would then be measured on a
    blank image and nothing would look wrong.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scaled = values * (255.0 / 65535.0)
    elif img.mode == "I":
        # Pillow decodes most 16-bit files into "I"; use the 16-bit range when the data
        # fits it so brightness is preserved, and the data's own range otherwise.
        if values.size and values.min() >= 0 and values.max() <= 65535:
            scaled = values * (255.0 / 65535.0)
        else:
            scaled = _minmax(values)
    else:  # "F"
        finite = np.isfinite(values)
        if not finite.any():
            raise ValueError("float image has no finite pixel values")
        values = np.where(finite, values, 0.0)
        if values.min() >= 0.0 and values.max() <= 1.0:
            scaled = values * 255.0  # the usual [0, 1] convention
        else:
            scaled = _minmax(values)
    return _u8_gray(scaled).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _over_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _over_white(img)
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    # "1", "L", "CMYK", "YCbCr", "RGBX", "LAB", "HSV" ... Pillow converts these directly.
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode one file into an 8-bit RGB image the transforms can rely on.

    Everything that can go wrong with a user's file is raised as ``ImageLoadError`` with
    a short reason, because callers (the dataset) record it and move on; decoding is
    forced here with ``load()`` since Pillow is lazy and would otherwise fail later,
    deep inside a transform, with an unhelpful traceback. Transparency is composited
    over white (what a person sees in a viewer) and EXIF rotation is applied (what a
    camera meant), so the model sees the picture a person would.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd metadata; the image itself is still fine.
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:  # broken EXIF must not lose the pixels
                    oriented = img
                rgb = _to_rgb(oriented if oriented is not None else img)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        reason = str(exc).strip() or type(exc).__name__
        raise ImageLoadError(path, f"corrupt or truncated image ({reason})") from None
    except Exception as exc:
        # Malformed files make some Pillow decoders fail with struct.error, IndexError,
        # ZeroDivisionError ...; to the caller that is still just a bad file.
        raise ImageLoadError(path, f"could not decode ({type(exc).__name__}: {exc})") from None
    if rgb.mode != "RGB":  # defensive: a Pillow conversion we did not expect
        raise ImageLoadError(path, f"could not convert mode {rgb.mode} to RGB")
    return rgb


# --------------------------------------------------------------------------- transforms


def build_eval_transform(
    model: torch.nn.Module, input_size: tuple[int, int] | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """The preprocessing the model was trained/evaluated with, from timm's own config.

    Using timm's resolver (rather than hard-coded ImageNet mean/std and 224 px) matters
    because attention statistics shift with resolution and normalisation; the returned
    config is meant to be saved with the results so a run can be reproduced.
    """
    import timm.data  # heavy; only needed once a model exists

    cfg = dict(timm.data.resolve_model_data_config(model))
    if input_size is not None:
        if (
            len(input_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in input_size)
            or min(input_size) < 1
        ):
            raise AttnscopeError(f"input_size must be two positive integers (H, W), got {input_size!r}")
        cfg["input_size"] = (3, int(input_size[0]), int(input_size[1]))
    transform = timm.data.create_transform(**cfg, is_training=False)
    return transform, cfg


# --------------------------------------------------------------------------- dataset


class ImageSource:
    """Images addressable by position, and how each one is named in run.json.

    `load(i)` returns a PIL image (it then goes through the model's eval transform) or a
    tensor that is already model input; it raises `ImageLoadError` for an image that cannot
    be had, which the run records and skips.
    """

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, i: int) -> Image.Image | torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> str | Path:
        """The name of image `i` (what run.json and images.csv call it)."""
        return self.describe(i)


class PathImages(ImageSource):
    """Image files, decoded by `load_rgb`."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def __getitem__(self, i: int) -> Path:
        return self.paths[i]


class MemoryImages(ImageSource):
    """Images already in memory: PIL images, arrays, tensors, or the items of a Dataset.

    A tensor is model input when `preprocessed` (normalised, at the model's input size);
    otherwise it is a picture (3, H, W) with values in [0, 1] (float) or [0, 255] (uint8)
    that goes through the model's eval transform like a file would. A Dataset item that is
    a tuple contributes its first element (the usual (image, label) pair).
    """

    def __init__(self, items: Any, preprocessed: bool, name: str) -> None:
        self.items = items
        self.preprocessed = preprocessed
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image | torch.Tensor:
        item = self.items[i]
        if isinstance(item, tuple | list):
            item = item[0]
        if isinstance(item, Image.Image):
            return _to_rgb(item)
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
            if item.ndim == 3 and item.shape[-1] in (1, 3, 4):
                item = item.permute(2, 0, 1)  # (H, W, C) arrays are pictures as PIL lays them out
        if not isinstance(item, torch.Tensor):
            raise ImageLoadError(self.describe(i), f"not an image ({type(item).__name__})")
        if item.ndim != 3:
            raise ImageLoadError(self.describe(i), f"expected a (3, H, W) tensor, got {tuple(item.shape)}")
        if self.preprocessed:
            return item.float()
        from torchvision.transforms.functional import to_pil_image

        return _to_rgb(to_pil_image(item))

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"


# What the measuring loop takes: file paths, or any ImageSource (indexing gives a name).
Images = Sequence[Path] | ImageSource


def image_source(
    images: Any,
    *,
    preprocessed: bool = False,
    max_images: int | None = None,
    ignored: list[Path] | None = None,
) -> ImageSource:
    """What a caller has at hand -> the images to measure.

    Takes folders, files or globs (one or a list; None: the bundled samples), PIL images,
    arrays or tensors (one picture, a list, or a (N, 3, H, W) batch), a torch Dataset, or a
    DataLoader, whose dataset's items are taken as model input (the DataLoader's own
    batching is not needed: attnscope batches them itself). `max_images` keeps the first N.
    """
    if isinstance(images, DataLoader):
        if not hasattr(images.dataset, "__len__") or not hasattr(images.dataset, "__getitem__"):
            raise ConfigError("images", "takes a DataLoader over an indexable Dataset, not an iterable one")
        images, preprocessed = images.dataset, True
    if isinstance(images, Sequence) and not isinstance(images, str) and len(images) == 0:
        # an empty glob result must not turn into the bundled samples (that is `None`)
        raise ConfigError(
            "images", "is empty: no folders, files, globs or pictures (None: the bundled samples)"
        )
    if images is None or isinstance(images, str | Path) or _all_paths(images):
        return PathImages(collect_image_paths(images, max_images=max_images, ignored=ignored))
    if isinstance(images, Image.Image | np.ndarray | torch.Tensor) and not _is_batch(images):
        images = [images]
    if isinstance(images, Dataset | torch.Tensor | np.ndarray) or (
        isinstance(images, Sequence) and len(images) > 0
    ):
        kind = "dataset" if isinstance(images, Dataset) else "images"
        if not isinstance(images, Dataset):
            _check_pictures(images, preprocessed)
        source = MemoryImages(images, preprocessed, kind)
        if max_images is not None:
            # Subset only indexes and measures it: torch's stub asks for a Dataset subclass
            source.items = Subset(cast(Dataset, images), range(min(max_images, len(cast(Sized, images)))))
        return source
    raise ConfigError(
        "images",
        "takes folders, files or globs, PIL images, arrays or tensors, a torch Dataset or a "
        f"DataLoader; got {type(images).__name__}" + (" (empty)" if not images else ""),
    )


def _check_pictures(images: Any, preprocessed: bool) -> None:
    """Tensors and arrays in memory, checked before any model loads: each must be one
    picture (C, H, W) or (H, W, C); float pictures outside [0, 1] that are not declared
    `preprocessed` are most likely normalised model input, which the eval transform would
    wreck, so they get a warning."""
    import warnings

    tensors = [torch.as_tensor(i) for i in images if isinstance(i, torch.Tensor | np.ndarray)]
    for t in tensors:
        if t.ndim != 3:
            raise ConfigError(
                "images", f"takes pictures of shape (3, H, W) or an (N, 3, H, W) batch, got {tuple(t.shape)}"
            )
    floats = [t for t in tensors[:16] if t.is_floating_point() and t.numel()]
    if not preprocessed and floats:
        low, high = min(float(t.min()) for t in floats), max(float(t.max()) for t in floats)
        if low < -0.01 or high > 1.01:
            warnings.warn(
                f"images: float values in [{low:.2f}, {high:.2f}], outside a picture's [0, 1]; if they are "
                "already normalised model input, pass preprocessed=True",
                UserWarning,
                stacklevel=3,
            )


def _all_paths(images: Any) -> bool:
    return isinstance(images, Sequence) and all(isinstance(i, str | Path) for i in images)


def _is_batch(images: Any) -> bool:
    if isinstance(images, torch.Tensor):
        return images.ndim == 4
    return isinstance(images, np.ndarray) and images.ndim == 4


class ImageDataset(Dataset):
    """Loads and transforms one image per index, reporting failures instead of raising.

    A raised exception inside a DataLoader worker ends the whole run; returning
    ``(None, index, reason)`` lets the collate step keep good images and list the bad
    ones. The index is returned so results stay tied to the original positions even
    when iterating a subset (distributed shards).
    """

    def __init__(
        self, source: ImageSource | Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.source = source if isinstance(source, ImageSource) else PathImages(source)
        self.transform = transform

    @property
    def paths(self) -> list[Path]:
        assert isinstance(self.source, PathImages)
        return self.source.paths

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        index = int(i)
        try:
            image = self.source.load(index)
        except ImageLoadError as exc:
            return None, index, exc.reason
        if isinstance(image, torch.Tensor):  # already model input
            return image, index, None
        try:
            tensor = self.transform(image)
        except Exception as exc:  # a bad image must not kill the run
            return None, index, f"transform failed ({type(exc).__name__}: {exc})"
        if not isinstance(tensor, torch.Tensor):
            return None, index, f"transform returned {type(tensor).__name__}, not a tensor"
        return tensor, index, None


@dataclass
class ImageBatch:
    """One loader step: the good images stacked, plus which dataset items failed and why."""

    images: torch.Tensor | None
    indices: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


def collate_images(items: Sequence[tuple[torch.Tensor | None, int, str | None]]) -> ImageBatch:
    """Stack the good items and set the bad ones aside (module-level so workers can pickle it)."""
    tensors: list[torch.Tensor] = []
    indices: list[int] = []
    failures: list[tuple[int, str]] = []
    for tensor, index, reason in items:
        if tensor is None:
            failures.append((int(index), reason or "unknown error"))
        else:
            tensors.append(tensor)
            indices.append(int(index))
    if not tensors:
        return ImageBatch(images=None, indices=[], failures=failures)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise AttnscopeError(
            f"images in one batch have different shapes {sorted(shapes)}; the transform must "
            "produce a fixed size"
        )
    return ImageBatch(images=torch.stack(tensors), indices=indices, failures=failures)


def make_loader(
    paths: Sequence[Path] | ImageSource,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """A deterministic loader of ``ImageBatch`` over ``paths`` (or a subset of positions).

    No shuffling, so batches line up across runs and models; ``indices`` lets each
    distributed rank take its own shard while every ``ImageBatch.indices`` still refers
    to positions in the full ``paths`` list.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttnscopeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise AttnscopeError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    dataset: Dataset = ImageDataset(paths, transform)
    if indices is not None:
        subset = [int(i) for i in indices]
        n = len(paths)
        bad = [i for i in subset if not 0 <= i < n]
        if bad:
            raise AttnscopeError(f"indices out of range for {n} images: {bad[:5]}")
        dataset = Subset(dataset, subset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=False,
        persistent_workers=False,
        drop_last=False,
    )
