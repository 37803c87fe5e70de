"""StatsArena: slots, chunk growth, and on CUDA the chunks sent to pinned host memory behind the
kernels that filled them (no sync, bounded device memory, every row intact)."""

import pytest
import torch

from recon_fast.kernels.token_stats import token_stats, token_stats_ref
from recon_fast.trace import stats_arena
from recon_fast.trace.stats_arena import StatsArena, back_to_back
from conftest import DEVICES


def fill(arena, activations, device):
    slots = []
    for a in activations:
        slot, out = arena.take(torch.device(device), a.shape[:-1])
        token_stats(a, out=out)
        slots.append(slot)
    return slots


@pytest.mark.parametrize("device", DEVICES)
def test_every_slot_reads_back_its_own_rows(device, monkeypatch):
    monkeypatch.setattr(stats_arena, "CUDA_CHUNK_ROWS", 300)  # many CUDA chunks, sent as they fill
    g = torch.Generator().manual_seed(0)
    activations = [torch.randn(2, int(n), 24, generator=g).to(device)
                   for n in torch.randint(1, 120, (40,), generator=g)]
    arena = StatsArena(initial_rows=64)
    slots = fill(arena, activations, device)
    assert len({s.chunk for s in slots}) > 3
    streamed = [arena.read(s) for s in slots]  # the streaming path, before to_host
    host = arena.to_host()
    for slot, a, rows in zip(slots, activations, streamed):
        want = token_stats_ref(a.cpu()).view(-1, 5)
        torch.testing.assert_close(host.read(slot), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)


def test_back_to_back_slots_span_one_copy():
    arena = StatsArena(initial_rows=16)
    activations = [torch.randn(1, 4, 8) for _ in range(6)]  # 24 rows: two chunks (16, then 32)
    slots = fill(arena, activations, "cpu")
    host = arena.to_host()
    assert back_to_back(slots[0], slots[1]) and back_to_back(slots[2], slots[3])
    assert not back_to_back(slots[3], slots[4])  # the fifth did not fit: a new chunk
    span = host.span(slots[0], slots[3])
    torch.testing.assert_close(span, torch.cat([host.read(s) for s in slots[:4]]))


@pytest.mark.cuda
def test_cuda_chunks_leave_the_device_without_a_sync(monkeypatch):
    monkeypatch.setattr(stats_arena, "CUDA_CHUNK_ROWS", 4096)
    a = torch.randn(4096, 64, device="cuda")
    arena = StatsArena(initial_rows=4096)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    peak = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        slots = []
        for _ in range(64):  # 64 chunks' worth: 5 MiB of statistics
            slots += fill(arena, [a], "cuda")
            peak = max(peak, torch.cuda.memory_allocated() - before)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Sent chunks go back to the allocator: the device holds a few chunks, not all 64.
    assert peak <= 8 * 4096 * 5 * 4
    host = arena.to_host()
    want = token_stats_ref(a.cpu())
    for slot in slots:
        torch.testing.assert_close(host.read(slot), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [True, False], ids=["rows-op", "python-slice"])
def test_write_equals_take_then_token_stats(device, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(stats_arena, "_rows_op_for", lambda device_type: None)
    elif stats_arena._rows_op_for(device) is None:
        pytest.skip("no compiled token_stats for this device")
    g = torch.Generator().manual_seed(3)
    activations = [torch.randn(2, 5, 40, generator=g).to(device, dtype)
                   for dtype in (torch.float32, torch.bfloat16, torch.float16)] * 3
    activations.append(torch.randn(7, 40, 3, generator=g).to(device).transpose(0, 1))  # strided rows
    arena = StatsArena(initial_rows=32)
    slots = [arena.write(a) for a in activations]
    host = arena.to_host()
    for slot, a in zip(slots, activations):
        assert slot.rows == a.numel() // a.shape[-1]
        torch.testing.assert_close(host.read(slot), token_stats_ref(a.cpu()).reshape(-1, 5), rtol=1e-5, atol=1e-5)


def test_rows_op_names_bad_rows():
    if stats_arena._rows_op_for("cpu") is None:
        pytest.skip("no compiled token_stats")
    with pytest.raises(RuntimeError, match=r"rows \[8, 14\) are outside the buffer's 10"):
        torch.ops.recon_fast.token_stats_rows(torch.randn(2, 3, 8), torch.empty(10, 5), 8)


def test_rows_op_passes_opcheck():
    if stats_arena._rows_op_for("cpu") is None:
        pytest.skip("no compiled token_stats")
    torch.library.opcheck(torch.ops.recon_fast.token_stats_rows.default,
                          (torch.randn(2, 3, 8), torch.zeros(10, 5), 2))


@pytest.mark.parametrize("device", DEVICES)
def test_adopted_rows_read_back_uncopied_between_written_ones(device):
    # A compiled run's buffer: adopted as a full chunk of its own, between rows written before and after.
    g = torch.Generator().manual_seed(1)
    before, after = torch.randn(3, 8, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)
    buffer = torch.randn(10, 5, generator=g).to(device)
    arena = StatsArena(initial_rows=16)
    first = arena.write(before)
    adopted = arena.adopt(buffer[:7])
    last = arena.write(after)
    assert (adopted.row0, adopted.rows) == (0, 7) and len({first.chunk, adopted.chunk, last.chunk}) == 3
    host = arena.to_host()
    torch.testing.assert_close(host.read(adopted), buffer[:7].cpu(), rtol=0, atol=0)
    torch.testing.assert_close(host.read(first), token_stats_ref(before).cpu())
    torch.testing.assert_close(host.read(last), token_stats_ref(after).cpu())
    if device == "cpu":  # not copied
        assert host.read(adopted).data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("rows, message", [(torch.zeros(4, 6), r"\[n, 5\] rows, got torch.float32 \(4, 6\)"),
                                           (torch.zeros(4, 5, dtype=torch.float64), "float64"),
                                           (torch.zeros(5, 4).t(), r"contiguous")])
def test_adopt_refuses_what_is_not_arena_rows(rows, message):
    with pytest.raises(ValueError, match=message):
        StatsArena().adopt(rows)
