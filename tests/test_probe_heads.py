"""Probe heads and optimizers: known-answer selection task, exact equivalences, parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import mil_bags

from attnscope.errors import AttnscopeError
from attnscope.probe.heads import (
    GATED_HIDDEN,
    AbmilpPool,
    AttentivePool,
    GatedAbmilpPool,
    HeadBank,
    attentive_num_heads,
    parse_aggregators,
)
from attnscope.probe.selection import select_hyperparameters
from attnscope.probe.train import (
    LARS,
    BankAdamW,
    BankSpec,
    TensorSource,
    TrainingData,
    cosine_factor,
    resolve_recipe,
    train_bank,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---------------------------------------------------------------- known answer


def test_selective_heads_solve_the_one_token_task_and_mean_does_not():
    xt, yt, _ = mil_bags(1600, seed=1)
    xe, ye, _ = mil_bags(600, seed=2)
    recipe = resolve_recipe("default", n_train=1440, batch_size=128, epochs=12, lrs=[3e-3, 1e-2], wds=[1e-4])
    trained = train_bank(
        TrainingData(
            train_source=TensorSource(xt),
            train_labels=yt,
            train_positions=np.arange(1440),
            holdout_positions=np.arange(1440, 1600),
            eval_source=TensorSource(xe),
            eval_labels=ye,
            eval_positions=np.arange(600),
        ),
        BankSpec(
            aggregators=["mean", "abmilp", "abmilp_gated", "attentive"],
            num_classes=4,
            dim=32,
            num_prefix=3,
            has_cls=True,
        ),
        recipe,
        seed=0,
    )
    _, summary = select_hyperparameters(trained.results)
    acc = dict(zip(summary["aggregator"], summary["eval_top1"], strict=True))
    for name in ("abmilp", "abmilp_gated", "attentive"):
        assert acc[name] >= 0.95, acc
    assert acc["mean"] <= 0.6, acc
    assert np.isnan(summary["eval_top5"]).all()  # 4 classes: no top-5


def test_trained_abmilp_puts_its_weight_on_the_key_token():
    xt, yt, key = mil_bags(1000, seed=3, registers=0)
    recipe = resolve_recipe("default", n_train=1000, batch_size=100, epochs=10, lrs=[1e-2], wds=[0.0])
    trained = train_bank(
        TrainingData(
            train_source=TensorSource(xt), train_labels=yt, train_positions=np.arange(1000),
            holdout_positions=[], eval_source=TensorSource(xt), eval_labels=yt, eval_positions=np.arange(200),
        ),
        BankSpec(aggregators=["abmilp"], num_classes=4, dim=32, num_prefix=1, has_cls=True),
        recipe,
    )  # fmt: skip
    with torch.no_grad():
        w = trained.bank.patch_weights("abmilp", torch.from_numpy(xt[:200]))[0].numpy()
    assert (w.argmax(-1) == key[:200]).mean() > 0.95
    assert w.max(-1).mean() > 0.5  # selective, not merely above uniform (1/16)


# ---------------------------------------------------------------- exactness


def test_attentive_fast_path_equals_sdpa_cross_attention():
    g = torch.Generator().manual_seed(0)
    pool = AttentivePool(3, 128, generator=g).double()
    with torch.no_grad():
        (
            pool.k_b.normal_(),
            pool.v_b.normal_(),
        )  # biases matter for the equivalence argument; make them non-zero
        pool.query.mul_(50)
    x = torch.randn(4, 9, 128, dtype=torch.double)
    fast, ref = pool(None, x), pool.forward_sdpa(x)
    assert pool.attn_heads == 2 and fast.shape == (4, 3, 128)  # (B, H, D)
    torch.testing.assert_close(fast, ref)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), list(pool.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad((pool.forward_sdpa(x) * w).sum(), list(pool.parameters()))
    for (name, _), a, b in zip(pool.named_parameters(), g_fast, g_ref, strict=True):
        if name == "k_b":  # the key bias cancels in the softmax: the fast path does not use it
            assert a is None and b.abs().max() < 1e-12
        else:
            torch.testing.assert_close(a, b, msg=name)
    assert attentive_num_heads(768) == 12 and attentive_num_heads(64) == 1 and attentive_num_heads(200) == 2


def test_gated_chunked_autograd_equals_plain_autograd():
    g = torch.Generator().manual_seed(0)
    pool = GatedAbmilpPool(3, 24, 16, generator=g).double()
    x = torch.randn(5, 7, 24, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pool.scores(t), (x,))
    a, b = pool.scores(x), pool.scores_reference(x)
    torch.testing.assert_close(a, b)
    w = torch.randn_like(a)
    params = [x, *pool.parameters()]
    for u, v in zip(
        torch.autograd.grad((a * w).sum(), params), torch.autograd.grad((b * w).sum(), params), strict=True
    ):
        torch.testing.assert_close(u, v)


def test_heads_of_a_bank_are_independent():
    bank = HeadBank(
        ["cls", "abmilp", "abmilp_gated", "attentive"], 3, 64, 5, num_prefix=1, has_cls=True
    ).eval()
    x = torch.randn(6, 10, 64)
    before = bank(x)
    with torch.no_grad():
        for p in bank.parameters():
            p[1:] += torch.randn_like(p[1:])  # disturb every head but the first
    after = bank(x)
    for name in before:
        torch.testing.assert_close(before[name][0], after[name][0])
        assert not torch.allclose(before[name][1], after[name][1])
    bank.zero_grad()
    sum(out[0].sum() for out in bank(x).values()).backward()
    for p in bank.parameters():
        if p.grad is not None:
            assert p.grad[1:].abs().max() == 0


def test_prefix_tokens_are_never_in_the_patch_bag():
    bank = HeadBank(
        ["cls", "mean", "abmilp", "abmilp_gated", "attentive"], 2, 64, 3, num_prefix=5, has_cls=True
    ).eval()
    x = torch.randn(4, 21, 64)
    y = x.clone()
    y[:, 1:5] = 100 * torch.randn(4, 4, 64)  # registers
    out_x, out_y = bank(x), bank(y)
    for name in ("mean", "abmilp", "abmilp_gated", "attentive"):
        torch.testing.assert_close(out_x[name], out_y[name])
        if name != "mean":
            assert bank.patch_weights(name, x).shape == (2, 4, 16)
    torch.testing.assert_close(out_x["cls"], out_y["cls"])  # the class token itself is unchanged
    y[:, 0] += 1
    assert not torch.allclose(bank(y)["cls"], out_x["cls"])


def test_parameter_counts_per_head():
    d, c = 64, 10
    bank = HeadBank(
        ["cls", "mean", "cls_mean", "abmilp", "abmilp_gated", "attentive"],
        5,
        d,
        c,
        num_prefix=1,
        has_cls=True,
    )
    linear = d * c + c
    assert bank.params_per_head("cls") == linear
    assert bank.params_per_head("mean") == linear
    assert bank.params_per_head("cls_mean") == 2 * d * c + c
    assert bank.params_per_head("abmilp") == (d + 1) + linear  # one Linear(D, 1)
    assert (
        bank.params_per_head("abmilp_gated")
        == 2 * (GATED_HIDDEN * d + GATED_HIDDEN) + GATED_HIDDEN + 1 + linear
    )
    assert bank.params_per_head("attentive") == d + 2 * d * d + 2 * d + linear
    deep = HeadBank(["abmilp"], 2, d, c, num_prefix=1, has_cls=True, abmilp_depth=3)
    assert deep.params_per_head("abmilp") == 2 * (d * d + d) + (d + 1) + linear
    assert all(
        isinstance(m, torch.nn.BatchNorm1d) and not m.affine
        for m in bank.modules()
        if "BatchNorm" in type(m).__name__
    )


def test_abmilp_depth_adds_hidden_layers_and_runs():
    g = torch.Generator().manual_seed(0)
    pool = AbmilpPool(2, 16, depth=3, generator=g)
    assert len(pool.hidden_w) == 2
    w = pool.patch_weights(torch.randn(3, 7, 16))
    assert w.shape == (2, 3, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    with pytest.raises(AttnscopeError):
        AbmilpPool(1, 16, depth=0, generator=g)


def test_no_class_token_refuses_cls_heads():
    with pytest.raises(AttnscopeError, match="class token"):
        HeadBank(["cls", "mean"], 1, 8, 2, num_prefix=1, has_cls=False)
    bank = HeadBank(["mean", "abmilp"], 1, 8, 2, num_prefix=1, has_cls=False)
    assert set(bank(torch.randn(3, 5, 8))) == {"mean", "abmilp"}


def test_parse_aggregators():
    assert parse_aggregators(" cls, mean,abmilp ,mean") == ["cls", "mean", "abmilp"]
    with pytest.raises(AttnscopeError, match="unknown aggregator"):
        parse_aggregators("cls,abmil")
    with pytest.raises(AttnscopeError):
        parse_aggregators(" , ")


def test_the_registry_is_the_one_list_of_aggregators():
    """Each aggregator is one registered class carrying what it needs; the torch-free view the
    CLI help is generated from reads the same registry."""
    from attnscope.probe.catalog import registered_aggregators
    from attnscope.probe.heads import AGGREGATORS, Aggregator

    assert list(AGGREGATORS) == [
        "cls", "mean", "cls_mean", "abmilp", "abmilp_gated", "attentive",
        "abmilp_tanh", "abmilp_sa", "abmilp_sa_map", "abmilp_pe", "abmilp_all",
    ]  # fmt: skip
    assert registered_aggregators() == [(name, cls.help) for name, cls in AGGREGATORS.items()]
    # each aggregator's init stream is its position in the former list: initialisation unchanged
    assert [cls.init_stream for cls in AGGREGATORS.values()] == list(range(11))
    assert {name for name, cls in AGGREGATORS.items() if cls.needs_cls} == {"cls", "cls_mean", "abmilp_all"}
    for cls in AGGREGATORS.values():  # selective means it has weights over the patches
        assert (cls.patch_weights is not Aggregator.patch_weights) == cls.selective, cls.name


def test_a_new_aggregator_is_its_class(monkeypatch):
    from attnscope.probe import heads

    monkeypatch.setattr(heads, "AGGREGATORS", dict(heads.AGGREGATORS))  # registered for this test only

    @heads.register_aggregator
    class MaxPool(heads.Aggregator):
        name = "max"
        help = "the largest value of each channel over the patches"
        init_stream = 99
        shared = True

        def forward(self, cls, patches):
            return patches.amax(dim=1).unsqueeze(1)

    assert parse_aggregators("max,cls") == ["max", "cls"]
    bank = HeadBank(["max", "cls"], 2, 8, 3, num_prefix=1, has_cls=True)
    assert bank(torch.randn(4, 5, 8))["max"].shape == (2, 4, 3)
    with pytest.raises(TypeError, match="taken"):
        heads.register_aggregator(MaxPool)


# ---------------------------------------------------------------- optimizers


def mae_lars_step(
    p: torch.Tensor, grad: torch.Tensor, mu: torch.Tensor, lr: float, wd: float, momentum=0.9, tc=0.001
):
    """MAE util/lars.py, restated for one tensor."""
    dp = grad
    if p.ndim > 1:
        dp = dp.add(p, alpha=wd)
        param_norm, update_norm = torch.norm(p), torch.norm(dp)
        one = torch.ones_like(param_norm)
        q = torch.where(
            param_norm > 0.0, torch.where(update_norm > 0, tc * param_norm / update_norm, one), one
        )
        dp = dp.mul(q)
    mu.mul_(momentum).add_(dp)
    p.add_(mu, alpha=-lr)


def test_lars_matches_mae_semantics_plain_and_stacked():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 5, 4))  # 3 stacked heads of a (5, 4) weight
    b = torch.nn.Parameter(torch.randn(3, 4))  # 3 stacked biases (1-D per head: plain momentum SGD)
    lrs, wds = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.0, 0.1, 0.2])
    opt = LARS([{"params": [w, b], "head_lr": lrs, "head_wd": wds}], lr=0.3)
    ref_w, ref_b = [w[h].detach().clone() for h in range(3)], [b[h].detach().clone() for h in range(3)]
    mu_w, mu_b = [torch.zeros_like(t) for t in ref_w], [torch.zeros_like(t) for t in ref_b]
    for _ in range(3):
        gw, gb = torch.randn_like(w), torch.randn_like(b)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        for h in range(3):
            mae_lars_step(ref_w[h], gw[h], mu_w[h], 0.3 * float(lrs[h]), float(wds[h]))
            mae_lars_step(ref_b[h], gb[h], mu_b[h], 0.3 * float(lrs[h]), float(wds[h]))
    for h in range(3):
        torch.testing.assert_close(w[h].detach(), ref_w[h])
        torch.testing.assert_close(b[h].detach(), ref_b[h])
    # and the unstacked form is exactly MAE's
    p = torch.nn.Parameter(torch.randn(5, 4))
    ref, mu = p.detach().clone(), torch.zeros(5, 4)
    plain = LARS([p], lr=0.7, weight_decay=0.05)
    for _ in range(3):
        g = torch.randn(5, 4)
        p.grad = g.clone()
        plain.step()
        mae_lars_step(ref, g, mu, 0.7, 0.05)
    torch.testing.assert_close(p.detach(), ref)


def test_bank_adamw_equals_torch_adamw_per_head():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2, 6, 3))
    lrs, wds = torch.tensor([1e-2, 3e-2]), torch.tensor([0.0, 0.5])
    opt = BankAdamW([{"params": [w], "head_lr": lrs, "head_wd": wds}], lr=0.5)
    copies = [torch.nn.Parameter(w[h].detach().clone()) for h in range(2)]
    refs = [
        torch.optim.AdamW([copies[h]], lr=0.5 * float(lrs[h]), weight_decay=float(wds[h])) for h in range(2)
    ]
    for _ in range(4):
        g = torch.randn_like(w)
        w.grad = g.clone()
        opt.step()
        for h in range(2):
            copies[h].grad = g[h].clone()
            refs[h].step()
    for h in range(2):
        torch.testing.assert_close(w[h].detach(), copies[h].detach())


def test_schedule_and_recipes():
    assert cosine_factor(0, 100, 10) == 0 and cosine_factor(5, 100, 10) == 0.5
    assert cosine_factor(10, 100, 10) == 1.0 and math.isclose(cosine_factor(55, 100, 10), 0.5)
    assert cosine_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    paper = resolve_recipe("paper", n_train=50000)
    assert (paper.optimizer, paper.epochs, paper.warmup_epochs, paper.wds) == ("lars", 90, 10, [0.0])
    assert paper.batch_size == 16384 and paper.lrs == [pytest.approx(0.1 * 16384 / 256)]
    # BatchNorm over 2048 images, the per-GPU batch of the paper's published command
    assert paper.accumulation == 8 and paper.micro_batch * paper.accumulation == 16384
    small = resolve_recipe("paper", n_train=1000, lrs=[0.05])
    assert (
        small.batch_size == 1000
        and small.lrs == [pytest.approx(0.05 * 1000 / 256)]
        and small.base_lrs == [0.05]
    )
    default = resolve_recipe("default", n_train=5000)
    assert default.optimizer == "adamw" and default.batch_size == 256 and default.epochs_auto
    assert default.epochs == math.ceil(1000 / (5000 // 256)) and len(default.grid) == 10
    assert resolve_recipe("default", n_train=100).batch_size == 100
    assert resolve_recipe("default", n_train=10**6).epochs == 10
    with pytest.raises(AttnscopeError):
        resolve_recipe("sgd", n_train=100)
    with pytest.raises(AttnscopeError):
        resolve_recipe("default", n_train=100, lrs=[0.0])


def test_selection_uses_holdout_not_eval():
    import pandas as pd

    rows = [
        {"aggregator": "abmilp", "lr": 0.1, "wd": 0.0, "params": 5, "train_top1": 0.9, "holdout_top1": 0.8,
         "holdout_loss": 1.0, "eval_top1": 0.5, "eval_top5": 0.9, "train_loss": 0.1, "head": 0},
        {"aggregator": "abmilp", "lr": 0.01, "wd": 0.0, "params": 5, "train_top1": 0.8, "holdout_top1": 0.7,
         "holdout_loss": 1.0, "eval_top1": 0.6, "eval_top5": 0.9, "train_loss": 0.2, "head": 1},
        {"aggregator": "cls", "lr": 0.1, "wd": 0.0, "params": 5, "train_top1": 0.9, "holdout_top1": 0.4,
         "holdout_loss": 1.0, "eval_top1": 0.4, "eval_top5": 0.9, "train_loss": 0.1, "head": 0},
    ]  # fmt: skip
    results, summary = select_hyperparameters(pd.DataFrame(rows))
    ab = summary.set_index("aggregator").loc["abmilp"]
    assert ab["lr"] == 0.1 and ab["eval_top1"] == 0.5 and ab["best_over_grid_eval_top1"] == 0.6
    assert ab["delta_top1_vs_baseline"] == pytest.approx(0.1) and ab["baseline"] == "cls"
    assert results["selected"].tolist() == [True, False, True]


def test_bank_shared_pooling_equals_each_aggregator_on_its_own():
    """HeadBank.pool computes abmilp + attentive in one logits product and one weighted sum,
    and the mean once: outputs and gradients must be those of each aggregator alone."""
    torch.manual_seed(0)
    names = ["cls", "mean", "cls_mean", "abmilp", "abmilp_gated", "attentive"]
    bank = HeadBank(names, 3, 128, 4, num_prefix=2, has_cls=True).train()
    tokens = torch.randn(6, 2 + 20, 128)
    cls, patches = bank.split_tokens(tokens)
    shared = bank.pool(cls, patches)
    alone = {name: head.aggregator(cls, patches) for name, head in bank.heads.items()}
    assert list(shared) == names
    for name in names:
        torch.testing.assert_close(shared[name], alone[name], rtol=1e-5, atol=1e-6, msg=name)
    params = [p for p in bank.parameters() if p.requires_grad]
    probe = {name: torch.randn_like(v) for name, v in alone.items()}
    g_shared = torch.autograd.grad(
        sum((shared[n] * probe[n]).sum() for n in names), params, allow_unused=True
    )
    g_alone = torch.autograd.grad(sum((alone[n] * probe[n]).sum() for n in names), params, allow_unused=True)
    score_bias = next(i for i, p in enumerate(params) if p is bank.heads["abmilp"].aggregator.score_b)
    for i, (a, b) in enumerate(zip(g_shared, g_alone, strict=True)):
        assert (a is None) == (b is None)
        if i == score_bias:
            # shifts every logit of a head alike, which the softmax cancels: exactly zero
            # in the shared path, rounding noise in autograd's
            assert torch.count_nonzero(a) == 0 and b.abs().max() < 1e-5
        elif a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the deep scorer is not linear in the patches: it keeps its own path
    deep = HeadBank(["abmilp", "attentive"], 2, 64, 3, num_prefix=1, has_cls=True, abmilp_depth=2)
    assert deep.heads["abmilp"].aggregator.linear_scores() is None
    c2, p2 = deep.split_tokens(torch.randn(3, 9, 64))
    torch.testing.assert_close(deep.pool(c2, p2)["abmilp"], deep.heads["abmilp"].aggregator(c2, p2))


def test_training_accuracy_from_kept_bn_features_equals_a_fresh_pass():
    """train_bank scores the training images from the features its BatchNorm pass kept
    (float32 tokens: the class token is a view of the batch). It must equal reading and
    pooling them again with the final statistics."""
    from attnscope.probe.train import evaluate_bank

    xt, yt, _ = mil_bags(300, seed=3)
    recipe = resolve_recipe("default", n_train=300, batch_size=64, epochs=2, lrs=[1e-2, 1e-1], wds=[1e-4])
    source = TensorSource(xt)
    common = dict(train_labels=yt, train_positions=np.arange(300), holdout_positions=[], eval_labels=yt)
    trained = train_bank(
        TrainingData(train_source=source, eval_source=source, eval_positions=np.arange(0), **common),
        BankSpec(aggregators=["cls", "mean", "cls_mean", "abmilp", "attentive"], num_classes=4, dim=32,
                 num_prefix=3, has_cls=True),
        recipe,
        seed=0,
    )  # fmt: skip
    fresh = evaluate_bank(trained.bank, source, yt, np.arange(300), batch_size=max(recipe.micro_batch, 2))
    for name, rows in trained.results.groupby("aggregator", sort=False):
        np.testing.assert_array_equal(rows["train_top1"].to_numpy(), fresh[name]["top1"], err_msg=name)
        np.testing.assert_allclose(
            rows["train_loss"].to_numpy(), fresh[name]["loss"], rtol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("reuse", [False, True])
def test_softmax_pool_matches_autograd_in_float64(reuse):
    """The shared pooling's hand-written backward (gradients of the scorer rows, and of the
    patches when they need one) is checked numerically, with fresh and reused buffers."""
    from attnscope.probe.heads import Scratch, softmax_pool

    torch.manual_seed(0)
    scratch = Scratch()
    scratch.enabled = reuse
    patches = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (pooled,), mean = softmax_pool(patches, [(w, bias)], with_mean=True, scratch=scratch)
    reference = torch.bmm((patches @ w.t() + bias).transpose(1, 2).softmax(-1), patches)
    torch.testing.assert_close(pooled, reference)
    torch.testing.assert_close(mean, patches.mean(1))
    assert not mean.requires_grad  # no parameter before it
    probe = torch.randn_like(pooled)
    got = torch.autograd.grad((pooled * probe).sum(), (patches, w, bias))
    want = torch.autograd.grad((reference * probe).sum(), (patches, w, bias))
    torch.testing.assert_close(got[:2], want[:2])
    assert torch.count_nonzero(got[2]) == 0 and want[2].abs().max() < 1e-12  # cancels in the softmax
    if not reuse:
        assert torch.autograd.gradcheck(
            lambda x, w_: softmax_pool(
                x, [(w_[:1], bias[:1]), (w_[1:], bias[1:])], with_mean=False, scratch=scratch
            )[0],
            (patches, w),
        )
    else:
        # reused buffers: a graph whose buffers a later call overwrote fails loudly
        (stale,), _ = softmax_pool(patches, [(w, bias)], with_mean=False, scratch=scratch)
        softmax_pool(patches, [(w * 2, bias)], with_mean=False, scratch=scratch)
        with pytest.raises(RuntimeError, match="modified inplace"):
            stale.sum().backward()


def test_selection_at_the_edge_of_the_grid_is_noted_with_the_next_grid():
    import pandas as pd

    from attnscope.probe.selection import grid_edge_notes, select_hyperparameters

    def table(best_lr: float) -> pd.DataFrame:
        rows = []
        for lr in (1e-3, 1e-2, 1e-1):
            for wd in (0.0, 1e-4):
                acc = 0.9 if (lr == best_lr and wd == 0.0) else 0.5
                rows.append(
                    dict(aggregator="abmilp", lr=lr, wd=wd, params=1, holdout_top1=acc, holdout_loss=1.0,
                         train_top1=1.0, train_loss=0.0, eval_top1=acc, eval_top5=1.0, head=len(rows))
                )  # fmt: skip
        return pd.DataFrame(rows)

    top = grid_edge_notes(*select_hyperparameters(table(1e-1)))
    assert top == [
        "abmilp: the selected lr 0.1 is the largest of the grid (0.001, 0.01, 0.1), so the best one "
        "may lie beyond it; try `lrs` 0.1,1,10"
    ]  # wd 0 is the smallest, but nothing lies below it
    low = grid_edge_notes(*select_hyperparameters(table(1e-3)))
    assert len(low) == 1 and "smallest" in low[0] and low[0].endswith("try `lrs` 1e-05,0.0001,0.001")
    assert grid_edge_notes(*select_hyperparameters(table(1e-2))) == []


def test_smallest_weight_decay_at_the_edge_suggests_going_to_zero():
    import pandas as pd

    from attnscope.probe.selection import grid_edge_notes, select_hyperparameters

    rows = [
        dict(aggregator="mean", lr=1e-2, wd=wd, params=1, holdout_top1=acc, holdout_loss=1.0,
             train_top1=1.0, train_loss=0.0, eval_top1=acc, eval_top5=1.0, head=k)
        for k, (wd, acc) in enumerate([(1e-4, 0.9), (5e-2, 0.5)])
    ]  # fmt: skip
    (note,) = grid_edge_notes(*select_hyperparameters(pd.DataFrame(rows)))
    assert "wd 0.0001 is the smallest" in note and note.endswith("try `wds` 0,1e-05,0.0001")


# ---------------------------------------------------------------- the paper code's AbMILP options


def mae_sincos_2d(dim: int, rows: int, cols: int, cls_token: bool) -> np.ndarray:
    """MAE's util/pos_embed.get_2d_sincos_pos_embed, restated (and for a rows x cols grid)."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))  # w goes first
    emb = np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb]) if cls_token else emb


