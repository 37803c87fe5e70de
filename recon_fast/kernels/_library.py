"""Loads the compiled recon_fast library, so that torch.ops.recon_fast.* are registered.

Order: the extension installed with the package (`recon_fast._C`); else a JIT build of csrc/
with torch.utils.cpp_extension.load, cached under ~/.cache/recon_fast (a source checkout used
without `pip install`); else nothing, and recon_fast.kernels.ops falls back to plain PyTorch. Import never
fails: why the compiled library is missing is kept in `load_error` and said once, in a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parents[2] / "csrc"

loaded_from: str | None = None  # "extension", "jit" or None
load_error: str | None = None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    sources += sorted(str(p) for p in (_CSRC / "cpu").glob("*.cpp"))
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    cflags = ["-O3", "-std=c++17", "-fopenmp"]  # -fopenmp: see setup.py
    if with_cuda:
        sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.c*"))
        cflags.append("-DRECON_FAST_WITH_CUDA")
    build_dir = Path(os.environ.get("RECON_FAST_JIT_DIR", Path.home() / ".cache" / "recon_fast"))
    build_dir = build_dir / f"torch{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="recon_fast_C",
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def load() -> None:
    """Loads the library once; records where it came from or why it could not be loaded."""
    global loaded_from, load_error
    if loaded_from is not None or load_error is not None:
        return
    try:
        from recon_fast import _C  # noqa: F401  (importing registers the ops)

        loaded_from = "extension"
        return
    except ImportError as exc:
        extension_error = f"recon_fast._C is not built ({exc})"
    if os.environ.get("RECON_FAST_NO_JIT") == "1" or not _CSRC.is_dir():
        load_error = extension_error + "; JIT build disabled or csrc/ absent"
        return
    try:
        _jit_build()
        loaded_from = "jit"
    except Exception as exc:  # a compiler error must not make `import recon_fast` fail
        load_error = f"{extension_error}; JIT build failed: {exc}".strip()
        log.debug("recon_fast JIT build failed", exc_info=True)
