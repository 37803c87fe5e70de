"""Build logic only (metadata lives in pyproject.toml): the recon_fast._C extension.

The CPU kernels are always built. The CUDA kernels are built when the installed torch is a CUDA
build and a CUDA toolkit is found; RECON_FAST_CUDA=1 forces them (and fails loudly without a
toolkit), RECON_FAST_CUDA=0 skips them. Build against the installed torch:
    pip install --no-build-isolation -e .
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _want_cuda(torch_cuda_version, cuda_home):
    forced = os.environ.get("RECON_FAST_CUDA")
    if forced == "0":
        return False
    if forced == "1":
        if not cuda_home:
            raise RuntimeError("RECON_FAST_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return bool(torch_cuda_version and cuda_home)


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    # -fopenmp: at::parallel_for is a header template; without it the loop runs on one thread.
    # No -std: torch's cpp_extension picks the standard its own headers need (C++20 from 2.13 on;
    # torch 2.14's headers do not compile as C++17).
    cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    link_flags = ["-fopenmp"]
    if _want_cuda(torch.version.cuda, CUDA_HOME):
        # .cpp (torch-facing registrations) and .cu (kernels); .cuh and .h are included, not built.
        cuda_sources = sorted((CSRC / "cuda").glob("*.cpp")) + sorted((CSRC / "cuda").glob("*.cu"))
        sources += [str(p.relative_to(ROOT)) for p in cuda_sources]
        nvcc_flags = ["-O3", "-lineinfo"]
        return [
            CUDAExtension(
                "recon_fast._C",
                sources,
                extra_compile_args={"cxx": cxx_flags + ["-DRECON_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [
        CppExtension(
            "recon_fast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
