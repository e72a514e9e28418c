"""Every metric: one record (`@metric(...)`) directly above its formula, in spec order.

The contract these formulas implement is docs/metrics.md. A record says what a metric is
called and how it is shown (label, unit), what it needs (a class token, registers, the
residual stream), whether it has a head dimension, whether its values lie in [0, 1],
whether it is a headline metric, and its revision (raised whenever its numbers change).
Everything else is derived from the records: the name tuples, the labels, which metrics
apply to a token layout, why one is absent, which revisions a run's hash holds, and
`block_metrics`, which evaluates them.

To add a metric, add a record + formula here at its place in spec order (CSV rows and
plots follow it), over the shared intermediates of `BlockContext` (add one there if
several metrics need it), then its known answer and float64 reference in tests/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from attnscope.config import METRIC_FAMILIES
from attnscope.errors import AttnscopeError
from attnscope.metrics.context import (
    BlockContext,
    Workspace,
    entropy,
    high_norm_mode,
    patch_distance_matrix,
)

if TYPE_CHECKING:
    import torch

    from attnscope.models import TokenLayout

Formula = Callable[[BlockContext], "torch.Tensor"]


@dataclass(frozen=True)
class MetricSpec:
    """What attnscope knows about one metric besides its formula.

    `compute(ctx)` returns per-image values: (B, H) when `per_head`, else (B,).
    """

    name: str
    label: str
    compute: Formula = field(repr=False, compare=False)
    unit: str = ""  # "nats", "px"; "" for probabilities, fractions and ratios
    per_head: bool = True
    needs_cls: bool = False
    needs_registers: bool = False
    needs_residual: bool = False
    unit_interval: bool = False  # every value lies in [0, 1]
    headline: bool = False  # leads comparisons (summary.csv columns, headline panels and table)
    family: str = "attention"  # "attention" or "tokens" (needs each block's output tokens)
    # bumped whenever the formula changes the numbers it returns: it enters the hash that
    # decides whether a run folder may be reused or resumed (`metric_revisions`)
    revision: int = 1

    def absent_reason(self, *, has_cls: bool, num_registers: int) -> str | None:
        """Why the metric has no rows for this token layout, or None when it applies."""
        if self.needs_cls and not has_cls:
            return "no class token"
        if self.needs_registers and not num_registers:
            return "no registers"
        return None


#: Every metric in spec order (the order of CSV rows and plots).
METRICS: dict[str, MetricSpec] = {}


def metric(
    name: str,
    label: str,
    *,
    unit: str = "",
    per_head: bool = True,
    needs_cls: bool = False,
    needs_registers: bool = False,
    needs_residual: bool = False,
    unit_interval: bool = False,
    headline: bool = False,
    family: str = "attention",
    revision: int = 1,
) -> Callable[[Formula], Formula]:
    """Register the decorated formula as metric `name`, after those registered before it."""

    def register(compute: Formula) -> Formula:
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        if per_head and any(not spec.per_head for spec in METRICS.values()):
            raise ValueError(f"per-head metric {name!r} registered after a per-block one")
        METRICS[name] = MetricSpec(
            name,
            label,
            compute,
            unit=unit,
            per_head=per_head,
            needs_cls=needs_cls,
            needs_registers=needs_registers,
            needs_residual=needs_residual,
            unit_interval=unit_interval,
            headline=headline,
            family=family,
            revision=revision,
        )
        return compute

    return register


# ---------------------------------------------------------------- raw attention masses


@metric("cls_self_attn", "[cls] self-attention", needs_cls=True, unit_interval=True, headline=True)
def cls_self_attn(ctx: BlockContext) -> torch.Tensor:
    """A[c, c]"""
    return ctx.A[:, :, 0, 0]


@metric("cls_patch_mass", "[cls] attention mass on patches", needs_cls=True, unit_interval=True)
def cls_patch_mass(ctx: BlockContext) -> torch.Tensor:
    """S_c = sum_{j in P} A[c, j]"""
    return ctx.cls_patch_sum


@metric(
    "cls_register_mass",
    "[cls] attention mass on registers",
    needs_cls=True,
    needs_registers=True,
    unit_interval=True,
)
def cls_register_mass(ctx: BlockContext) -> torch.Tensor:
    """sum_{j in R} A[c, j]"""
    return ctx.A[:, :, 0, ctx.R].sum(-1)


@metric("patch_cls_attn", "patch attention to [cls]", needs_cls=True, unit_interval=True)
def patch_cls_attn(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} A[i, c]"""
    return ctx.A[:, :, ctx.P, 0].mean(-1)


