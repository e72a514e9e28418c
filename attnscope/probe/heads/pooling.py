"""The parameter-free aggregators: the class token, the patch mean, and both concatenated.

Each is `shared` (one pooled tensor serves every head of the bank); `mean` and `cls_mean`
pool from the patch mean, which the bank computes once for both (`uses_mean`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.probe.heads.base import Aggregator, register_aggregator

__all__ = ["ClsMeanPool", "ClsPool", "MeanPool"]


@register_aggregator
class ClsPool(Aggregator):
    name = "cls"
    help = "the class token"
    needs_cls = True
    init_stream = 0
    shared = True

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        if cls is None:
            raise AttnscopeError("the `cls` aggregator needs a model with a class token")
        return cls.unsqueeze(1)


@register_aggregator
class MeanPool(Aggregator):
    name = "mean"
    help = "the mean of the patch tokens"
    init_stream = 1
    shared = True
    uses_mean = True

    def from_mean(self, cls: Tensor | None, mean: Tensor) -> Tensor:
        return mean.unsqueeze(1)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return self.from_mean(cls, patches.mean(dim=1))


@register_aggregator
class ClsMeanPool(Aggregator):
    name = "cls_mean"
    help = "the class token and the patch mean, concatenated"
    needs_cls = True
    init_stream = 2
    shared = True
    uses_mean = True

    @property
    def out_dim(self) -> int:
        return 2 * self.dim

    def from_mean(self, cls: Tensor | None, mean: Tensor) -> Tensor:
        if cls is None:
            raise AttnscopeError("the `cls_mean` aggregator needs a model with a class token")
        return torch.cat([cls, mean], dim=-1).unsqueeze(1)

    def forward(self, cls: Tensor | None, patches: Tensor) -> Tensor:
        return self.from_mean(cls, patches.mean(dim=1))
