"""Position terms at a grid other than the checkpoint's, resized the way each family's own
code resizes them.

A learned table trained on a 37 x 37 grid and measured on 16 x 16 must be resampled, and the
resampling defines the network: DINOv2's hub code (bicubic, scale factor (16 + 0.1) / 37, no
antialias), transformers' (bicubic to size 16 x 16, no antialias) and timm's loader (bicubic,
antialias) give three different 16 x 16 tables and three different sets of attention maps.
So each family names its rule here (`RULES`), the model and converter records say which one
is theirs, and `resize_positions` applies it to a state dict before timm's own filter sees
it. Rotary positions (EVA-02, DINOv3, CAPI) have no table: the model computes them from the
grid at every forward, so there is nothing to resize.

Every resampling runs in float64 and is cast back to the checkpoint's dtype: the families'
own code interpolates in float32, which differs from float64 by ~1e-7 of the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

Grid = tuple[int, int]
#: `--position-resize`: the model's own rule (default) or timm's loader, for comparison.
RESIZE_CHOICES = ("own", "timm")


@dataclass(frozen=True)
class PositionRule:
    """How one family's code brings its position terms to another grid.

    `absolute(patch_table, from, to)` maps the (gh*gw, C) float64 rows of the learned or
    fixed table (prefix rows excluded) to the new grid; `relative(table, from, to)` maps a
    BEiT-style (2Wh-1)(2Ww-1) x heads bias table (its 3 class-token rows excluded).
    `source` says whose code defines the rule, for run.json and docs/models.md.
    """

    name: str
    source: str
    absolute: Callable[[torch.Tensor, Grid, Grid], torch.Tensor] | None = None
    relative: Callable[[torch.Tensor, Grid, Grid], torch.Tensor] | None = None


def _as_image(rows: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(gh*gw, C) rows, row-major over the grid -> (1, C, gh, gw)."""
    return rows.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def _as_rows(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 2, 3, 1).reshape(-1, image.shape[1])


