"""Loads the compiled recon_fast library, so that torch.ops.recon_fast.* are registered and its
Python module (the eager hot path's direct launchers) is at hand as `module`; and `CompiledOp`, the
one answer to which backend serves an op on a device.

Order: the extension installed with the package (`recon_fast._C`); else a JIT build of csrc/
with torch.utils.cpp_extension.load (the sources and flags of build_config.py, as setup.py's),
cached under ~/.cache/recon_fast (a source checkout used without `pip install`), imported as the
module `recon_fast_C`; else nothing, and the ops' faces (token_stats.py, attention_stats.py) fall
back to plain PyTorch. A library whose ops write other channels than stats_tables.py lists (built
from other sources) is not used either. Import never fails: why the compiled library is missing
is kept in `load_error` and said once, in a warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from recon_fast.kernels import build_config, stats_tables

log = logging.getLogger(__name__)

loaded_from: str | None = None  # "extension", "jit" or None
load_error: str | None = None
module: ModuleType | None = None  # recon_fast._C, or the JIT build's recon_fast_C

# The devices the library has kernels for: device type -> (the dispatch key its kernels register
# under, the name `backend()` gives that kernel). Any other device type (meta, mps ...) takes the
# plain-PyTorch fallback.
_KERNEL_DEVICES = {"cpu": ("CPU", "cpp"), "cuda": ("CUDA", "cuda")}


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    with_cuda = build_config.want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    args = build_config.compile_args(with_cuda)
    build_dir = Path(os.environ.get("RECON_FAST_JIT_DIR", Path.home() / ".cache" / "recon_fast"))
    build_dir = build_dir / f"torch{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="recon_fast_C",
        sources=[str(p) for p in build_config.sources(with_cuda)],
        extra_cflags=args["cxx"],
        extra_ldflags=build_config.LINK_FLAGS,
        extra_cuda_cflags=args.get("nvcc"),
        build_directory=str(build_dir),
        is_python_module=True,  # the direct launchers live in the module (csrc/ops.cpp)
        verbose=False,
    )


def _refusal(library: ModuleType) -> str | None:
    """Why `library` cannot serve the ops' faces: its channels differ from stats_tables.py's
    (a library built before it reported them is taken as it is)."""
    if not hasattr(library, "channel_names"):
        return None
    return stats_tables.library_mismatch(library.channel_names())


def load() -> None:
    """Loads the library once; records where it came from or why it could not be loaded."""
    global loaded_from, load_error, module
    if loaded_from is not None or load_error is not None:
        return
    try:
        from recon_fast import _C  # importing registers the ops

        found, source = _C, "extension"
    except ImportError as exc:
        found, source = None, None
        extension_error = f"recon_fast._C is not built ({exc})"
    if found is None:
        if os.environ.get("RECON_FAST_NO_JIT") == "1" or not build_config.CSRC.is_dir():
            load_error = extension_error + "; JIT build disabled or csrc/ absent"
            return
        try:
            found, source = _jit_build(), "jit"
        except Exception as exc:  # a compiler error must not make `import recon_fast` fail
            load_error = f"{extension_error}; JIT build failed: {exc}".strip()
            log.debug("recon_fast JIT build failed", exc_info=True)
            return
    refused = _refusal(found)
    if refused is not None:
        # Its ops stay registered with torch, but no face calls them: their outputs would not be
        # what the tables name.
        load_error = f"the compiled library ({found.__file__}) is not used: {refused}"
        return
    module, loaded_from = found, source


class CompiledOp:
    """One op of the library as its Python face sees it: whether a kernel serves a dispatch key
    (asked once per key: the tracer's hooks call ops thousands of times per pass), which backend
    that makes on a device, and the one-time warning when the plain-PyTorch fallback serves
    instead. Made after the library is loaded (it loads it); asks every key at once, so that
    torch.compile finds the answers cached (it cannot trace the dispatcher query)."""

    def __init__(self, qualified_name: str, fallback_cost: str):
        load()
        self.qualified_name = qualified_name  # "recon_fast::token_stats"
        self.fallback_cost = fallback_cost  # what the fallback costs, for the warning
        self.registered: dict[str, bool] = {}
        self.warned: set[str] = set()
        for key, _ in _KERNEL_DEVICES.values():
            self.has_kernel(key)

    def has_kernel(self, dispatch_key: str) -> bool:
        known = self.registered.get(dispatch_key)
        if known is None:
            known = loaded_from is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
                self.qualified_name, dispatch_key
            )
            self.registered[dispatch_key] = known
        return known

    def serves(self, device_type: str) -> bool:
        """Whether a compiled kernel serves tensors on `device_type` (else the fallback does).
        The op's hot path: two dictionary lookups once the key was asked."""
        known = _KERNEL_DEVICES.get(device_type)
        return known is not None and self.has_kernel(known[0])

    def backend(self, device: torch.device | str = "cpu") -> str:
        """Which implementation the op uses on `device`: "cpp", "cuda" or "torch" (the fallback)."""
        known = _KERNEL_DEVICES.get(torch.device(device).type)
        return known[1] if known is not None and self.has_kernel(known[0]) else "torch"

    def warn_fallback_once(self, device_type: str) -> None:
        """Warns, once per device type, at the caller of the op's Python face."""
        if device_type in self.warned:
            return
        self.warned.add(device_type)
        why = load_error or f"the library was built without a {device_type} kernel"
        name = self.qualified_name.replace("::", ".")
        warnings.warn(f"{name} is using the plain-PyTorch fallback on {device_type} ({self.fallback_cost}): {why}",
                      RuntimeWarning, stacklevel=3)
