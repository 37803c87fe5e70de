"""Device buffers that the tracer's hooks write token statistics into.

Each hook call takes the next rows of a float32 [rows, NUM_STATS] chunk on the device where its
activation lives and hands that slice to token_stats as `out`. Nothing in a hook copies to the host or
synchronises. On a CUDA device chunks have a fixed size: a full chunk is copied to pinned host
memory on a side stream, behind the kernels that wrote it, and its device memory goes back to
the allocator once that copy is done, so a long-context run holds O(chunk) statistics on the
device instead of O(layers x tokens). Elsewhere chunks double and stay where they are.

Grouped writes (`defer`): a hook reserves its rows and queues the activation; `launch` computes
every queued activation of a chunk in one token_stats_rows_grouped call (one decoder layer's
outputs, or GROUP_BYTES of them), and lets them go. An activation changed in place between its
hook and the launch (its `_version` moved) raises InPlaceEdit naming the module.

During a traced pass the hooks' C++ Recorder (recon_fast._C.Recorder) writes a device's rows
itself: the arena lends it that device's cursor (`_lend`: the chunk being written, its fill and
queued group) and every method here takes it back first (`_take_back`), so that the two never
reserve the same rows; new chunks (`_new_chunk`) stay the arena's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recon_fast.kernels import token_stats as token_stats_op
from recon_fast.kernels.token_stats import NUM_STATS, token_stats


def _rows_op_for(device_type: str):
    """recon_fast::token_stats_rows where the compiled token_stats serves this device, else None
    (the Python slice + token_stats, which also covers the plain-PyTorch fallback)."""
    if token_stats_op.backend(device_type) == "torch":
        return None
    return torch.ops.recon_fast.token_stats_rows.default


def _eager_rows_op(device_type: str, overload):
    """The eager write: the direct launcher (a pybind11 call, no dispatcher) where the kernels
    offer one for this device, else the op's C++ function."""
    if overload is not None and token_stats_op.direct_available(device_type):
        return token_stats_op.token_stats_rows_into
    return _direct(overload)


def _grouped_op(device_type: str):
    """The eager grouped write where the kernels have one for this device: the direct launcher,
    else token_stats_rows_grouped (the op); None without compiled kernels (then a group is
    written one activation at a time)."""
    if token_stats_op.backend(device_type) == "torch":
        return None
    if token_stats_op.direct_available(device_type):
        return token_stats_op.token_stats_rows_grouped_into
    return token_stats_op.token_stats_rows_grouped


# (device type, and what the lookups below read; a library without direct launchers has no
# token_stats_rows_grouped_into) -> their answers. The same for every arena while
# nothing they read changes (tests and benchmarks swap these functions, the library's
# registrations and its Recorder); looked up afresh for each arena they cost a traced run of the
# host-bound proxy ~40 us, at the first write of its forward (issue 17).
_DEVICE_OPS: dict[tuple, tuple] = {}


def _device_ops(device_type: str) -> tuple:
    """(the op a compiled graph writes with, the eager write, the eager grouped write, whether the
    hooks' C++ Recorder may write the rows) for arenas on this device type."""
    key = (device_type, _rows_op_for, _eager_rows_op, _grouped_op, token_stats_op.TokenStatsRecorder,
           token_stats_op.token_stats_rows_into, getattr(token_stats_op, "token_stats_rows_grouped_into", None),
           token_stats_op.compiled_serves(device_type), token_stats_op.direct_available(device_type))
    found = _DEVICE_OPS.get(key)
    if found is None:
        traced = _rows_op_for(device_type)  # looked up once per arena, not per write
        rows_op = _eager_rows_op(device_type, traced)
        grouped_op = _grouped_op(device_type) if traced is not None else None
        # The hooks' C++ Recorder may write these rows: it calls the direct launchers themselves.
        lendable = (token_stats_op.TokenStatsRecorder is not None and rows_op is token_stats_op.token_stats_rows_into
                    and grouped_op is token_stats_op.token_stats_rows_grouped_into)
        found = _DEVICE_OPS[key] = (traced, rows_op, grouped_op, lendable)
    return found


def _direct(overload):
    """The C++ function behind an OpOverload: OpOverload.__call__ only forwards to `_op` (which
    dispatches as usual), so calling it skips a Python frame, 0.3 us of every hook call. Eager
    only: torch.compile cannot trace the bare builtin (a graph break per hook), so writes made
    while compiling call the overload itself. The overload where `_op` is gone (private API)."""
    return getattr(overload, "_op", overload) if overload is not None else None


