"""The run folder: the one place that decides paths and writes files.

Every file is written to a temporary name in the same folder and renamed into place, so a
crash or Ctrl-C leaves either the old file or the new one, never half of one; and a
folder that already holds results is never written into without `overwrite`.
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
