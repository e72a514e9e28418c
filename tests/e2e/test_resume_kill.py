"""Interrupted runs as a user meets them: Ctrl-C on a running `attnscope` process, and
kill -9 at random moments of entropy and compare runs.

A resumed run must write the same CSVs as one that never stopped, and whatever a kill
leaves behind must either resume to those CSVs or be refused in one line, never trusted
half-written. (The in-process interruptions are in tests/test_resume.py.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import PARTIAL, assert_same_csvs, error_lines, make_images, no_leftovers

from attnscope.commands import resume as resume_mod


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "COLUMNS": "200",
        resume_mod.ENV_IMAGES: "1",
    }


def _command(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "attnscope", "entropy", "--model", "test_vit", "--random-init",
        "--images", str(images), "--batch-size", "1", "--out", str(out), *extra,
    ]  # fmt: skip


def _run(cwd: Path, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(images, out, *extra), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _start(cwd: Path, images: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(images, out, *extra),
        cwd=cwd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_ctrl_c_says_what_is_committed_and_exits_130(tmp_path):
    images = make_images(tmp_path)
    ref = _run(tmp_path, images, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    proc = _start(tmp_path, images, out)
    deadline = time.monotonic() + 120
    while not (out / PARTIAL / "state.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (line,) = error_lines(err)
    assert "images of test_vit are committed in" in line and line.endswith("--resume"), line
    committed = int(line.split("interrupted: ")[1].split(" of ")[0])
    assert 1 <= committed < 14
    resumed = _run(tmp_path, images, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_csvs(tmp_path / "ref", out)
    assert no_leftovers(out)


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_file_a_rerun_trusts_but_is_corrupt(tmp_path):
    """Kill the same run again and again at seeded random moments (before the first commit,
    inside a commit, while the CSVs and figures are written, after the end), resuming it each
    time. After every kill a copy of the folder must resume to the uninterrupted CSVs, or be
    refused in one line (and then start over cleanly with --overwrite)."""
    images = make_images(tmp_path)
    start = time.monotonic()
    ref = _run(tmp_path, images, tmp_path / "ref")
    duration = time.monotonic() - start
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(20240611)
    out = tmp_path / "run"
    outcomes = []
    for trial in range(5):
        proc = _start(tmp_path, images, out, "--resume")
        time.sleep(rng.uniform(0.3, duration))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        check = tmp_path / f"check{trial}"
        if out.exists():
            shutil.copytree(out, check, symlinks=True)
        result = _run(tmp_path, images, check, "--resume")
        if result.returncode == 0:
            assert_same_csvs(tmp_path / "ref", check)
            assert no_leftovers(check)  # no partial state, no temporary file of the killed writer
            outcomes.append("resumed")
            continue
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result.stderr)
        if "holds a finished run" in line:  # the kill came after the end: the run is complete
            assert_same_csvs(tmp_path / "ref", check)
            outcomes.append("finished")
            continue
        outcomes.append("refused")
        again = _run(tmp_path, images, check, "--overwrite")
        assert again.returncode == 0, again.stderr
        assert_same_csvs(tmp_path / "ref", check)
    final = _run(tmp_path, images, out, "--resume")
    assert final.returncode in (0, 2), final.stderr
    assert_same_csvs(tmp_path / "ref", out)
    assert outcomes.count("refused") <= 1, outcomes  # nothing damaged should be the rule


def _compare(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "attnscope", "compare", "test_vit", "test_vit2", "--random-init",
        "--images", str(images), "--batch-size", "1", "--gallery", "1", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_kill_9_during_compare_never_leaves_a_model_run_that_is_reused_but_wrong(tmp_path):
    """The same for compare: after each kill the folder resumes (reusing finished model runs,
    continuing the interrupted one) to the uninterrupted tables, or is refused in one line."""
    images = make_images(tmp_path, copies=1)

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            _compare(images, out, *extra),
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    start = time.monotonic()
    assert run(tmp_path / "ref").returncode == 0
    duration = time.monotonic() - start
    rng = random.Random(7)
    out = tmp_path / "run"
    for trial in range(3):
        proc = subprocess.Popen(
            _compare(images, out, "--resume"), cwd=tmp_path, env=_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        time.sleep(rng.uniform(0.3, duration))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        check = tmp_path / f"check{trial}"
        if out.exists():
            shutil.copytree(out, check, symlinks=True)
        result = run(check, "--resume")
        if result.returncode != 0:
            assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
            assert run(check, "--overwrite").returncode == 0
        for model in ("test_vit", "test_vit2"):
            assert_same_csvs(tmp_path / "ref" / "runs" / model, check / "runs" / model)
            assert no_leftovers(check / "runs" / model)
        assert_same_csvs(tmp_path / "ref", check)
        ref_iv = pd.read_csv(tmp_path / "ref" / "intervals.csv")
        pd.testing.assert_frame_equal(pd.read_csv(check / "intervals.csv"), ref_iv)
