"""Peak resident memory of one piece of work, for the benchmarks that measure it in a fresh
subprocess. Linux only: /proc/self/status's VmHWM, reset to the current resident size through
/proc/self/clear_refs, so a peak reached before (imports, loading a model) does not count.
(getrusage's ru_maxrss cannot be reset and survives fork + exec: a subprocess of a pytest
process that holds a model reports the parent's peak.)"""

from __future__ import annotations

import ctypes


def status(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak() -> int:
    """Gives freed heap back to the system and sets the peak to what is resident now; returns it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def peak() -> int:
    """The highest resident size since the last reset_peak() (or the process's start)."""
    return status("VmHWM")