def paper_abmilp_head(agg, h: int, cls: torch.Tensor, patches: torch.Tensor, grid) -> torch.Tensor:
    """abmilp.ABMILPHead.forward for head `h` of `agg`, in float64, from its equations."""
    p = {k: v[h].double() for k, v in agg.named_parameters() if not k.startswith("hidden")}
    x = torch.cat([cls[:, None], patches], 1).double() if agg.with_cls else patches.double()
    d = x.shape[-1]
    y = None
    if agg.self_attention != "none":  # models_vit.Attention(dim, num_heads=1): qkv without bias, then proj
        q, k, v = (x @ p["qkv_w"].T).split(d, dim=-1)
        y = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v @ p["proj_w"].T + p["proj_b"]
    z = y if agg.self_attention in ("map", "both") else x
    if agg.positional:
        z = z + torch.from_numpy(mae_sincos_2d(d, *grid, cls_token=agg.with_cls))
    for w, b in zip(agg.hidden_w, agg.hidden_b, strict=True):
        z = z @ w[h].double().T + b[h].double()
        z = torch.tanh(z) if agg.activation == "tanh" else torch.relu(z)
    a = torch.softmax(z @ p["score_w"].T + p["score_b"], dim=1)  # (B, N, 1)
    return ((y if agg.self_attention == "both" else x) * a).sum(1)


