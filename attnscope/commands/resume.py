"""A run's committed state inside its folder, so an interrupted run can continue (`resume`).

While a run streams its images, `PartialRun.commit` saves the state in the hidden folder
`.attnscope-partial/` of the run folder:

- `chunk-NNNNNN.npz`: the per-image values of the images measured since the previous
  commit (written once, never rewritten, so the cost of a commit does not grow with
  the run);
- `state.npz`: the exact running sums, the positions done, the failures, the token
  layout, the hash of everything that changes the numbers, and the list of chunks with
  their sha256. It is replaced last, so it only ever names chunks that are complete.

Every file is written to a temporary name and renamed into place, so a kill at any
moment leaves the previous state or the new one. `load` trusts nothing it cannot check:
an unknown format, another configuration hash, a missing chunk or a checksum that does
not match refuse the resume in one line. A finished run writes run.json last and then
removes the folder; run.json, not the partial folder, is what marks a run finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError, ConfigError, Interrupted
from attnscope.files import remove_stale_temporaries

if TYPE_CHECKING:
    import numpy as np

    from attnscope.measure import Checkpointing, StreamState

PARTIAL_DIR = ".attnscope-partial"
STATE_FILE = "state.npz"
FORMAT = 1
ENV_IMAGES = "ATTNSCOPE_COMMIT_IMAGES"
ENV_SECONDS = "ATTNSCOPE_COMMIT_SECONDS"
DEFAULT_IMAGES = 64
DEFAULT_SECONDS = 30.0


def commit_every() -> tuple[int, float]:
    """(images, seconds) between commits: 64 and 30 unless the environment says otherwise."""
    images_raw = os.environ.get(ENV_IMAGES, "").strip()
    seconds_raw = os.environ.get(ENV_SECONDS, "").strip()
    try:
        images = int(images_raw) if images_raw else DEFAULT_IMAGES
        seconds = float(seconds_raw) if seconds_raw else DEFAULT_SECONDS
    except ValueError:
        images, seconds = 0, 0.0
    if images < 1 or not seconds > 0:
        raise AttnscopeError(
            f"{ENV_IMAGES} must be a positive integer and {ENV_SECONDS} a positive number, "
            f"got {images_raw!r} and {seconds_raw!r}"
        )
    return images, seconds


def _npz_bytes(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    save: Any = np.savez  # its typed keywords (allow_pickle) hide that names are free
    save(buf, meta=np.array(json.dumps(meta)), **arrays)
    return buf.getvalue()


def _read_npz(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays.pop("meta")))
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta, arrays


class PartialRun:
    """The committed state of one run folder's stream; `what` names the run in messages."""

    def __init__(self, run_dir: Path, config_hash: str, what: str) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / PARTIAL_DIR
        self.config_hash = config_hash
        self.what = what
        self.committed = 0  # positions done at the last commit (restored ones included)
        self.total: int | None = None
        self._chunks: list[dict[str, Any]] = []
        self._mark = 0  # the accumulator's image_batches at the last commit
        self._started = False

    @staticmethod
    def exists(run_dir: Path) -> bool:
        return (Path(run_dir) / PARTIAL_DIR).is_dir()

    # ---------------------------------------------------------------- writing

    def _write(self, name: str, data: bytes) -> None:
        from attnscope.results import RunWriter

        RunWriter(self.dir, overwrite=True).write_bytes(name, data)

    def commit(self, state: StreamState) -> None:
        """Save `state`: the new per-image values as a chunk, then state.npz naming it."""
        if not self._started:
            # a folder being (re)written must never look finished: run.json goes first
            (self.run_dir / "run.json").unlink(missing_ok=True)
            self._started = True
        acc = state.accumulator
        if acc is not None and acc.image_batches > self._mark:
            groups, values = acc.images_since(self._mark)
            name = f"chunk-{len(self._chunks):06d}.npz"
            data = _npz_bytes({"groups": groups}, values)
            self._write(name, data)
            self._chunks.append({"file": name, "sha256": hashlib.sha256(data).hexdigest()})
            self._mark = acc.image_batches
        meta: dict[str, Any] = {
            "format": FORMAT,
            "config_hash": self.config_hash,
            "total": state.total,
            "done": state.done,
            "used": len(state.used),
            "failures": [[int(i), str(r)] for i, r in state.failures],
            "layout": None if state.layout is None else _layout_dict(state.layout),
            "chunks": self._chunks,
            "accumulator": None,
        }
        arrays: dict[str, np.ndarray] = {}
        if acc is not None:
            meta["accumulator"], arrays = acc.snapshot()
        self._write(STATE_FILE, _npz_bytes(meta, arrays))
        self.committed, self.total = state.done, state.total

    def checkpointing(self, resume: StreamState | None) -> Checkpointing:
        from attnscope.measure import Checkpointing

        images, seconds = commit_every()
        return Checkpointing(self.commit, resume=resume, every_images=images, every_seconds=seconds)

    def remove(self) -> None:
        """Drop the committed state (after run.json is written, or to start over)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- reading

    def describe(self) -> str:
        """'k of N images committed' for messages, without trusting more than the metadata."""
        try:
            meta, _ = _read_npz((self.dir / STATE_FILE).read_bytes())
            return f"{int(meta['done'])} of {int(meta['total'])} images committed"
        except FileNotFoundError:
            return "no image committed"
        except Exception:
            return "its saved state is unreadable"

    def _refuse(self, reason: str) -> ConfigError:
        return ConfigError(
            None, f"cannot resume {self.what} from {self.dir}: {reason}; start it over with `overwrite`"
        )

    def load(self, total: int) -> StreamState | None:
        """The committed state of a stream over `total` images, checked; None when nothing
        was committed yet. Refuses (ConfigError) a state it cannot trust or that another
        configuration made."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            meta, arrays = _read_npz(path.read_bytes())
            if meta.get("format") != FORMAT:
                raise self._refuse(f"its saved state has format {meta.get('format')!r}, not {FORMAT}")
            if meta.get("config_hash") != self.config_hash:
                raise self._refuse(
                    "it was started with other settings (model, weights, image size, dtype or the images "
                    "themselves changed)"
                )
            state = self._rebuild(meta, arrays, total)
        except ConfigError:
            raise
        except Exception as exc:  # any damage: refuse, never add to it
            raise self._refuse(f"its saved state is damaged ({type(exc).__name__}: {exc})") from None
        self.committed, self.total = state.done, state.total
        return state

    def _rebuild(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], total: int) -> StreamState:
        from attnscope.measure import StreamState
        from attnscope.metrics import MetricAccumulator
        from attnscope.models import TokenLayout

        if int(meta["total"]) != total:
            raise ValueError(f"it covers {meta['total']} images, this run lists {total}")
        parts = []
        for chunk in meta["chunks"]:
            data = (self.dir / str(chunk["file"])).read_bytes()
            if hashlib.sha256(data).hexdigest() != chunk["sha256"]:
                raise ValueError(f"{chunk['file']} does not match its checksum")
            chunk_meta, chunk_arrays = _read_npz(data)
            parts.append((chunk_meta["groups"], chunk_arrays))
        acc = None
        if meta["accumulator"] is not None:
            acc = MetricAccumulator.restore(meta["accumulator"], arrays, parts)
        used = [] if acc is None else acc.image_positions()
        failures = [(int(i), str(r)) for i, r in meta["failures"]]
        done = int(meta["done"])
        if len(used) != int(meta["used"]) or len(used) + len(failures) != done or done > total:
            raise ValueError(
                f"{len(used)} measured and {len(failures)} failed images do not make {done} done"
            )
        lay = meta["layout"]
        layout = None
        if lay is not None:
            (gh, gw), (ph, pw) = lay["grid"], lay["patch_size"]
            layout = TokenLayout(
                bool(lay["has_cls"]),
                int(lay["num_registers"]),
                int(lay["num_prefix"]),
                (int(gh), int(gw)),
                (int(ph), int(pw)),
            )
        self._chunks = list(meta["chunks"])
        self._mark = 0 if acc is None else acc.image_batches
        return StreamState(total, done, used, failures, acc, layout)

    def interrupted(self, prefix: str = "") -> Interrupted:
        """The Ctrl-C line: what is committed where, and whether resume continues it."""
        if self.committed:
            detail = f"{self.committed} of {self.total} images of {self.what} are committed in {self.run_dir}"
        else:
            detail = f"no image of {self.what} was committed yet"
        return Interrupted(prefix + detail, resumable=self.committed > 0)


@contextlib.contextmanager
def committing(partial: PartialRun | None) -> Iterator[None]:
    """Around the measuring and writing of a run that commits its state as it goes (None:
    one that does not, e.g. under torchrun). Ctrl-C becomes `Interrupted` saying what is
    committed; a run that finishes drops its state and the temporaries an earlier, killed
    session may have left mid-write."""
    try:
        yield
    except KeyboardInterrupt:
        if partial is None:
            raise
        raise partial.interrupted() from None
    if partial is not None:
        partial.remove()
        remove_stale_temporaries(partial.run_dir)


def _layout_dict(layout: Any) -> dict[str, Any]:
    return {
        "has_cls": bool(layout.has_cls),
        "num_registers": int(layout.num_registers),
        "num_prefix": int(layout.num_prefix),
        "grid": [int(v) for v in layout.grid],
        "patch_size": [int(v) for v in layout.patch_size],
    }
