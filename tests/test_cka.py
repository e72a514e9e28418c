"""Streaming minibatch CKA (attnscope.cka) against a direct float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.cka import GramCollector, cka_matrix, cka_table
from attnscope.errors import AttnscopeError


def _hsic1_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012), written out with explicit ones vectors, float64."""
    n = x.shape[0]
    k = x @ x.T
    l_ = y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    one = np.ones(n)
    term = np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
    term -= 2.0 / (n - 2) * (one @ k @ l_ @ one)
    return float(term / (n * (n - 3)))


def _minibatch_cka_direct(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    xy = np.mean([_hsic1_direct(x, y) for x, y in zip(xs, ys, strict=True)])
    xx = np.mean([_hsic1_direct(x, x) for x in xs])
    yy = np.mean([_hsic1_direct(y, y) for y in ys])
    return float(xy / np.sqrt(xx * yy))


def _collect(features: list[list[np.ndarray]], batches: list[tuple[int, ...]]) -> GramCollector:
    """features[block][batch] -> a collector fed block by block, batch by batch (as a stream)."""
    col = GramCollector(len(features))
    for bi, positions in enumerate(batches):
        for block, per_batch in enumerate(features):
            col.add(block, positions, "cls", torch.from_numpy(per_batch[bi]).float())
    return col


def _features(rng, blocks: int, batches: list[tuple[int, ...]], dim: int) -> list[list[np.ndarray]]:
    base = rng.standard_normal((sum(len(b) for b in batches), dim))
    out = []
    for block in range(blocks):
        mix = rng.standard_normal((dim, dim)) * 0.3 + np.eye(dim) * (1 + block)
        feats = np.tanh(base @ mix)
        out.append([feats[list(b)].astype(np.float32).astype(np.float64) for b in batches])
    return out


BATCHES = [tuple(range(0, 8)), tuple(range(8, 16)), tuple(range(16, 22)), (22, 23)]  # last: < 4, left out


def test_streaming_cka_equals_the_direct_float64_minibatch_estimator():
    rng = np.random.default_rng(0)
    fa = _features(rng, 3, BATCHES, 10)
    fb = _features(rng, 2, BATCHES, 7)
    got = cka_matrix(_collect(fa, BATCHES), _collect(fb, BATCHES), "cls")
    assert got.shape == (3, 2)
    used = range(3)  # the 2-image minibatch has no unbiased HSIC
    for p in range(3):
        for q in range(2):
            want = _minibatch_cka_direct([fa[p][i] for i in used], [fb[q][i] for i in used])
            assert got[p, q] == pytest.approx(want, rel=1e-9)


def test_self_cka_is_one_on_the_diagonal_and_invariant():
    rng = np.random.default_rng(1)
    fa = _features(rng, 3, BATCHES, 10)
    a = _collect(fa, BATCHES)
    np.testing.assert_allclose(np.diagonal(cka_matrix(a, a, "cls")), 1.0, rtol=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    fb = [[3.7 * f @ q for f in block] for block in fa]  # orthogonal transform + isotropic scale
    b = _collect(fb, BATCHES)
    np.testing.assert_allclose(cka_matrix(a, b, "cls"), cka_matrix(a, a, "cls"), rtol=1e-5)
    rows = cka_table({"m": a, "n": b})
    assert {(r[0], r[2]) for r in rows} == {("m", "m"), ("m", "n"), ("n", "n")}
    assert len(rows) == 3 * 9


def test_different_minibatches_are_an_error():
    rng = np.random.default_rng(2)
    fa = _features(rng, 1, BATCHES, 4)
    other = [tuple(range(1, 9)), tuple(range(9, 17)), tuple(range(17, 23)), (0, 23)]
    with pytest.raises(AttnscopeError, match="same minibatches"):
        cka_matrix(_collect(fa, BATCHES), _collect(fa, other), "cls")


@pytest.mark.parametrize(
    ("n", "batch", "world"),
    [(17, 6, 2), (16, 4, 2), (19, 4, 3), (10, 4, 5), (3, 4, 2), (0, 4, 2), (12, 1, 5), (20, 4, 1)],
)
def test_batch_shard_gives_each_rank_whole_single_process_batches(n, batch, world):
    """Disjoint, covering, batch-aligned: each rank's share, cut into batches as its loader
    cuts it, is batches rank, rank + world, ... of the single-process split (the last may be
    short); ranks beyond the number of batches get nothing."""
    from attnscope.distributed import batch_shard

    single = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    shares = [batch_shard(n, batch, r, world) for r in range(world)]
    assert sorted(p for share in shares for p in share) == list(range(n))  # disjoint and covering
    for r, share in enumerate(shares):
        cut = [share[s : s + batch] for s in range(0, len(share), batch)]
        assert cut == single[r::world]
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= batch  # uneven by at most one batch
    if world > len(single):
        assert all(shares[r] == [] for r in range(len(single), world))


def test_batch_shard_known_answer_and_bad_arguments():
    from attnscope.distributed import batch_shard

    assert batch_shard(17, 6, 0, 2) == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16]
    assert batch_shard(17, 6, 1, 2) == [6, 7, 8, 9, 10, 11]
    for args in ((5, 0, 0, 2), (5, 2, 2, 2), (5, 2, -1, 2)):
        with pytest.raises(AttnscopeError):
            batch_shard(*args)
