"""How the compiled library is built, for both builders: setup.py (the installed recon_fast._C),
which loads this file by its path (the package is not importable while it is being built), and
kernels/_library.py's JIT build of a source checkout. The sources, the flags and whether CUDA is
built are decided here alone. Plain Python: no torch, nothing of recon_fast.
"""

from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"

# -fopenmp: at::parallel_for is a header template; without it the loop runs on one thread.
# No -std: torch's cpp_extension picks the standard its own headers need (C++20 from 2.13 on;
# torch 2.14's headers do not compile as C++17).
CXX_FLAGS = ["-O3", "-fopenmp"]
CUDA_DEFINE = "-DRECON_FAST_WITH_CUDA"  # csrc/ops.cpp and the direct launchers then reach the CUDA kernels
NVCC_FLAGS = ["-O3", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    """Whether to build the CUDA kernels: with a CUDA build of torch and a CUDA toolkit, unless
    RECON_FAST_CUDA says otherwise (0 skips them; 1 forces them and fails without a toolkit)."""
    forced = os.environ.get("RECON_FAST_CUDA")
    if forced == "0":
        return False
    if forced == "1":
        if not cuda_home:
            raise RuntimeError("RECON_FAST_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return bool(torch_cuda_version and cuda_home)


def sources(with_cuda: bool) -> list[Path]:
    """csrc's translation units: the op declarations and shared code, the CPU backend, and with
    CUDA its .cpp (torch-facing registrations) and .cu (kernels); .cuh and .h are included, not built."""
    found = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if with_cuda:
        found += sorted((CSRC / "cuda").glob("*.cpp")) + sorted((CSRC / "cuda").glob("*.cu"))
    return found


def compile_args(with_cuda: bool, *, colour: bool = False) -> dict[str, list[str]]:
    """{"cxx": flags[, "nvcc": flags]}; colour: the compiler's diagnostics in colour (for a
    terminal, not for an error message kept as text)."""
    cxx = CXX_FLAGS + (["-fdiagnostics-color=always"] if colour else [])
    if not with_cuda:
        return {"cxx": cxx}
    return {"cxx": cxx + [CUDA_DEFINE], "nvcc": list(NVCC_FLAGS)}
