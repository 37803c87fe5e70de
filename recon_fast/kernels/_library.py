"""Loads the compiled recon_fast library, so that torch.ops.recon_fast.* are registered and its
Python module (the eager hot path's direct launchers) is at hand as `module`.

Order: the extension installed with the package (`recon_fast._C`); else a JIT build of csrc/
with torch.utils.cpp_extension.load, cached under ~/.cache/recon_fast (a source checkout used
without `pip install`), imported as the module `recon_fast_C`; else nothing, and
recon_fast.kernels.ops falls back to plain PyTorch. Import never fails: why the compiled library
is missing is kept in `load_error` and said once, in a warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parents[2] / "csrc"

loaded_from: str | None = None  # "extension", "jit" or None
load_error: str | None = None
module: ModuleType | None = None  # recon_fast._C, or the JIT build's recon_fast_C


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    sources += sorted(str(p) for p in (_CSRC / "cpu").glob("*.cpp"))
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    cflags = ["-O3", "-fopenmp"]  # -fopenmp and no -std: see setup.py
    if with_cuda:
        sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cpp"))
        sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu"))
        cflags.append("-DRECON_FAST_WITH_CUDA")
    build_dir = Path(os.environ.get("RECON_FAST_JIT_DIR", Path.home() / ".cache" / "recon_fast"))
    build_dir = build_dir / f"torch{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="recon_fast_C",
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        is_python_module=True,  # the direct launchers live in the module (csrc/ops.cpp)
        verbose=False,
    )


def load() -> None:
    """Loads the library once; records where it came from or why it could not be loaded."""
    global loaded_from, load_error, module
    if loaded_from is not None or load_error is not None:
        return
    try:
        from recon_fast import _C  # importing registers the ops

        module, loaded_from = _C, "extension"
        return
    except ImportError as exc:
        extension_error = f"recon_fast._C is not built ({exc})"
    if os.environ.get("RECON_FAST_NO_JIT") == "1" or not _CSRC.is_dir():
        load_error = extension_error + "; JIT build disabled or csrc/ absent"
        return
    try:
        module = _jit_build()
        loaded_from = "jit"
    except Exception as exc:  # a compiler error must not make `import recon_fast` fail
        load_error = f"{extension_error}; JIT build failed: {exc}".strip()
        log.debug("recon_fast JIT build failed", exc_info=True)


class CompiledOp:
    """One op of the library as its Python face sees it: whether a kernel serves a dispatch key
    (asked once per key: the tracer's hooks call ops thousands of times per pass), and the
    one-time warning when the plain-PyTorch fallback serves instead."""

    def __init__(self, qualified_name: str, fallback_cost: str):
        self.qualified_name = qualified_name  # "recon_fast::token_stats"
        self.fallback_cost = fallback_cost  # what the fallback costs, for the warning
        self.registered: dict[str, bool] = {}
        self.warned: set[str] = set()

    def has_kernel(self, dispatch_key: str) -> bool:
        known = self.registered.get(dispatch_key)
        if known is None:
            known = loaded_from is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
                self.qualified_name, dispatch_key
            )
            self.registered[dispatch_key] = known
        return known

    def warn_fallback_once(self, device_type: str) -> None:
        """Warns, once per device type, at the caller of the op's Python face."""
        if device_type in self.warned:
            return
        self.warned.add(device_type)
        why = load_error or f"the library was built without a {device_type} kernel"
        name = self.qualified_name.replace("::", ".")
        warnings.warn(f"{name} is using the plain-PyTorch fallback on {device_type} ({self.fallback_cost}): {why}",
                      RuntimeWarning, stacklevel=3)

