"""The CLI's surface: one way to name the model, help panels, and tables off a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from attnscope.cli.app import app

runner = CliRunner()
COMMANDS = ("entropy", "compare", "maps", "probe")


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def record_configs(monkeypatch, tmp_path: Path, command: str) -> list:
    """Replace `attnscope.commands.<command>.run` by one that keeps the config and runs nothing."""
    import importlib

    module = importlib.import_module(f"attnscope.commands.{command}")
    seen: list = []
    monkeypatch.setattr(module, "run", lambda config, ui, **kw: (seen.append(config), (tmp_path, None))[1])
    return seen


@pytest.mark.parametrize("command", ["entropy", "maps", "probe"])
@pytest.mark.parametrize("form", [["test_vit"], ["--model", "test_vit"], ["-m", "test_vit"]])
def test_the_model_is_named_positionally_or_with_model(monkeypatch, tmp_path, command, form):
    seen = record_configs(monkeypatch, tmp_path, command)
    result = invoke(command, *form, "--random-init", "--img-size", "64")
    assert result.exit_code == 0, result.output
    assert seen[-1].model == "test_vit"
    # the same model both ways is no conflict
    result = invoke(command, "test_vit", "--model", "test_vit", "--random-init")
    assert result.exit_code == 0, result.output
    assert seen[-1].model == "test_vit"


def test_probe_without_a_model_probes_the_papers_mae(monkeypatch, tmp_path):
    seen = record_configs(monkeypatch, tmp_path, "probe")
    assert invoke("probe", "--random-init").exit_code == 0
    assert seen[-1].model == "mae_vit_base"


@pytest.mark.parametrize("command", ["entropy", "maps", "probe"])
def test_two_different_models_are_a_one_line_error(monkeypatch, tmp_path, command):
    seen = record_configs(monkeypatch, tmp_path, command)
    result = invoke(command, "test_vit", "--model", "test_vit2", "--random-init")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "'test_vit'" in lines[0] and "--model 'test_vit2'" in lines[0]
    assert not seen  # refused before anything runs


@pytest.mark.parametrize("command", ["entropy", "maps"])
def test_no_model_at_all_says_how_to_name_one(command):
    result = invoke(command, "--random-init")
    assert result.exit_code == 2
    assert f"attnscope {command} mae" in result.output and "Traceback" not in result.output


def test_maps_positional_model_writes_its_figures(tmp_path):
    out = tmp_path / "maps"
    result = invoke(
        "maps", "test_vit", "--random-init", "--max-images", "1", "--img-size", "64", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 1 and (out / "maps.npz").exists()
    meta = json.loads((out / "run.json").read_text())
    assert list(meta["models"]) == ["test_vit"]


def help_panels(command: str) -> dict[str, str]:
    """flag -> the help panel `attnscope COMMAND --help` shows it under."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    panels, panel = {}, None
    for line in result.output.splitlines():
        title = re.match(r"╭─ (.+?) ─", line)
        if title:
            panel = title[1]
            continue
        flag = re.match(r"│ (--[a-z0-9-]+)", line)
        if flag and panel:
            panels[flag[1]] = panel
    return panels


def test_probe_help_groups_its_options_in_panels():
    panels = help_panels("probe")
    expected = {
        "--model": "Model",
        "--checkpoint": "Model",
        "--img-size": "Images",
        "--data": "Probe data",
        "--max-images-per-split": "Probe data",
        "--aggregator": "Heads",
        "--blocks": "Heads",
        "--recipe": "Training",
        "--epochs": "Training",
        "--lrs": "Selection",
        "--holdout-fraction": "Selection",
        "--device": "Execution",
        "--threads": "Execution",
        "--out": "Output",
        "--format": "Output",
    }
    assert {flag: panels.get(flag) for flag in expected} == expected
    # nothing is left in the catch-all panel but --help itself
    assert [flag for flag, panel in panels.items() if panel == "Options"] == ["--help"]


def test_a_shared_option_sits_in_the_same_panel_in_every_command():
    by_command = {command: help_panels(command) for command in COMMANDS}
    for command, panels in by_command.items():
        assert [flag for flag, panel in panels.items() if panel == "Options"] == ["--help"], command
    shared = set.intersection(*(set(p) for p in by_command.values())) - {"--help"}
    assert {"--checkpoint", "--random-init", "--img-size", "--device", "--out", "--format"} <= shared
    for flag in sorted(shared):
        assert len({panels[flag] for panels in by_command.values()}) == 1, (
            flag,
            {c: p[flag] for c, p in by_command.items()},
        )


def run_logged(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`attnscope ARGS` with stdout a pipe, as in a SLURM log: no terminal anywhere, and
    COLUMNS=80, the width rich would otherwise assume."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "attnscope", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.slow  # a whole CLI run in a subprocess
def test_entropy_table_off_a_terminal_is_whole(tmp_path):
    out = tmp_path / "run"
    proc = run_logged(
        "entropy", "test_vit", "--random-init", "--max-images", "1", "--out", str(out), tmp_path=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout, proc.stdout
    for header in ("cls_self_attn", "cls_patch_entropy_norm", "patch_patch_entropy_norm", "attn_distance_px"):
        assert header in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) > 80  # wider than the guess, not cut
    assert str(out) in proc.stdout  # a path is one word: never broken


@pytest.mark.slow
def test_probe_summary_off_a_terminal_holds_every_number(tmp_path):
    out = tmp_path / "probe"
    proc = run_logged(
        "probe", "test_vit", "--random-init", "--img-size", "48", "--max-images-per-split", "40",
        "--epochs", "2", "--lrs", "0.003,0.03", "--wds", "0.0001,0.05", "--maps", "0",
        "--embedding", "none", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout, proc.stdout
    summary = pd.read_csv(out / "summary.csv")
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    for _, row in summary.iterrows():
        cells = rows[row["aggregator"]]
        assert f"{row['lr']:g}" == cells[1] and f"{row['wd']:g}" == cells[2], cells
        assert f"{100 * row['eval_top1']:.1f}" in cells


def test_probe_summary_fits_an_80_column_terminal_with_every_number_whole():
    """The default aggregators at ImageNet's sizes (1,000 classes, 50,000 images, 90 epochs)."""
    from rich.console import Console

    from attnscope.cli.probe import _summary_table

    rows = [
        {
            "aggregator": name, "lr": lr, "wd": wd, "params": 769_769, "selected_on": "holdout",
            "holdout_top1": 0.6812, "train_top1": 0.7, "eval_top1": 0.6755, "eval_top1_ci_low": 0.6671,
            "eval_top1_ci_high": 0.6838, "eval_top5": 0.8812, "best_over_grid_eval_top1": 0.6801,
            "best_epoch": 87, "best_epoch_top1": 0.6803, "eval_images": 50_000, "baseline": "cls",
            "delta_top1_vs_baseline": delta, "delta_ci_low": delta - 0.01, "delta_ci_high": delta + 0.01,
        }
        for name, lr, wd, delta in [
            ("cls", 0.003, 0.0001, 0.0), ("mean", 0.1, 0.05, 0.0), ("abmilp", 0.001, 0.05, -0.012)
        ]
    ]  # fmt: skip
    console = Console(width=80, force_terminal=True, color_system=None, record=True)
    console.print(_summary_table(pd.DataFrame(rows), "mae_vit_base: probe accuracy"))
    text = console.export_text()
    assert "…" not in text, text
    for cell in ("abmilp", "0.003", "0.0001", "769,769", "67..68", "ep 87", "-1.2", "Δ cls"):
        assert cell in text, cell
    assert "(optimistic)" in text  # the caption wraps, it is not cut
