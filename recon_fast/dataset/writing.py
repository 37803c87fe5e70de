"""Every file a dataset run writes goes through `atomic_write` here: atomic_files' (temporary +
rename, so a killed run never leaves half a file under a real name), plus two things a run over
hours needs.

A failed write names its file: a full disk gives one WriteFailed line ("no space left on device
writing DIR/activations/rank0/part-00003.parquet ...") instead of pyarrow's or Python's bare
`[Errno 28] No space left on device`, which says neither where nor what to do. The shards already
committed stay as they are, so `--resume` continues once there is space.

Test-only fault injection (RECON_FAST_DATASET_FAULT), as a crash or a preempted node would kill a
run (tests/test_dataset.py, tests/test_chaos_dataset.py):
  kill:RANK:SHARD     SIGKILL that rank right after it commits that shard;
  kill-at-byte:RANK:N SIGKILL that rank once it has written N bytes into the run's files (shards,
                      profile.json, manifest.json, in the order the run writes them), in the
                      middle of a temporary file when N falls inside one: the moments a crash
                      leaves the most debris.
Unset (every real run), the only cost is reading one environment variable once."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from recon_fast.atomic_files import atomic_write as _atomic_write

FAULT_ENV = "RECON_FAST_DATASET_FAULT"
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's, as atomic_write names them


class WriteFailed(OSError):
    """A dataset file could not be written (full disk, no permission, ...): one line naming it."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        full = cause.errno == errno.ENOSPC
        what = "no space left on device" if full else (cause.strerror or str(cause)).lower()
        self.message = (f"{what} writing {path}: the shards committed before it are kept; "
                        f"{'free space' if full else 'fix that'}, then run again with --resume")

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """atomic_files.atomic_write for a dataset file: any OSError becomes WriteFailed naming `path`."""
    try:
        with _atomic_write(path) as f:
            yield f if _fault() is None else _Counted(f)
    except WriteFailed:
        raise
    except OSError as exc:
        raise WriteFailed(path, exc) from exc


def remove_temporaries(folders: list[Path], names: tuple[str, ...] | None = None) -> None:
    """Removes the temporaries (".NAME.XXXXXXXX.tmp", atomic_write's) a killed run left in
    `folders` (only those of `names`, when given). Called before a run writes anything, so
    whatever temporary is there is a dead run's: atomic_files' own clean-up keeps one written less
    than a second before the process started (its start time is from the boot time, in whole
    seconds), and a run restarted right after a kill (torchrun's restarts, a job loop) is exactly that."""
    for folder in folders:
        for path in folder.glob(".*.tmp") if folder.is_dir() else ():
            match = _TEMPORARY.fullmatch(path.name)
            if match and (names is None or match[1] in names):
                path.unlink(missing_ok=True)


def after_commit(rank: int, shard: int) -> None:
    """Called once a shard is committed: the kill:RANK:SHARD fault fires here."""
    if _fault() == ("kill", rank, shard):
        _die()


@functools.cache
def _fault() -> tuple[str, int, int] | None:
    """The fault this process is to suffer, or None; read once (a malformed value is an error:
    a test that meant to inject a fault must not pass silently without one)."""
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    kind, rank, at = (value.split(":") + ["", "", ""])[:3]
    if kind not in ("kill", "kill-at-byte") or not rank.isdigit() or not at.isdigit():
        raise ValueError(f"{FAULT_ENV}={value!r}: expected kill:RANK:SHARD or kill-at-byte:RANK:BYTES")
    return kind, int(rank), int(at)


def _this_rank() -> int:
    return int(os.environ.get("RANK", 0))  # torchrun's; no process group is needed to know it


class _Counted:
    """A file object that counts the bytes written through it (per process) and dies at the
    kill-at-byte fault's byte, after writing (and flushing) the part of the data before it."""
    written = 0

    def __init__(self, f: IO[bytes]):
        self._f = f

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        kind, rank, at = _fault()
        if kind == "kill-at-byte" and rank == _this_rank() and _Counted.written + size > at:
            self._f.write(memoryview(data).cast("B")[:at - _Counted.written])
            self._f.flush()  # into the temporary, as the kernel holds a killed process's writes
            _die()
        _Counted.written += size
        return self._f.write(data)

    def __getattr__(self, name):  # flush, tell, closed, fileno...: the file's own
        return getattr(self._f, name)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
