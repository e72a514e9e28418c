"""The metrics of docs/metrics.md, computed per block and streamed into running sums.

- `attnscope.metrics.registry`: one record per metric (`MetricSpec`: label, unit, what it
  needs, head or block, [0, 1] or not, headline or not) directly above its formula, the
  names derived from the records, and `block_metrics`, a pure function of one block's
  attention (and residual stream) for a batch of images.
- `attnscope.metrics.context`: `BlockContext`, the intermediates several formulas share,
  and `Workspace`, the scratch memory reused from block to block.
- `attnscope.metrics.accumulator`: `MetricAccumulator`, float64 sums, sums of squares and
  counts per (layer, head, metric), so the sums of several processes add up
  (`MetricAccumulator.all_reduce`), plus each image's per-layer values (a few floats per
  image; attention maps are never kept); `snapshot`/`restore` make a run resumable.
- `attnscope.metrics.profiles`: the per-block vectors of the tokens family (the
  singular-value spectrum and the radial frequency profile) and their tables,
  spectrum.csv and frequency.csv.
- `attnscope.metrics.intervals`: bootstrap confidence intervals of means over images.
"""

from attnscope.metrics.accumulator import MetricAccumulator
from attnscope.metrics.context import BlockContext, Workspace, patch_distance_matrix
from attnscope.metrics.registry import (
    ALL_METRICS,
    BLOCK_METRICS,
    HEAD_METRICS,
    HEADLINE_METRICS,
    METRIC_LABELS,
    METRICS,
    UNIT_INTERVAL_METRICS,
    MetricSpec,
    absent_reason,
    applicable_metrics,
    block_measures,
    block_metrics,
    metric_revisions,
    metric_spec,
    token_profiles,
)

__all__ = [
    "ALL_METRICS",
    "BLOCK_METRICS",
    "HEADLINE_METRICS",
    "HEAD_METRICS",
    "METRICS",
    "METRIC_LABELS",
    "UNIT_INTERVAL_METRICS",
    "BlockContext",
    "MetricAccumulator",
    "MetricSpec",
    "Workspace",
    "absent_reason",
    "applicable_metrics",
    "block_measures",
    "block_metrics",
    "metric_revisions",
    "metric_spec",
    "patch_distance_matrix",
    "token_profiles",
]
