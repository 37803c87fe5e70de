"""token_stats: every row of an activation reduced to its statistics (TOKEN_STATS_TABLE: energy,
mean, std, min, max) in one read.

The op is declared in csrc/ops.cpp and implemented per backend (csrc/cpu, csrc/cuda); this module
is its typed Python face, its fake (meta) implementation for torch.compile, and the plain-PyTorch
reference `token_stats_ref`, which tests compare against and which serves when the compiled
library is missing. The tracer's row writes (token_stats_rows, token_stats_rows_grouped) also have
direct launchers, pybind11 functions that reach the same kernels without the dispatcher: the eager
hot path (called by the hooks' C++ TokenStatsRecorder); the ops stay what torch.compile, fake
tensors and opcheck see.
"""

from __future__ import annotations

import warnings

import torch

from recon_fast.kernels import _library
from recon_fast.kernels.stats_tables import TOKEN_STATS_TABLE

# The channels of token_stats' last dimension, in order: the table's names.
STATS: tuple[str, ...] = TOKEN_STATS_TABLE.names
NUM_STATS = len(TOKEN_STATS_TABLE)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Registrations are fixed once the library is loaded; the tracer calls token_stats once per hook,
# so the dispatcher lookup is answered once per dispatch key.
_COMPILED = _library.CompiledOp("recon_fast::token_stats", "slower, several passes over memory")
_GROUPED = _library.CompiledOp("recon_fast::token_stats_rows_grouped", "one call per tensor")


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation token_stats uses on `device`: "cpp", "cuda" or "torch" (fallback)."""
    return _COMPILED.backend(device)


def compiled_serves(device_type: str) -> bool:
    """Whether the compiled token_stats serves tensors on this device type (backend() != "torch"),
    with two dictionary lookups: no torch.device is made."""
    return _COMPILED.serves(device_type)


def cpu_kernel() -> str:
    """The CPU kernel variant that would run now ("avx2" or "default"), or "torch" without one."""
    if backend("cpu") != "cpp":
        return "torch"
    return torch.ops.recon_fast.cpu_kernel()


def stats_shape(x_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of token_stats' result for an input of `x_shape`: x_shape[:-1] + (NUM_STATS,)."""
    return tuple(x_shape[:-1]) + (NUM_STATS,)


