"""`make demo`: the main job, `attnscope compare mae dino`, on the bundled photographs.

Runs the real CLI. With pretrained weights available (in the local Hugging Face cache, or
the Hub reachable) it compares MAE with DINO. Where they cannot be had, it says so first,
then compares the same two architectures with random weights (each drawn with its own
seed, so they differ), which every output labels as random, and prints the command to run
once the weights are there. The CLI itself never falls back like this: only this demo does,
so it always shows what the tool makes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path("demo-out")
MODELS = ["mae", "dino"]


def attnscope(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attnscope", *args]
    print("$ attnscope " + " ".join(args), flush=True)
    return subprocess.run(cmd, stderr=subprocess.PIPE if capture else None, text=True)


def weights_unavailable(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == 2 and (
        "cannot be reached" in proc.stderr or "not in the local cache" in proc.stderr
    )


def fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def main() -> None:
    OUT.mkdir(exist_ok=True)
    real = fresh(OUT / "mae-vs-dino")
    command = ["compare", *MODELS, "--out", str(real)]
    proc = attnscope(*command)
    if weights_unavailable(proc):
        random = fresh(OUT / "mae-vs-dino-random-init")
        print(
            "demo: this compares RANDOM networks (the MAE and DINO architectures with random weights): "
            "their pretrained weights are not in the local Hugging Face cache and the Hub cannot be "
            "reached. A real comparison needs the weights in the cache (HF_HOME) or local files "
            "(--checkpoint mae=PATH --checkpoint dino=PATH).",
            flush=True,
        )
        proc = attnscope("compare", *MODELS, "--random-init", "--out", str(random), capture=False)
        if proc.returncode == 0:
            print(f"demo: report of the random networks: {random / 'report.html'}")
            print(f"demo: once the weights are there, run: attnscope {' '.join(command)}")
    else:
        sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
