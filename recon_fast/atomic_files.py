"""Files written whole or not at all, wherever recon-fast writes one (cubes, reports, pages,
dataset shards): the bytes go to a temporary file beside the target, are flushed to disk and
renamed over it only when complete, so a crash leaves the previous file or none. A SIGTERM during
the write removes the temporary file before the process dies of it; one left by a SIGKILL or a
power cut (`.<name>.XXXXXXXX.tmp`) is removed by the next write to the same path, provided it is
older than the process doing that write (a younger one may be another write in flight).
check_writable says before any work whether a path could be written at all."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back
_IMPORTED = time.time()


def check_writable(path: str | os.PathLike) -> None:
    """ValueError (one line) if a file could not be written at `path`: an empty name, a directory,
    or a folder that cannot be created or written in. Probes with a temporary file it removes, so
    nothing is left behind and missing folders are not created yet."""
    if not str(path).strip():
        raise ValueError("the output path is empty")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; name a file in it, e.g. {str(path / 'cube.json')!r}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: {str(existing)!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=existing)
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {exc.strerror or exc} in {str(existing)!r}") from None
    os.close(fd)
    os.unlink(probe)


# ---- temporary files: removed on SIGTERM, and when stale ------------------------------------------
_in_flight: set[str] = set()
_lock = threading.Lock()
_previous_sigterm = None  # the handler ours replaced while a write is in flight


def _remove_in_flight() -> None:
    for tmp in list(_in_flight):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _in_flight.clear()


atexit.register(_remove_in_flight)


def _on_sigterm(signum, frame) -> None:
    """Removes in-flight temporary files, then lets SIGTERM do what it would have done."""
    _remove_in_flight()
    previous = _previous_sigterm
    signal.signal(signum, previous)
    if callable(previous):
        previous(signum, frame)
    else:  # SIG_DFL: die of the signal, as without us
        os.kill(os.getpid(), signum)


def _track(tmp: str) -> None:
    global _previous_sigterm
    with _lock:
        if not _in_flight and threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGTERM)
            # Only a handler we can put back (not SIG_IGN: then SIGTERM kills nothing; not one set from C).
            if current is signal.SIG_DFL or (callable(current) and current is not _on_sigterm):
                _previous_sigterm = current
                signal.signal(signal.SIGTERM, _on_sigterm)
        _in_flight.add(tmp)


def _untrack(tmp: str) -> None:
    global _previous_sigterm
    with _lock:
        _in_flight.discard(tmp)
        if (not _in_flight and _previous_sigterm is not None
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is _on_sigterm):
            signal.signal(signal.SIGTERM, _previous_sigterm)
            _previous_sigterm = None


def process_start_time() -> float:
    """When this process started (epoch seconds): from /proc where there is one, else when this
    module was imported. Measured back from now by the uptime, not from /proc/stat's btime: btime
    is whole seconds, so a temporary written by a run killed less than a second before this one
    started would count as this run's and be kept (the dataset chaos tests found it)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes `.<name>.XXXXXXXX.tmp` files of `path` (this module's own pattern) last written
    before this process started: their export died. Returns what was removed."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    started = process_start_time()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < started:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _track(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make exports private to their writer
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _untrack(tmp)
