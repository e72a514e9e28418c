"""Per-block profiles of the token family: vectors per image, averaged over images.

Two tables go beside `layers.csv` when the tokens family is measured (docs/metrics.md,
"Profiles"):

- `spectrum.csv`: the normalised singular-value spectrum of each image's centred
  patch-token matrix (the spectrum `patch_eff_rank` summarises), k = 1..min(N, C);
- `frequency.csv`: the radial profile of the relative log amplitude of the patch-token
  feature map (the Fourier analysis `patch_hf_amp` reads the last point of).

Each is a mean over images of a per-image vector, so the accumulator keeps only a count
and a float64 sum per (block, profile) (`MetricAccumulator.update(..., profiles=)`):
memory does not grow with the image count, the sums of torchrun ranks add up, and a
resumed run restores them exactly. This module has the frequency lattice both the
formula and the table use, and builds the two tables from those sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

#: The profiles, in the order the accumulator keeps them: the two spectrum normalisations
#: (spectrum.csv) and the frequency profile (frequency.csv).
SPECTRUM_PROFILES: tuple[str, ...] = ("sv_share", "energy_share")
FREQUENCY_PROFILE = "rel_log_amplitude"
PROFILES: tuple[str, ...] = (*SPECTRUM_PROFILES, FREQUENCY_PROFILE)

SPECTRUM_COLUMNS = ("model", "block", "relative_depth", "k", "sv_share", "energy_share", "energy_cum")
FREQUENCY_COLUMNS = (
    "model", "block", "relative_depth", "step", "freq_row", "freq_col", "frequency", FREQUENCY_PROFILE,
)  # fmt: skip


def frequency_lattice(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The DFT coefficients (u, v) of the radial profile on a gh x gw grid, DC first.

    With Kh = (gh - 1) // 2, Kw = (gw - 1) // 2 (the highest frequencies below Nyquist)
    and M = max(Kh, Kw), step t = 0..M takes u = round(t Kh / M), v = round(t Kw / M)
    (halves rounded up): the lattice points nearest the straight line from DC to
    (Kh, Kw). On a square grid that is (t, t), the diagonal the cl-vs-mim notebook reads;
    the last point is always (Kh, Kw), the coefficient `patch_hf_amp` reports.
    """
    gh, gw = grid
    kh, kw = (gh - 1) // 2, (gw - 1) // 2
    m = max(kh, kw)
    if m == 0:
        return [(0, 0)]
    return [((2 * t * kh + m) // (2 * m), (2 * t * kw + m) // (2 * m)) for t in range(m + 1)]


def radial_frequency(u: int, v: int, grid: tuple[int, int]) -> float:
    """Angular frequency (radians per patch) of coefficient (u, v): the root mean square of
    the two axis frequencies 2 pi u / gh and 2 pi v / gw, so (t, t) on an h x h grid is
    2 pi t / h and the Nyquist corner would be pi."""
    gh, gw = grid
    return 2 * math.pi * math.sqrt(((u / gh) ** 2 + (v / gw) ** 2) / 2)


def _relative_depth(block: int, num_blocks: int) -> float:
    return block / max(num_blocks - 1, 1)


ProfileSums = Mapping[tuple[int, str], "np.ndarray"]  # (block, profile) -> [count, sum_1, ..., sum_K]


def _means(sums: ProfileSums, name: str) -> dict[int, np.ndarray]:
    """block -> mean over images of profile `name`, for the blocks that have it."""
    return {block: s[1:] / s[0] for (block, n), s in sorted(sums.items()) if n == name and s[0] > 0}


def spectrum_table(model: str, num_blocks: int, sums: ProfileSums) -> pd.DataFrame:
    """spectrum.csv's rows: one per (block, k), k = 1..K, columns SPECTRUM_COLUMNS."""
    import numpy as np
    import pandas as pd

    sv, energy = (_means(sums, name) for name in SPECTRUM_PROFILES)
    frames = []
    for block, share in sv.items():
        k = np.arange(1, share.shape[0] + 1)
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "block": block,
                    "relative_depth": _relative_depth(block, num_blocks),
                    "k": k,
                    "sv_share": share,
                    "energy_share": energy[block],
                    "energy_cum": np.cumsum(energy[block]),
                }
            )
        )
    return _concat(frames, SPECTRUM_COLUMNS)


def frequency_table(model: str, num_blocks: int, grid: tuple[int, int], sums: ProfileSums) -> pd.DataFrame:
    """frequency.csv's rows: one per (block, step of `frequency_lattice(grid)`)."""
    import pandas as pd

    lattice = frequency_lattice(grid)
    frames = []
    for block, profile in _means(sums, FREQUENCY_PROFILE).items():
        if profile.shape[0] != len(lattice):
            raise ValueError(f"block {block}: {profile.shape[0]} frequencies for a {grid[0]}x{grid[1]} grid")
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "block": block,
                    "relative_depth": _relative_depth(block, num_blocks),
                    "step": range(len(lattice)),
                    "freq_row": [u for u, _ in lattice],
                    "freq_col": [v for _, v in lattice],
                    "frequency": [radial_frequency(u, v, grid) for u, v in lattice],
                    FREQUENCY_PROFILE: profile,
                }
            )
        )
    return _concat(frames, FREQUENCY_COLUMNS)


def _concat(frames: list[pd.DataFrame], columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    if not frames:
        return pd.DataFrame(columns=list(columns))
    return pd.concat(frames, ignore_index=True)[list(columns)]
