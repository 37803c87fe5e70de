"""One shard of an activation cache at a time: its host memory, its write on a background thread,
and, on --resume, whether the file a run left is this shard.

Memory is bounded by two shards (three while a shuffled one is written): one filling while the
other is written. Host buffers are pinned on CUDA so that the device's copies land in them
directly. The writer thread waits for the shard's copies (one event), writes it through
activation_format (atomically, naming the file on failure) and fires the kill:RANK:SHARD test
fault once it is committed (shard = the shard's index k, which is global). Its errors come back
on the run's thread at the next wait, or at finish()."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import torch

from recon_fast.dataset import activation_format, writing

HOST_DTYPES = {np.float32: torch.float32, np.float16: torch.float16}


class ShardBuffer:
    """Host memory for `windows` windows: per hook [windows, context_size, d_in] of the cache's
    host dtype, and the windows' token ids."""

    def __init__(self, hooks: dict[str, int], windows: int, context_size: int, dtype: str, pinned: bool):
        host = HOST_DTYPES[activation_format.DTYPES[dtype][0]]
        self.values = {name: torch.empty((windows, context_size, d_in), dtype=host, pin_memory=pinned)
                       for name, d_in in hooks.items()}
        self.pending: concurrent.futures.Future | None = None  # its write, while one is in flight

    def destination(self, start: int, count: int):
        """What ActivationCapture.run takes: module name -> the rows [start, start + count)."""
        return lambda name, d_in: self.values[name][start: start + count]


class ShardWriter:
    """At most one shard written at a time, on a thread of its own."""

    def __init__(self, out_dir: Path, rank: int, context_size: int, dtype: str, config_sha256: str,
                 shuffle: bool, seed: int):
        self.out_dir, self.rank = out_dir, rank
        self.context_size, self.dtype, self.config_sha256 = context_size, dtype, config_sha256
        self.shuffle, self.seed = shuffle, seed
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="recon-fast cache writer")

    def wait(self, buffer: ShardBuffer) -> None:
        """Returns once `buffer`'s last write is done (raising its error, if it failed)."""
        if buffer.pending is not None:
            pending, buffer.pending = buffer.pending, None
            pending.result()

    def submit(self, buffer: ShardBuffer, k: int, token_ids: np.ndarray, copies_done) -> None:
        """Writes shard k from `buffer` (its first len(token_ids) rows) once copies_done (a CUDA
        event, or None) has completed."""
        buffer.pending = self._pool.submit(self._write, buffer, k, token_ids, copies_done)

    def finish(self, buffers: list[ShardBuffer]) -> None:
        """Every write done (raising the first failure)."""
        try:
            for buffer in buffers:
                self.wait(buffer)
        finally:
            self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """The run failed: the write in flight completes (a whole shard, or its temporary removed)
        and its own failure, if any, gives way to the run's."""
        self._pool.shutdown(wait=True)

    def _write(self, buffer: ShardBuffer, k: int, token_ids: np.ndarray, copies_done) -> None:
        if copies_done is not None:
            copies_done.synchronize()  # the host's one wait per shard
        rows = len(token_ids)
        values = {name: tensor.numpy() for name, tensor in buffer.values.items()}
        if self.shuffle:
            order = shard_order(self.seed, k, rows)
            values = {name: array[:rows][order] for name, array in values.items()}
            token_ids = token_ids[order]
        activation_format.write_shard(self.out_dir / activation_format.shard_name(k), values, token_ids, rows,
                                      self.context_size, self.dtype, self.config_sha256)
        writing.after_commit(self.rank, k)


def shard_order(seed: int, k: int, rows: int) -> np.ndarray:
    """--shuffle's order of shard k's windows: seeded by (seed, k), the same on every run."""
    return np.random.default_rng([seed, k]).permutation(rows)


def committed(out_dir: Path, k: int, token_ids: np.ndarray, config_sha256: str, shuffle: bool,
              seed: int) -> dict | None:
    """The hooks ({name: d_in}) of shard k if a run with these settings committed it with exactly
    these windows, else None (missing or unreadable: written again). A shard of other settings,
    or of other windows (the source changed), is an error: the folder belongs to another run."""
    path = out_dir / activation_format.shard_name(k)
    found = activation_format.read_shard(path)
    if found is None:
        return None
    meta, ids = found
    if meta.get("config_sha256") != config_sha256:
        raise ValueError(f"{path} was written by a run with other settings (model, hooks, context size, dtype, "
                         "tokens, batch or shard size, shuffle); resume with the same ones or use a new --out")
    expected = token_ids[shard_order(seed, k, len(token_ids))] if shuffle else token_ids
    if ids.shape != expected.shape or not np.array_equal(ids, expected):
        raise ValueError(f"{path} holds other windows than the source gives now: the data changed since the "
                         "first run; use a new --out")
    return meta["hooks"]