@metric("patch_self_attn", "patch self-attention", unit_interval=True)
def patch_self_attn(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} A[i, i]"""
    return ctx.patch_patch.diagonal(dim1=-2, dim2=-1).mean(-1)


@metric("patch_register_mass", "patch attention mass on registers", needs_registers=True, unit_interval=True)
def patch_register_mass(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} sum_{j in R} A[i, j]"""
    return ctx.A[:, :, ctx.P, ctx.R].sum(-1).mean(-1)


# ---------------------------------------------------------------- [cls] over patches (p_c renormalised)


@metric("cls_patch_entropy", "[cls]->patch entropy (nats)", needs_cls=True, unit="nats")
def cls_patch_entropy(ctx: BlockContext) -> torch.Tensor:
    """H(p_c)"""
    return ctx.cls_entropy


@metric(
    "cls_patch_entropy_norm", "[cls]->patch entropy / ln N", needs_cls=True, unit_interval=True, headline=True
)
def cls_patch_entropy_norm(ctx: BlockContext) -> torch.Tensor:
    """H(p_c) / ln N"""
    return ctx.cls_entropy / ctx.log_n


@metric(
    "cls_patch_eff_frac",
    "[cls] effective fraction of patches",
    needs_cls=True,
    unit_interval=True,
    headline=True,
)
def cls_patch_eff_frac(ctx: BlockContext) -> torch.Tensor:
    """exp(H(p_c)) / N"""
    import torch

    return torch.exp(ctx.cls_entropy) / ctx.n


def _top_mass_fraction(ctx: BlockContext, threshold: float) -> torch.Tensor:
    """k / N, k = the smallest count of largest p_c values whose sum reaches `threshold`.

    The cumulative sum is compared with threshold - 1e-6, so float rounding at the
    boundary cannot add a patch.
    """
    n = ctx.n
    return ((ctx.cls_cumsum < threshold - 1e-6).sum(-1) + 1).clamp(max=n).float() / n


@metric(
    "cls_patch_k60_frac", "fraction of patches holding 60% of [cls] mass", needs_cls=True, unit_interval=True
)
def cls_patch_k60_frac(ctx: BlockContext) -> torch.Tensor:
    """k60 / N"""
    return _top_mass_fraction(ctx, 0.6)


@metric(
    "cls_patch_k90_frac",
    "fraction of patches holding 90% of [cls] mass",
    needs_cls=True,
    unit_interval=True,
    headline=True,
)
def cls_patch_k90_frac(ctx: BlockContext) -> torch.Tensor:
    """k90 / N"""
    return _top_mass_fraction(ctx, 0.9)


@metric("cls_patch_gini", "Gini of [cls]->patch attention", needs_cls=True, unit_interval=True)
def cls_patch_gini(ctx: BlockContext) -> torch.Tensor:
    """(2 sum_r r q_r) / N - (N + 1) / N, q = p_c ascending, r = 1..N"""
    import torch

    n = ctx.n
    ranks = torch.arange(n, 0, -1, device=ctx.A.device, dtype=torch.float32)  # ascending rank of desc order
    return 2.0 * (ctx.cls_sorted * ranks).sum(-1) / n - (n + 1) / n


