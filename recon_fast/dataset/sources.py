"""Where a dataset's documents come from: JSONL (one object per line, text under --text-field),
plain text (one document per line, or a folder of .txt files, one document each), Parquet (a text
column), a Hugging Face `datasets` Dataset (optional import: only when the user hands one in) or
any iterable of strings. Each yields (source_row, text) in the source's own order, lazily."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def describe(source) -> str:
    """A short name of the source for the manifest's provenance."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).resolve())
    return type(source).__name__


def check_source(source, text_field: str = "text") -> None:
    """ValueError (one line) if `source` is a path that cannot be read as documents; found before
    any model loads."""
    if not isinstance(source, (str, os.PathLike)):
        return
    path = Path(source)
    if not path.exists():
        raise ValueError(f"--data {str(path)!r}: no such file or folder")
    if path.is_dir():
        if not any(p.suffix in TEXT_SUFFIXES for p in path.iterdir()):
            raise ValueError(f"--data {str(path)!r}: a folder must hold .txt files (one document each)")
        return
    name = path.name.lower()
    if not name.endswith((*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)):
        raise ValueError(f"--data {str(path)!r}: unknown kind of file; use .jsonl, .txt (one document per line), "
                         ".parquet or a folder of .txt files")
    if name.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
            raise ValueError(f"--data {str(path)!r}: not a readable Parquet file ({_first_line(exc)})") from None
        if text_field not in names:
            raise ValueError(f"--data {str(path)!r} has no column {text_field!r} (it has {names}); "
                             "name the text column with --text-field")


def documents(source, text_field: str = "text") -> Iterator[tuple[int, str]]:
    """(source_row, text) for every document of `source`, in order. A row whose text is missing
    (JSONL or Parquet) is an error naming it; blank lines of a text file are not documents."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.name.lower()
        if path.is_dir():
            return _text_files(path)
        if name.endswith(PARQUET_SUFFIXES):
            return _parquet(path, text_field)
        if name.endswith(JSONL_SUFFIXES):
            return _jsonl(path, text_field)
        return _text_lines(path)
    return _iterable(source, text_field)


def count(source) -> int | None:
    """How many documents `source` holds, where that is cheap to know without tokenizing: a
    sized iterable, a Parquet file's metadata, a folder's .txt files, a text or JSONL file's
    non-blank lines (one pass over the file); None for an iterator of unknown length."""
    if not isinstance(source, (str, os.PathLike)):
        try:
            return len(source)
        except TypeError:
            return None
    path = Path(source)
    name = path.name.lower()
    if path.is_dir():
        return len(_text_files_in(path))
    if name.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if name.endswith(".gz"):
        return None  # a second decompression pass would cost as much as reading the documents
    with open(path, encoding="utf-8") as f:  # as the readers split and skip lines (universal newlines)
        return sum(1 for line in f if line.strip())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f):
            line = line.rstrip("\n")
            if line.strip():
                yield row, line


def _text_files_in(folder: Path) -> list[Path]:
    """A folder's documents: its .txt files, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file())


def _text_files(folder: Path) -> Iterator[tuple[int, str]]:
    files = _text_files_in(folder)
    for row, file in enumerate(files):
        yield row, file.read_text(encoding="utf-8")


def _jsonl(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    opener = open
    if path.name.lower().endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {row + 1} is not JSON ({exc.msg})") from None
            yield row, _field(record, text_field, f"{path}: line {row + 1}")


def _parquet(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise ValueError(f"{path}: row {row} has no {text_field!r}")
            yield row, text
            row += 1


def _iterable(source: Iterable, text_field: str) -> Iterator[tuple[int, str]]:
    # A HF datasets Dataset iterates as dicts; taking the column first reads only that column.
    column_names = getattr(source, "column_names", None)
    if isinstance(column_names, list) and text_field in column_names and hasattr(source, "select_columns"):
        source = source.select_columns([text_field])
    for row, item in enumerate(source):
        yield row, item if isinstance(item, str) else _field(item, text_field, f"item {row}")


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where} has no text under {text_field!r} (found {keys}); name it with --text-field")
    return record[text_field]
