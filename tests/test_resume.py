"""Interrupted entropy and compare runs: what Ctrl-C says, --resume, and kill -9 at any moment.

A resumed run must write the same CSVs as one that never stopped (to 1e-12; in fact byte for
byte with the same batch size), and whatever a kill leaves behind must either resume to
those CSVs or be refused in one line, never trusted half-written.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import CSVS, PARTIAL, assert_same_csvs, error_lines, make_images, no_leftovers
from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.commands import resume as resume_mod

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def interrupt_after(monkeypatch):
    """Ctrl-C right after the `n`-th commit of the next run (a test hook on the commit)."""
    monkeypatch.setenv(resume_mod.ENV_IMAGES, "2")

    def arm(n: int) -> None:
        commit, count = resume_mod.PartialRun.commit, [0]

        def commit_then_interrupt(self, state):
            commit(self, state)
            count[0] += 1
            if count[0] == n:
                monkeypatch.setattr(resume_mod.PartialRun, "commit", commit)
                raise KeyboardInterrupt

        monkeypatch.setattr(resume_mod.PartialRun, "commit", commit_then_interrupt)

    return arm


# ---------------------------------------------------------------- the stream itself (fast)


@pytest.mark.parametrize("families", [("attention",), ("attention", "tokens")])
def test_a_stream_resumed_from_its_committed_state_equals_one_that_never_stopped(
    tmp_path, sample_paths, families
):
    """Interrupt after two commits, reload the state from disk, continue: the tables (sums,
    per-image values, used images, and the token profiles) are exactly those of an
    uninterrupted stream."""
    import torch

    from attnscope.analysis import measure_model
    from attnscope.errors import ConfigError
    from attnscope.measure import Checkpointing
    from attnscope.models import load_model

    loaded = load_model("test_vit", random_init=True)
    paths, cpu = sample_paths[:5], torch.device("cpu")
    ref = measure_model(loaded, paths, device=cpu, batch_size=2, families=families)
    partial, done = resume_mod.PartialRun(tmp_path, "hash-1", "test_vit"), []

    def commit_twice(state):
        partial.commit(state)
        done.append(state.done)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_model(
            loaded,
            paths,
            device=cpu,
            batch_size=2,
            families=families,
            checkpointing=Checkpointing(commit_twice, every_images=1),
        )
    again = resume_mod.PartialRun(tmp_path, "hash-1", "test_vit")
    state = again.load(len(paths))
    assert done == [2, 4] and state.done == 4 and state.used == [0, 1, 2, 3]
    resumed = measure_model(
        loaded, paths, device=cpu, batch_size=2, families=families, checkpointing=again.checkpointing(state)
    )
    assert resumed.spectrum.empty == ("tokens" not in families)
    for name in ("layers", "heads", "images", "spectrum", "frequency"):
        pd.testing.assert_frame_equal(getattr(resumed, name), getattr(ref, name), check_exact=True)
    assert resumed.info["images_used"] == ref.info["images_used"]
    with pytest.raises(ConfigError, match="other settings"):
        resume_mod.PartialRun(tmp_path, "hash-2", "test_vit").load(len(paths))
    (tmp_path / PARTIAL / "chunk-000000.npz").unlink()
    with pytest.raises(ConfigError, match="damaged"):
        resume_mod.PartialRun(tmp_path, "hash-1", "test_vit").load(len(paths))


# ---------------------------------------------------------------- entropy and compare, in process


@pytest.mark.slow
def test_interrupted_entropy_resumes_to_the_same_csvs(tmp_path, interrupt_after):
    images = make_images(tmp_path, copies=1)
    args = ["entropy", "--model", "test_vit", "--random-init", "--images", str(images), "--batch-size", "2"]
    args += ["--metrics", "attention,tokens"]  # the token profiles are streamed sums too
    assert invoke(*args, "--out", str(tmp_path / "ref")).exit_code == 0
    out = tmp_path / "run"
    interrupt_after(2)  # 2 commits of 2 images each
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 130
    (line,) = error_lines(result.output)
    assert line.startswith(f"interrupted: 4 of 7 images of test_vit are committed in {out}; to continue: ")
    assert line.endswith("--resume")
    assert not (out / "run.json").exists() and (out / PARTIAL / "state.npz").is_file()

    result = invoke(*args, "--out", str(out))  # without --resume: says what is there, changes nothing
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"{out} holds an interrupted run of test_vit (4 of 7 images committed); pass --resume to "
        "continue it, or --overwrite to start over"
    ]
    result = invoke(*args, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed after 4 of 7" in result.output  # the bar covers the 3 images left
    assert_same_csvs(tmp_path / "ref", out)
    for name in (*CSVS, "spectrum.csv", "frequency.csv"):  # same batches, same additions: same bytes
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    info = json.loads((out / "run.json").read_text())["models"]["test_vit"]
    assert info["resumed_after"] == 4 and len(info["images_used"]) == 7
    assert no_leftovers(out)


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_trust(tmp_path, interrupt_after):
    images = make_images(tmp_path, copies=1)
    args = ["entropy", "--model", "test_vit", "--random-init", "--images", str(images), "--batch-size", "2"]
    args += ["--max-images", "5", "--format", "svg"]
    out = tmp_path / "run"
    interrupt_after(2)
    assert invoke(*args, "--out", str(out)).exit_code == 130

    # other settings: the hash of model, weights, input size, dtype and images differs
    result = invoke(*args, "--img-size", "128", "--out", str(out), "--resume")
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "cannot resume test_vit" in line and "other settings" in line and line.endswith("--overwrite")

    # a damaged chunk is refused, never added to
    chunk = sorted((out / PARTIAL).glob("chunk-*.npz"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-7] + b"garbage")
    result = invoke(*args, "--out", str(out), "--resume")
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "damaged" in line and "does not match its checksum" in line

    # --overwrite starts over; the run is complete and the partial state gone
    assert invoke(*args, "--out", str(out), "--overwrite").exit_code == 0
    assert no_leftovers(out) and (out / "run.json").is_file()

    # --resume on a finished run: nothing to resume
    result = invoke(*args, "--out", str(out), "--resume")
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"{out} holds a finished run: nothing to resume (pass --overwrite to rerun it)"
    ]

    # --resume into a new folder starts from the first image and says so
    fresh = tmp_path / "fresh"
    result = invoke(*args, "--out", str(fresh), "--resume")
    assert result.exit_code == 0 and "no interrupted run in" in result.output
    assert_same_csvs(out, fresh)


@pytest.mark.slow
def test_interrupted_compare_resumes_the_model_that_was_running(tmp_path, interrupt_after):
    from attnscope.commands.compare import CompareConfig, run

    images = make_images(tmp_path, copies=1)
    config = dict(models=("test_vit", "test_vit2"), images=(str(images),), random_init=True, gallery=2)
    config["batch_size"] = 2
    ref = run(CompareConfig(**config, out=tmp_path / "ref"))
    out = tmp_path / "cmp"
    interrupt_after(6)  # test_vit: 4 commits (2, 2, 2, 1 images); test_vit2: 2 commits
    with pytest.raises(KeyboardInterrupt) as info:
        run(CompareConfig(**config, out=out))
    assert str(info.value) == (
        f"test_vit complete in {out / 'runs'}; 4 of 7 images of test_vit2 are committed in "
        f"{out / 'runs' / 'test_vit2'}"
    )
    assert info.value.resumable
    result = invoke(
        "compare", "test_vit", "test_vit2", "--random-init", "--images", str(images), "--out", str(out)
    )
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"{out} holds interrupted model runs (test_vit2: 4 of 7 images committed); pass --resume to "
        "continue them, or --overwrite to start them over"
    ]
    again = run(CompareConfig(**config, out=out, resume=True))
    assert [r.status for r in again.runs] == ["reused", "resumed"]
    for model in ("test_vit", "test_vit2"):
        assert_same_csvs(tmp_path / "ref" / "runs" / model, out / "runs" / model)
        assert no_leftovers(out / "runs" / model)
    assert_same_csvs(tmp_path / "ref", out)
    pd.testing.assert_frame_equal(again.intervals, ref.intervals, rtol=0, atol=1e-12)
    assert again.findings == ref.findings