@metric("cls_patch_max", "max [cls]->patch attention", needs_cls=True, unit_interval=True)
def cls_patch_max(ctx: BlockContext) -> torch.Tensor:
    """max_j p_c(j)"""
    return ctx.cls_sorted[..., 0]


# ---------------------------------------------------------------- patches over patches (p_i renormalised)


@metric("patch_patch_entropy", "patch->patch entropy (nats)", unit="nats")
def patch_patch_entropy(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} H(p_i)"""
    return ctx.mean_patch_entropy


@metric("patch_patch_entropy_norm", "patch->patch entropy / ln N", unit_interval=True, headline=True)
def patch_patch_entropy_norm(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} H(p_i) / ln N"""
    return ctx.mean_patch_entropy / ctx.log_n


@metric("patch_patch_eff_frac", "patch->patch effective fraction", unit_interval=True)
def patch_patch_eff_frac(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} exp(H(p_i)) / N"""
    import torch

    return torch.exp(ctx.patch_entropies).mean(-1) / ctx.n


@metric("attn_distance_px", "mean attention distance (px)", unit="px", headline=True)
def attn_distance_px(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} sum_{j in P} p_i(j) D(i, j) = mean_i (sum_j a_ij D_ij) / S_i.

    Values are ~100 px while their spread over images can be < 0.1 px: rounding each
    image's value to float32 alone moves the std over images by ~4e-6 px. So only the row
    dot products (the bulk of the work, off by a few float32 ulps) run in float32, and
    everything after them in float64 where the device has it (not MPS); the result is
    float64 there. tests/test_reference_agreement.py holds it to the float64 reference.
    """
    import torch

    pp = ctx.patch_patch
    wide = torch.float32 if pp.device.type == "mps" else torch.float64
    dist = patch_distance_matrix(ctx.layout, pp.device)
    if ctx.workspace is None:
        rows = torch.linalg.vecdot(pp, dist)
    else:
        rows = torch.mul(pp, dist, out=ctx.workspace.take(pp.shape, pp)).sum(-1)
    return (rows.to(wide) * ctx.inv_patch_sums.to(wide)).mean(-1)


@metric("cls_self_attn_adj", "[cls] self-attention / [cls] patch mass", needs_cls=True)
def cls_self_attn_adj(ctx: BlockContext) -> torch.Tensor:
    """A[c, c] / S_c (not bounded by 1: a [cls] that mostly attends to itself gives large values)"""
    return ctx.A[:, :, 0, 0] / ctx.cls_patch_sum


@metric("patch_self_attn_adj", "patch self-attention / patch mass", unit_interval=True)
def patch_self_attn_adj(ctx: BlockContext) -> torch.Tensor:
    """mean_{i in P} A[i, i] / S_i"""
    return (ctx.patch_patch.diagonal(dim1=-2, dim2=-1) / ctx.patch_sums).mean(-1)


@metric("attn_nmi", "query-key NMI", unit_interval=True)
def attn_nmi(ctx: BlockContext) -> torch.Tensor:
    """I / sqrt(ln N * H_K), H_K = H(k), I = H_K - mean_{i in P} H(p_i).

    H_K = 0 means every query looks at one and the same key: I = 0 too, and that 0/0 is
    taken as 0 (no information about the query in the key distribution).
    """
    import torch

    h_k = entropy(ctx.key_marginal)
    nmi = (h_k - ctx.mean_patch_entropy) / torch.sqrt(ctx.log_n * h_k).clamp_min(
        torch.finfo(torch.float32).tiny
    )
    return torch.where(h_k > 0, nmi, torch.zeros_like(nmi))


# ---------------------------------------------------------------- residual stream (per block, no head)


@metric(
    "cls_residual_ratio",
    "[cls] residual update ratio",
    needs_cls=True,
    per_head=False,
    needs_residual=True,
    headline=True,
)
def cls_residual_ratio(ctx: BlockContext) -> torch.Tensor:
    """norm(y_c) / norm(x_c)"""
    xn, yn = ctx.residual_norms
    return yn[:, 0] / xn[:, 0]


