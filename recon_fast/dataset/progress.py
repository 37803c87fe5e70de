"""A dataset run's progress: one bar per rank (documents, tokens/s, ETA) on rank 0's terminal.

Each rank writes its counts to DIR/.progress/rank{r}.json (a few bytes, at most a few times a
second, by rename so a reader never sees half a file); rank 0 redraws one bar per rank from those
files on a background thread, so the bars of ranks running ahead of or behind rank 0 keep moving.
Files, not collectives: a collective per update would make every rank wait for the slowest. Where
the folder is not shared (nodes without a common file system) rank 0 shows the ranks it can see.

Shown when stderr is a terminal (progress=None) or when asked (progress=True); never in CI logs.
The ETA needs the number of documents, counted from the source when that is cheap (a sized
iterable, Parquet metadata, the lines of a text or JSONL file); each rank's bar assumes an equal
share. The .progress folder is removed when the run ends."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

FOLDER = ".progress"
WRITE_EVERY_S = 0.25  # a rank's file is rewritten at most this often: a few bytes, negligible I/O
REDRAW_EVERY_S = 0.5


def enabled(progress: bool | None) -> bool:
    return progress if progress is not None else sys.stderr.isatty()


class RankProgress:
    """This rank's counts, written for rank 0; on rank 0 also the bars of every rank."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, total_documents: int | None):
        self.folder = Path(out_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.started = time.time()
        self.documents = self.tokens = 0
        self.done = False
        self._written = 0.0
        self._bars = None
        self._stop = threading.Event()
        self._thread = None
        self._write(force=True)
        if rank == 0:
            from tqdm.auto import tqdm

            share = -(-total_documents // world_size) if total_documents is not None else None
            self._bars = [tqdm(total=share, desc=f"trace-dataset rank {r}/{world_size}", unit="doc", position=r,
                               file=sys.stderr, dynamic_ncols=True, leave=True) for r in range(world_size)]
            self._thread = threading.Thread(target=self._redraw_loop, name="recon-fast progress", daemon=True)
            self._thread.start()

    def __enter__(self) -> "RankProgress":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """The rank's loop is over: its final counts are written. The bars stay up until close()
        (after the run's gather, when every rank's file is final), unless the loop failed."""
        self.done, self._finished = True, time.time()
        self._write(force=True)
        if kind is not None:
            self.close()

    def advance(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self._write()

    def close(self) -> None:
        """Rank 0: the bars' last state, drawn once, and the .progress folder removed."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._redraw()
        for bar in self._bars:
            bar.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- files ------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "started": self.started, "done": self.done,
                "now": self._finished if self.done else time.time()}  # tok/s stops at the rank's end

    def _write(self, force: bool = False) -> None:
        state = self._state()
        if not force and state["now"] - self._written < WRITE_EVERY_S:
            return
        self._written = state["now"]
        path = self.folder / f"rank{self.rank}.json"
        temporary = self.folder / f".rank{self.rank}.json.tmp"
        try:
            temporary.write_text(json.dumps(state))
            os.replace(temporary, path)
        except OSError:
            pass  # progress is a courtesy: a full disk or a vanished folder must not stop the run

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads((self.folder / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            return None

    # ---- rank 0's bars ----------------------------------------------------------------------
    def _redraw_loop(self) -> None:
        while not self._stop.wait(REDRAW_EVERY_S):
            self._redraw()

    def _redraw(self) -> None:
        for rank, bar in enumerate(self._bars):
            state = self._state() if rank == self.rank else self._read(rank)
            if state is None:
                continue
            if state["done"]:  # the equal share was an estimate: a finished rank shows 100%
                bar.total = state["documents"]
            bar.n = state["documents"]
            seconds = max(state["now"] - state["started"], 1e-9)
            bar.set_postfix_str(f"{state['tokens']} tok, {state['tokens'] / seconds:,.0f} tok/s", refresh=False)
            bar.refresh()


class Silent:
    """What start() gives where no progress is shown: the same calls, doing nothing."""

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def advance(self, documents: int, tokens: int) -> None:
        pass

    def close(self) -> None:
        pass


def start(out_dir: Path, rank: int, world_size: int, progress: bool | None,
          total_documents) -> "RankProgress | Silent":
    """A RankProgress where progress is shown, else a Silent one. total_documents: a callable
    counting the source's documents (called only when shown), returning None when it cannot."""
    if not enabled(progress):
        return Silent()
    return RankProgress(out_dir, rank, world_size, total_documents())
