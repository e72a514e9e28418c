"""Labelled image sets for probing: folder trees, CSV lists, torchvision, built-in digits.

Every source is reduced to the same two things: an `ImageSource` that can decode item `i`
into an RGB image (raising `ImageLoadError` for a bad file, so the loader records it
instead of dying), and an integer label per item. Each item also has a stable identity
string (path + size + mtime for files) that goes into the feature-cache key, so a cache
is never reused for images that changed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image

from attnscope import data
from attnscope.data import IMAGE_EXTENSIONS, ImageLoadError
from attnscope.errors import AttnscopeError, ConfigError

__all__ = [
    "NAMED_DATASETS",
    "DigitsSource",
    "FileSource",
    "ImageSource",
    "LabelledSplit",
    "Positions",
    "ProbeData",
    "SubsetSource",
    "TorchvisionSource",
    "digits_data",
    "folder_data",
    "csv_data",
    "load_probe_data",
    "named_data",
    "stratified_split",
    "stratified_subsample",
]

# Purposes get their own random streams so that changing `shots` does not move the
# validation split, and changing `val_fraction` does not change which shots are kept.
_SPLIT_STREAM, _SHOTS_STREAM, _SUBSAMPLE_STREAM = 11, 12, 13
_EVAL_DIR_NAMES = ("val", "validation", "test")

# Positions into a split: a list of ints, or the int64 array the splitting functions below
# return; every consumer reads them through np.asarray or int().
Positions: TypeAlias = Sequence[int] | np.ndarray


# --------------------------------------------------------------------------- sources


class ImageSource(data.ImageSource):
    """An image source whose items have ids for the feature cache's key (always pictures)."""

    def load(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_ids(self) -> list[str]:  # pragma: no cover - abstract
        """One string per item that changes whenever the item's pixels may have changed."""
        raise NotImplementedError

    def path(self, i: int) -> Path:
        """A path-like name for warnings about item `i`."""
        return Path(self.describe(i))


class FileSource(data.PathImages, ImageSource):
    """Image files on disk, decoded with attnscope's robust loader."""

    def path(self, i: int) -> Path:
        return self.paths[i]

    def item_ids(self) -> list[str]:
        ids = []
        for p in self.paths:
            try:
                st = p.stat()
                ids.append(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}")
            except OSError:
                ids.append(f"{os.path.abspath(p)}|missing")
        return ids


class DigitsSource(ImageSource):
    """scikit-learn's 8x8 handwritten digits, upsampled to the model's input size.

    Bundled with scikit-learn, so a probe runs on a machine with no network and no data.
    """

    def __init__(self, images: np.ndarray, size: tuple[int, int]) -> None:
        self.images = np.asarray(images, dtype=np.float32)
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        # sklearn stores ink intensity 0..16; draw dark ink on white paper like a scan.
        gray = 255.0 - self.images[i] * (255.0 / 16.0)
        img = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
        img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        return img.convert("RGB")

    def describe(self, i: int) -> str:
        return f"sklearn-digits/{i}"

    def item_ids(self) -> list[str]:
        import sklearn

        return [
            f"sklearn-digits|{sklearn.__version__}|{self.size[0]}x{self.size[1]}|"
            + hashlib.sha1(self.images[i].tobytes()).hexdigest()[:16]
            for i in range(len(self))
        ]


class TorchvisionSource(ImageSource):
    """Items of a torchvision dataset that keeps its images in memory (CIFAR, STL-10)."""

    def __init__(self, name: str, split: str, dataset: Any, fingerprint: str) -> None:
        self.name = name
        self.split = split
        self.dataset = dataset
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> Image.Image:
        try:
            image = self.dataset[i][0]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            return image.convert("RGB")
        except Exception as exc:  # a bad record must not kill the run
            raise ImageLoadError(
                self.describe(i), f"could not decode ({type(exc).__name__}: {exc})"
            ) from None

    def describe(self, i: int) -> str:
        return f"{self.name}/{self.split}/{i}"

    def item_ids(self) -> list[str]:
        return [f"{self.name}@{self.fingerprint}/{self.split}/{i}" for i in range(len(self))]


class SubsetSource(ImageSource):
    """Selected positions of another source, in the given order."""

    def __init__(self, base: ImageSource, positions: Sequence[int]) -> None:
        self.base = base
        self.positions = [int(p) for p in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def load(self, i: int) -> Image.Image:
        return self.base.load(self.positions[i])

    def describe(self, i: int) -> str:
        return self.base.describe(self.positions[i])

    def path(self, i: int) -> Path:
        return self.base.path(self.positions[i])

    def item_ids(self) -> list[str]:
        ids = self.base.item_ids()
        return [ids[p] for p in self.positions]


class ConcatSource(ImageSource):
    """Several sources one after the other (Flowers-102 train + val as one training split)."""

    def __init__(self, parts: Sequence[ImageSource]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[ImageSource, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k], int(i - self.offsets[k])

    def load(self, i: int) -> Image.Image:
        part, j = self._locate(i)
        return part.load(j)

    def describe(self, i: int) -> str:
        part, j = self._locate(i)
        return part.describe(j)

    def path(self, i: int) -> Path:
        part, j = self._locate(i)
        return part.path(j)

    def item_ids(self) -> list[str]:
        return [s for p in self.parts for s in p.item_ids()]


# --------------------------------------------------------------------------- splits


@dataclass
class LabelledSplit:
    """One split: a source and an integer class label per item."""

    source: ImageSource
    labels: np.ndarray
    name: str

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.source):
            raise AttnscopeError(f"{self.name}: {len(self.source)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: Positions) -> LabelledSplit:
        positions = [int(p) for p in positions]
        return LabelledSplit(SubsetSource(self.source, positions), self.labels[positions], self.name)


@dataclass
class ProbeData:
    """A training split, an evaluation split, class names, and how they were made."""

    train: LabelledSplit
    eval: LabelledSplit
    classes: list[str]
    description: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> dict[str, Any]:
        return {
            **self.description,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "train_images": len(self.train),
            "eval_images": len(self.eval),
            "eval_split": self.eval.name,
            "notes": list(self.notes),
        }


def _largest_remainder(
    counts: np.ndarray, total: int, caps: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Split `total` over classes proportionally to `counts`, never above `caps`."""
    total = int(min(total, caps.sum()))
    if total <= 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    exact = counts * (total / counts.sum())
    take = np.minimum(np.floor(exact).astype(np.int64), caps)
    # Random tie order so no class is systematically favoured by its index.
    order = rng.permutation(len(counts))
    order = order[np.argsort(-(exact - np.floor(exact))[order], kind="stable")]
    while take.sum() < total:
        progressed = False
        for c in order:
            if take.sum() >= total:
                break
            if take[c] < caps[c]:
                take[c] += 1
                progressed = True
        if not progressed:
            break
    return take


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int, stream: int = _SPLIT_STREAM
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, split-off) positions: about `fraction` of every class split off, seeded.

    Class shares follow the class sizes (largest remainder), and every class keeps at least
    one item on the kept side, so few-shot training sets never lose a class entirely.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise AttnscopeError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, stream])
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    take = _largest_remainder(counts, round(fraction * len(labels)), np.maximum(counts - 1, 0), rng)
    kept, split = [], []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        members = members[rng.permutation(len(members))]
        split.append(members[: take[c]])
        kept.append(members[take[c] :])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(split)) if split else np.zeros(0, np.int64)


def stratified_subsample(labels: Sequence[int] | np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most `n` positions, class proportions preserved, seeded; sorted."""
    labels = np.asarray(labels, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, _SUBSAMPLE_STREAM])
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    take = _largest_remainder(counts, n, counts, rng)
    chosen = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        chosen.append(members[rng.permutation(len(members))[: take[c]]])
    return np.sort(np.concatenate(chosen))


def keep_shots(labels: Sequence[int] | np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """K positions per class (seeded, sorted) and the classes that had fewer than K."""
    labels = np.asarray(labels, dtype=np.int64)
    if shots < 1:
        raise ConfigError("shots", f"must be at least 1, got {shots}")
    rng = np.random.default_rng([seed, _SHOTS_STREAM])
    chosen, short = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            short.append(int(c))
        chosen.append(members[rng.permutation(len(members))[:shots]])
    return np.sort(np.concatenate(chosen)), short


# --------------------------------------------------------------------------- folders


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(os.path.abspath(os.path.join(dirpath, name))))
    return sorted(found)


def _scan_class_tree(
    root: Path, classes: list[str] | None, notes: list[str]
) -> tuple[list[Path], list[str], list[str]]:
    """(paths, label names, class names) of an ImageFolder-style tree."""
    if not root.is_dir():
        raise AttnscopeError(f"data folder not found: {root}")
    dirs = _class_dirs(root)
    if not dirs:
        raise AttnscopeError(
            f"{root} has no class sub-folders; expected <root>/<class>/<image> or "
            "<root>/train/<class>/<image>"
        )
    paths: list[Path] = []
    names: list[str] = []
    found: list[str] = []
    for d in dirs:
        if classes is not None and d.name not in classes:
            raise AttnscopeError(f"class folder {d} has no counterpart in the training split")
        files = _images_under(d)
        if not files:
            notes.append(f"class folder {d} holds no images; ignored")
            continue
        found.append(d.name)
        paths.extend(files)
        names.extend([d.name] * len(files))
    if not paths:
        raise AttnscopeError(f"no images found under {root}")
    return paths, names, found


def _split_from_train(
    source: ImageSource, labels: np.ndarray, val_fraction: float, seed: int, notes: list[str]
) -> tuple[LabelledSplit, LabelledSplit]:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            "val_fraction", f"must be between 0 and 1 to split off an evaluation set, got {val_fraction}"
        )
    full = LabelledSplit(source, labels, "train")
    kept, held = stratified_split(labels, val_fraction, seed)
    if len(held) == 0:
        raise AttnscopeError(
            f"too few images ({len(labels)}) to split off an evaluation set; add images or give an "
            "evaluation folder"
        )
    notes.append(
        f"no evaluation split given: {len(held)} images ({val_fraction:.0%}, stratified, seed {seed}) "
        "held out for evaluation"
    )
    ev = full.subset(held)
    ev.name = "split"
    return full.subset(kept), ev


def folder_data(
    train_dir: str | Path,
    val_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ProbeData:
    """ImageFolder trees: `train_dir` with class folders, and `val_dir` or a seeded split."""
    notes: list[str] = []
    train_dir = Path(train_dir).expanduser()
    paths, names, classes = _scan_class_tree(train_dir, None, notes)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names])
    desc: dict[str, Any] = {"source": "folder", "train_dir": str(train_dir.resolve())}
    if val_dir is not None:
        val_dir = Path(val_dir).expanduser()
        vpaths, vnames, _ = _scan_class_tree(val_dir, classes, notes)
        train = LabelledSplit(FileSource(paths), labels, "train")
        ev = LabelledSplit(FileSource(vpaths), np.array([index[n] for n in vnames]), val_dir.name or "val")
        desc["eval_dir"] = str(val_dir.resolve())
    else:
        train, ev = _split_from_train(FileSource(paths), labels, val_fraction, seed, notes)
    return ProbeData(train, ev, classes, desc, notes)


def _detect_tree(root: Path) -> tuple[Path, Path | None, list[str]]:
    """(train folder, eval folder or None, notes) for a `data` folder."""
    notes: list[str] = []
    sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    if "train" not in sub:
        return root, None, notes
    evals = [sub[n] for n in _EVAL_DIR_NAMES if n in sub]
    if len(evals) > 1:
        notes.append(
            f"{evals[0].name}/ used for evaluation; {', '.join(e.name + '/' for e in evals[1:])} ignored"
        )
    return sub["train"], (evals[0] if evals else None), notes


# --------------------------------------------------------------------------- CSV


def csv_data(csv_file: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> ProbeData:
    """`path,label[,split]` rows (header optional); relative paths are relative to the file."""
    csv_file = Path(csv_file).expanduser()
    if not csv_file.is_file():
        raise ConfigError("csv_file", f"{csv_file}: no such file")
    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() == "path":
        header = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
        if header[:2] != ["path", "label"] or (len(header) > 2 and header[2] != "split"):
            raise AttnscopeError(f"{csv_file}: header must be path,label[,split], got {','.join(header)}")
    if not rows:
        raise AttnscopeError(f"{csv_file} has no rows")
    base = csv_file.parent
    paths, names, splits = [], [], []
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or len(row) > 3:
            raise AttnscopeError(f"{csv_file} row {n}: expected path,label[,split], got {len(row)} fields")
        p = Path(row[0].strip()).expanduser()
        paths.append(p if p.is_absolute() else base / p)
        names.append(row[1].strip())
        split = row[2].strip().lower() if len(row) == 3 else ""
        split = {"valid": "val", "validation": "val", "": ""}.get(split, split)
        if split not in ("", "train", "val", "test"):
            raise AttnscopeError(f"{csv_file} row {n}: split must be train, val or test, got {row[2]!r}")
        splits.append(split)
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names])
    split_arr = np.array(splits)
    notes: list[str] = []
    desc = {"source": "csv", "csv": str(csv_file.resolve())}
    has_eval = bool(np.isin(split_arr, ["val", "test"]).any())
    if has_eval:
        eval_name = "val" if (split_arr == "val").any() else "test"
        if eval_name == "val" and (split_arr == "test").any():
            notes.append("rows with split=test ignored; split=val used for evaluation")
        tr = np.flatnonzero(np.isin(split_arr, ["train", ""]))
        ev = np.flatnonzero(split_arr == eval_name)
        if len(tr) == 0:
            raise AttnscopeError(f"{csv_file} has no training rows (split=train or empty)")
        train = LabelledSplit(FileSource([paths[i] for i in tr]), labels[tr], "train")
        evs = LabelledSplit(FileSource([paths[i] for i in ev]), labels[ev], eval_name)
    else:
        train, evs = _split_from_train(FileSource(paths), labels, val_fraction, seed, notes)
    return ProbeData(train, evs, classes, desc, notes)


