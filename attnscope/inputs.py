"""What a run's numbers depend on, as plain JSON-able data, and its hash.

A run folder records `config_hash(inputs)` of everything that changes its numbers
(versions, model, weights, input size, dtype, the images and the metrics measured), so a
later entropy or compare run over the same inputs can re-read it instead of recomputing.
Both commands build their inputs here; `attnscope.compare.config_inputs` is the compare
plan's view of `run_inputs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnscope.models import ModelSpec

__all__ = ["config_hash", "metric_inputs", "run_inputs"]


def _file_stamp(path: Path) -> list[Any]:
    # A file that vanished after listing is skipped (and listed) at load time like any
    # unreadable one; here it only needs a stamp that differs from the file's.
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _weights_stamp(source: str | Path) -> list[Any]:
    """A file's stamp (the form earlier run folders were hashed with); a Hugging Face folder's
    config.json and weights file, each stamped, since the folder's own mtime does not change
    when a file in it is rewritten."""
    from attnscope.models.source import weights_files

    if Path(source).expanduser().is_file():
        return _file_stamp(Path(source).expanduser().resolve())
    return [str(source), [_file_stamp(f.resolve()) for f in weights_files(source)]]


def run_inputs(
    spec: ModelSpec,
    paths: Sequence[Path],
    *,
    checkpoint: Path | None,
    model_kwargs: Mapping[str, Any] | None,
    random_init: bool,
    seed: int,
    img_size: Sequence[int] | None,
    dtype: str,
    position_resize: str = "own",
) -> dict[str, Any]:
    """`config_inputs` of any one-model run (entropy's too): versions, model, weights,
    input size, dtype and the images (path, size, mtime), as plain JSON-able data.

    Where weights may meet a grid other than their own (an `img_size`, or a checkpoint whose
    size the architecture's default need not match), the position resize rule is an input:
    folders written before it existed resampled with timm's rule, so they lack the key and
    are recomputed."""
    from attnscope import __version__
    from attnscope.versions import package_versions

    source = checkpoint if checkpoint is not None else spec.path  # a path given as the model
    if source is not None:
        weights: dict[str, Any] = {"checkpoint": _weights_stamp(source)}
    elif random_init:
        weights = {"random_init": True, "seed": seed}
    else:
        weights = {"pretrained": spec.timm_name}
    versions = package_versions()
    kwargs = dict(model_kwargs or {})
    resizable = not random_init and (img_size is not None or checkpoint is not None)
    positions = {"position_resize": position_resize} if resizable else {}
    return {
        # bumped when an input's meaning changes: 2 = random weights drawn per model, aliases
        # carrying their family's preprocessing (folders of version 1 hold other numbers);
        # 3 = DINOv2, DINOv3, I-JEPA, EVA-02, CLIP and fine-tuned BEiT-v2 aliases evaluated
        # with their family's transform instead of timm's tag
        "inputs_version": 3,
        "attnscope": __version__,
        "timm": versions.get("timm"),
        "torch": versions.get("torch"),
        "timm_name": spec.timm_name,
        "weights": weights,
        "model_kwargs": {k: kwargs[k] for k in sorted(kwargs)},
        "img_size": list(img_size) if img_size else None,
        "dtype": dtype,
        "images": [_file_stamp(Path(p)) for p in sorted(paths)],
        **positions,
    }


def metric_inputs(families: Sequence[str]) -> dict[str, Any]:
    """The config inputs of what a run measures: its metric families and, when a metric of
    theirs has been redefined since attnscope first wrote it, that metric's revision
    (`attnscope.metrics.metric_revisions`), so a folder holding the old numbers is recomputed
    instead of reused or resumed. Runs without a redefined metric keep their old hash."""
    from attnscope.metrics import metric_revisions

    inputs: dict[str, Any] = {"metrics": list(families)}
    revisions = metric_revisions(families)
    if revisions:
        inputs["metric_revisions"] = revisions
    return inputs


def config_hash(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config_inputs`."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
