"""benchmarks/run_gpu.sh on a machine without a GPU: a plain run stops at once with one clear line
(exit 2); REHEARSE=1 runs its CPU parts (the crash cases, the argument-error test), which must
pass here, and names every GPU step it skips."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and shutil.which("nvidia-smi") is not None,
                                reason="a GPU machine runs the script for real")


def _run(tmp_path, **env):
    full = {**os.environ, "LOGS": str(tmp_path), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full,
                          timeout=700, cwd=ROOT)


def test_plain_run_fails_fast_and_says_why(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "run_gpu.sh: not a GPU machine (" in proc.stderr
    assert not (tmp_path / "build.log").exists()  # stopped before building anything


def test_rehearsal_runs_the_cpu_parts_and_names_the_skipped_steps(tmp_path):
    proc = _run(tmp_path, REHEARSE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rehearsal: diagnose ok (every case raised)" in proc.stdout
    assert "rehearsal: argument-error test ok" in proc.stdout
    for step in ("build", "tests", "bench-tracer", "bench-attention", "bench-ops", "bench-compiled", "bench-dataset",
                 "bench-activation-cache", "ncu"):
        assert f"rehearsal: {step} needs a GPU: skipped" in proc.stdout
    assert "crashing: none" in (tmp_path / "diagnose.log").read_text()


def test_the_budget_runner_caps_each_step_and_skips_what_no_longer_fits(tmp_path):
    # The one GPU call has ~10 minutes: each step runs under `timeout` for the smaller of its own
    # budget and what is left, records its exit status and seconds, and a step that no longer
    # fits is named and skipped, so the steps after a slow one still get their turn.
    script = f"""
        set -uo pipefail
        LOGS={tmp_path}; BUDGET=30; STARTED=$SECONDS; steps="slow quick late"
        source {ROOT / "benchmarks" / "gpu_steps.sh"}
        do_slow() {{ sleep 10; }}
        do_quick() {{ echo "quick ran under $STEP_BUDGET s" | tee $LOGS/quick.txt; }}
        export -f do_slow do_quick
        step slow 1 do_slow
        step quick 100 do_quick
        step unwanted 5 do_quick
        STARTED=$((SECONDS - 15))
        step late 5 do_quick
    """
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [row[:2] for row in rows] == [["slow", "124"], ["quick", "0"], ["late", "skipped"]], rows
    assert int(rows[0][2]) <= 3  # cut at its 1 s budget, not the 10 s it wanted
    budget = int((tmp_path / "quick.txt").read_text().split()[-2])
    assert 20 <= budget <= 25, budget  # capped at what was left of the 30 s, minus a margin
    assert "== late: skipped (15 s of the budget left)" in proc.stdout
