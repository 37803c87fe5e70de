"""The one error for "this file is not a readable cube / profile / shard / manifest": a ValueError
(the CLI prints it as one line) that carries the path, the format expected and the first problem
found, so a user with a thousand files knows which one is damaged and what is wrong with it.

Parsers fail in many ways (orjson, gzip, zipfile, numpy, pyarrow, a KeyError on a missing key, a
shape that does not match): `reading(path, expected)` turns any of them into this one error."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class FileFormatError(ValueError):
    """`path` is not a readable `expected` (e.g. "recon-fast cube (.npz)"): `problem` says why."""

    def __init__(self, path: str | os.PathLike, expected: str, problem: str):
        self.path = str(path)
        self.expected = expected
        self.problem = problem
        super().__init__(f"{self.path!r} is not a readable {expected}: {problem}")


def describe(exc: BaseException) -> str:
    """An exception as a short one-line problem: its first line, the type when that says more."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KeyError):
        return f"missing entry {text}"
    if isinstance(exc, MemoryError):
        return "it declares more data than fits in memory (damaged sizes)"
    text = text[:200] + ("..." if len(text) > 200 else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, expected: str) -> Iterator[None]:
    """Any failure to parse or interpret `path` inside the block becomes one FileFormatError.
    A missing file stays FileNotFoundError (nothing is damaged); KeyboardInterrupt and the like
    pass through untouched."""
    try:
        yield
    except (FileFormatError, FileNotFoundError, IsADirectoryError):
        raise
    except Exception as exc:  # parsers raise anything (MemoryError on a damaged size too): that is the point
        raise FileFormatError(path, expected, describe(exc)) from exc
