"""Host cost of one hook's write into the stats arena, on a tiny activation (so the kernel itself
costs next to nothing and what is timed is the per-call overhead a launch-bound forward pays on a
GPU): the compiled token_stats_rows op against the Python slice + view + token_stats it
replaced. Baseline: the Python path. CPU here; on a CUDA machine the same run adds a cuda group."""

import pytest
import torch

from recon_fast.trace import stats_arena
from recon_fast.trace.stats_arena import StatsArena

CALLS = 2000  # hook calls per timing: a 135M model's 365 hooks, five forward passes


def _writes(device: str, python_path: bool):
    x = torch.randn(1, 4, 64, device=device)

    def run():
        arena = StatsArena(initial_rows=CALLS * 4)
        if python_path:
            arena._rows_ops[x.device.type] = None  # the Python slice + view + token_stats
        for _ in range(CALLS):
            arena.write(x)

    return run


@pytest.mark.parametrize("path", ["python slice + view + token_stats", "token_stats_rows op"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_hook_write_overhead(record, device, path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if stats_arena._rows_op_for(device) is None:
        pytest.skip("no compiled token_stats on this device")
    python_path = path.startswith("python")
    record(f"hook write, {device}, {CALLS} calls of [1, 4, 64] float32", path,
           _writes(device, python_path), device=device, baseline=python_path)
