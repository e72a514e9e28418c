"""`recipe="paper"` against the paper's code, step by step.

The reference below is written from the equations of gmum/beyond_cls's linear probe
(main_linprobe.py, engine_finetune.py, util/lars.py, util/lr_sched.py, abmilp.py), in
float64, one head at a time: AbMILP (depth 1, patches only, no self-attention: its
published command) or the class token, then BatchNorm1d(affine=False, eps=1e-6) in train
mode, then nn.Linear; the mean cross-entropy of each micro-batch divided by the number of
accumulation steps; LARS; the learning rate set at each optimizer step from the fractional
epoch (linear warm-up, then half a cosine to 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mil_bags

from attnscope.probe.heads import ProbeHeads, build_aggregator
from attnscope.probe.train import BankSpec, TensorSource, TrainingData, resolve_recipe, train_bank

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def paper_lr(peak: float, epoch: float, warmup: float, epochs: int) -> float:
    """util/lr_sched.adjust_learning_rate with min_lr 0, at a fractional epoch."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def paper_lars(params: dict[str, torch.Tensor], mu: dict[str, torch.Tensor], lr: float, wd: float) -> None:
    """util/lars.LARS.step: trust ratio and weight decay for matrices only, momentum 0.9."""
    with torch.no_grad():
        for k, p in params.items():
            dp = p.grad
            if p.ndim > 1:
                dp = dp + wd * p
                pn, un = torch.norm(p), torch.norm(dp)
                q = 0.001 * pn / un if pn > 0 and un > 0 else torch.ones_like(pn)
                dp = dp * q
            mu[k] = 0.9 * mu[k] + dp
            p -= lr * mu[k]
            p.grad = None


def paper_logits(params: dict[str, torch.Tensor], tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """The head in train mode on one micro-batch of (B, 1 + registers + N, D) tokens."""
    if pool == "cls":
        z = tokens[:, 0]
    else:
        patches = tokens[:, 3:]  # content "patch": the class token and the 2 registers stay out
        a = torch.softmax(patches @ params["score_w"].T + params["score_b"], dim=1)  # (B, N, 1)
        z = (patches * a).sum(1)
    mean, var = z.mean(0), z.var(0, unbiased=False)
    return ((z - mean) / torch.sqrt(var + 1e-6)) @ params["W"].T + params["c"]


def paper_training(init, tokens, labels, orders, *, pool, epochs, warmup, batch, micro, blr, wd):
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in init.items()}
    mu = {k: torch.zeros_like(v) for k, v in params.items()}
    accum, per_epoch = batch // micro, len(orders[0]) // batch
    peak = blr * batch / 256  # args.lr = args.blr * eff_batch_size / 256
    lr, steps = 0.0, 0
    for epoch in range(epochs):
        micro_batches = orders[epoch][: per_epoch * batch].reshape(-1, micro)  # drop_last
        for it, chunk in enumerate(micro_batches):
            if it % accum == 0:
                lr = paper_lr(peak, it / len(micro_batches) + epoch, warmup, epochs)
            x = torch.from_numpy(tokens[chunk]).double()
            loss = F.cross_entropy(paper_logits(params, x, pool), torch.from_numpy(labels[chunk])) / accum
            loss.backward()
            if (it + 1) % accum == 0:
                paper_lars(params, mu, lr, wd)
                steps += 1
    return params, steps


def head_params(bank, name: str, h: int) -> dict[str, torch.Tensor]:
    """Head `h` of aggregator `name` in the paper code's layout (nn.Linear weights are (out, in))."""
    heads = bank.heads[name]
    out = {"W": heads.weight[h].T, "c": heads.bias[h]}
    if name == "abmilp":
        out["score_w"], out["score_b"] = heads.aggregator.score_w[h], heads.aggregator.score_b[h]
    return {k: v.detach().clone() for k, v in out.items()}