@TOKEN_STATS_TABLE.documented
def token_stats(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row statistics of x over its last dimension, in one read of x.

    x:   floating tensor [..., D] (float32, float64, float16, bfloat16), CPU or CUDA, any strides
         (fastest when the last dim is contiguous).
    out: optional float32 tensor [..., NUM_STATS] on x's device, written in place (it may be a
         slice of a larger buffer); allocated when None.
    Returns float32 [..., NUM_STATS], its channels (`STATS` names them):
        {channels}
    Accumulates in float32 (float64 for float64 input), so, as with torch's float32 reductions,
    magnitudes below ~1e-19 (whose squares underflow) or above ~1e19 (whose squares overflow)
    lose the std/energy. Runs on the current CUDA stream without synchronising.
    """
    if out is None:
        out = torch.empty(stats_shape(x.shape), dtype=torch.float32, device=x.device)
    if _COMPILED.serves(x.device.type):
        torch.ops.recon_fast.token_stats(x, out)
    else:
        _COMPILED.warn_fallback_once(x.device.type)
        _check_args(x, out)
        out.copy_(token_stats_ref(x))
    return out


def _direct_devices() -> frozenset[str]:
    """Device types whose tensors the library's direct launchers take (none with a library built
    before they existed, or without one)."""
    module = _library.module
    if module is None or not hasattr(module, "token_stats_rows_grouped_into"):
        return frozenset()
    return frozenset(["cpu"] + (["cuda"] if module.with_cuda else []))


_DIRECT_DEVICES = _direct_devices()


# The cube's read of the arena's host rows in one call (the library's copy_stat_columns), or None
# without a library that has it: then numpy does it (recon_fast/trace/stats_capture.py).
copy_stat_columns = getattr(_library.module, "copy_stat_columns", None)


def direct_available(device_type: str) -> bool:
    """Whether token_stats_rows_into and token_stats_rows_grouped_into serve tensors on this
    device type (then the eager hook path calls them instead of the ops)."""
    return device_type in _DIRECT_DEVICES and _COMPILED.serves(device_type)  # backend() != "torch", no torch.device made


def _token_stats_rows_via_op(x: torch.Tensor, buffer: torch.Tensor, row0: int) -> None:
    """token_stats_rows_into without the direct launcher: the op, or the plain-PyTorch fallback."""
    if _COMPILED.serves(x.device.type):
        torch.ops.recon_fast.token_stats_rows(x, buffer, row0)
    else:
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        token_stats(x, out=buffer[row0 : row0 + rows].view(*x.shape[:-1], NUM_STATS))


def token_stats_rows_grouped(xs: list[torch.Tensor], buffer: torch.Tensor, row0s: list[int]) -> None:
    """token_stats_rows of every xs[i] at row0s[i] in one launch (one parallel loop on the CPU,
    one kernel per kind of row on CUDA): xs [..., D_i] of any float dtypes, their rows not
    overlapping, buffer a contiguous float32 [N, NUM_STATS] tensor on their device. In eager mode the
    direct launcher where direct_available(device); under torch.compile and elsewhere the op
    recon_fast::token_stats_rows_grouped, or the fallback (one token_stats per tensor) without it."""
    device_type = buffer.device.type
    if _grouped_into is not None and device_type in _DIRECT_DEVICES and not torch.compiler.is_compiling():
        _grouped_into(xs, buffer, row0s)
    elif _GROUPED.serves(buffer.device.type):
        torch.ops.recon_fast.token_stats_rows_grouped(xs, buffer, row0s)
    else:
        if len(xs) != len(row0s):
            raise RuntimeError(_length_error(xs, row0s))
        for x, row0 in zip(xs, row0s):
            _token_stats_rows_via_op(x, buffer, row0)


def _length_error(xs, row0s) -> str:
    return f"token_stats_rows_grouped: xs has {len(xs)} tensors but row0s has {len(row0s)} rows"


# token_stats_rows_into(x, buffer, row0) -> None and token_stats_rows_grouped_into(xs, buffer, row0s)
# -> None: the direct launchers (csrc/token_stats_direct.cpp; their docstrings in csrc/ops.cpp),
# for eager calls on devices where direct_available(). The same work, checks and messages as
# recon_fast::token_stats_rows(x [..., D], buffer [N, NUM_STATS], row0) and token_stats_rows_grouped, the
# CUDA kernels on the current stream, without the dispatcher (0.5-1 us a call against 1.3-2.5). They
# are the pybind11 functions themselves: a Python wrapper would cost a frame per hook call. Under
# torch.compile they would break the graph: call the ops there. Without a library that has them,
# token_stats_rows_into is the op (or the fallback) and token_stats_rows_grouped_into is absent.
_grouped_into = None
if _DIRECT_DEVICES:
    token_stats_rows_into = _library.module.token_stats_rows_into
    token_stats_rows_grouped_into = _grouped_into = _library.module.token_stats_rows_grouped_into
else:
    token_stats_rows_into = _token_stats_rows_via_op

# TokenStatsRecorder(arena, fallback, group_ends, eager, grouped): the hooks' eager path for one
# traced pass in C++ (csrc/token_stats_recorder.h), which calls the direct launchers above itself;
# recon_fast.trace.stats_capture.session_recorder makes one. None with a library built before it.
TokenStatsRecorder = getattr(_library.module, "Recorder", None) if _DIRECT_DEVICES else None


if _library.loaded_from is not None:

    @torch.library.register_fake("recon_fast::token_stats")
    def _token_stats_fake(x: torch.Tensor, out: torch.Tensor) -> None:
        # The op only writes `out` in place. The checks run here too, so that torch.compile and
        # meta tensors reject what the kernels would.
        _check_args(x, out)

    @torch.library.register_fake("recon_fast::token_stats_rows")
    def _token_stats_rows_fake(x: torch.Tensor, buffer: torch.Tensor, row0: int) -> None:
        # Writes rows of `buffer` in place; nothing to allocate.
        return None

    @torch.library.register_fake("recon_fast::token_stats_rows_grouped")
    def _token_stats_rows_grouped_fake(xs: list[torch.Tensor], buffer: torch.Tensor, row0s: list[int]) -> None:
        # Writes rows of `buffer` in place; nothing to allocate. The lengths are known while
        # tracing (row0s' values may be symbolic).
        if len(xs) != len(row0s):
            raise RuntimeError(_length_error(xs, row0s))


def _check_args(x: torch.Tensor, out: torch.Tensor) -> None:
    """The compiled op's argument checks, for the fallback path (same conditions, same words)."""
    if x.dim() < 1:
        raise RuntimeError("token_stats: x must have at least one dimension (the one reduced)")
    if x.is_complex():
        raise RuntimeError(f"token_stats: complex x is not supported, got {x.dtype}")
    if x.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            "token_stats: x must be a floating tensor (float32, float64, float16, bfloat16), "
            f"got {x.dtype}"
        )
    if x.shape[-1] == 0:
        raise RuntimeError("token_stats: the last dimension of x is empty (size 0)")
    if out.dtype != torch.float32:
        raise RuntimeError(f"token_stats: out must be float32, got {out.dtype}")
    if out.device != x.device:
        raise RuntimeError(f"token_stats: out is on {out.device} but x is on {x.device}")
    if tuple(out.shape) != stats_shape(x.shape):
        raise RuntimeError(
            f"token_stats: out must have shape {list(x.shape[:-1])} + [{NUM_STATS}] for x of shape "
            f"{list(x.shape)}, got {list(out.shape)}"
        )


def token_stats_ref(x: torch.Tensor, *, float64: bool = False) -> torch.Tensor:  # [..., D] -> [..., NUM_STATS]
    """Plain-PyTorch token_stats: the reference for tests and the fallback.

    Computes in float64 for float64 input and float32 otherwise, and returns float32, as
    token_stats does. float64=True computes in float64 whatever the input and returns float64:
    the independent reference the tests hold the kernels to. Several passes over memory.
    """
    acc = torch.float64 if float64 or x.dtype == torch.float64 else torch.float32
    stats = TOKEN_STATS_TABLE.stack(_reference_channels(x.to(acc)), by="token_stats_ref")
    return stats if float64 else stats.to(torch.float32)


def _reference_channels(xf: torch.Tensor) -> dict[str, torch.Tensor]:  # [..., D] -> {name: [...]}
    """Each statistic of TOKEN_STATS_TABLE over the last dimension of xf, by name, in xf's dtype."""
    with warnings.catch_warnings():
        # D == 1: torch.std warns about zero degrees of freedom and returns NaN, which we keep.
        warnings.simplefilter("ignore", UserWarning)
        std = xf.std(dim=-1, correction=1)
    lo, hi = torch.aminmax(xf, dim=-1)
    return {"energy": torch.linalg.vector_norm(xf, dim=-1), "mean": xf.mean(dim=-1), "std": std, "min": lo, "max": hi}
