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
    for step in ("build", "tests", "bench-attention", "bench-dataset", "dispatch"):
        assert f"rehearsal: {step} needs a GPU: skipped" in proc.stdout
    assert "crashing: none" in (tmp_path / "diagnose.log").read_text()
