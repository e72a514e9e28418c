"""Linear CKA between the blocks of models, streamed with the unbiased minibatch estimator.

Nguyen, Raghu & Kornblith (2021, "Do wide and deep networks learn the same things?"):
for minibatches i of the same images under both representations, with K_i = X_i X_i^T
and L_i = Y_i Y_i^T the linear Gram matrices (k x k),

    CKA = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) * mean_i HSIC_1(L_i, L_i))

where HSIC_1 is the unbiased estimator of Song et al. (2012): with K~ and L~ the Grams
with their diagonals set to zero and n = k,

    HSIC_1 = [tr(K~ L~) + (1' K~ 1)(1' L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1' K~ L~ 1] / (n (n-3)).

Only the k x k Grams of each minibatch are kept (`GramCollector`), so a model's forward
can be dropped before the next model runs; the pairs are combined afterwards
(`cka_matrix`). A minibatch needs at least 4 images; smaller ones are left out.
Under torchrun each rank streams whole minibatches of the single-process split
(`measure.rank_share`) and `gather_ranks` unites them, so CKA is a single process's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import numpy as np
    import torch

#: The token kinds CKA compares: the class token and the mean of the patch tokens.
TOKEN_KINDS: tuple[str, ...] = ("cls", "patch_mean")
MIN_BATCH = 4


@dataclass
class GramCollector:
    """Each minibatch's linear Gram per (block, token kind), float64, keyed by the images'
    list positions so two models' minibatches can be matched exactly."""

    num_blocks: int
    # kind -> positions of each minibatch -> (blocks, k, k)
    grams: dict[str, dict[tuple[int, ...], np.ndarray]] = field(default_factory=dict)
    # False when some minibatches were never seen here (a resumed or sharded stream)
    complete: bool = True

    def add_block(self, block: int, positions: tuple[int, ...], out: torch.Tensor, layout: object) -> None:
        """The [cls] and mean-patch features of one block's output (B, T, C)."""
        if getattr(layout, "has_cls", False):
            self.add(block, positions, "cls", out[:, 0].float())
        self.add(block, positions, "patch_mean", out[:, layout.patch_slice].float().mean(dim=1))  # type: ignore[attr-defined]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for an .npz beside a model run) that `from_arrays` reads back."""
        import numpy as np

        arrays: dict[str, np.ndarray] = {"num_blocks": np.asarray(self.num_blocks)}
        for kind, batches in self.grams.items():
            for i, (positions, stack) in enumerate(sorted(batches.items())):
                arrays[f"{kind}.{i}.positions"] = np.asarray(positions, dtype=np.int64)
                arrays[f"{kind}.{i}.grams"] = stack
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> GramCollector:
        col = cls(int(arrays["num_blocks"]))
        for key in arrays:
            if key.endswith(".positions"):
                kind, i, _ = key.split(".")
                positions = tuple(int(p) for p in arrays[key])
                col.grams.setdefault(kind, {})[positions] = arrays[f"{kind}.{i}.grams"]
        return col

    def gather_ranks(self) -> None:
        """Under torchrun, every rank's minibatches on every rank (a collective; a no-op
        outside torchrun). The ranks must have streamed disjoint whole minibatches."""
        from attnscope import distributed

        if not distributed.is_distributed():
            return
        merged: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
        for part in distributed.all_gather(self.grams):
            for kind, batches in part.items():
                slot = merged.setdefault(kind, {})
                if slot.keys() & batches.keys():
                    raise AttnscopeError("CKA: two ranks measured the same minibatch of images")
                slot.update(batches)
        self.grams = merged

    def add(self, block: int, positions: tuple[int, ...], kind: str, features: torch.Tensor) -> None:
        """features: (k, C) of one block for the images at `positions` (k >= 4 to count)."""
        import numpy as np
        import torch

        if len(positions) < MIN_BATCH:
            return
        wide = torch.float32 if features.device.type == "mps" else torch.float64
        x = features.detach().to(wide)
        gram = (x @ x.T).cpu().to(torch.float64).numpy()
        slot = self.grams.setdefault(kind, {})
        stack = slot.get(positions)
        if stack is None:
            stack = slot[positions] = np.zeros((self.num_blocks, len(positions), len(positions)))
        stack[block] = gram


def _unbiased_parts(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """grams (..., n, n) -> (K~ (..., n, n), row sums K~ 1 (..., n), total 1' K~ 1 (...))."""
    import numpy as np

    tilde = grams.copy()
    n = grams.shape[-1]
    idx = np.arange(n)
    tilde[..., idx, idx] = 0.0
    rows = tilde.sum(-1)
    return tilde, rows, rows.sum(-1)


def hsic1_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unbiased HSIC_1 between every Gram of `a` (P, n, n) and every one of `b` (Q, n, n): (P, Q)."""
    import numpy as np

    n = a.shape[-1]
    if n < MIN_BATCH:
        raise AttnscopeError(f"the unbiased HSIC needs at least {MIN_BATCH} images per minibatch, got {n}")
    ta, ra, sa = _unbiased_parts(a)
    tb, rb, sb = _unbiased_parts(b)
    trace = np.einsum("pij,qij->pq", ta, tb)  # tr(K~ L~) for symmetric Grams
    cross = ra @ rb.T  # 1' K~ L~ 1 = (K~ 1) . (L~ 1)
    return (trace + np.outer(sa, sb) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def cka_matrix(a: GramCollector, b: GramCollector, kind: str) -> np.ndarray:
    """(blocks of a, blocks of b) linear CKA over the minibatches both saw, for `kind`."""
    import numpy as np

    ga, gb = a.grams.get(kind, {}), b.grams.get(kind, {})
    if set(ga) != set(gb):
        raise AttnscopeError("CKA: the two models were not run on the same minibatches of images")
    if not ga:
        raise AttnscopeError(f"CKA: no minibatch of at least {MIN_BATCH} images for {kind}")
    cross = np.zeros((a.num_blocks, b.num_blocks))
    self_a = np.zeros(a.num_blocks)
    self_b = np.zeros(b.num_blocks)
    for key in sorted(ga):
        cross += hsic1_pairs(ga[key], gb[key])
        self_a += np.diagonal(hsic1_pairs(ga[key], ga[key]))
        self_b += np.diagonal(hsic1_pairs(gb[key], gb[key]))
    # the mean over minibatches cancels between numerator and denominator
    return cross / np.sqrt(np.outer(self_a, self_b))


def cka_table(collectors: dict[str, GramCollector]) -> list[tuple[str, int, str, int, str, float]]:
    """cka.csv rows (model_a, block_a, model_b, block_b, token, cka) for every ordered pair
    of models with a <= b in the given order (each model with itself included), every
    block pair and every token kind both models have."""
    names = list(collectors)
    rows: list[tuple[str, int, str, int, str, float]] = []
    for i, name_a in enumerate(names):
        for name_b in names[i:]:
            a, b = collectors[name_a], collectors[name_b]
            for kind in TOKEN_KINDS:
                if kind not in a.grams or kind not in b.grams:
                    continue
                matrix = cka_matrix(a, b, kind)
                for p in range(matrix.shape[0]):
                    for q in range(matrix.shape[1]):
                        rows.append((name_a, p, name_b, q, kind, float(matrix[p, q])))
    return rows
