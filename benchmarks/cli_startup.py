"""How long `attnscope --help` takes against `python -c "import torch"`.

The CLI imports torch, timm and seaborn only inside command bodies, so its help should
answer in well under half the time torch alone takes to import. Each command is run
`--rounds` times in fresh processes, interleaved; the medians are compared.

    python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET = 0.5


def _seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "attnscope --help": [sys.executable, "-m", "attnscope", "--help"],
        "import torch": [sys.executable, "-c", "import torch"],
    }
    for cmd in commands.values():  # warm the file cache once
        _seconds(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, cmd in commands.items():
            times[name].append(_seconds(cmd))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:>18}: median {m * 1000:7.1f} ms over {args.rounds} runs")
    ratio = medians["attnscope --help"] / medians["import torch"]
    verdict = "MEETS" if ratio <= TARGET else "MISSES"
    print(f"ratio help / import torch = {ratio:.3f} -> {verdict} the target <= {TARGET}")


if __name__ == "__main__":
    main()