@pytest.mark.parametrize("name", ["abmilp_tanh", "abmilp_sa", "abmilp_sa_map", "abmilp_pe", "abmilp_all"])
def test_abmilp_options_equal_the_paper_codes_head(name):
    torch.manual_seed(0)
    grid = (3, 4)  # not square: the position embedding must follow the model's grid
    bank = HeadBank([name], 2, 32, 5, num_prefix=1, has_cls=True, abmilp_depth=1, grid=grid)
    agg = bank.heads[name].aggregator
    assert agg.depth == (2 if name == "abmilp_tanh" else 1)  # the paper code's default depth for tanh
    tokens = torch.randn(6, 13, 32)
    out = agg(tokens[:, 0], tokens[:, 1:])
    assert out.shape == (6, 2, 32)
    assert agg(tokens[:0, 0], tokens[:0, 1:]).shape == (0, 2, 32)  # a rank's empty share of a batch
    for h in range(2):
        ref = paper_abmilp_head(agg, h, tokens[:, 0], tokens[:, 1:], grid)
        torch.testing.assert_close(out[:, h].double(), ref, rtol=1e-5, atol=1e-5)
    weights = bank.patch_weights(name, tokens)
    assert weights.shape == (2, 6, 12) and torch.allclose(weights.sum(-1), torch.ones(2, 6))
    out.sum().backward()  # every parameter takes part
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for k, p in agg.named_parameters() if k != "score_b"
    )


