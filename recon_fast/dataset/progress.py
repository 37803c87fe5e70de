"""A dataset run's progress: one bar per rank (documents, tokens/s, ETA) on rank 0's terminal.

Each rank writes its counts to DIR/.progress/rank{r}.json (a few bytes, at most a few times a
second, by rename so a reader never sees half a file); rank 0 redraws one bar per rank from those
files on a background thread, so the bars of ranks running ahead of or behind rank 0 keep moving.
Files, not collectives: a collective per update would make every rank wait for the slowest. Where
the folder is not shared (nodes without a common file system) rank 0 shows the ranks it can see.

Drawn when rank 0's stderr is a terminal (progress=None) or when asked (progress=True); never in
CI logs. Rank 0 decides and the run tells every rank (a rank's own terminal says nothing of rank
0's: under Slurm only task 0 may have one), with a run id that tells this run's files from those
a killed run left. The ETA needs the
number of documents, counted from the source on rank 0 when that is cheap (a sized iterable,
Parquet metadata, the lines of a text or JSONL file); each rank's bar assumes an equal share, and
a finished rank's bar shows its own total. Shards kept by --resume count as done but not in the
rates. Each rank removes its file at the end, rank 0 the folder, also when the run fails."""

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
    """This rank's counts, written for rank 0; on rank 0 (draw=True) the bars of every rank.
    A context manager: leaving it stops the drawing and removes the files. `command` and `unit`
    name the bars: trace-dataset counts documents, cache-activations windows (total_documents is
    then the number of windows)."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, run_id: str, total_documents: int | None,
                 draw: bool, *, command: str = "trace-dataset", unit: str = "doc"):
        self.folder = Path(out_dir) / FOLDER
        self.run_id = run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.started = time.time()
        self.finished: float | None = None
        self.documents = self.tokens = 0
        self.resumed_documents = self.resumed_tokens = 0
        self._written = 0.0
        self._bars = None
        self._stop = threading.Event()
        self._thread = None
        self._write(force=True)
        if draw:
            from tqdm.auto import tqdm

            share = -(-total_documents // world_size) if total_documents is not None else None
            self._bars = [tqdm(total=share, desc=f"{command} rank {r}/{world_size}", unit=unit, position=r,
                               file=sys.stderr, dynamic_ncols=True, leave=True) for r in range(world_size)]
            self._thread = threading.Thread(target=self._redraw_loop, name="recon-fast progress", daemon=True)
            self._thread.start()

    def __enter__(self) -> "RankProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.draw_final()
        try:
            (self.folder / f"rank{self.rank}.json").unlink(missing_ok=True)
            if self.rank == 0:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                self.folder.rmdir()  # empty where the folder is this node's own; else rank 0's to remove
        except OSError:
            pass

    def advance(self, documents: int, tokens: int, resumed: bool = False) -> None:
        if resumed:  # done already: counted, but not in the rates (first: the drawing thread reads along)
            self.resumed_documents += documents
            self.resumed_tokens += tokens
        self.documents += documents
        self.tokens += tokens
        self._write()

    def rank_done(self) -> None:
        """This rank's loop is over: its final counts, for rank 0's last drawing."""
        self.finished = time.time()
        self._write(force=True)

    def draw_final(self) -> None:
        """Rank 0, once every rank is done (after the run's gather): the bars' last state, drawn
        once. Elsewhere, or a second time, nothing."""
        if self._bars is None:
            return
        self._stop.set()
        self._thread.join()
        self._redraw()
        for bar in self._bars:
            bar.close()
        self._bars = None

    # ---- files ------------------------------------------------------------------------------
    def _state(self) -> dict:
        finished = self.finished  # read once: the drawing thread may run while the loop ends
        return {"run": self.run_id, "documents": self.documents, "tokens": self.tokens,
                "resumed_documents": self.resumed_documents,
                "resumed_tokens": self.resumed_tokens, "started": self.started, "done": finished is not None,
                "now": finished if finished is not None else time.time()}  # tok/s stops at the rank's end

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
            state = json.loads((self.folder / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("run") == self.run_id else None  # not a killed run's leftover

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
            bar.initial = state["resumed_documents"]  # tqdm's rate and ETA count from there
            bar.n = state["documents"]
            seconds = max(state["now"] - state["started"], 1e-9)
            rate = (state["tokens"] - state["resumed_tokens"]) / seconds
            bar.set_postfix_str(f"{state['tokens']} tok, {rate:,.0f} tok/s", refresh=False)
            bar.refresh()


class Silent:
    """What start() gives where no progress is reported: the same calls, doing nothing."""

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def advance(self, documents: int, tokens: int, resumed: bool = False) -> None:
        pass

    def rank_done(self) -> None:
        pass

    def draw_final(self) -> None:
        pass


def start(out_dir: Path, rank: int, world_size: int, shown: bool, run_id: str,
          count_documents) -> "RankProgress | Silent":
    """This rank's progress where rank 0 shows it (`shown`: rank 0's enabled(progress), as every
    rank was told), else a Silent one. count_documents: a callable counting the source's
    documents (called on rank 0 only), returning None when it cannot."""
    if not shown:
        return Silent()
    return RankProgress(out_dir, rank, world_size, run_id, count_documents() if rank == 0 else None, rank == 0)