# --------------------------------------------------------------------------- digits


def digits_data(input_size: tuple[int, int], *, val_fraction: float = 0.2, seed: int = 0) -> ProbeData:
    """The built-in dataset: 1,797 handwritten digits (10 classes) from scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    source = DigitsSource(bunch.images, input_size)
    notes: list[str] = []
    train, ev = _split_from_train(source, bunch.target, val_fraction, seed, notes)
    notes[-1] = notes[-1].replace("no evaluation split given: ", "built-in digits: ")
    desc = {
        "source": "builtin-digits",
        "what": f"scikit-learn load_digits, 8x8 upsampled to {input_size[0]}x{input_size[1]} RGB",
    }
    return ProbeData(train, ev, [str(d) for d in range(10)], desc, notes)


# --------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class NamedDataset:
    name: str
    cls_name: str
    folder: str  # what the data root must contain
    host: str  # where torchvision downloads it from
    train: tuple[dict[str, Any], ...]
    eval: tuple[dict[str, Any], ...]
    eval_name: str = "test"


NAMED_DATASETS: dict[str, NamedDataset] = {
    d.name: d
    for d in (
        NamedDataset("cifar10", "CIFAR10", "cifar-10-batches-py", "www.cs.toronto.edu",
                     ({"train": True},), ({"train": False},)),
        NamedDataset("cifar100", "CIFAR100", "cifar-100-python", "www.cs.toronto.edu",
                     ({"train": True},), ({"train": False},)),
        NamedDataset("stl10", "STL10", "stl10_binary", "ai.stanford.edu",
                     ({"split": "train"},), ({"split": "test"},)),
        # The usual transfer protocol trains on train+val for these two.
        NamedDataset("flowers102", "Flowers102", "flowers-102", "www.robots.ox.ac.uk",
                     ({"split": "train"}, {"split": "val"}), ({"split": "test"},)),
        NamedDataset("oxford_pets", "OxfordIIITPet", "oxford-iiit-pet", "www.robots.ox.ac.uk",
                     ({"split": "trainval"},), ({"split": "test"},)),
        NamedDataset("food101", "Food101", "food-101", "data.vision.ee.ethz.ch",
                     ({"split": "train"},), ({"split": "test"},)),
        NamedDataset("dtd", "DTD", "dtd", "www.robots.ox.ac.uk",
                     ({"split": "train", "partition": 1}, {"split": "val", "partition": 1}),
                     ({"split": "test", "partition": 1},)),
    )
}  # fmt: skip
_DATASET_ALIASES = {
    "pets": "oxford_pets", "oxford-iiit-pet": "oxford_pets", "flowers": "flowers102", "food": "food101",
    "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10",
}  # fmt: skip


def resolve_dataset_name(name: str) -> NamedDataset | None:
    key = name.strip().lower().replace(" ", "_")
    return NAMED_DATASETS.get(_DATASET_ALIASES.get(key, key))


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine gets an answer in seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def default_data_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "attnscope" / "datasets"


def _folder_fingerprint(folder: Path) -> str:
    """Hash of every file's name, size and mtime under the dataset folder."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            h.update(f"{os.path.relpath(p, folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _open_torchvision(spec: NamedDataset, root: Path, kwargs: dict[str, Any]) -> Any:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.cls_name)
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError:
        pass  # not there (or incomplete): try to download below
    how = (
        f'download it on a machine with network (python -c "import torchvision; '
        f"torchvision.datasets.{spec.cls_name}('DIR', download=True)\") and give DIR, the folder "
        f"that contains {spec.folder}/"
    )
    if not host_reachable(spec.host):
        raise ConfigError(
            "data_root",
            f"{root} does not hold {spec.name} and {spec.host} cannot be reached (offline?); {how}",
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        return cls(str(root), download=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network and archive errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError("data_root", f"{root}: could not download {spec.name} ({first}); {how}") from None


def _tv_part(spec: NamedDataset, ds: Any, split: str, fingerprint: str) -> tuple[ImageSource, np.ndarray]:
    files = getattr(ds, "_image_files", None) or getattr(ds, "_images", None)
    if files is not None:
        source: ImageSource = FileSource(files)
    else:
        source = TorchvisionSource(spec.name, split, ds, fingerprint)
    for attr in ("targets", "labels", "_labels"):
        labels = getattr(ds, attr, None)
        if labels is not None:
            return source, np.asarray(labels, dtype=np.int64)
    raise AttnscopeError(f"{spec.name}: torchvision dataset exposes no labels")  # pragma: no cover


def named_data(name: str, data_root: str | Path | None = None) -> ProbeData:
    """A torchvision dataset from `data_root`, downloaded when it is missing and the network allows."""
    spec = resolve_dataset_name(name)
    if spec is None:
        raise AttnscopeError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMED_DATASETS)}")
    root = Path(data_root).expanduser() if data_root else default_data_root()
    parts: dict[str, list[tuple[ImageSource, np.ndarray]]] = {"train": [], "eval": []}
    classes: list[str] | None = None
    fingerprint = ""
    for side, kw_list in (("train", spec.train), ("eval", spec.eval)):
        for kwargs in kw_list:
            ds = _open_torchvision(spec, root, kwargs)
            if not fingerprint:
                fingerprint = _folder_fingerprint(root / spec.folder)
            split = str(kwargs.get("split", "train" if kwargs.get("train") else "test"))
            parts[side].append(_tv_part(spec, ds, split, fingerprint))
            classes = classes or list(getattr(ds, "classes", []) or [])

    def join(side: str) -> tuple[ImageSource, np.ndarray]:
        items = parts[side]
        if len(items) == 1:
            return items[0]
        return ConcatSource([s for s, _ in items]), np.concatenate([lab for _, lab in items])

    train_src, train_lab = join("train")
    eval_src, eval_lab = join("eval")
    n_classes = int(max(train_lab.max(), eval_lab.max())) + 1
    if not classes or len(classes) != n_classes:
        classes = [str(i) for i in range(n_classes)]
    desc = {"source": "torchvision", "dataset": spec.name, "data_root": str(root.resolve())}
    return ProbeData(
        LabelledSplit(train_src, train_lab, "train"),
        LabelledSplit(eval_src, eval_lab, spec.eval_name),
        classes,
        desc,
    )


