"""`make demo`: the main job on the bundled photographs.

Runs the real CLI. With pretrained weights available (Hub reachable or cached) it runs on
MAE and DINO; where they cannot be had, it says so in one line and runs the very same
pipeline with --random-init, which every output labels as random weights. The CLI itself
never falls back like this: only this demo does, so it always shows what the tool makes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path("demo-out")


def attnscope(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attnscope", *args]
    print("$ attnscope " + " ".join(args), flush=True)
    return subprocess.run(cmd, stderr=subprocess.PIPE if capture else None, text=True)


def weights_unavailable(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == 2 and (
        "cannot be reached" in proc.stderr or "not in the local cache" in proc.stderr
    )


def run(command: list[str], out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    proc = attnscope(*command, "--out", str(out))
    sys.stderr.write(proc.stderr)
    if weights_unavailable(proc):
        print("demo: pretrained weights are unavailable here; rerunning with --random-init (random weights)")
        fallback = out.with_name(out.name + "-random-init")
        if fallback.exists():
            shutil.rmtree(fallback)
        proc = attnscope(*command, "--random-init", "--out", str(fallback), capture=False)
    if proc.returncode != 0:
        sys.exit(proc.returncode)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    has_compare = (
        "compare"
        in subprocess.run(
            [sys.executable, "-m", "attnscope", "--help"], capture_output=True, text=True
        ).stdout
    )
    if has_compare:
        run(["compare", "mae", "dino"], OUT / "mae-vs-dino")
    else:
        run(["entropy", "--model", "mae"], OUT / "mae")


if __name__ == "__main__":
    main()