def test_position_embedding_is_maes_and_needs_the_grid():
    from attnscope.probe.heads import sincos_2d

    np.testing.assert_allclose(sincos_2d(64, (4, 4)).numpy(), mae_sincos_2d(64, 4, 4, False), atol=1e-6)
    np.testing.assert_allclose(sincos_2d(32, (2, 5)).numpy(), mae_sincos_2d(32, 2, 5, False), atol=1e-6)
    bank = HeadBank(["abmilp_pe"], 1, 32, 3, num_prefix=1, has_cls=True)  # no grid: a square one is assumed
    assert bank(torch.randn(2, 17, 32))["abmilp_pe"].shape == (1, 2, 3)
    with pytest.raises(AttnscopeError, match="grid"):
        bank(torch.randn(2, 13, 32))
    with pytest.raises(AttnscopeError, match="class token"):
        HeadBank(["abmilp_all"], 1, 32, 3, num_prefix=1, has_cls=False)


def train_mil(names, xt, yt, xe, ye, *, epochs=12, lrs=(3e-3, 1e-2), grid=None, prefix=3):
    n = len(xt)
    recipe = resolve_recipe(
        "default", n_train=n - 160, batch_size=128, epochs=epochs, lrs=list(lrs), wds=[1e-4]
    )
    trained = train_bank(
        TrainingData(
            TensorSource(xt), yt, np.arange(n - 160), np.arange(n - 160, n),
            TensorSource(xe), ye, np.arange(len(xe)),
        ),
        BankSpec(aggregators=names, num_classes=4, dim=32, num_prefix=prefix, has_cls=True, grid=grid),
        recipe,
    )  # fmt: skip
    _, summary = select_hyperparameters(trained.results)
    return dict(zip(summary["aggregator"], summary["eval_top1"], strict=True))


