"""Load times of the embedded SmolLM2: the first `recon-fast trace` into an empty cache (GGUF
de-quantised and written to the cache) and later ones (read from the cache), side by side, each a
fresh process as a user's command is. The figures are the command's own stderr line `model NAME
loaded in N s, M s since start`: N the load itself (cache check, weights, tokenizer), M from the
command's start to the model ready (Python, torch and transformers' imports included), and the
whole command's wall time. Long (a cold run is ~30 s): behind RECON_FAST_BENCH_LOAD=1.

    RECON_FAST_BENCH_LOAD=1 python benchmarks/bench_model_load.py [rounds]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Why do bees buzz? Because their wings beat two hundred times a second."


def trace_once(cache: str, out: str) -> tuple[float, float, float]:
    """(the load's seconds, seconds from the command's start to the model ready, the command's
    wall seconds) of one `recon-fast trace`."""
    env = {**os.environ, "RECON_FAST_CACHE": cache, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "recon_fast.cli", "trace", "--prompt", PROMPT, "--out", out],
                            env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    line = re.search(r"loaded in ([\d.]+) s, ([\d.]+) s since start", result.stderr)
    return float(line.group(1)), float(line.group(2)), wall


def main(rounds: int) -> None:
    cold, warm = [], []
    for _ in range(rounds):  # interleaved: a cold run into an empty cache, then a warm one from it
        with tempfile.TemporaryDirectory() as cache:
            out = str(Path(cache) / "cube.json")
            cold.append(trace_once(cache, out))
            warm.append(trace_once(cache, out))
    for name, runs in (("first (convert)", cold), ("later (cache)", warm)):
        loads, ready, walls = ([r[i] for r in runs] for i in range(3))
        print(f"{name:16s} load median {statistics.median(loads):5.1f} s (min {min(loads):.1f}, max {max(loads):.1f})"
              f"   ready {statistics.median(ready):5.1f} s   command {statistics.median(walls):5.1f} s   n={len(runs)}")


if __name__ == "__main__":
    if os.environ.get("RECON_FAST_BENCH_LOAD") != "1":
        sys.exit("set RECON_FAST_BENCH_LOAD=1 to run (a cold load takes ~30 s)")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
