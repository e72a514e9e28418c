"""Independent float64 reference implementation of docs/metrics.md (the metric contract).

This module exists to check attnscope's production (torch, streaming) metrics. It is written
from the specification alone and shares no code with ``attnscope.metrics`` or
``attnscope.capture``. It favours clarity over speed: plain numpy float64, one (image, head)
at a time.

Spec points followed literally (see the spec for the formulas):

* rows are renormalised over patch keys only: ``p_i(j) = A[i, j] / S_i``, ``S_i = sum_{j in P} A[i, j]``;
  registers and the class token never count as patches;
* entropy is exact, ``0 ln 0 = 0`` (``scipy.special.entr``), with no epsilon;
* a zero patch row sum (for any row the metrics use: ``c`` and every patch query) is an error
  (``ValueError``), never a silent zero;
* ``k60``/``k90``: ``k`` = smallest number of largest ``p_c`` values whose cumulative sum is
  at least ``threshold - 1e-6``;
* Gini: ``G = (2 sum_r r q_r) / N - (N + 1) / N`` with ``q`` ascending, ranks ``1..N``;
* attention distance uses the true ``gh x gw`` grid (row ``r = idx // gw``, column
  ``s = idx % gw``) and the patch size ``(ph, pw)``: ``D = sqrt((ph dr)^2 + (pw ds)^2)``;
* NMI: ``k(j) = mean_i p_i(j)``, ``I = H(k) - mean_i H(p_i)``, ``nmi = I / sqrt(ln N * H(k))``.
* self-attention relative to the patch mass of the same row, no epsilon:
  ``cls_self_attn_adj = A[c, c] / S_c``, ``patch_self_attn_adj = mean_i A[i, i] / S_i``.

Choices the spec does not make (reported as ambiguities, kept explicit here):

* 0/0 in a normalised metric (``ln N = 0`` when ``N = 1``; ``H_K = 0`` in NMI when every patch
  query puts all its patch mass on one and the same key) gives NaN, never a made-up number;
* a zero-norm ``x_t`` in a residual ratio raises ``ValueError`` (the spec does not say);
* row order of the tables: layer ascending, then metric in spec-table order, then head.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import entr

#: Per (image, block, head) metric names, in the spec table's order.
HEAD_METRICS: tuple[str, ...] = (
    "cls_self_attn",
    "cls_patch_mass",
    "cls_register_mass",
    "patch_cls_attn",
    "patch_self_attn",
    "patch_register_mass",
    "cls_patch_entropy",
    "cls_patch_entropy_norm",
    "cls_patch_eff_frac",
    "cls_patch_k60_frac",
    "cls_patch_k90_frac",
    "cls_patch_gini",
    "cls_patch_max",
    "patch_patch_entropy",
    "patch_patch_entropy_norm",
    "patch_patch_eff_frac",
    "attn_distance_px",
    "cls_self_attn_adj",
    "patch_self_attn_adj",
    "attn_nmi",
)
#: Per (image, block) metric names (no head dimension), in the spec table's order.
BLOCK_METRICS: tuple[str, ...] = ("cls_residual_ratio", "patch_residual_ratio")
#: Per (image, block) token metrics (the "tokens" family), in the spec table's order.
TOKEN_METRICS: tuple[str, ...] = (
    "cls_patch_cos",
    "patch_patch_cos",
    "patch_norm_mean",
    "cls_norm",
    "patch_outlier_frac",
    "cls_outlier_mass",
    "patch_eff_rank",
    "patch_hf_amp",
)
TOKEN_NEEDS_CLS = frozenset({"cls_patch_cos", "cls_norm", "cls_outlier_mass"})
#: The outlier rule of docs/metrics.md: norm > OUTLIER_RATIO x the median patch norm and >= t,
#: the lowest patch norm above the median with no patch norm in (t / OUTLIER_GAP, t).
OUTLIER_RATIO = 3.0
OUTLIER_GAP = 1.5

#: Which per-head metrics need the class token ``c`` / at least one register.
NEEDS_CLS = frozenset(
    {
        "cls_self_attn",
        "cls_patch_mass",
        "cls_register_mass",
        "patch_cls_attn",
        "cls_patch_entropy",
        "cls_patch_entropy_norm",
        "cls_patch_eff_frac",
        "cls_patch_k60_frac",
        "cls_patch_k90_frac",
        "cls_patch_gini",
        "cls_patch_max",
        "cls_self_attn_adj",
    }
)
NEEDS_REGISTERS = frozenset({"cls_register_mass", "patch_register_mass"})

K_TOLERANCE = 1e-6  # spec: compare the cumulative sum with threshold - 1e-6


# --------------------------------------------------------------------------- building blocks


def entropy(p: np.ndarray) -> np.ndarray:
    """Exact Shannon entropy (nats) along the last axis, with 0 ln 0 = 0 and no epsilon."""
    return entr(np.asarray(p, dtype=np.float64)).sum(axis=-1)


def _ratio(num: float, den: float) -> float:
    """num / den, with 0/0 (an undefined normalised metric) reported as NaN."""
    if den == 0.0:
        return math.nan if num == 0.0 else math.copysign(math.inf, num)
    return num / den


def renormalise_over_patches(rows: np.ndarray, patch: slice, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(p, S): rows restricted to patch keys and divided by their patch sum S.

    rows: (Q, T). A zero patch sum is an error (it cannot happen after a softmax)."""
    sub = rows[:, patch]
    s = sub.sum(axis=1)
    if np.any(s == 0.0):
        bad = np.flatnonzero(s == 0.0).tolist()
        raise ValueError(f"{what}: zero attention mass on patches (rows {bad}); cannot renormalise")
    return sub / s[:, None], s