# Rows of one CUDA chunk: 20 MiB of statistics (1M tokens x layers) on the device at a time.
CUDA_CHUNK_ROWS = 1 << 20
# Most bytes of activations a group holds before it is launched: what grouping may add to the
# forward's peak memory (the outputs would otherwise be freed as the forward goes on). 8 MiB is a
# decoder layer's outputs of a 135M model at T=512 in bfloat16 (under 3% of its weights) and
# every layer's outputs of a host-bound small model, where one launch saves ~0.3 ms per layer.
GROUP_BYTES = 8 << 20


class InPlaceEdit(RuntimeError):
    """A hooked output was changed in place after its hook, before its statistics were computed."""

    def __init__(self, modules: list[str]):
        self.modules = modules
        shown = ", ".join(modules[:3]) + (f", ... +{len(modules) - 3}" if len(modules) > 3 else "")
        super().__init__(f"the output of {shown} was changed in place after its hook, before its grouped statistics "
                         "were computed, so this run's numbers for it would be wrong; from now on this Tracer "
                         "computes it at its hook: run again (Tracer(grouped=False) computes every module so)")


@dataclass(slots=True)
class ArenaSlot:
    """Where one hook call's rows are. One is made per hook call: not frozen, as a frozen
    dataclass's __init__ (object.__setattr__ per field) costs four times as much, and nothing
    changes a slot once made."""

    device: torch.device
    chunk: int
    row0: int
    rows: int


class _DeviceChunks:
    """One device's chunks: `device[i]` while chunk i may still be written, `host[i]` once it
    was sent (pinned, filled by the side stream by the time `done` has been waited on). The
    chunk being written is also held as `last` ([capacity, NUM_STATS]); with none, capacity is
    -1 so that even a write of no rows takes a chunk."""

    def __init__(self, device: torch.device):
        self.device = device
        self.chunks: list[torch.Tensor | None] = []
        self.host: list[torch.Tensor | None] = []
        self.last: torch.Tensor | None = None
        self.index = -1  # of `last` in chunks
        self.capacity = -1  # rows of `last`
        self.fill = 0  # rows used in `last`
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.rows_op_traced, self.rows_op, self.grouped_op, self.lendable = _device_ops(device.type)
        # The group being gathered: (activation, its first row in `last`, its _version, its module)
        # per hook call, in one tuple so that a hook makes one append.
        self.pending: list[tuple[torch.Tensor, int, int, str]] = []


