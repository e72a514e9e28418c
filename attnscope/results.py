"""The run folder: the one place that decides paths and writes files.

Every file is written to a temporary name in the same folder and renamed into place, so a
crash or Ctrl-C leaves either the old file or the new one, never half of one; and a
folder that already holds results is never written into without `overwrite`.

`RunWriter` writes any file of any command's folder; `RunFolder` owns one model's run
folder (entropy's, and each of compare's `runs/<model>/`): what it holds, in which order it
is written, and whether it is finished and reusable.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError, ConfigError
from attnscope.files import atomic_path, slug, write_text_atomic
from attnscope.versions import package_versions

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from attnscope.analysis import AnalysisResult
    from attnscope.cka import GramCollector
    from attnscope.compare import Gallery

RUNS_ROOT = Path("attnscope-runs")


def default_run_dir(label: str, root: Path = RUNS_ROOT) -> Path:
    """A new timestamped folder name under attnscope-runs/ that does not exist yet."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{slug(label)}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    return str(obj)


class RunWriter:
    """Owns one output folder; every file of a run goes through it."""

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError("out", f"{self.out_dir} exists and is not a folder")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise ConfigError(
                "out", f"{self.out_dir} is not empty; choose another folder or pass `overwrite`"
            )
        self.written: list[Path] = []

    def prepare(self) -> Path:
        """Create the folder; called only once results exist, so errors leave no empty folder."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AttnscopeError(f"cannot create {self.out_dir}: {exc.strerror or exc}") from exc
        return self.out_dir

    def path(self, relative: str) -> Path:
        return self.out_dir / relative

    def _record(self, path: Path) -> Path:
        self.written.append(path)
        return path

    def write_csv(self, relative: str, frame: pd.DataFrame, *, float_format: str | None = "%.10g") -> Path:
        """`frame` as CSV; floats with 10 significant digits, or the shortest text that reads
        back to the same float64 (`float_format=None`, read it with `read_csv_exact`)."""
        target = self.prepare() / relative
        with atomic_path(target) as tmp:
            frame.to_csv(tmp, index=False, float_format=float_format)
        return self._record(target)

    def write_json(self, relative: str, data: dict[str, Any]) -> Path:
        target = self.prepare() / relative
        write_text_atomic(target, json.dumps(data, indent=2, default=_jsonable) + "\n")
        return self._record(target)

    def write_text(self, relative: str, text: str) -> Path:
        target = self.prepare() / relative
        write_text_atomic(target, text)
        return self._record(target)

    def write_bytes(self, relative: str, data: bytes) -> Path:
        target = self.prepare() / relative
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return self._record(target)

    def write_figure(
        self, relative_stem: str, fig: Figure, formats: Sequence[str] = ("png",), dpi: int = 150
    ) -> list[Path]:
        """Save `fig` once per format (png, svg, pdf) and close it."""
        import matplotlib.pyplot as plt

        paths = []
        for fmt in formats:
            target = self.prepare() / f"{relative_stem}.{fmt}"
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
            paths.append(self._record(target))
        plt.close(fig)
        return paths


def run_metadata(command: str, config: dict[str, Any], models: dict[str, Any], seed: int) -> dict[str, Any]:
    """The run.json document: config, seed, versions and per-model provenance."""
    return {
        "attnscope_run": 1,
        "command": command,
        "argv": list(sys.argv),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seed": seed,
        "config": config,
        "versions": package_versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "models": models,
    }


def read_csv_exact(path: Path) -> pd.DataFrame:
    """A CSV whose floats read back bit for bit: pandas 2's default parser may be 1 ulp off
    (pandas 3 reads exactly by default and deprecates the option)."""
    import pandas as pd

    if int(pd.__version__.split(".")[0]) >= 3:
        return pd.read_csv(path)
    return pd.read_csv(path, float_precision="round_trip")


def read_images(run_dir: str | Path) -> pd.DataFrame:
    """images.csv of a run folder (model, image, layer, metric, value), floats exact."""
    path = Path(run_dir) / "images.csv"
    if not path.is_file():
        raise AttnscopeError(f"{run_dir} has no images.csv (written by attnscope before per-image values)")
    frame = read_csv_exact(path)
    if list(frame.columns) != ["model", "image", "layer", "metric", "value"]:
        raise AttnscopeError(f"{path} does not have the columns model, image, layer, metric, value")
    return frame


def read_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(layers, heads, run.json) of a finished run folder."""
    import pandas as pd

    run_dir = Path(run_dir)
    needed = [run_dir / "layers.csv", run_dir / "heads.csv", run_dir / "run.json"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise AttnscopeError(f"{run_dir} is not an attnscope run folder (missing {', '.join(missing)})")
    layers = pd.read_csv(needed[0])
    heads = pd.read_csv(needed[1])
    meta = json.loads(needed[2].read_text(encoding="utf-8"))
    return layers, heads, meta


PROFILE_FILES = ("spectrum.csv", "frequency.csv")


def write_profiles(writer: RunWriter, spectrum: pd.DataFrame | None, frequency: pd.DataFrame | None) -> None:
    """spectrum.csv and frequency.csv (exact floats) when the tokens family gave them rows;
    an older copy is removed otherwise, so a folder never mixes two runs."""
    for name, table in zip(PROFILE_FILES, (spectrum, frequency), strict=True):
        if table is not None and not table.empty:
            writer.write_csv(name, table, float_format=None)
        else:
            (writer.prepare() / name).unlink(missing_ok=True)


def read_profiles(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(spectrum, frequency) of a run folder, floats exact; None when either file is missing
    or lacks its columns (a run without the tokens family, or an older attnscope)."""
    from attnscope.metrics.profiles import FREQUENCY_COLUMNS, SPECTRUM_COLUMNS

    tables = []
    for name, columns in zip(PROFILE_FILES, (SPECTRUM_COLUMNS, FREQUENCY_COLUMNS), strict=True):
        path = Path(run_dir) / name
        if not path.is_file():
            return None
        frame = read_csv_exact(path)
        if list(frame.columns) != list(columns):
            return None
        tables.append(frame)
    return tables[0], tables[1]


# ---------------------------------------------------------------- one model's run folder

RUN_JSON = "run.json"
GALLERY_FILE = "gallery.npz"
GRAMS_FILE = "cka_grams.npz"
Profiles = tuple["pd.DataFrame", "pd.DataFrame"] | None  # (spectrum, frequency): the tokens family
Found = tuple["pd.DataFrame", "pd.DataFrame", dict[str, Any], "pd.DataFrame", Profiles]


class RunFolder:
    """One model's run folder: its tables, token profiles, gallery and CKA Grams, and
    run.json.

    run.json is written last and removed first, so its presence marks a finished run and
    a half-rewritten folder never looks finished; with its `config_hash` it marks a run a
    later command may reuse. Every file goes through a `RunWriter`, so each write is atomic.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer: RunWriter | None = None

    @property
    def writer(self) -> RunWriter:
        """Made on the first write: reading or checking a folder never refuses it."""
        if self._writer is None:
            self._writer = RunWriter(self.path, overwrite=True)  # the caller decided it may be written
        return self._writer

    @property
    def finished(self) -> bool:
        return (self.path / RUN_JSON).is_file()

    # ------------------------------------------------------------ writing, in this order

    def write_tables(self, result: AnalysisResult) -> None:
        """layers.csv, heads.csv, images.csv and the token profiles, after removing an older
        run.json (the folder is unfinished until `finish`)."""
        (self.writer.prepare() / RUN_JSON).unlink(missing_ok=True)
        self.writer.write_csv("layers.csv", result.layers)
        self.writer.write_csv("heads.csv", result.heads)
        self.writer.write_csv("images.csv", result.images, float_format=None)
        write_profiles(self.writer, result.spectrum, result.frequency)

    def write_gallery(self, gallery: Gallery, config_hash: str) -> Path:
        """gallery.npz: the last-block maps of the first images, stamped with the run's hash."""
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            maps=gallery.maps.astype(np.float32),
            views=gallery.views,
            names=np.array(gallery.names),
            query=np.array(gallery.query),
            patch_size=np.array(gallery.patch_size),
            config_hash=np.array(config_hash),
        )
        return self.writer.write_bytes(GALLERY_FILE, buf.getvalue())

    def write_grams(self, grams: GramCollector | None) -> GramCollector | None:
        """Keep a complete set of CKA Grams beside the tables (so a reuse can compute CKA);
        an incomplete set is not kept, and an older file is removed."""
        import io

        import numpy as np

        if grams is None or not grams.complete:
            (self.path / GRAMS_FILE).unlink(missing_ok=True)
            return None
        buffer = io.BytesIO()
        np.savez(buffer, **grams.to_arrays())  # type: ignore[arg-type]
        self.writer.write_bytes(GRAMS_FILE, buffer.getvalue())
        return grams

    def write_figure(self, relative_stem: str, fig: Figure, formats: Sequence[str] = ("png",)) -> list[Path]:
        return self.writer.write_figure(relative_stem, fig, formats)

    def finish(self, meta: dict[str, Any]) -> Path:
        """run.json, last: the run is finished."""
        return self.writer.write_json(RUN_JSON, meta)

    # ------------------------------------------------------------ reading

    def read(self) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
        """(layers, heads, run.json) of the finished run."""
        return read_run(self.path)

    def read_images(self) -> pd.DataFrame:
        return read_images(self.path)

    def read_profiles(self) -> Profiles:
        return read_profiles(self.path)

    def reusable(self, config_hash: str, name: str) -> Found | None:
        """(layers, heads, run.json, images, profiles) of a finished run of `name` with this
        hash, or None.

        A folder without images.csv (an older attnscope), or whose images.csv does not add
        up to its layers.csv, is recomputed, not trusted; so is a run of the tokens family
        without its spectrum.csv and frequency.csv.
        """
        from attnscope.compare import images_agree

        if not self.finished:
            return None
        try:
            meta = json.loads((self.path / RUN_JSON).read_text(encoding="utf-8"))
            if meta.get("config_hash") != config_hash or name not in meta.get("models", {}):
                return None
            layers, heads, meta = self.read()
            images = self.read_images()
            profiles = self.read_profiles()
        except (OSError, ValueError, KeyError, AttnscopeError):
            return None
        if profiles is None and "tokens" in meta.get("config_inputs", {}).get("metrics", []):
            return None
        return (layers, heads, meta, images, profiles) if images_agree(images, layers) else None

    def read_gallery(self, config_hash: str, k: int) -> Gallery | None:
        """The first `k` gallery images of this run, or None when gallery.npz is missing,
        of another hash, shorter or damaged (it is then recomputed, not trusted)."""
        import numpy as np

        from attnscope.compare import Gallery

        path = self.path / GALLERY_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["config_hash"]) != config_hash or len(data["maps"]) < k:
                    return None
                return Gallery(
                    maps=data["maps"][:k],
                    views=data["views"][:k],
                    names=[str(n) for n in data["names"][:k]],
                    query=str(data["query"]),
                    patch_size=(int(data["patch_size"][0]), int(data["patch_size"][1])),
                )
        except (OSError, KeyError, ValueError):
            return None

    def read_grams(self) -> GramCollector | None:
        """The CKA Grams kept beside the tables, or None (older run, resumed run, damaged:
        CKA is then left out, the statistics stand)."""
        import numpy as np

        from attnscope.cka import GramCollector

        path = self.path / GRAMS_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return GramCollector.from_arrays({k: data[k] for k in data.files})
        except (OSError, ValueError, KeyError):
            return None