@metric("patch_residual_ratio", "patch residual update ratio", per_head=False, needs_residual=True)
def patch_residual_ratio(ctx: BlockContext) -> torch.Tensor:
    """mean_{t in P} norm(y_t) / norm(x_t)"""
    xn, yn = ctx.residual_norms
    return (yn[:, ctx.P] / xn[:, ctx.P]).mean(-1)


# ---------------------------------------------------------------- tokens leaving the block (per block)

#: The metric families, in spec order.
FAMILIES: tuple[str, ...] = METRIC_FAMILIES

#: Outlier patches, per image (docs/metrics.md): norm > OUTLIER_RATIO x the median patch
#: norm, and above the lowest empty band of a factor OUTLIER_GAP above the median (a patch
#: norm t with none in (t / OUTLIER_GAP, t)): a separate high-norm mode, not the upper tail
#: of the bulk. The artefact tokens of "Vision Transformers Need Registers" have about 10
#: times the norm of the others, across an empty band from ~100 to ~150 (a factor 1.5).
#: Both constants are ratios, so the rule does not depend on the scale of the norms.
OUTLIER_RATIO = 3.0
OUTLIER_GAP = 1.5


@metric("cls_patch_cos", "[cls]-patch cosine similarity", needs_cls=True, per_head=False, family="tokens")
def cls_patch_cos(ctx: BlockContext) -> torch.Tensor:
    """mean_{j in P} cos(z_c, z_j)"""
    cls_unit = ctx.out_tokens[:, 0] / ctx.out_norms[:, 0].unsqueeze(-1)
    return (ctx.patch_units @ cls_unit.unsqueeze(-1)).squeeze(-1).mean(-1)


@metric("patch_patch_cos", "patch-patch cosine similarity", per_head=False, family="tokens")
def patch_patch_cos(ctx: BlockContext) -> torch.Tensor:
    """(norm(sum_j u_j)^2 - N) / (N (N - 1)), u_j = z_j / norm(z_j): the mean over pairs i != j.

    The square of the sum cancels N against values up to N^2, so the sum runs in float64
    where the device has it.
    """
    n = ctx.n
    total = ctx.patch_units.to(ctx.wide).sum(dim=1)
    return ((total * total).sum(-1) - n) / (n * (n - 1))


@metric("patch_norm_mean", "mean patch token norm", per_head=False, family="tokens")
def patch_norm_mean(ctx: BlockContext) -> torch.Tensor:
    """mean_{j in P} norm(z_j)"""
    return ctx.out_norms[:, ctx.P].mean(-1)


@metric("cls_norm", "[cls] token norm", needs_cls=True, per_head=False, family="tokens")
def cls_norm(ctx: BlockContext) -> torch.Tensor:
    """norm(z_c)"""
    return ctx.out_norms[:, 0]


@metric(
    "patch_outlier_frac",
    "fraction of high-norm patches",
    per_head=False,
    unit_interval=True,
    family="tokens",
    revision=2,  # 1 was norm > median + 5 MAD, which flags the upper tail of any distribution
)
def patch_outlier_frac(ctx: BlockContext) -> torch.Tensor:
    """|O(z)| / N, O(z) the patches with norm > OUTLIER_RATIO * median and >= t, the lowest patch
    norm above the median with no patch norm in (t / OUTLIER_GAP, t)"""
    mode = high_norm_mode(ctx.out_norms[:, ctx.P].to(ctx.wide), OUTLIER_RATIO, OUTLIER_GAP)
    return mode.to(ctx.wide).mean(-1)


