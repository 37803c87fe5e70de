"""Device buffers that the tracer's hooks write token statistics into.

Each hook call takes the next rows of a float32 [rows, 5] buffer on the device where its
activation lives and hands that slice to token_stats as `out`. Growing allocates a new chunk
(twice the last) and never copies or synchronises; the host reads each chunk once, after the
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recon_fast.ops import NUM_STATS


@dataclass(frozen=True)
class ArenaSlot:
    device: torch.device
    chunk: int
    row0: int
    rows: int


class StatsArena:
    def __init__(self, initial_rows: int = 4096):
        self._initial_rows = max(1, initial_rows)
        self._chunks: dict[torch.device, list[torch.Tensor]] = {}
        self._fill: dict[torch.device, int] = {}  # rows used in the device's last chunk

    def take(self, device: torch.device, lead_shape: torch.Size) -> tuple[ArenaSlot, torch.Tensor]:
        """A slot for an activation with leading dims `lead_shape`, and its [*lead, 5] view."""
        rows = 1
        for size in lead_shape:
            rows *= size
        chunks = self._chunks.setdefault(device, [])
        fill = self._fill.get(device, 0)
        if not chunks or fill + rows > chunks[-1].shape[0]:
            capacity = max(rows, 2 * chunks[-1].shape[0] if chunks else self._initial_rows)
            chunks.append(torch.empty(capacity, NUM_STATS, dtype=torch.float32, device=device))
            fill = 0
        slot = ArenaSlot(device, len(chunks) - 1, fill, rows)
        self._fill[device] = fill + rows
        return slot, chunks[-1][fill : fill + rows].view(*lead_shape, NUM_STATS)

    def to_host(self) -> "HostArena":
        """Copies every used row to the host: one transfer per chunk, after the forward pass.

        From a CUDA device the chunks go into pinned buffers without blocking, and one event per
        device is waited on: the only synchronisation of a traced run, after all its kernels.
        """
        host, done = {}, []
        for device, chunks in self._chunks.items():
            used = [c.shape[0] for c in chunks[:-1]] + [self._fill[device]]
            if device.type != "cuda":
                host[device] = [c[:n].cpu() for c, n in zip(chunks, used)]
                continue
            copies = []
            for chunk, n in zip(chunks, used):
                pinned = torch.empty((n, NUM_STATS), dtype=torch.float32, pin_memory=True)
                pinned.copy_(chunk[:n], non_blocking=True)
                copies.append(pinned)
            host[device] = copies
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            done.append(event)
        for event in done:
            event.synchronize()
        return HostArena(host)

    def read(self, slot: ArenaSlot) -> torch.Tensor:
        """One slot's rows on the host ([rows, 5]); for streaming, a layer at a time."""
        return self._chunks[slot.device][slot.chunk][slot.row0 : slot.row0 + slot.rows].cpu()


class HostArena:
    def __init__(self, chunks: dict[torch.device, list[torch.Tensor]]):
        self._chunks = chunks

    def read(self, slot: ArenaSlot) -> torch.Tensor:
        return self._chunks[slot.device][slot.chunk][slot.row0 : slot.row0 + slot.rows]