class StatsArena:
    def __init__(self, initial_rows: int = 4096, group_bytes: int = GROUP_BYTES):
        self._initial_rows = max(1, initial_rows)
        self._devices: dict[torch.device, _DeviceChunks] = {}
        self.group_bytes = group_bytes
        self.pending_bytes = 0  # of the activations queued by defer(), all devices
        self.peak_pending_bytes = 0  # the most they held at once in this arena's life
        self.launches = 0  # grouped launches made
        self.launched = 0  # activations they computed
        # Calls whose output was the tensor an earlier call had just written, unchanged: their rows
        # were copied, not computed again (the C++ Recorder's at-hook path on the CPU).
        self.repeats = 0
        self._lent = None  # the C++ Recorder holding a device's cursor (_lend), if one does

    def _take_back(self) -> None:
        """Every device's cursor back in the arena's hands (the Recorder writes them back)."""
        if self._lent is not None:
            self._lent.give_back()

    def _lend(self, x: torch.Tensor, recorder) -> "_DeviceChunks | None":
        """x's device cursor, for `recorder` (a recon_fast._C.Recorder) to reserve rows and queue
        activations in until it gives it back; None where the direct launchers do not serve it."""
        self._take_back()
        chunks = self._chunks_of(x.device)
        if not chunks.lendable:
            return None
        self._lent = recorder
        return chunks

    def _chunks_of(self, device: torch.device) -> "_DeviceChunks":
        chunks = self._devices.get(device)
        if chunks is None:
            chunks = self._devices[device] = _DeviceChunks(device)
        return chunks

    def write(self, x: torch.Tensor) -> ArenaSlot:
        """Enqueues token_stats(x) into the next rows (x [..., D], D > 0); returns where they are.
        The hooks' path, run once per hook call: with the compiled library no tensor is made in
        Python, and the reservation is inlined (a host-bound forward pays for every Python call
        made here, hundreds of times a pass; so _take_back is inlined here and in defer)."""
        if self._lent is not None:
            self._lent.give_back()
        rows = x.numel() // x.shape[-1]
        device = x.device
        chunks = self._devices.get(device)
        if chunks is None:
            chunks = self._devices[device] = _DeviceChunks(device)
        row0 = chunks.fill
        if row0 + rows > chunks.capacity:
            self._new_chunk(chunks, rows)
            row0 = 0
        chunks.fill = row0 + rows
        rows_op = chunks.rows_op if not torch.compiler.is_compiling() else chunks.rows_op_traced
        if rows_op is not None:
            rows_op(x, chunks.last, row0)
        else:
            token_stats(x, out=chunks.last[row0 : row0 + rows].view(*x.shape[:-1], NUM_STATS))
        return ArenaSlot(device, chunks.index, row0, rows)

    def defer(self, x: torch.Tensor, name: str) -> ArenaSlot:
        """Reserves x's rows and queues x; its statistics are written at the group's launch
        (launch(), or the next chunk, or to_host()/read()). x [..., D], D > 0, not changed in
        place until then (checked). An inference tensor (made under torch.inference_mode) has no
        version counter to check, so it is computed at once."""
        if x.is_inference():
            return self.write(x)
        if self._lent is not None:
            self._lent.give_back()
        numel = x.numel()
        rows = numel // x.shape[-1]
        device = x.device
        chunks = self._devices.get(device)
        if chunks is None:
            chunks = self._devices[device] = _DeviceChunks(device)
        row0 = chunks.fill
        if row0 + rows > chunks.capacity:
            self._new_chunk(chunks, rows)
            row0 = 0
        chunks.fill = row0 + rows
        chunks.pending.append((x, row0, x._version, name))
        held = self.pending_bytes + numel * x.itemsize
        self.pending_bytes = held
        if held > self.peak_pending_bytes:
            self.peak_pending_bytes = held
        if held >= self.group_bytes:
            self.launch()
        return ArenaSlot(device, chunks.index, row0, rows)

    def launch(self) -> None:
        """Computes every queued activation, one call per device, and lets them go."""
        if self._lent is not None:
            self._lent.give_back()
        for chunks in self._devices.values():
            if chunks.pending:
                self._launch(chunks)
        self.pending_bytes = 0

    def _launch(self, chunks: _DeviceChunks) -> None:
        pending, chunks.pending = chunks.pending, []
        # An output edited in place after its hook (a later module's `x += ...`, an in-place
        # activation) would give the edited tensor's numbers. Refusing is the one honest answer:
        # the values at hook time are gone, and running the forward again could repeat its side
        # effects (sampling, caches, user hooks).
        edited = [name for x, _, version, name in pending if x._version != version]
        if edited:
            self._refuse_edited(edited)
        self.launches += 1
        self.launched += len(pending)
        xs, row0s, _, _ = zip(*pending)
        buffer = chunks.last
        if chunks.grouped_op is not None and not torch.compiler.is_compiling():
            chunks.grouped_op(xs, buffer, row0s)
        elif chunks.rows_op is not None:
            for x, row0 in zip(xs, row0s):
                chunks.rows_op(x, buffer, row0)
        else:
            for x, row0 in zip(xs, row0s):
                token_stats(x, out=buffer[row0 : row0 + x.numel() // x.shape[-1]].view(*x.shape[:-1], NUM_STATS))

    @staticmethod
    def _refuse_edited(names: list[str]) -> None:
        """Raises InPlaceEdit for the modules whose queued outputs were edited in place (the
        Recorder's launches call it too)."""
        raise InPlaceEdit(list(dict.fromkeys(names)))

    def adopt(self, rows: torch.Tensor) -> ArenaSlot:
        """Rows written elsewhere ([n, NUM_STATS], contiguous float32: a compiled run's buffer) as
        a chunk of their own, full, without a copy; the slot covers them all. The caller keeps
        them unchanged while this arena is read (a compiled run's buffer is written again by the
        next run only, after the cube was made from this one)."""
        if rows.dim() != 2 or rows.shape[1] != NUM_STATS or rows.dtype != torch.float32 or not rows.is_contiguous():
            raise ValueError(f"adopt() takes contiguous float32 [n, {NUM_STATS}] rows, got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        self._take_back()
        chunks = self._chunks_of(rows.device)
        if chunks.pending:  # the queued rows are in the chunk being left
            self.launch()
        chunks.chunks.append(rows)
        chunks.host.append(None)
        n = rows.shape[0]
        chunks.last, chunks.index, chunks.capacity, chunks.fill = rows, len(chunks.chunks) - 1, n, n
        return ArenaSlot(rows.device, chunks.index, 0, n)

    def take(self, device: torch.device, lead_shape: torch.Size) -> tuple[ArenaSlot, torch.Tensor]:
        """A slot for an activation with leading dims `lead_shape`, and its [*lead, NUM_STATS] view."""
        rows = 1
        for size in lead_shape:
            rows *= size
        chunk, slot = self._reserve(device, rows)
        return slot, chunk[slot.row0 : slot.row0 + rows].view(*lead_shape, NUM_STATS)

    def _reserve(self, device: torch.device, rows: int) -> tuple[torch.Tensor, ArenaSlot]:
        self._take_back()
        chunks = self._chunks_of(device)
        if chunks.fill + rows > chunks.capacity:
            self._new_chunk(chunks, rows)
        fill = chunks.fill
        chunks.fill = fill + rows
        return chunks.last, ArenaSlot(device, chunks.index, fill, rows)

    def _new_chunk(self, chunks: _DeviceChunks, rows: int) -> torch.Tensor:
        if chunks.pending:  # the queued rows are in the chunk being left
            self.pending_bytes -= sum(x.numel() * x.itemsize for x, _, _, _ in chunks.pending)
            self._launch(chunks)
        previous = chunks.chunks[-1] if chunks.chunks else None
        if chunks.copy_stream is not None:
            if previous is not None:
                self._send(chunks, len(chunks.chunks) - 1)
            capacity = max(rows, min(CUDA_CHUNK_ROWS, 2 * previous.shape[0] if previous is not None
                                     else self._initial_rows))
        else:
            capacity = max(rows, 2 * previous.shape[0] if previous is not None else self._initial_rows)
        chunk = torch.empty(capacity, NUM_STATS, dtype=torch.float32, device=chunks.device)
        chunks.chunks.append(chunk)
        chunks.host.append(None)
        chunks.last, chunks.index, chunks.capacity, chunks.fill = chunk, len(chunks.chunks) - 1, capacity, 0
        return chunk

    @staticmethod
    def _send(chunks: _DeviceChunks, index: int) -> None:
        """Copies chunk `index` to pinned host memory on the side stream, after the kernels
        already enqueued on the current stream, and lets its device memory go once copied."""
        chunk = chunks.chunks[index]
        used = chunks.fill if index == len(chunks.chunks) - 1 else chunk.shape[0]
        stream = chunks.copy_stream
        stream.wait_stream(torch.cuda.current_stream(chunks.device))
        with torch.cuda.stream(stream):
            host = torch.empty((used, NUM_STATS), dtype=torch.float32, pin_memory=True)
            host.copy_(chunk[:used], non_blocking=True)
        # The caching allocator must not hand this memory out before the side stream read it.
        chunk.record_stream(stream)
        chunks.host[index] = host
        chunks.chunks[index] = None
        if index == chunks.index:  # nothing more goes into it (a later write takes a new chunk)
            chunks.last, chunks.capacity = None, -1

    def to_host(self) -> "HostArena":
        """Every used row on the host, after the forward pass: the last chunks are sent like the
        others, and one event per CUDA device is waited on (the only sync of a traced run)."""
        self.launch()  # takes the lent cursor back too
        host, done = {}, []
        for device, chunks in self._devices.items():
            if chunks.copy_stream is None:
                host[device] = [c[:n] for c, n in zip(chunks.chunks, self._used(chunks))]
                continue
            for index, chunk in enumerate(chunks.chunks):
                if chunk is not None:
                    self._send(chunks, index)
            event = torch.cuda.Event()
            event.record(chunks.copy_stream)
            done.append(event)
            host[device] = list(chunks.host)
        for event in done:
            event.synchronize()
        return HostArena(host)

    @staticmethod
    def _used(chunks: _DeviceChunks) -> list[int]:
        return [c.shape[0] for c in chunks.chunks[:-1]] + [chunks.fill]

    def read(self, slot: ArenaSlot) -> torch.Tensor:
        """One slot's rows on the host ([rows, NUM_STATS]); for streaming, a layer at a time."""
        self._take_back()
        chunks = self._devices[slot.device]
        if chunks.pending:
            self.launch()
        sent = chunks.host[slot.chunk]
        if sent is not None:
            chunks.copy_stream.synchronize()
            return sent[slot.row0 : slot.row0 + slot.rows]
        return chunks.chunks[slot.chunk][slot.row0 : slot.row0 + slot.rows].cpu()


class HostArena:
    def __init__(self, chunks: dict[torch.device, list[torch.Tensor]]):
        self._chunks = chunks

    def read(self, slot: ArenaSlot) -> torch.Tensor:
        return self._chunks[slot.device][slot.chunk][slot.row0 : slot.row0 + slot.rows]

    def span(self, first: ArenaSlot, last: ArenaSlot) -> torch.Tensor:
        """The rows from `first` to `last` inclusive, which must lie back to back in one chunk."""
        return self._chunks[first.device][first.chunk][first.row0 : last.row0 + last.rows]


def back_to_back(a: ArenaSlot, b: ArenaSlot) -> bool:
    """Whether slot b starts where slot a ends, in the same chunk."""
    return b.device == a.device and b.chunk == a.chunk and b.row0 == a.row0 + a.rows