# --------------------------------------------------------------------------- entry point


def load_probe_data(
    *,
    data: str | Path | None = None,
    train: str | Path | None = None,
    val: str | Path | None = None,
    csv_file: str | Path | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    input_size: tuple[int, int] = (224, 224),
    val_fraction: float = 0.2,
    shots: int | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> ProbeData:
    """The labelled data of a probe run from exactly one kind of source.

    No source at all gives the built-in digits, so the command runs on a fresh machine.
    `shots` keeps K training images per class; `max_images` keeps at most that many per
    split (stratified). Both are seeded and applied after the train/eval split, so the
    evaluation set never depends on them.
    """
    given = [
        n for n, v in (("data", data), ("train", train), ("csv_file", csv_file), ("dataset", dataset)) if v
    ]
    if len(given) > 1:
        others = " and ".join(f"`{n}`" for n in given[1:])
        raise ConfigError(given[0], f"and {others} exclude each other; give one data source")
    if val is not None and train is None:
        raise ConfigError("val", "needs `train` (or a `data` folder with train/ and val/ sub-folders)")
    if (
        data is not None
        and resolve_dataset_name(str(data)) is not None
        and not Path(data).expanduser().exists()
    ):
        dataset, data = str(data), None
    if dataset is not None:
        result = named_data(dataset, data_root)
    elif csv_file is not None:
        result = csv_data(csv_file, val_fraction=val_fraction, seed=seed)
    elif train is not None:
        result = folder_data(train, val, val_fraction=val_fraction, seed=seed)
    elif data is not None:
        root = Path(data).expanduser()
        if not root.is_dir():
            known = ", ".join(NAMED_DATASETS)
            raise ConfigError("data", f"{data}: no such folder (named datasets go to `dataset`: {known})")
        tr, ev, notes = _detect_tree(root)
        result = folder_data(tr, ev, val_fraction=val_fraction, seed=seed)
        result.notes[:0] = notes
        result.description["data"] = str(root.resolve())
    else:
        result = digits_data(input_size, val_fraction=val_fraction, seed=seed)

    if len(result.classes) < 2:
        raise AttnscopeError(f"probing needs at least 2 classes, found {len(result.classes)}")
    if shots is not None:
        keep, short = keep_shots(result.train.labels, shots, seed)
        result.train = result.train.subset(keep)
        msg = f"{shots}-shot: kept {len(keep)} training images (seed {seed})"
        if short:
            msg += f"; {len(short)} class(es) have fewer than {shots}"
        result.notes.append(msg)
        result.description = {**result.description, "shots": shots}
    if max_images is not None:
        if max_images < 1:
            raise ConfigError("max_images", f"must be at least 1, got {max_images}")
        for side in ("train", "eval"):
            split: LabelledSplit = getattr(result, side)
            if len(split) > max_images:
                setattr(result, side, split.subset(stratified_subsample(split.labels, max_images, seed)))
                result.notes.append(
                    f"`max_images`: {side} split reduced to {max_images} images (stratified, seed {seed})"
                )
    unseen = sorted(set(np.unique(result.eval.labels)) - set(np.unique(result.train.labels)))
    if unseen:
        names = ", ".join(result.classes[i] for i in unseen[:5])
        result.notes.append(f"{len(unseen)} evaluation class(es) have no training images ({names})")
    return result
