"""Build logic only (metadata lives in pyproject.toml): the recon_fast._C extension.

The CPU kernels are always built. The CUDA kernels are built when the installed torch is a CUDA
build and a CUDA toolkit is found; RECON_FAST_CUDA=1 forces them (and fails loudly without a
toolkit), RECON_FAST_CUDA=0 skips them. The sources and flags are recon_fast/kernels/build_config.py's,
which the JIT build of a source checkout uses too. Build against the installed torch:
    pip install --no-build-isolation -e .
"""

import importlib.util
from pathlib import Path

from setuptools import setup

# Resolved, as build_config.CSRC is: sources are made relative to it (a symlinked checkout).
ROOT = Path(__file__).resolve().parent


def _build_config():
    # By path: the package is not importable while it is being built (and its __init__ would
    # load the very library being built).
    path = ROOT / "recon_fast" / "kernels" / "build_config.py"
    spec = importlib.util.spec_from_file_location("recon_fast_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    config = _build_config()
    with_cuda = config.want_cuda(torch.version.cuda, CUDA_HOME)
    sources = [str(p.relative_to(ROOT)) for p in config.sources(with_cuda)]
    extension = CUDAExtension if with_cuda else CppExtension
    return [
        extension(
            "recon_fast._C",
            sources,
            extra_compile_args=config.compile_args(with_cuda, colour=True),
            extra_link_args=config.LINK_FLAGS,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