def test_paper_recipe_equals_the_paper_codes_training_step_by_step():
    n, seed, epochs, warmup, batch, micro = 32, 5, 5, 2, 16, 8  # 2 steps per epoch of 2 micro-batches
    xt, yt, _ = mil_bags(n + 8, seed=1)
    xe, ye, _ = mil_bags(12, seed=2)
    base_lrs, wds = [4.0, 32.0], [0.0, 1e-2]  # both branches of LARS, per stacked head
    recipe = resolve_recipe(
        "paper", n_train=n, batch_size=batch, epochs=epochs, lrs=base_lrs, wds=wds, micro_batch=micro,
        warmup_epochs=warmup,
    )  # fmt: skip
    assert (recipe.micro_batch, recipe.accumulation, recipe.classifier_init) == (8, 2, "linear_default")
    spec = BankSpec(["cls", "abmilp"], 4, 32, 3, True)
    initial = spec.build(len(recipe.grid), seed, recipe.classifier_init)
    trained = train_bank(
        TrainingData(
            TensorSource(xt), yt, np.arange(n), np.arange(n, n + 8), TensorSource(xe), ye, np.arange(12)
        ),
        spec,
        recipe,
        seed=seed,
    )
    assert trained.steps == 10
    rng = np.random.default_rng([seed, 21])  # train_bank's stream of the epochs' orders
    orders = [np.arange(n)[rng.permutation(n)] for _ in range(epochs)]
    for name in ("cls", "abmilp"):
        for h, (lr, wd) in enumerate(recipe.grid):
            ref, steps = paper_training(
                head_params(initial, name, h), xt, yt, orders, pool=name, epochs=epochs, warmup=warmup,
                batch=batch, micro=micro, blr=lr * 256 / batch, wd=wd,
            )  # fmt: skip
            assert steps == 10
            ours = head_params(trained.bank, name, h)
            for k, value in ref.items():
                moved = (value.detach() - head_params(initial, name, h)[k].double()).abs().max()
                # every parameter trained, but the scorer's bias, which cancels in the softmax
                assert moved > 1e-4 or k == "score_b", (name, h, k)
                torch.testing.assert_close(
                    ours[k].double(), value.detach(), rtol=0, atol=1e-6, msg=(name, h, k)
                )


def test_paper_recipe_defaults_and_the_short_schedule_note():
    big = resolve_recipe("paper", n_train=1_281_167)
    assert (big.batch_size, big.micro_batch, big.accumulation) == (16384, 2048, 8)
    assert (big.epochs, big.warmup_epochs, big.lrs) == (90, 10, [pytest.approx(6.4)]) and not big.notes
    short = resolve_recipe("paper", n_train=50_000, epochs=30)
    assert short.warmup_epochs == 10  # fixed, not scaled with the epochs
    small = resolve_recipe("paper", n_train=1293)
    assert small.batch_size == small.micro_batch == 1293 and small.lrs == [pytest.approx(0.1 * 1293 / 256)]
    note = next(t for t in small.notes if "steps" in t)
    assert "90 epochs x 1 optimizer step(s) of 1293 images = 90 steps" in note
    assert "`batch_size` (64: 20 steps per epoch, 1,800 steps" in note and "more `epochs` (1,000" in note
    warm = resolve_recipe("paper", n_train=5000, epochs=8)
    assert any("all 8 epochs are warm-up" in t for t in warm.notes)
    default = resolve_recipe("default", n_train=5000)  # unchanged: MAE's init, 10% warm-up
    assert default.classifier_init == "trunc_normal" and default.micro_batch == 256
    assert resolve_recipe("default", n_train=5000, epochs=40).warmup_epochs == 4


def test_paper_classifier_is_initialised_as_nn_linear():
    g = torch.Generator().manual_seed(0)
    agg = build_aggregator("mean", 1, 768, generator=g)
    heads = ProbeHeads(agg, 1000, generator=g, classifier_init="linear_default")
    w, b = heads.weight[0].detach(), heads.bias[0].detach()
    reference = torch.nn.Linear(768, 1000).requires_grad_(
        False
    )  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
    bound = 1 / math.sqrt(768)
    for ours, theirs in ((w, reference.weight), (b, reference.bias)):
        assert ours.abs().max() <= bound and theirs.abs().max() <= bound
        assert abs(float(ours.std()) - float(theirs.std())) < 0.02 * bound  # both bound / sqrt(3)
    mae = ProbeHeads(build_aggregator("mean", 1, 768, generator=g), 1000, generator=g)
    assert float(mae.weight.detach().std()) == pytest.approx(0.01 * 0.88, rel=0.05) and not mae.bias.any()
