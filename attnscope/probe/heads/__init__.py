"""Probe heads: aggregators over last-block tokens, each + BatchNorm1d(affine=False) + Linear.

A probing run trains a *bank* (`bank.py`): every aggregator at every (learning rate,
weight decay) point of a grid. Heads of one aggregator type are stored stacked, with a
leading head dimension `H` on every parameter, and computed with batched products over
that dimension, so every head of the bank steps on a batch of tokens read once.

The patch bag is `tokens[:, num_prefix:]`: the class token *and* any registers are kept out
of it (registers are prefix tokens too; treating only index 0 as special would let a
pooled head attend to registers).

Aggregators are registered by name in one table (`base.py`: `@register_aggregator`, like
timm's `@register_model`), one module per family:

- `pooling.py`: `cls` (the class token), `mean` (the mean of the patch tokens) and
  `cls_mean` (both, concatenated: width 2D).
- `abmilp.py`: `abmilp`, Selective Aggregation (a scorer gives each patch one logit,
  softmax over the patches, weighted sum of the patch tokens), and the options of the
  paper code's AbMILP head as its registered variants `abmilp_tanh`, `abmilp_sa`,
  `abmilp_sa_map`, `abmilp_pe` and `abmilp_all`.
- `gated.py`: `abmilp_gated`, Ilse et al. 2018, logit = w^T [tanh(V h) * sigmoid(U h)].
- `attentive.py`: `attentive`, one learnable query cross-attending to the patches.

`fused.py` pools every linear scorer of the bank in one pass over the patches.
"""

from __future__ import annotations

from attnscope.probe.heads.abmilp import (
    AbmilpPool,
    ClsAbmilpPool,
    PositionalAbmilpPool,
    SelfAttentionAbmilpPool,
    SelfAttentionMapAbmilpPool,
    TanhAbmilpPool,
    sincos_2d,
)
from attnscope.probe.heads.attentive import ATTENTIVE_HEAD_DIM, AttentivePool, attentive_num_heads
from attnscope.probe.heads.bank import (
    BN_EPS,
    CLASSIFIER_INITS,
    HeadBank,
    ProbeHeads,
    SumFn,
    synced_batch_norm,
)
from attnscope.probe.heads.base import (
    AGGREGATORS,
    Aggregator,
    aggregator_class,
    build_aggregator,
    parse_aggregators,
    register_aggregator,
)
from attnscope.probe.heads.fused import Scratch, softmax_pool
from attnscope.probe.heads.gated import GATED_HIDDEN, GatedAbmilpPool
from attnscope.probe.heads.pooling import ClsMeanPool, ClsPool, MeanPool

__all__ = [
    "AGGREGATORS",
    "ATTENTIVE_HEAD_DIM",
    "BN_EPS",
    "CLASSIFIER_INITS",
    "GATED_HIDDEN",
    "AbmilpPool",
    "Aggregator",
    "AttentivePool",
    "ClsAbmilpPool",
    "ClsMeanPool",
    "ClsPool",
    "GatedAbmilpPool",
    "HeadBank",
    "MeanPool",
    "PositionalAbmilpPool",
    "ProbeHeads",
    "Scratch",
    "SelfAttentionAbmilpPool",
    "SelfAttentionMapAbmilpPool",
    "SumFn",
    "TanhAbmilpPool",
    "aggregator_class",
    "attentive_num_heads",
    "build_aggregator",
    "parse_aggregators",
    "register_aggregator",
    "sincos_2d",
    "softmax_pool",
    "synced_batch_norm",
]