@pytest.mark.slow
def test_tanh_and_self_attention_options_solve_the_one_token_task():
    xt, yt, _ = mil_bags(1600, seed=1)
    xe, ye, _ = mil_bags(600, seed=2)
    acc = train_mil(["abmilp_tanh", "abmilp_sa", "abmilp_sa_map"], xt, yt, xe, ye)
    assert all(a >= 0.9 for a in acc.values()), acc


def positional_bags(n: int, seed: int, key: int = 0):
    """The label is carried by the token at one fixed place of a 4x4 grid (a corner: a linear
    scorer of smooth sine-cosine positions separates a corner best), which looks like every
    other token (each shows a random class prototype): only where it is tells it apart."""
    g = np.random.default_rng(seed)
    protos = np.random.default_rng(1234).normal(size=(4, 32))
    y = g.integers(0, 4, n)
    x = protos[g.integers(0, 4, (n, 17))] + 0.3 * g.normal(size=(n, 17, 32))
    x[:, 1 + key] = protos[y] + 0.3 * g.normal(size=(n, 32))
    return x.astype(np.float32), y


@pytest.mark.slow
def test_positional_option_finds_the_token_at_a_place_plain_abmilp_cannot():
    xt, yt = positional_bags(1600, seed=1)
    xe, ye = positional_bags(600, seed=2)
    acc = train_mil(
        ["abmilp", "abmilp_pe"], xt, yt, xe, ye, epochs=30, lrs=(3e-2, 1e-1), grid=(4, 4), prefix=1
    )
    assert acc["abmilp_pe"] >= 0.85 and acc["abmilp"] <= 0.45, acc  # chance is 0.25


@pytest.mark.slow
def test_class_token_option_reads_a_label_only_the_class_token_carries():
    g = np.random.default_rng(0)
    protos = np.random.default_rng(1234).normal(size=(4, 32))
    own = np.random.default_rng(99).normal(size=32)  # what sets a class token apart from the patches

    def bags(n):
        y = g.integers(0, 4, n)
        # the patches show random classes; the class token, the label
        x = protos[g.integers(0, 4, (n, 17))] + 0.3 * g.normal(size=(n, 17, 32))
        x[:, 0] = protos[y] + own + 0.3 * g.normal(size=(n, 32))
        return x.astype(np.float32), y

    (xt, yt), (xe, ye) = bags(1600), bags(600)
    acc = train_mil(["abmilp", "abmilp_all"], xt, yt, xe, ye, prefix=1)
    assert acc["abmilp_all"] >= 0.9 and acc["abmilp"] <= 0.4, acc
