"""`maps`: one model's attention over each image, written as overlay figures and maps.npz.

The science (queries, rollout, the patch grid) is in `attnscope.maps`, the drawing in
`attnscope.plots.maps`; this module checks the settings, runs the model once over the
images and writes the run folder.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.commands.ui import UI, NullUI
from attnscope.config import (
    check_at_least,
    check_choice,
    check_dtype,
    config_dict,
    normalise_formats,
    normalise_img_size,
)
from attnscope.errors import ConfigError
from attnscope.maps import (
    UPSAMPLE_MODES,
    HeadSelection,
    Query,
    check_map_options,
    parse_heads,
    parse_query,
)
from attnscope.models.loading import random_weights_warning

if TYPE_CHECKING:
    from attnscope.maps import AttentionMaps
    from attnscope.models import LoadedModel
    from attnscope.results import RunWriter

MAPS_FILE = "maps.npz"


@dataclass(frozen=True)
class MapsConfig:
    """Everything a `maps` run depends on; recorded as run.json's `config`.

    `query` takes a `Query` or its text form (cls, mean, patch:ROW,COL); `heads` takes
    mean, all, a sequence of head indices or their text form (0,3,5). `contour` 0 or None
    draws no contour.
    """

    model: str
    checkpoint: Path | None = None
    images: tuple[str, ...] | None = None
    random_init: bool = False
    data_config: str | None = None
    query: Query | str = "cls"
    layer: int | None = None
    heads: HeadSelection | Sequence[int] | str = "mean"
    rollout: bool = False
    discard_ratio: float = 0.0
    upsample: str = "nearest"
    contour: float | None = 0.6
    img_size: tuple[int, int] | None = None
    position_resize: str = "own"
    max_images: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    formats: tuple[str, ...] = ("png",)
    out: Path | None = field(default=None, compare=False)
    overwrite: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", normalise_formats(self.formats))
        for name in ("checkpoint", "out"):  # a notebook may pass a string
            value = getattr(self, name)
            object.__setattr__(self, name, Path(value) if value is not None else None)
        object.__setattr__(self, "img_size", normalise_img_size(self.img_size))
        if isinstance(self.query, str):
            object.__setattr__(self, "query", parse_query(self.query))
        heads = parse_heads(self.heads) if isinstance(self.heads, str) else self.heads
        object.__setattr__(self, "heads", heads if isinstance(heads, str) else tuple(heads))
        check_choice("upsample", self.upsample, UPSAMPLE_MODES)
        if self.contour is not None and not 0.0 <= self.contour <= 1.0:
            raise ConfigError("contour", f"takes a mass fraction in [0, 1] (0: none), got {self.contour}")
        object.__setattr__(self, "contour", self.contour or None)
        check_map_options(self.heads, self.rollout, self.discard_ratio)  # type: ignore[arg-type]
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("max_images", self.max_images, 1)
        check_dtype(self.dtype)
        object.__setattr__(self, "images", tuple(str(i) for i in self.images) if self.images else None)

    def as_dict(self, layer: int) -> dict[str, Any]:
        """run.json's `config`, with the block actually shown (`layer` resolved)."""
        assert isinstance(self.query, Query)
        block = config_dict(self, skip=("seed", "out", "overwrite"))
        block.update(query=self.query.slug(), layer=layer)
        files = {MAPS_FILE: "maps (images, maps, grid rows, grid cols): each a distribution over patches"}
        return {"command": "maps", **block, "files": files}


def figure_stems(paths: Sequence[Path]) -> list[str]:
    """One file name per image; two images called `img.jpg` in different folders get -2, -3."""
    from attnscope.files import slug

    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = slug(p.stem)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _collect(config: MapsConfig, loaded: LoadedModel, paths: Sequence[Path], ui: UI) -> AttentionMaps:
    """The maps of every readable image, with a progress bar; unreadable files are reported."""
    from attnscope.maps import collect_maps

    if config.random_init:
        ui.banner(random_weights_warning(loaded.name, config.seed, "maps"))
    with ui.progress(loaded.name) as prog:
        task = prog.add_task(loaded.name, total=len(paths))
        result = collect_maps(
            loaded,
            paths,
            query=config.query,
            layer=config.layer,
            heads=config.heads,
            rollout=config.rollout,
            discard_ratio=config.discard_ratio,
            batch_size=config.batch_size,
            device=config.device,
            dtype=config.dtype,
            progress=lambda done, total: prog.update(task, completed=done),
        )
    for path, reason in result.skipped:
        ui.skip(path, reason)
    return result


def _write_figures(
    writer: RunWriter, config: MapsConfig, loaded: LoadedModel, result: AttentionMaps, stems: list[str]
) -> None:
    from attnscope.plots.maps import overlay_figure

    assert isinstance(config.query, Query)
    label = loaded.label
    cell = (config.query.row, config.query.col) if config.query.kind == "patch" else None
    formats = list(dict.fromkeys(["png", *config.formats]))  # PNG always, for viewing
    for i, (path, stem) in enumerate(zip(result.paths, stems, strict=True)):
        fig = overlay_figure(
            result.views[i],
            result.maps[i],
            result.labels,
            result.layout.patch_size,
            title=f"{label}: {result.describe()} — {path.name}",
            mode=config.upsample,
            threshold=config.contour,
            query_cell=cell,
        )
        writer.write_figure(stem, fig, formats)


def _maps_bytes(result: AttentionMaps, stems: list[str]) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        maps=result.maps,
        labels=np.array(result.labels),
        images=np.array([str(p) for p in result.paths]),
        files=np.array(stems),
        grid=np.array(result.layout.grid),
        patch_size=np.array(result.layout.patch_size),
    )
    return buf.getvalue()


def _info(loaded: LoadedModel, result: AttentionMaps) -> dict[str, Any]:
    """The model's provenance block of run.json."""
    from attnscope.analysis import provenance

    used = [str(p) for p in result.paths]
    info = provenance(loaded, result.layout, used, [(str(p), r) for p, r in result.skipped])
    info["maps"] = result.describe()
    return info


def run(config: MapsConfig, ui: UI | None = None, *, command: str = "") -> tuple[Path, AttentionMaps]:
    """One overlay figure per image, maps.npz and run.json; returns the folder and the maps."""
    from attnscope.commands.steps import list_images, load_configured
    from attnscope.models.source import short_name
    from attnscope.results import RunWriter, default_run_dir, run_metadata

    ui = ui or NullUI()
    # refuse a bad out folder before any work
    out = config.out or default_run_dir(f"maps-{short_name(config.model)}")
    writer = RunWriter(out, overwrite=config.overwrite)
    paths, _ = list_images(config.images, config.max_images, ui)
    loaded = load_configured(config, ui)
    result = _collect(config, loaded, paths, ui)
    stems = figure_stems(result.paths)
    _write_figures(writer, config, loaded, result, stems)
    writer.write_bytes(MAPS_FILE, _maps_bytes(result, stems))
    meta = run_metadata(
        command, config.as_dict(result.layer), {config.model: _info(loaded, result)}, config.seed
    )
    writer.write_json("run.json", meta)
    return writer.out_dir, result