def k_frac(p: np.ndarray, threshold: float) -> float:
    """k / N with k the smallest number of largest p values whose sum reaches threshold - 1e-6."""
    n = p.shape[0]
    csum = np.cumsum(np.sort(p)[::-1])
    reached = np.flatnonzero(csum >= threshold - K_TOLERANCE)
    # p sums to 1 (it is renormalised), so the threshold (< 1) is always reached.
    k = int(reached[0]) + 1
    return k / n


def gini(p: np.ndarray) -> float:
    """G = (2 sum_r r q_r) / N - (N + 1) / N, q = p sorted ascending, r = 1..N (spec formula)."""
    n = p.shape[0]
    q = np.sort(p)
    r = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * np.sum(r * q) / n - (n + 1) / n)


def patch_distance_matrix(grid: tuple[int, int], patch_size: tuple[int, int]) -> np.ndarray:
    """(N, N) Euclidean distance between patch centres in input pixels, row-major gh x gw grid."""
    gh, gw = grid
    ph, pw = patch_size
    idx = np.arange(gh * gw)
    r = (idx // gw).astype(np.float64)
    s = (idx % gw).astype(np.float64)
    dr = ph * (r[:, None] - r[None, :])
    ds = pw * (s[:, None] - s[None, :])
    return np.sqrt(dr**2 + ds**2)


# --------------------------------------------------------------------------- per block


def _one_head(
    a: np.ndarray, *, has_cls: bool, num_registers: int, n_prefix: int, dist: np.ndarray
) -> dict[str, float]:
    """All applicable per-head metrics for one (image, head) attention matrix a: (T, T)."""
    t = a.shape[0]
    n = t - n_prefix
    patch = slice(n_prefix, t)
    reg = slice(int(has_cls), n_prefix)
    patch_idx = np.arange(n_prefix, t)
    ln_n = math.log(n)
    out: dict[str, float] = {}

    # -- raw (not renormalised) masses
    if has_cls:
        c = 0
        out["cls_self_attn"] = float(a[c, c])
        out["cls_patch_mass"] = float(a[c, patch].sum())
        if num_registers > 0:
            out["cls_register_mass"] = float(a[c, reg].sum())
        out["patch_cls_attn"] = float(a[patch, c].mean())
    out["patch_self_attn"] = float(a[patch_idx, patch_idx].mean())
    if num_registers > 0:
        out["patch_register_mass"] = float(a[patch, reg].sum(axis=1).mean())

    # -- class token over patches
    if has_cls:
        p_c, s_c = renormalise_over_patches(a[0:1], patch, "class-token row")
        p_c = p_c[0]
        h_c = float(entropy(p_c))
        out["cls_patch_entropy"] = h_c
        out["cls_patch_entropy_norm"] = _ratio(h_c, ln_n)
        out["cls_patch_eff_frac"] = math.exp(h_c) / n
        out["cls_patch_k60_frac"] = k_frac(p_c, 0.6)
        out["cls_patch_k90_frac"] = k_frac(p_c, 0.9)
        out["cls_patch_gini"] = gini(p_c)
        out["cls_patch_max"] = float(p_c.max())

    # -- patch queries over patches
    p, s_i = renormalise_over_patches(a[patch], patch, "patch query rows")  # (N, N), (N,)
    h_i = entropy(p)  # (N,)
    out["patch_patch_entropy"] = float(h_i.mean())
    out["patch_patch_entropy_norm"] = _ratio(float(h_i.mean()), ln_n)  # mean(H/ln N) = mean(H)/ln N
    out["patch_patch_eff_frac"] = float(np.mean(np.exp(h_i) / n))
    out["attn_distance_px"] = float(np.mean(np.sum(p * dist, axis=1)))
    if has_cls:
        out["cls_self_attn_adj"] = float(a[0, 0] / s_c[0])
    out["patch_self_attn_adj"] = float(np.mean(a[patch_idx, patch_idx] / s_i))
    k_marg = p.mean(axis=0)  # key marginal, queries uniform
    h_k = float(entropy(k_marg))
    mi = h_k - float(h_i.mean())
    out["attn_nmi"] = _ratio(mi, math.sqrt(ln_n * h_k))
    return out


def reference_block_metrics(
    A: np.ndarray,
    *,
    has_cls: bool,
    num_registers: int,
    grid: tuple[int, int],
    patch_size: tuple[int, int],
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A: (B, H, T, T) post-softmax attention of one block for B images (float64 internally).

    Token layout [cls?][registers R][patches P row-major over grid gh x gw]. x, y: (B, T, C)
    block input and attention branch (optional, both or neither).
    Returns (per_head, per_block): per_head maps metric name -> (B, H) array for every
    per-(image, block, head) metric of the spec that applies (metrics needing ``c`` are absent
    without a class token, metrics needing registers are absent without registers);
    per_block maps cls_residual_ratio / patch_residual_ratio -> (B,) when x and y are given
    (the cls one only with a class token)."""
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 4 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (B, H, T, T), got {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError("A has non-finite values")
    if num_registers < 0:
        raise ValueError(f"num_registers must be >= 0, got {num_registers}")
    b, nh, t, _ = A.shape
    gh, gw = (int(v) for v in grid)
    ph, pw = (float(v) for v in patch_size)
    n_prefix = int(bool(has_cls)) + int(num_registers)
    n = gh * gw
    if n < 1 or t != n_prefix + n:
        raise ValueError(f"T={t} does not match {n_prefix} prefix tokens + {gh}x{gw} patches")

    dist = patch_distance_matrix((gh, gw), (ph, pw))
    names = [
        m
        for m in HEAD_METRICS
        if (has_cls or m not in NEEDS_CLS) and (num_registers > 0 or m not in NEEDS_REGISTERS)
    ]
    per_head = {m: np.empty((b, nh), dtype=np.float64) for m in names}
    for bi in range(b):
        for hi in range(nh):
            vals = _one_head(
                A[bi, hi],
                has_cls=bool(has_cls),
                num_registers=int(num_registers),
                n_prefix=n_prefix,
                dist=dist,
            )
            assert set(vals) == set(names), (sorted(vals), names)
            for m in names:
                per_head[m][bi, hi] = vals[m]

    per_block: dict[str, np.ndarray] = {}
    if (x is None) != (y is None):
        raise ValueError("give both x and y, or neither")
    if x is not None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 3 or x.shape[:2] != (b, t):
            raise ValueError(f"x, y must both be (B={b}, T={t}, C), got {x.shape} and {y.shape}")
        nx = np.linalg.norm(x, axis=-1)  # (B, T), L2 over channels
        ny = np.linalg.norm(y, axis=-1)
        used = [0] if has_cls else []
        used += list(range(n_prefix, t))
        if np.any(nx[:, used] == 0.0):
            raise ValueError("zero-norm block input token: residual ratio undefined")
        if has_cls:
            per_block["cls_residual_ratio"] = ny[:, 0] / nx[:, 0]
        per_block["patch_residual_ratio"] = (ny[:, n_prefix:] / nx[:, n_prefix:]).mean(axis=1)
    return per_head, per_block


def outlier_patches(norms: np.ndarray) -> np.ndarray:
    """O: one image's outlier patches, as docs/metrics.md states the rule.

    The band's top t is the first of the image's own patch norms, lowest first, that is
    above the median and has nothing in (t / OUTLIER_GAP, t): every norm is either >= t or
    at most t / OUTLIER_GAP (written OUTLIER_GAP * n <= t). The outliers are the norms
    >= t that are also more than OUTLIER_RATIO times the median. No such t: none."""
    norms = np.asarray(norms, dtype=np.float64)
    med = float(np.median(norms))
    for t in np.unique(norms):  # ascending
        if t > med and np.all((norms >= t) | (OUTLIER_GAP * norms <= t)):
            return (norms >= t) & (norms > OUTLIER_RATIO * med)
    return np.zeros(norms.shape, dtype=bool)


def effective_rank(tokens: np.ndarray) -> float:
    """Roy & Vetterli: exp of the entropy of the singular values (normalised to sum 1) of the
    centred (N, C) matrix; 1 (its floor) for a zero centred matrix."""
    centred = tokens - tokens.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    if s.sum() == 0:
        return 1.0
    return float(np.exp(entr(s / s.sum()).sum()))


def log_amplitude(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) mean over channels of ln(|DFT2| + 1e-6) of the (N, C) patch tokens on the grid,
    DC at [0, 0]."""
    gh, gw = grid
    maps = tokens.T.reshape(tokens.shape[1], gh, gw)
    return np.log(np.abs(np.fft.fft2(maps, axes=(1, 2))) + 1e-6).mean(axis=0)


def reference_spectrum(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s / sum s, s^2 / sum s^2) of the centred (N, C) patch tokens by a full SVD, descending,
    min(N, C) values each; zeros for a zero centred matrix (every patch the same)."""
    centred = tokens - tokens.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    if s.sum() == 0:
        return np.zeros_like(s), np.zeros_like(s)
    return s / s.sum(), s**2 / (s**2).sum()


def reference_frequency_profile(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The radial profile of docs/metrics.md for one image's (N, C) patch tokens.

    A square grid follows the cl-vs-mim notebook's own arithmetic: log amplitude, mean over
    channels, roll by (h // 2, w // 2), the half-diagonal from the centre, minus its first
    value. Other grids read the fftshifted map at the lattice points
    (round(t Kh / M), round(t Kw / M)) from the centre, halves rounded up.
    """
    gh, gw = grid
    shifted = np.roll(log_amplitude(tokens, grid), shift=(gh // 2, gw // 2), axis=(0, 1))
    if gh == gw:
        half = np.diag(shifted)[gh // 2 :]
        return half - half[0]
    kh, kw = (gh - 1) // 2, (gw - 1) // 2
    m = max(kh, kw)
    if m == 0:
        return np.zeros(1)
    steps = [(int(np.floor(t * kh / m + 0.5)), int(np.floor(t * kw / m + 0.5))) for t in range(m + 1)]
    values = np.array([shifted[gh // 2 + u, gw // 2 + v] for u, v in steps])
    return values - values[0]


def reference_token_metrics(
    out: np.ndarray,
    x: np.ndarray,
    A: np.ndarray,
    *,
    has_cls: bool,
    num_registers: int,
    grid: tuple[int, int],
) -> dict[str, np.ndarray]:
    """The token family of one block for B images, one image and one pair at a time.

    out, x: (B, T, C) block output and input; A: (B, H, T, T) the block's attention.
    Returns metric -> (B,) for every token metric that applies."""
    out = np.asarray(out, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    p0 = int(bool(has_cls)) + int(num_registers)
    gh, gw = grid
    result: dict[str, list[float]] = {m: [] for m in TOKEN_METRICS if has_cls or m not in TOKEN_NEEDS_CLS}
    for b in range(out.shape[0]):
        z = out[b, p0:]
        n = z.shape[0]
        norms = np.linalg.norm(z, axis=1)
        pair = [z[i] @ z[j] / (norms[i] * norms[j]) for i in range(n) for j in range(n) if i != j]
        result["patch_patch_cos"].append(float(np.mean(pair)))
        result["patch_norm_mean"].append(float(norms.mean()))
        result["patch_outlier_frac"].append(float(outlier_patches(norms).mean()))
        result["patch_eff_rank"].append(effective_rank(z))
        amp = log_amplitude(z, grid)
        result["patch_hf_amp"].append(float(amp[(gh - 1) // 2, (gw - 1) // 2] - amp[0, 0]))
        if has_cls:
            c = out[b, 0]
            cn = np.linalg.norm(c)
            result["cls_patch_cos"].append(
                float(np.mean([c @ zj / (cn * nj) for zj, nj in zip(z, norms, strict=True)]))
            )
            result["cls_norm"].append(float(cn))
            mask = outlier_patches(np.linalg.norm(x[b, p0:], axis=1))
            mass = [A[b, h, 0, p0:][mask].sum() for h in range(A.shape[1])]
            result["cls_outlier_mass"].append(float(np.mean(mass)))
    return {m: np.asarray(v, dtype=np.float64) for m, v in result.items()}


# --------------------------------------------------------------------------- aggregation

LAYERS_COLUMNS = ["model", "layer", "metric", "mean", "std", "count"]
HEADS_COLUMNS = ["model", "layer", "head", "metric", "mean", "std", "count"]


def _order(names) -> list[str]:
    known = list(HEAD_METRICS) + list(BLOCK_METRICS) + list(TOKEN_METRICS)
    return sorted(names, key=lambda m: (known.index(m) if m in known else len(known), m))


def _stats(values: np.ndarray) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=0)), int(v.shape[0])


def reference_tables(per_image: list[tuple[dict, dict]], model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """per_image[layer] = (per_head, per_block) as returned by reference_block_metrics, for all
    images of a run (B images each), layers numbered from 0.

    Returns (layers_df, heads_df) with exactly the spec's columns, in order:
    layers.csv: model, layer, metric, mean, std, count; heads.csv: model, layer, head, metric,
    mean, std, count. Per-image values are the unit; std is the population std (ddof 0); for
    layers, per-head metrics are first averaged over heads within each image; per-block metrics
    go straight to layers. Rows: layer ascending, metric in spec order, head ascending (from 0)."""
    layer_rows: list[dict] = []
    head_rows: list[dict] = []
    for layer, (per_head, per_block) in enumerate(per_image):
        for metric in _order(per_head):
            v = np.asarray(per_head[metric], dtype=np.float64)
            if v.ndim != 2:
                raise ValueError(f"layer {layer} {metric}: per-head values must be (B, H), got {v.shape}")
            for head in range(v.shape[1]):
                mean, std, count = _stats(v[:, head])
                head_rows.append(
                    {
                        "model": model,
                        "layer": layer,
                        "head": head,
                        "metric": metric,
                        "mean": mean,
                        "std": std,
                        "count": count,
                    }
                )
            mean, std, count = _stats(v.mean(axis=1))  # heads averaged within each image first
            layer_rows.append(
                {"model": model, "layer": layer, "metric": metric, "mean": mean, "std": std, "count": count}
            )
        for metric in _order(per_block):
            v = np.asarray(per_block[metric], dtype=np.float64)
            if v.ndim != 1:
                raise ValueError(f"layer {layer} {metric}: per-block values must be (B,), got {v.shape}")
            mean, std, count = _stats(v)
            layer_rows.append(
                {"model": model, "layer": layer, "metric": metric, "mean": mean, "std": std, "count": count}
            )

    layers_df = pd.DataFrame(layer_rows, columns=LAYERS_COLUMNS)
    heads_df = pd.DataFrame(head_rows, columns=HEADS_COLUMNS)
    for df in (layers_df, heads_df):
        df["mean"] = df["mean"].astype(np.float64)
        df["std"] = df["std"].astype(np.float64)
        df["count"] = df["count"].astype(np.int64)
        df["layer"] = df["layer"].astype(np.int64)
    heads_df["head"] = heads_df["head"].astype(np.int64)
    return layers_df, heads_df


IMAGES_COLUMNS = ["model", "image", "layer", "metric", "value"]


def reference_images(per_image: list[tuple[dict, dict]], model: str, images: list[str]) -> pd.DataFrame:
    """images.csv of the spec: each image's per-layer value (per-head metrics averaged over
    the heads within the image; per-block metrics as they are), rows ordered by image, then
    layer, then metric in spec order. `per_image` as for `reference_tables`, `images` the
    names of its B images in order."""
    rows = []
    for b, image in enumerate(images):
        for layer, (per_head, per_block) in enumerate(per_image):
            for metric in _order(list(per_head) + list(per_block)):
                v = per_head[metric][b].mean() if metric in per_head else per_block[metric][b]
                rows.append((model, image, layer, metric, float(v)))
    return pd.DataFrame(rows, columns=IMAGES_COLUMNS)