@metric(
    "cls_outlier_mass",
    "[cls] attention mass on high-norm patches",
    needs_cls=True,
    per_head=False,
    unit_interval=True,
    family="tokens",
    revision=2,  # its outlier set changed with patch_outlier_frac's
)
def cls_outlier_mass(ctx: BlockContext) -> torch.Tensor:
    """mean_h sum_{j in O} A[c, j], O = the outlier patches of the stream entering the block.

    The stream entering block l is exactly block l-1's output, so this is the next block's
    [cls] mass on the patches `patch_outlier_frac` flags one row earlier, with no state kept
    from block to block (block 0 looks at the embedded patches).
    """
    assert ctx.x is not None
    norms = ctx.input_norms[:, ctx.P].to(ctx.wide)
    mask = high_norm_mode(norms, OUTLIER_RATIO, OUTLIER_GAP).to(ctx.A.dtype)  # (B, N)
    return (ctx.cls_patch * mask.unsqueeze(1)).sum(-1).mean(-1)


@metric("patch_eff_rank", "effective rank of patch tokens", per_head=False, family="tokens")
def patch_eff_rank(ctx: BlockContext) -> torch.Tensor:
    """exp(H(s / sum s)), s the singular values of the centred patch-token matrix (Roy & Vetterli);
    1 when the centred matrix is zero: every patch token the same is the complete collapse, and
    1 is the measure's floor (a rank-one spread gives 1 too), so the metric stays monotone in collapse."""
    import torch

    s = ctx.patch_spectrum
    total = s.sum(-1, keepdim=True)
    rank = torch.exp(entropy(s / total.clamp_min(torch.finfo(s.dtype).tiny)))
    return torch.where(total.squeeze(-1) > 0, rank, torch.ones_like(rank))


@metric("patch_hf_amp", "high-frequency log amplitude of patch tokens", per_head=False, family="tokens")
def patch_hf_amp(ctx: BlockContext) -> torch.Tensor:
    """L[(gh - 1) // 2, (gw - 1) // 2] - L[0, 0], L = mean_ch ln(|DFT| + 1e-6) on the gh x gw grid:
    the last point of the radial frequency profile (frequency.csv), which is computed anyway."""
    return ctx.patch_frequency_profile[:, -1]


# ---------------------------------------------------------------- per-block profiles (vectors per image)


