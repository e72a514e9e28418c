"""`attnscope models`: readable at 80 columns, machine-readable with --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from attnscope.models import list_model_specs
from attnscope.models.registry import TEST_MODELS


def _run(*args: str, columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns)}
    proc = subprocess.run(
        [sys.executable, "-m", "attnscope", "models", *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_80_columns_break_no_name():
    out = _run(columns=80)
    words = {w.strip("(),") for line in out.splitlines() for w in line.split()}
    for spec in [*list_model_specs(), *TEST_MODELS]:
        assert spec.alias in words and spec.timm_name in words, spec.alias
    # a download link is printed whole on a line of its own, so it can be copied
    assert all(
        len(line.rstrip()) <= 80 or line.split()[0].startswith("https://") for line in out.splitlines()
    )
    assert "tiny test models" in out


def test_json_lists_aliases_and_test_models_with_cache_state():
    entries = json.loads(_run("--json"))
    by_alias = {e["alias"]: e for e in entries}
    assert by_alias["mae_vit_base"]["timm_name"] == "vit_base_patch16_224.mae"
    assert by_alias["mae_vit_base"]["also"] == ["mae"]
    assert by_alias["test_vit"]["section"] == "test models"
    assert all(isinstance(e["cached"], bool) for e in entries)
    assert by_alias["dino_vit_base"]["input_size"] == [224, 224]
