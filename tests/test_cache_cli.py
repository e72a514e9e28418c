"""`attnscope cache list|clear`: sizes, ages and deletion of the probe's feature caches."""

from __future__ import annotations

import json
import os
import time

from typer.testing import CliRunner

from attnscope.cli.app import app
from attnscope.probe.caches import list_caches, parse_age

runner = CliRunner()


def _fake_cache(root, name, images, *, complete, age_days):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "key.json").write_text(
        json.dumps({"material": {"timm_name": "test_vit", "num_images": images}})
    )
    (folder / "shard-000000000-000000009.npy").write_bytes(b"x" * 1000)
    if complete:
        (folder / "index.json").write_text("{}")
    stamp = time.time() - age_days * 86400
    for path in folder.iterdir():
        os.utime(path, (stamp, stamp))
    return folder


def test_list_and_clear_by_age(tmp_path):
    old = _fake_cache(tmp_path, "test_vit-train-aaaa", 10, complete=True, age_days=40)
    new = _fake_cache(tmp_path, "test_vit-eval-bbbb", 5, complete=False, age_days=1)
    (tmp_path / "not-a-cache").mkdir()
    entries = list_caches(tmp_path)
    assert [e.path for e in entries] == [old, new]  # oldest first; other folders ignored
    assert entries[0].complete and not entries[1].complete and entries[0].bytes > 1000

    listed = runner.invoke(app, ["cache", "list", "--cache-dir", str(tmp_path), "--json"])
    assert listed.exit_code == 0
    assert [e["images"] for e in json.loads(listed.output)] == [10, 5]

    dry = runner.invoke(
        app, ["cache", "clear", "--cache-dir", str(tmp_path), "--older-than", "30d", "--dry-run"]
    )
    assert dry.exit_code == 0 and "would remove" in dry.output and old.exists()
    cleared = runner.invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path), "--older-than", "30d"])
    assert cleared.exit_code == 0 and "1 caches removed" in cleared.output
    assert not old.exists() and new.exists()


def test_ages_parse_and_bad_ones_are_one_line_errors():
    assert parse_age("30d") == 30 and parse_age("12h") == 0.5 and parse_age("7") == 7
    result = runner.invoke(app, ["cache", "clear", "--older-than", "soon"])
    assert result.exit_code == 2 and "--older-than takes an age" in result.output
