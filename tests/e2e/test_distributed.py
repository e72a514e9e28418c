"""attnscope under torchrun: 2 gloo processes on CPU, launched by the tests themselves.

Every launch has a subprocess timeout, so a deadlock fails the test instead of hanging it;
ATTNSCOPE_DIST_TIMEOUT is short so a missed agreement would surface as a collective timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import attnscope
from attnscope.cli.app import app
from attnscope.data import bundled_sample_paths

pytestmark = pytest.mark.slow  # every test here starts torchrun with two processes

TINY = ["--model", "test_vit", "--random-init"]
LAUNCH_TIMEOUT = 150  # seconds; a hang fails here, long after a healthy run (~20 s on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    tmp_path: Path, *args: str, nproc: int = 2, dist_timeout: int = 60
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node N ...args`; killed as a group on timeout."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "ATTNSCOPE_DIST_TIMEOUT": str(dist_timeout),
        "COLUMNS": "200",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "--monitor-interval", "0.2",
        *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT} s (deadlock?)\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def single_process(*args: str):
    result = CliRunner().invoke(app, ["entropy", *TINY, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def assert_same_tables(a: Path, b: Path) -> None:
    """layers.csv, heads.csv and images.csv: the same rows in the same order, and the same
    numbers up to the float32 rounding of forwards over other batch compositions.

    images.csv names an image as its run was given it (an absolute path in one run, a path
    relative to torchrun's folder in the other), so images are compared by file name."""
    for name in ("layers.csv", "heads.csv", "images.csv"):
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        for t in (x, y):
            if "image" in t.columns:
                t["image"] = t["image"].map(lambda p: Path(p).name)
        values = [c for c in ("mean", "std", "value") if c in x.columns]
        keys = [c for c in x.columns if c not in values]
        pd.testing.assert_frame_equal(x[keys], y[keys])  # same rows, same counts, same images
        for col in values:
            np.testing.assert_allclose(y[col], x[col], rtol=1e-7, atol=1e-12, err_msg=f"{name}:{col}")


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def mixed_images(tmp_path: Path) -> Path:
    """7 files, 5 readable: b.jpg truncated, d.jpg a link to a file that is gone by load time."""
    images = tmp_path / "images"
    images.mkdir()
    samples = iter(bundled_sample_paths())
    for i, name in enumerate("abcdefg"):
        target = images / f"{name}.jpg"
        if i == 1:
            target.write_bytes(next(samples).read_bytes()[:300])  # truncated
        elif i == 3:
            target.symlink_to(tmp_path / "deleted.jpg")  # listed, gone by load time
        else:
            shutil.copy(next(samples), target)
    return images


def test_two_ranks_equal_one_process_odd_count_with_corrupt_and_vanished_files(tmp_path):
    """7 files (5 readable), positions 0,2,4,6 on rank 0 and 1,3,5 on rank 1.

    Rank 1 also gets a truncated file (1) and one deleted between listing and loading (3):
    both are skipped and listed, the run ends normally (exit 0), and the tables equal a
    single process's over the same files.
    """
    images = mixed_images(tmp_path)
    single_process("--images", str(images), "--out", str(tmp_path / "one"))
    # the console script, as `torchrun --no-python attnscope ...` runs it
    script = Path(sys.executable).with_name("attnscope")
    proc = torchrun(
        tmp_path, "--no-python", str(script), "entropy", *TINY, "--images", "images", "--out", "two"
    )
    assert proc.returncode == 0, proc.stderr
    assert_same_tables(tmp_path / "one", tmp_path / "two")  # images.csv: both ranks' images, in order
    assert not (tmp_path / "two" / ".attnscope-partial").exists()  # torchrun runs commit nothing
    layers = pd.read_csv(tmp_path / "two" / "layers.csv")
    assert (layers["count"] == 5).all()  # every readable image exactly once: no padding, no duplicates
    info = json.loads((tmp_path / "two" / "run.json").read_text())["models"]["test_vit"]
    assert [Path(p).name for p in info["images_used"]] == ["a.jpg", "c.jpg", "e.jpg", "f.jpg", "g.jpg"]
    assert info["distributed"] == {"world_size": 2, "backend": "gloo"}
    skipped = {Path(s["path"]).name: s["reason"] for s in info["images_skipped"]}
    assert skipped["d.jpg"] == "file not found" and "corrupt" in skipped["b.jpg"]
    # rank 0 alone prints: rank 1's skipped files once each, one banner, one bar, one table
    assert proc.stderr.count("skipped /") == 2 and proc.stderr.count("b.jpg") == 1, proc.stderr
    assert proc.stderr.count("RANDOM WEIGHTS (seed 0)") == 1 and "rank 0 of 2: 4 of 7 images" in proc.stderr
    assert proc.stdout.count("mean over 5 images") == 1


def test_token_profiles_of_two_ranks_equal_one_process(tmp_path):
    """spectrum.csv and frequency.csv are sums all-reduced with the others: the same rows as
    one process over the same files, the same means up to the float32 rounding of forwards
    over other batch compositions."""
    images = mixed_images(tmp_path)
    tokens = ["--metrics", "attention,tokens"]
    single_process("--images", str(images), *tokens, "--out", str(tmp_path / "one"))
    proc = torchrun(
        tmp_path, "-m", "attnscope", "entropy", *TINY, "--images", "images", *tokens, "--out", "two"
    )
    assert proc.returncode == 0, proc.stderr
    assert_same_tables(tmp_path / "one", tmp_path / "two")
    for name, value in (
        ("spectrum.csv", ["sv_share", "energy_share", "energy_cum"]),
        ("frequency.csv", ["rel_log_amplitude"]),
    ):
        x, y = pd.read_csv(tmp_path / "one" / name), pd.read_csv(tmp_path / "two" / name)
        keys = [c for c in x.columns if c not in value]
        assert len(x) and list(x.columns) == list(y.columns)
        pd.testing.assert_frame_equal(x[keys], y[keys])
        for col in value:
            np.testing.assert_allclose(y[col], x[col], rtol=1e-6, atol=1e-10, err_msg=f"{name}:{col}")


def test_compare_two_ranks_equal_one_process(tmp_path):
    """compare shards the same way: its per-model tables equal the single-process entropy run."""
    images = mixed_images(tmp_path)
    single_process("--images", str(images), "--out", str(tmp_path / "one"))
    (images / "d.jpg").unlink()  # compare stats every listed file for its reuse hash
    proc = torchrun(
        tmp_path, "-m", "attnscope", "compare", "test_vit", "test_vit2", "--random-init",
        "--images", "images", "--gallery", "0", "--out", "cmp",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_same_tables(tmp_path / "one", tmp_path / "cmp" / "runs" / "test_vit")
    intervals = pd.read_csv(tmp_path / "cmp" / "intervals.csv")
    assert (intervals["n_images"] == 5).all() and intervals["ci_low"].notna().all()
    assert (tmp_path / "cmp" / "report.html").is_file() and proc.stdout.count("report:") == 1
    meta = json.loads((tmp_path / "cmp" / "runs" / "test_vit2" / "run.json").read_text())
    assert meta["models"]["test_vit2"]["distributed"]["world_size"] == 2


def _cache_content(cache_dir: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every split's tokens (by position) and recorded failures, whatever the shard layout."""
    from attnscope.probe.features import FeatureCache, FeatureStore

    out = {}
    for root in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        key = json.loads((root / "key.json").read_text())
        index = json.loads((root / "index.json").read_text())
        cache = FeatureCache(
            root, key["key"], index["num_items"], key["tokens"], key["dim"], key["shard_images"]
        )
        out[root.name] = (FeatureStore(cache).load_all(), index["failures"])
    return out


def test_probe_features_sharded_over_ranks_equal_one_process(tmp_path, one_thread):
    """41 train and 41 eval digits (odd): each rank writes its own shards, rank 0 the index and the heads.

    The reference runs on one thread like torchrun's ranks (`one_thread`): a BLAS may split
    its sums differently with two, and results.csv is compared exactly below."""
    args = [
        "--img-size",
        "64",
        "--max-images-per-split",
        "41",
        "--epochs",
        "2",
        "--maps",
        "0",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(
        app, ["probe", *TINY, *args, "--cache-dir", str(tmp_path / "cache1"), "--out", str(tmp_path / "one")]
    )
    assert result.exit_code == 0, result.output
    proc = torchrun(
        tmp_path, "-m", "attnscope", "probe", *TINY, *args, "--cache-dir", "cache2", "--out", "two"
    )
    assert proc.returncode == 0, proc.stderr
    one, two = _cache_content(tmp_path / "cache1"), _cache_content(tmp_path / "cache2")
    assert list(one) == list(two) and len(one) == 2  # same cache keys: train and eval
    for name in one:
        np.testing.assert_array_equal(two[name][0], one[name][0])  # identical fp16 tokens
        assert two[name][1] == one[name][1]
        shards = sorted(p.name for p in (tmp_path / "cache2" / name).glob("shard-*.npy"))
        assert shards == ["shard-000000000-000000040.npy", "shard-000000001-000000039.npy"]  # one per rank
    # the heads were trained once, on rank 0, on the same features
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "two" / "results.csv"), pd.read_csv(tmp_path / "one" / "results.csv")
    )
    assert proc.stdout.count("results: two") == 1


def test_no_readable_image_on_any_rank_is_one_error_not_a_hang(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_text("not an image")
    proc = torchrun(tmp_path, "-m", "attnscope", "entropy", *TINY, "--images", "images", "--out", "run")
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: none of the 3 images could be read"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_failure_on_rank_0_alone_stops_every_rank(tmp_path):
    """Only rank 0 owns --out, so only rank 0 finds it not empty; rank 1 must not wait forever."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("keep")
    proc = torchrun(tmp_path, "-m", "attnscope", "entropy", *TINY, "--max-images", "1", "--out", "run")
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "error: --out run is not empty; choose another folder or pass --overwrite"
    ], proc.stderr
    # torchrun's own report only: no frame from the package itself, wherever the clone sits
    # (a clone named attnscope/ holds torch's frames under attnscope/.venv/)
    package = os.path.dirname(attnscope.__file__) + os.sep
    assert f'File "{package}' not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


PROTOCOL = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from attnscope import distributed
    from attnscope.errors import AttnscopeError
    from attnscope.measure import reduce_statistics
    from attnscope.metrics import MetricAccumulator

    distributed.setup("cpu")
    r, out = distributed.rank(), {}
    out["shards"] = {n: distributed.shard_positions(n) for n in (1, 5)}

    def outcome(fn):
        try:
            with distributed.step():
                fn()
            return "ok"
        except distributed.RankFailure as exc:
            return f"RankFailure: {exc}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def user_error():
        if r == 1:
            raise AttnscopeError("rank one could not read its checkpoint")

    def bug():
        if r == 0:
            raise ValueError("a bug")

    out["user"] = outcome(user_error)
    out["bug"] = outcome(bug)
    out["fine"] = outcome(lambda: None)

    acc = None  # rank 1: a shard without readable images has no accumulator
    if r == 0:
        acc = MetricAccumulator("m", 1, 2, ["cls_self_attn"], [])
        acc.state[("head", 0, "cls_self_attn")] = torch.tensor(
            [[2.0, 2.0], [1.0, 3.0], [0.5, 4.5]], dtype=torch.float64
        )
    total, layout, used, failures = reduce_statistics(
        acc, "layout" if r == 0 else None, [r * 2], [(r * 2 + 1, "bad")]
    )
    out["reduced"] = {str(k): v.tolist() for k, v in total.state.items()}
    out["used"], out["failures"] = used, failures
    other = MetricAccumulator("m", 1, 2, ["cls_self_attn"] if r == 0 else ["attn_nmi"], [])
    try:
        MetricAccumulator.all_reduce(other)
        out["mismatch"] = "no error"
    except distributed.RankFailure as exc:
        out["mismatch"] = str(exc)

    # a rank that wedges without raising: the others hit the collective timeout, not a hang
    if r == 1:
        time.sleep(8)
    else:
        try:
            distributed.barrier()
            out["timeout"] = "no error"
        except Exception as exc:
            out["timeout"] = (
                distributed.comm_failure_message(exc) or f"unrecognised {type(exc).__name__}: {exc}"
            )
        json.dump(out, open(f"rank{r}.json", "w"))
        os._exit(0)
    json.dump(out, open(f"rank{r}.json", "w"))
    """
)


def test_step_agreement_reduction_and_timeout(tmp_path):
    (tmp_path / "protocol.py").write_text(PROTOCOL)
    proc = torchrun(tmp_path, "protocol.py", dist_timeout=3)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["shards"] == {"1": [0], "5": [0, 2, 4]} and r1["shards"] == {"1": [], "5": [1, 3]}, proc.stderr
    assert r0["user"] == r1["user"] == "RankFailure: rank 1: rank one could not read its checkpoint"
    assert r0["bug"] == "ValueError: a bug"  # the buggy rank keeps its own exception (and traceback)
    assert r1["bug"] == "RankFailure: ValueError: a bug (traceback printed by that rank)"
    assert r0["fine"] == r1["fine"] == "ok"
    expected = {"('head', 0, 'cls_self_attn')": [[2.0, 2.0], [1.0, 3.0], [0.5, 4.5]]}
    assert r0["reduced"] == r1["reduced"] == expected
    assert r0["used"] == r1["used"] == [0, 2] and r0["failures"] == [[1, "bad"], [3, "bad"]]
    assert (
        r0["mismatch"] == r1["mismatch"] == "ranks 0 and 1 measured different metric sets (different models?)"
    )
    assert "lost contact" in r0["timeout"] and "ATTNSCOPE_DIST_TIMEOUT=3" in r0["timeout"], r0["timeout"]


# ---------------------------------------------------------------- probe --no-cache: data-parallel heads

STREAM_ARGS = [
    "--img-size",
    "64",
    "--max-images-per-split",
    "41",
    "--epochs",
    "2",
    "--train-batch-size",
    "8",
    "--maps",
    "0",
    "--no-cache",
    "--threads",
    "1",
]


def test_probe_no_cache_trains_data_parallel_and_only_rank_0_writes(tmp_path, monkeypatch):
    """41 train (37 fit + 4 hold-out) and 41 eval digits, batch 8 = 2 ranks x 4, streamed.

    Same files and columns as one process; every head is measured on all 41 evaluation
    images exactly once (rank 0 holds 21, rank 1 20); nothing else is written anywhere.
    """
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "cache-home"))  # --no-cache: must stay absent
    result = CliRunner().invoke(app, ["probe", *TINY, *STREAM_ARGS, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    proc = torchrun(tmp_path, "-m", "attnscope", "probe", *TINY, *STREAM_ARGS, "--out", "two")
    assert proc.returncode == 0, proc.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.rglob("*")) == sorted(p.name for p in one.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no feature cache, no stray files
    # rank 0 alone prints, and says the batch of 8 is the sum of the ranks' shares
    assert (
        proc.stdout.count("results: two") == 1
        and proc.stdout.count("probe accuracy on 41 evaluation images") == 1
    )
    assert proc.stderr.count("effective batch size 8, summed over 2 ranks x 4 images") == 1, proc.stderr
    assert proc.stderr.count("torchrun: each of the 2 ranks streams its share") == 1

    for name in ("results.csv", "summary.csv"):
        a, b = pd.read_csv(one / name), pd.read_csv(two / name)
        assert list(b.columns) == list(a.columns) and "eval_images" in b.columns, name
        pd.testing.assert_frame_equal(
            b[["aggregator", "lr", "wd", "params"]], a[["aggregator", "lr", "wd", "params"]]
        )
        assert (b["eval_images"] == 41).all(), b["eval_images"]  # not 42 (padding), not 21 (one rank's share)
        # The ranks forward other batch compositions through the backbone, so tokens differ
        # from one process's in the last float32 bits; a prediction at a near-tie may flip:
        # at most one image of 41 (or of the 4 held out).
        for col in ("eval_top1", "eval_top5", "holdout_top1"):
            np.testing.assert_allclose(
                b[col], a[col], atol=1.01 / 4 if col == "holdout_top1" else 1.01 / 41, err_msg=col
            )
    summary = pd.read_csv(two / "summary.csv")
    assert ((summary["eval_top5"] >= summary["eval_top1"]) & summary["eval_top1"].between(0, 1)).all()
    info = json.loads((two / "run.json").read_text())["models"]["test_vit"]
    assert info["distributed"] == {"world_size": 2, "backend": "gloo"} and info["cache"] is None
    assert info["bank"]["data_parallel"] == {"ranks": 2, "images_per_rank_per_step": [4, 4]}
    assert info["bank"]["steps"] == 2 * 4 and info["splits"] == {"train": 37, "holdout": 4, "eval": 41}
    base = json.loads((one / "run.json").read_text())["models"]["test_vit"]
    np.testing.assert_allclose(info["bank"]["epoch_losses"], base["bank"]["epoch_losses"], rtol=1e-4)


BANK = textwrap.dedent(
    """
    # Every rank trains the same bank data-parallel on the same in-memory features; some
    # positions are unreadable (as a streaming source skips files), so the ranks' shares of a
    # micro-batch differ, and some are empty.
    import json, sys
    import numpy as np
    import torch
    from attnscope import distributed
    from attnscope.probe import train
    from attnscope.probe.heads import AGGREGATORS

    torch.set_num_threads(1)
    UNREADABLE = [2, 3, 5, 8, 13, 21, 22, 23]


    class Dropping(train.TensorSource):
        def iterate(self, positions, batch_size, **kw):
            yield from super().iterate([p for p in positions if int(p) not in UNREADABLE], batch_size, **kw)


    def features(n, seed):
        g = np.random.default_rng(seed)
        y = g.integers(0, 7, n)
        x = g.normal(size=(n, 10, 16)).astype(np.float32)
        x[:, 1:4] += 0.5 * y[:, None, None] * np.linspace(-1, 1, 16, dtype=np.float32)
        return x, y


    def run(recipe, lrs, data_parallel):
        xt, yt = features(31, 0)
        xe, ye = features(19, 1)
        recipe = train.resolve_recipe(
            recipe, n_train=27, batch_size=9, epochs=3, lrs=lrs, wds=[0.0, 0.05], micro_batch=3
        )
        trained = train.train_bank(
            train.TrainingData(
                train_source=Dropping(xt), train_labels=yt, train_positions=np.arange(27),
                holdout_positions=np.arange(27, 31), eval_source=Dropping(xe), eval_labels=ye,
                eval_positions=np.arange(19),
            ),
            train.BankSpec(
                aggregators=list(AGGREGATORS), num_classes=7, dim=16, num_prefix=2, has_cls=True, grid=(2, 4)
            ),
            recipe, seed=0, data_parallel=data_parallel,
        )
        trained.bank.eval()
        with torch.no_grad():
            logits = {k: v.numpy() for k, v in trained.bank(torch.from_numpy(xe)).items()}
        return trained, logits


    # AdamW; LARS, whose bias steps scale with the gradient (so a sum and an average of the
    # ranks' gradients differ). Small AdamW lrs: at lr 0.1 this tiny problem is chaotic, a
    # 2e-7 relative change of the features moves one process's logits by up to 6e-2.
    RECIPES = {"default": [1e-3, 1e-2], "paper": [1.0]}
    if __name__ == "__main__":
        distributed.setup("cpu")
        empty = []
        make_empty = train._empty_tokens
        train._empty_tokens = lambda *a: empty.append(1) or make_empty(*a)
        for name, lrs in RECIPES.items():
            trained, logits = run(name, lrs, True)
            torch.save(
                {"state": trained.bank.state_dict(), "results": trained.results, "losses": trained.losses,
                 "steps": trained.steps, "logits": logits, "empty_batches": len(empty)},
                f"{name}-rank{distributed.rank()}.pt",
            )
    """
)


def test_data_parallel_bank_is_identical_on_every_rank_and_equals_one_process(
    tmp_path, monkeypatch, one_thread
):
    """Gradient sums and BatchNorm statistics over the ranks are real: both ranks end with
    bitwise the same bank, and it computes what one process trains on the same data.

    Tolerance: both runs add the same float32 terms in another order (two half-batch sums
    joined by the all-reduce; BatchNorm statistics from float64 sums instead of torch's
    float32 kernel). That is float32 rounding, and its effect after 9 steps was measured
    in one process: scaling the features by (1 + 2e-7) moves the logits by up to 2e-5 and
    the losses by 1e-7 relative; hence 1e-4 on logits and 1e-5 on losses. Accuracies may
    differ by one image, should a prediction sit at a near-tie. Parameters are compared
    through what they compute, not one by one: directions with an exactly zero gradient
    (a bias before a softmax or a BatchNorm) are moved by Adam's normalisation of pure
    rounding noise and drift without changing any output. Per-rank BatchNorm, unsummed
    gradients or averaged per-rank means (LARS's bias steps show those) miss by far more.
    """
    import torch

    (tmp_path / "bank.py").write_text(BANK)
    proc = torchrun(tmp_path, "bank.py")
    assert proc.returncode == 0, proc.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import bank

    for name, lrs in bank.RECIPES.items():
        r0, r1 = (torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1))
        assert r0["state"].keys() == r1["state"].keys()
        for key, value in r0["state"].items():
            assert torch.equal(value, r1["state"][key]), f"{name}: {key} differs between the ranks"
        assert r0["empty_batches"] + r1["empty_batches"] > 0  # a rank with no image still took part
        single, logits = bank.run(name, lrs, False)
        assert r0["steps"] == single.steps == 3 * 3
        np.testing.assert_allclose(r0["losses"], single.losses, rtol=1e-5, err_msg=name)
        for agg, lg in logits.items():
            np.testing.assert_allclose(r0["logits"][agg], lg, rtol=1e-4, atol=1e-4, err_msg=f"{name}: {agg}")
        exact = ["aggregator", "lr", "wd", "eval_images"]
        pd.testing.assert_frame_equal(r0["results"][exact], single.results[exact])
        n_eval = 19 - sum(p < 19 for p in bank.UNREADABLE)
        assert (r0["results"]["eval_images"] == n_eval).all()  # the readable ones, each once
        for col, n in (
            ("eval_top1", n_eval),
            ("eval_top5", n_eval),
            ("holdout_top1", 4),
            ("train_top1", 27 - 8),
        ):
            np.testing.assert_allclose(
                r0["results"][col], single.results[col], atol=1.01 / n, err_msg=f"{name}: {col}"
            )
        for col in ("train_loss", "holdout_loss"):
            np.testing.assert_allclose(
                r0["results"][col], single.results[col], rtol=1e-4, err_msg=f"{name}: {col}"
            )


FLAKY = textwrap.dedent(
    """
    # rank 1's backbone fails at its third forward: the second batch of the first epoch
    import os, sys
    from attnscope.errors import AttnscopeError
    from attnscope.probe import features

    forward, calls = features.TokenExtractor.__call__, []

    def flaky(self, images):
        calls.append(1)  # call 1 is the token-shape probe while loading
        if os.environ["RANK"] == "1" and len(calls) == 3:
            raise AttnscopeError("rank one lost its data disk")
        return forward(self, images)

    features.TokenExtractor.__call__ = flaky
    from attnscope.cli.app import app
    app(sys.argv[1:], prog_name="attnscope")
    """
)


def test_probe_no_cache_failure_on_one_rank_mid_training_ends_every_rank_with_one_line(tmp_path):
    """No hang and no second message: rank 0, waiting for the next micro-batch's collectives,
    learns of rank 1's failure at the per-batch check and stops with rank 1's message.
    Without that check rank 1 would exit alone and rank 0 would report a lost peer (or
    wait for the collective timeout, here longer than the whole launch)."""
    import time

    (tmp_path / "flaky.py").write_text(FLAKY)
    start = time.perf_counter()
    proc = torchrun(
        tmp_path, "flaky.py", "probe", *TINY, *STREAM_ARGS, "--batch-size", "2", "--out", "run",
        dist_timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: rank 1: rank one lost its data disk"], proc.stderr
    assert "lost contact" not in proc.stderr and not (tmp_path / "run").exists()
    assert time.perf_counter() - start < LAUNCH_TIMEOUT


@pytest.mark.slow
def test_resume_under_torchrun_is_refused_in_one_line(tmp_path):
    proc = torchrun(
        tmp_path, "-m", "attnscope", "entropy", *TINY, "--max-images", "1", "--out", "run", "--resume"
    )
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--resume is not available under torchrun" in lines[0], proc.stderr
    assert "--overwrite" in lines[0] and not (tmp_path / "run").exists()


def cka_images(tmp_path: Path, count: int = 17, corrupt: int = 7) -> Path:
    """`count` distinct images (the bundled samples, transposed and tinted), file `corrupt` truncated."""
    from PIL import Image, ImageOps

    images = tmp_path / "images"
    images.mkdir()
    samples = bundled_sample_paths()
    for i in range(count):
        with Image.open(samples[i % len(samples)]) as img:
            img = img.convert("RGB")
            if (i // len(samples)) % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if i >= 2 * len(samples):
                img = ImageOps.colorize(ImageOps.grayscale(img), "navy", "orange")
            img.save(images / f"img{i:02d}.png")
    target = images / f"img{corrupt:02d}.png"
    target.write_bytes(target.read_bytes()[:200])
    return images


def test_compare_cka_two_ranks_equal_one_process(tmp_path, one_thread):
    """17 images (16 readable) in batches of 6: [0-5], [6-11] with 7 unreadable (5 used),
    [12-16] (short). Rank 0 takes batches 0 and 2, rank 1 batch 1, and the gathered Grams,
    hence cka.csv, are a single process's: the same minibatches, the same float64 sums.

    One thread on both sides (`one_thread`, torchrun's OMP_NUM_THREADS=1), so the forwards,
    and the Grams, do the same arithmetic."""
    images = cka_images(tmp_path)
    args = ["compare", "test_vit", "test_vit2", "--random-init", "--images"]
    tail = ["--batch-size", "6", "--gallery", "0", "--metrics", "attention,tokens", "--out"]
    result = CliRunner().invoke(app, [*args, str(images), *tail, str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    proc = torchrun(tmp_path, "-m", "attnscope", *args, "images", *tail, "two")
    assert proc.returncode == 0, proc.stderr
    assert "rank 0 of 2: 11 of 17 images" in proc.stderr  # whole batches 0 and 2
    for model in ("test_vit", "test_vit2"):
        with (
            np.load(tmp_path / "one" / "runs" / model / "cka_grams.npz") as one,
            np.load(tmp_path / "two" / "runs" / model / "cka_grams.npz") as two,
        ):
            assert sorted(one.files) == sorted(two.files)
            for key in one.files:
                np.testing.assert_array_equal(two[key], one[key], err_msg=f"{model}: {key}")
        with np.load(tmp_path / "two" / "runs" / model / "cka_grams.npz") as two:
            batches = sorted(
                tuple(two[k]) for k in two.files if k.startswith("patch_mean.") and "positions" in k
            )
        assert batches == [(0, 1, 2, 3, 4, 5), (6, 8, 9, 10, 11), (12, 13, 14, 15, 16)]
    one, two = pd.read_csv(tmp_path / "one" / "cka.csv"), pd.read_csv(tmp_path / "two" / "cka.csv")
    assert len(one) == 36 + 36 + 48 + 64
    keys = ["model_a", "block_a", "model_b", "block_b", "token"]
    pd.testing.assert_frame_equal(two[keys], one[keys])
    np.testing.assert_allclose(two["cka"], one["cka"], rtol=0, atol=1e-12)
    assert "torchrun" not in (tmp_path / "two" / "report.md").read_text()