def bicubic_to_size(rows: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """Bicubic to the new size, half-pixel centres, no antialias: MAE's and LUT's
    `interpolate_pos_embed`, EVA-02's and BEiT's loaders, transformers' ViT and Dinov2."""
    import torch.nn.functional as F

    out = F.interpolate(_as_image(rows, old), size=new, mode="bicubic", align_corners=False)
    return _as_rows(out)


def bicubic_offset(rows: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """Bicubic with scale factor (new + 0.1) / old per axis, no antialias: DINO's, iBOT's
    and DINOv2's `interpolate_pos_encoding` (the 0.1 makes the output size floor to `new`; the
    scale factor itself, not new / old, maps output to input coordinates)."""
    import torch.nn.functional as F

    scale = ((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1])
    out = F.interpolate(_as_image(rows, old), scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != new:  # pragma: no cover - the offset guarantees the size
        raise AttnscopeError(f"offset resize gave {tuple(out.shape[-2:])}, not {new}")
    return _as_rows(out)


def bicubic_antialias(rows: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """Bicubic to size with antialias (which only differs from `bicubic_to_size` when
    shrinking): timm's `resample_abs_pos_embed` default, and DINOv2's register models."""
    import torch.nn.functional as F

    out = F.interpolate(_as_image(rows, old), size=new, mode="bicubic", align_corners=False, antialias=True)
    return _as_rows(out)


def _sincos_axis(positions: torch.Tensor, quarter: int) -> torch.Tensor:
    import torch

    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    angles = positions.reshape(-1, 1).double() * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _fixed_table(
    formula: Callable[[int, Grid], torch.Tensor], name: str
) -> Callable[[torch.Tensor, Grid, Grid], torch.Tensor]:
    """A rule that computes a fixed table for the new grid, once the checkpoint's table is
    seen to be that same formula on its own grid (a fine-tuned, learned table is not, and
    regenerating it would silently replace trained weights)."""

    def resize(rows: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
        dim = rows.shape[-1]
        if dim % 4 or (rows.double() - formula(dim, old)).abs().max() > 1e-4:
            raise AttnscopeError(
                f"its position table is not {name}'s fixed sin-cos table, so the {name} rule (computing that "
                "table for the new grid) does not apply; use `position_resize` timm to interpolate it"
            )
        return formula(dim, new)

    return resize


def sincos_mocov3(dim: int, grid: Grid) -> torch.Tensor:
    """MoCo v3's `build_2d_sincos_position_embedding` on `grid`, without the class row (the
    table is fixed, and MoCo v3's model computes it from its grid). Its `torch.meshgrid(grid_w, grid_h)`
    (default 'ij' indexing) enumerates a (w, h) array, so token k gets (k // h, k % h) as its
    (first, second) coordinates: the row and column on a square grid, and that same
    enumeration on a non-square one, as its code does."""
    import torch

    height, width = grid
    first = torch.arange(width * height, dtype=torch.float64) // height
    second = torch.arange(width * height, dtype=torch.float64) % height
    quarter = dim // 4
    return torch.cat([_sincos_axis(first, quarter), _sincos_axis(second, quarter)], dim=1)


def sincos_mae(dim: int, grid: Grid) -> torch.Tensor:
    """MAE's `get_2d_sincos_pos_embed` on `grid` (no class row), which I-JEPA's encoder uses
    for its fixed table: the first half encodes the column, the second the row. I-JEPA's own
    `interpolate_pos_encoding` cannot run (it assumes a class row its model lacks), while
    its constructor builds exactly this table for any image size."""
    import torch

    height, width = grid
    cols = torch.arange(width, dtype=torch.float64).repeat(height)
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    quarter = dim // 4
    return torch.cat([_sincos_axis(cols, quarter), _sincos_axis(rows, quarter)], dim=1)


def _geometric_offsets(src: int, dst: int) -> tuple[list[float], list[float]]:
    """BEiT's source and target coordinates of one axis of a (2W - 1) relative table.

    The source offsets grow geometrically (ratio q, found by bisection in [1.01, 1.5] so that
    the progression's sum over W - 1 terms just reaches the target's W - 1), so near offsets
    keep their spacing and far ones are compressed; the target offsets are the integers.
    """
    import numpy as np

    half_src, half_dst = src // 2, dst // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**half_src) / (1.0 - q) > half_dst:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(half_src):
        dis.append(cur)
        cur += q ** (i + 1)
    source = [-d for d in reversed(dis)] + [0.0] + dis
    t = dst // 2.0
    target = list(np.arange(-t, t + 0.1, 1.0))
    return source, target


def rel_geometric_cubic(table: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """BEiT's (and SimMIM's) loader for a relative bias table at another window: per head, an
    interpolating bicubic spline (SciPy's `interp2d(kind='cubic')`, an s = 0 FITPACK spline,
    which is `RectBivariateSpline(..., s=0)`) through the geometric source offsets,
    evaluated at the integer target offsets. BEiT's code handles square windows only; each
    axis here gets its own progression, which is BEiT's rule on a square window."""
    import numpy as np
    import torch
    from scipy.interpolate import RectBivariateSpline

    src_h, src_w = 2 * old[0] - 1, 2 * old[1] - 1
    dst_h, dst_w = 2 * new[0] - 1, 2 * new[1] - 1
    ys, dys = _geometric_offsets(src_h, dst_h)
    xs, dxs = _geometric_offsets(src_w, dst_w)
    heads = []
    for head in table.double().cpu().numpy().T:
        spline = RectBivariateSpline(ys, xs, head.reshape(src_h, src_w), kx=3, ky=3, s=0)
        heads.append(spline(dys, dxs).reshape(-1))
    return torch.from_numpy(np.stack(heads, axis=1))


def rel_bilinear(table: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """transformers' `BeitRelativePositionBias` with `interpolate_pos_encoding`: bilinear
    (half-pixel centres) from the (2Wh-1) x (2Ww-1) table to the new one. Its reshape reads
    the old table as (2Ww-1, 2Wh-1), the same thing on the square windows checkpoints have."""
    import torch.nn.functional as F

    image = table.reshape(1, 2 * old[1] - 1, 2 * old[0] - 1, -1).permute(0, 3, 1, 2)
    out = F.interpolate(image, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bilinear", align_corners=False)
    return _as_rows(out)


def rel_timm(table: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """timm's Beit loader: `resize_rel_pos_bias_table` on the whole table."""
    from timm.layers import resize_rel_pos_bias_table

    full = resize_rel_pos_bias_table(
        table, new_window_size=new, new_bias_shape=((2 * new[0] - 1) * (2 * new[1] - 1), table.shape[1])
    )
    return full


_DINO_SRC = "bicubic, scale factor (grid + 0.1) / old grid, no antialias"
RULES: dict[str, PositionRule] = {
    rule.name: rule
    for rule in (
        PositionRule(
            "dinov2",
            f"facebookresearch/dinov2 interpolate_pos_encoding (interpolate_offset 0.1): {_DINO_SRC}",
            absolute=bicubic_offset,
        ),
        PositionRule(
            "dinov2-reg",
            "facebookresearch/dinov2 interpolate_pos_encoding of the register models "
            "(interpolate_offset 0, interpolate_antialias True): bicubic to size, antialias",
            absolute=bicubic_antialias,
        ),
        PositionRule(
            "dino",
            f"facebookresearch/dino and iBOT interpolate_pos_encoding: {_DINO_SRC}",
            absolute=bicubic_offset,
        ),
        PositionRule(
            "mae",
            "facebookresearch/mae util/pos_embed.interpolate_pos_embed: bicubic to size, no antialias",
            absolute=bicubic_to_size,
        ),
        PositionRule(
            "eva02",
            "baaivision/EVA EVA-02 interpolate_pos_embed: bicubic to size, no antialias; "
            "rotary positions computed for the grid",
            absolute=bicubic_to_size,
        ),
        PositionRule(
            "transformers",
            "transformers interpolate_pos_encoding: bicubic to size, no antialias "
            "(Beit's relative bias: bilinear to size)",
            absolute=bicubic_to_size,
            relative=rel_bilinear,
        ),
        PositionRule(
            "mocov3",
            "facebookresearch/moco-v3 vits.build_2d_sincos_position_embedding, computed for the grid",
            absolute=_fixed_table(sincos_mocov3, "MoCo v3"),
        ),
        PositionRule(
            "ijepa",
            "facebookresearch/ijepa: fixed 2-D sin-cos table (get_2d_sincos_pos_embed) computed for the grid",
            absolute=_fixed_table(sincos_mae, "I-JEPA"),
        ),
        PositionRule(
            "beit",
            "microsoft/unilm beit2 and microsoft/SimMIM loaders: relative bias by bicubic spline "
            "through geometric offsets (interp2d cubic); absolute table bicubic to size",
            absolute=bicubic_to_size,
            relative=rel_geometric_cubic,
        ),
        PositionRule(
            "timm",
            "timm's loader: resample_abs_pos_embed (bicubic to size, antialias) and "
            "resize_rel_pos_bias_table",
            absolute=bicubic_antialias,
            relative=rel_timm,
        ),
    )
}


def get_rule(name: str) -> PositionRule:
    try:
        return RULES[name]
    except KeyError:
        raise ConfigError("position_resize", f"unknown rule {name!r}; known: {', '.join(RULES)}") from None


def model_grid(model: nn.Module) -> Grid:
    """The patch grid the model was built for."""
    from attnscope.models.layout import _pair

    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise AttnscopeError(f"{type(model).__name__} has no patch grid")
    return _pair(grid)


def _square(count: int, what: str) -> Grid:
    side = math.isqrt(count)
    if side * side != count:
        raise AttnscopeError(f"{what} has {count} grid positions, not a square grid; cannot tell its grid")
    return (side, side)


def _pos_prefix(model: nn.Module, rows: int) -> int:
    """Rows of a checkpoint's `pos_embed` that are not on the grid: the model's prefix
    (timm's `no_embed_class` models fold the class position into the class token, so their
    table is the grid alone), or one class row that an official file still carries (DINOv2
    with registers, which timm's filter folds afterwards)."""
    if getattr(model, "no_embed_class", False):
        own = 0
    else:
        own = int(
            getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
        )
    for prefix in (own, 1):
        side = math.isqrt(max(rows - prefix, 0))
        if side * side == rows - prefix:
            return prefix
    return own


@dataclass(frozen=True)
class Resize:
    """What `resize_positions` did, for run.json and the printed line."""

    rule: str
    source: str
    grid_from: Grid
    grid_to: Grid
    tensors: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "source": self.source,
            "from": list(self.grid_from),
            "to": list(self.grid_to),
            "tensors": list(self.tensors),
        }

    def describe(self) -> str:
        a, b = self.grid_from, self.grid_to
        return f"position terms resized from a {a[0]}x{a[1]} to a {b[0]}x{b[1]} grid by the {self.rule} rule"


def resize_positions(
    state: Mapping[str, torch.Tensor], model: nn.Module, rule: PositionRule
) -> tuple[dict[str, torch.Tensor], Resize | None]:
    """The position tensors of `state` (timm key names) brought to `model`'s grid by `rule`.

    Returns only the tensors that changed, in the state's dtype, and what was done (None when
    the checkpoint's grid is the model's). A table the rule cannot resize is an error, never
    left to another rule.
    """
    import torch

    tables = [k for k in state if k.endswith("relative_position_bias_table")]
    pos = state.get("pos_embed")
    if pos is None and not tables:
        return {}, None  # rotary positions (CAPI, EVA-02's, DINOv3) are computed for the grid
    new = model_grid(model)
    out: dict[str, torch.Tensor] = {}
    old: Grid | None = None
    if pos is not None and getattr(model, "pos_embed", None) is not None:
        prefix = _pos_prefix(model, pos.shape[1])
        grid = _square(pos.shape[1] - prefix, "the checkpoint's pos_embed")
        if grid != new:
            if rule.absolute is None:
                raise AttnscopeError(f"the {rule.name} rule has no resize for a learned position table")
            rows = rule.absolute(pos[0, prefix:].to(torch.float64), grid, new)
            out["pos_embed"] = torch.cat([pos[:, :prefix], rows.unsqueeze(0).to(pos.dtype)], dim=1)
            old = grid
    for key in tables:
        table = state[key]
        grid = _square(table.shape[0] - 3, f"the checkpoint's {key}")
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        if grid == new:
            continue
        if rule.relative is None:
            raise AttnscopeError(f"the {rule.name} rule has no resize for a relative position bias table")
        body = rule.relative(table[:-3].to(torch.float64), grid, new).to(table.dtype)
        out[key] = torch.cat([body, table[-3:]], dim=0)
        old = grid
    if old is None:
        return {}, None
    return out, Resize(rule.name, rule.source, old, new, tuple(sorted(out)))