def _shares(values: torch.Tensor) -> torch.Tensor:
    """values / their sum over the last dim; all zeros when the sum is 0 (no spectrum)."""
    import torch

    total = values.sum(-1, keepdim=True)
    return torch.where(total > 0, values / total.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


def token_profiles(ctx: BlockContext) -> dict[str, torch.Tensor]:
    """The per-image vectors of spectrum.csv and frequency.csv (`attnscope.metrics.profiles`):

    - sv_share: s_k / sum_i s_i, the normalised singular values `patch_eff_rank` takes the
      entropy of, (B, min(N, C)), descending;
    - energy_share: s_k^2 / sum_i s_i^2, the share of the centred tokens' variance along
      the k-th principal direction, (B, min(N, C));
    - rel_log_amplitude: the radial frequency profile, (B, M + 1), whose last point is
      `patch_hf_amp`.
    """
    s = ctx.patch_spectrum
    return {
        "sv_share": _shares(s),
        "energy_share": _shares(s * s),
        "rel_log_amplitude": ctx.patch_frequency_profile,
    }


# ---------------------------------------------------------------- derived from the records

HEAD_METRICS: tuple[str, ...] = tuple(name for name, spec in METRICS.items() if spec.per_head)
BLOCK_METRICS: tuple[str, ...] = tuple(name for name, spec in METRICS.items() if not spec.per_head)
ALL_METRICS: tuple[str, ...] = HEAD_METRICS + BLOCK_METRICS
METRIC_LABELS: dict[str, str] = {name: METRICS[name].label for name in ALL_METRICS}
HEADLINE_METRICS: tuple[str, ...] = tuple(name for name in ALL_METRICS if METRICS[name].headline)
UNIT_INTERVAL_METRICS: frozenset[str] = frozenset(name for name in ALL_METRICS if METRICS[name].unit_interval)


def metric_revisions(families: Sequence[str]) -> dict[str, int]:
    """{metric: revision} of the metrics of `families` whose definition has changed since
    attnscope first wrote them (revision > 1), for the hash of a run's inputs: a folder
    measured under an older definition then hashes differently and is recomputed, while the
    hash of a run with no revised metric stays what it always was."""
    revised = (spec for spec in METRICS.values() if spec.family in families and spec.revision > 1)
    return {spec.name: spec.revision for spec in revised}


def metric_spec(name: str) -> MetricSpec:
    """The record of metric `name`."""
    try:
        return METRICS[name]
    except KeyError:
        raise AttnscopeError(f"unknown metric {name!r}; known: {', '.join(ALL_METRICS)}") from None


def absent_reason(name: str, *, has_cls: bool, num_registers: int) -> str | None:
    """Why metric `name` has no rows for a model ("no class token", "no registers"), or None
    when the model's token layout has what it needs."""
    return metric_spec(name).absent_reason(has_cls=has_cls, num_registers=num_registers)


def applicable_metrics(
    layout: TokenLayout, *, residual: bool = True, families: tuple[str, ...] = ("attention",)
) -> tuple[list[str], list[str]]:
    """(head metrics, block metrics) that exist for this token layout, in spec order.

    Absent metrics are left out entirely (no NaN rows), as the contract requires; so are
    the ones that need the residual stream when `residual` is False, and those of a family
    not in `families`.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise AttnscopeError(f"unknown metric family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    keep = [
        spec
        for spec in (METRICS[name] for name in ALL_METRICS)
        if spec.absent_reason(has_cls=layout.has_cls, num_registers=layout.num_registers) is None
        and (residual or not spec.needs_residual)
        and spec.family in families
    ]
    return [s.name for s in keep if s.per_head], [s.name for s in keep if not s.per_head]


Measures = tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]


def block_measures(
    attn: torch.Tensor,
    layout: TokenLayout,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    workspace: Workspace | None = None,
    out: torch.Tensor | None = None,
    families: tuple[str, ...] = ("attention",),
) -> Measures:
    """`block_metrics` plus the per-image profile vectors of the tokens family
    (`token_profiles`; empty without it), from one shared `BlockContext`: (per_head,
    per_block, profiles)."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise AttnscopeError(f"expected attention of shape (B, H, T, T), got {tuple(attn.shape)}")
    if attn.shape[-1] != layout.num_tokens:
        raise AttnscopeError(
            f"attention has {attn.shape[-1]} tokens but the layout expects {layout.num_tokens} "
            f"({layout.num_prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches)"
        )
    if "tokens" in families and (out is None or x is None):
        raise AttnscopeError("the token metrics need each block's input and output tokens")
    ctx = BlockContext(attn, layout, x, y, workspace, out)
    heads, blocks = applicable_metrics(layout, residual=x is not None and y is not None, families=families)
    per_head = {name: METRICS[name].compute(ctx) for name in heads}
    per_block = {name: METRICS[name].compute(ctx) for name in blocks}
    profiles = token_profiles(ctx) if "tokens" in families else {}
    return per_head, per_block, profiles


def block_metrics(
    attn: torch.Tensor,
    layout: TokenLayout,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    workspace: Workspace | None = None,
    out: torch.Tensor | None = None,
    families: tuple[str, ...] = ("attention",),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-image metrics of one block.

    attn: (B, H, T, T) post-softmax attention. x, y: (B, T, C) block input and attention
    branch (the residual metrics need both). out: (B, T, C) block output (the token family
    needs it, and x). `workspace`: scratch memory to reuse from call to call (see
    `Workspace`). Returns (per_head {name: (B, H)}, per_block {name: (B,)}), float32
    (float64 for attn_distance_px and several token metrics where the device has it), on
    attn's device, holding exactly the metrics `applicable_metrics` names, in spec order.
    """
    per_head, per_block, _ = block_measures(
        attn, layout, x, y, workspace=workspace, out=out, families=families
    )
    return per_head, per_block
