"""kill -9 at any moment of feature extraction never leaves a shard that a rerun trusts but
is corrupt: every shard a later run accepts holds exactly the tokens of its images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from attnscope.models import load_model
    from attnscope.probe import datasets as ds
    from attnscope.probe import features as feat

    root = Path(sys.argv[1])
    paths = []
    for i in range(480):
        path = root / "img" / f"{i:03d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(path)
        paths.append(path)
    source = ds.FileSource(paths)
    loaded = load_model("test_vit", random_init=True)  # 160 px: 101 tokens
    ex = feat.TokenExtractor(loaded)
    material = feat.feature_key_material(
        loaded, transform_config=ex.transform_config, prenorm=False, dtype="float32", seed=0,
        item_ids=source.item_ids(),
    )
    cache = feat.open_cache(root / sys.argv[2], "tiny", material, len(source), *ex.token_shape())
    print("ready", flush=True)
    feat.extract_shards(ex, source, cache, range(len(source)), batch_size=4, commit_images=8)
    feat.write_cache_index(cache)
    np.save(root / (sys.argv[2] + "-all.npy"), feat.FeatureStore(cache).load_all())
    print("done", flush=True)
    """
)


def _run(tmp_path, cache: str) -> subprocess.Popen:
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), cache],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _committed(folder) -> int:
    """Images whose shard has its meta file, i.e. what a rerun trusts."""
    total = 0
    for meta in folder.rglob("shard-*.json"):
        try:
            total += len(json.loads(meta.read_text())["positions"])
        except (OSError, ValueError):  # being renamed into place right now
            pass
    return total


def test_kill_9_at_random_moments_then_resume_equals_one_uninterrupted_run(tmp_path):
    reference = _run(tmp_path, "reference")
    assert reference.wait(timeout=300) == 0
    expected = np.load(tmp_path / "reference-all.npy")

    # Each run is killed once a random number of images is committed (checked every few ms,
    # so the kill lands anywhere in the extraction, mid-write included), four runs in a row
    # on the same cache: each one continues where the last one died.
    rng = np.random.default_rng(7)
    killed = tmp_path / "killed"
    partial = 0
    for _ in range(4):
        low = _committed(killed) + 1
        if low >= 470:
            break
        target = int(rng.integers(low, 470))
        proc = _run(tmp_path, "killed")
        assert proc.stdout.readline().strip() == "ready"
        while proc.poll() is None and _committed(killed) < target:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        partial += 0 < _committed(killed) < 480
    assert partial >= 1  # the kills did land mid-extraction
    finish = _run(tmp_path, "killed")
    assert finish.wait(timeout=300) == 0
    resumed = np.load(tmp_path / "killed-all.npy")
    # batches of the resumed run may be composed differently: fp16 tokens agree to rounding
    np.testing.assert_allclose(resumed.astype(np.float32), expected.astype(np.float32), atol=2e-3, rtol=2e-3)
