"""recon_fast::token_stats_rows_grouped and the direct launchers (token_stats_rows_into,
token_stats_rows_grouped_into): a group gives bit for bit its tensors taken one at a time by
token_stats_rows, and the float64 reference, on odd shapes, strides, every dtype and mixes of them;
it writes exactly its rows; the direct launchers give the ops' bits and the ops' error messages;
opcheck; torch.compile without a graph break. CPU always; CUDA where a device is present."""

import pytest
import torch

from recon_fast.kernels import token_stats as ops
from recon_fast.kernels.token_stats import NUM_STATS

from conftest import DEVICES
from test_ops import DTYPES, assert_stats_close, sample_input

pytestmark = pytest.mark.skipif(ops.backend("cpu") == "torch", reason="the compiled library is not built "
                                "(test_ops.py::test_compiled_backend_is_the_one_running says why)")

SENTINEL = -7.0  # what the buffer holds where nothing may be written
GAP = 3  # rows left between two tensors' rows, which must keep the sentinel


def sample_group(device, dtypes, seed=0) -> list[torch.Tensor]:
    """One tensor per layout the kernels treat apart, cycling through `dtypes`: odd sizes
    ([5, 123, 123]), D=1, rows permuted (a transposed view), a strided last dim (the copy path),
    no rows, one long row (block-per-row on CUDA), four dims, and a few short [8, 64] rows."""
    layouts = [((5, 123), 123, True), ((7,), 1, True), ((2, 3), 64, False), ((4,), 33, False),
               ((0,), 16, True), ((1,), 4097, True), ((3, 2, 5), 96, True), ((1, 8), 64, True)]
    return [sample_input(lead, dim, dtypes[i % len(dtypes)], device, contiguous=contiguous, seed=seed + i)
            for i, (lead, dim, contiguous) in enumerate(layouts)]


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def layout(xs, gap=GAP) -> tuple[list[int], int]:
    """row0s with `gap` rows between tensors (and before the first), and the buffer's rows."""
    row0s, at = [], gap
    for x in xs:
        row0s.append(at)
        at += rows_of(x) + gap
    return row0s, at


def sentinel_buffer(rows, device) -> torch.Tensor:
    return torch.full((rows, NUM_STATS), SENTINEL, device=device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 values as integers: equal bits, NaN included."""
    return t.contiguous().view(torch.int32)


def assert_only_rows_written(buffer, xs, row0s):
    untouched = torch.ones(buffer.shape[0], dtype=torch.bool)
    for x, row0 in zip(xs, row0s):
        untouched[row0 : row0 + rows_of(x)] = False
    assert (buffer.cpu()[untouched] == SENTINEL).all(), "rows outside the group's were written"


MIXES = {str(d).removeprefix("torch."): [d] for d in DTYPES}
MIXES["mixed"] = DTYPES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", list(MIXES))
def test_group_equals_one_at_a_time_equals_float64(device, mix):
    xs = sample_group(device, MIXES[mix])
    row0s, n = layout(xs)
    grouped, single = sentinel_buffer(n, device), sentinel_buffer(n, device)
    torch.ops.recon_fast.token_stats_rows_grouped(xs, grouped, row0s)
    for x, row0 in zip(xs, row0s):
        torch.ops.recon_fast.token_stats_rows(x, single, row0)
    # The same kernel reduces each row either way (CPU: the same function; CUDA: the same device code).
    assert torch.equal(bits(grouped), bits(single))
    assert_only_rows_written(grouped, xs, row0s)
    for x, row0 in zip(xs, row0s):
        got = grouped[row0 : row0 + rows_of(x)].view(*x.shape[:-1], NUM_STATS)
        assert_stats_close(got.cpu(), x.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_rows_in_any_order(device):
    xs = sample_group(device, DTYPES, seed=3)
    row0s, n = layout(xs)
    reversed_buffer, ordered = sentinel_buffer(n, device), sentinel_buffer(n, device)
    torch.ops.recon_fast.token_stats_rows_grouped(xs[::-1], reversed_buffer, row0s[::-1])
    torch.ops.recon_fast.token_stats_rows_grouped(xs, ordered, row0s)
    assert torch.equal(bits(reversed_buffer), bits(ordered))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_groups_and_tensors_without_rows_write_nothing(device):
    buffer = sentinel_buffer(6, device)
    torch.ops.recon_fast.token_stats_rows_grouped([], buffer, [])
    ops.token_stats_rows_grouped_into([], buffer, [])
    empty = [torch.empty(0, 8, device=device), torch.empty(2, 0, 4, device=device)]
    # Rows [6, 6): a tensor without rows may sit at the buffer's end, and beside or on any other.
    torch.ops.recon_fast.token_stats_rows_grouped(empty, buffer, [6, 0])
    ops.token_stats_rows_grouped_into(empty, buffer, [6, 0])
    assert (buffer.cpu() == SENTINEL).all()


@pytest.mark.parametrize("device", DEVICES)
def test_more_tensors_than_one_launch_takes(device):
    """40 tensors of one kind: over the CUDA launch's table of 16, so the group is split."""
    xs = [sample_input((3,), 64, torch.float32, device, seed=i) for i in range(40)]
    row0s, n = layout(xs, gap=1)
    buffer = sentinel_buffer(n, device)
    ops.token_stats_rows_grouped(xs, buffer, row0s)
    assert_only_rows_written(buffer, xs, row0s)
    for x, row0 in zip(xs, row0s):
        assert_stats_close(buffer[row0 : row0 + 3].cpu(), x.cpu())


def test_direct_launchers_serve_cpu_and_cuda_only_where_built():
    assert ops.direct_available("cpu"), "the built library has no direct launchers"
    assert not ops.direct_available("meta")
    assert ops.direct_available("cuda") == (ops.backend("cuda") == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_direct_launchers_give_the_ops_bits(device):
    xs = sample_group(device, DTYPES, seed=5)
    row0s, n = layout(xs)
    by_op, direct = sentinel_buffer(n, device), sentinel_buffer(n, device)
    torch.ops.recon_fast.token_stats_rows_grouped(xs, by_op, row0s)
    ops.token_stats_rows_grouped_into(xs, direct, row0s)
    assert torch.equal(bits(by_op), bits(direct))
    one_by_one = sentinel_buffer(n, device)
    for x, row0 in zip(xs, row0s):
        ops.token_stats_rows_into(x, one_by_one, row0)
    assert torch.equal(bits(by_op), bits(one_by_one))
    # ops.token_stats_rows_grouped (what the tracer calls) takes the direct launcher in eager mode.
    wrapped = sentinel_buffer(n, device)
    ops.token_stats_rows_grouped(xs, wrapped, row0s)
    assert torch.equal(bits(by_op), bits(wrapped))


def test_negative_views_reach_the_kernels_as_their_values():
    """A negative view (a dispatch key whose fallback materialises it) is the values it shows."""
    x = sample_input((4,), 40, torch.float32, "cpu")
    buffer = sentinel_buffer(4, "cpu")
    ops.token_stats_rows_grouped_into([torch._neg_view(x)], buffer, [0])
    assert_stats_close(buffer, -x)
    ops.token_stats_rows_into(torch._neg_view(x), buffer, 0)
    assert_stats_close(buffer, -x)


def _grouped_errors(d):
    """(name, xs, buffer, row0s, a word of the message) for each argument error of the group."""
    r = lambda *shape, **kw: torch.randn(*shape, device=d, **kw)  # noqa: E731
    buf = torch.empty(10, NUM_STATS, device=d)
    x = r(2, 3, 8)
    yield "lengths", [x, x], buf, [0], "xs has 2 tensors but row0s has 1 rows"
    yield "buffer-dtype", [x], buf.double(), [0], "buffer must be float32, got Double"
    yield "buffer-stats", [x], torch.empty(10, 4, device=d), [0], "buffer must be a contiguous [N, 5] tensor"
    yield "buffer-3d", [x], torch.empty(2, 10, 5, device=d), [0], "buffer must be a contiguous [N, 5] tensor"
    yield "buffer-strided", [x], torch.empty(5, 10, device=d).t(), [0], "buffer must be a contiguous [N, 5] tensor"
    yield "row0-negative", [x], buf, [-1], "rows [-1, 5) of xs[0] are outside the buffer's 10"
    yield "row0-past", [r(2, 8), x], buf, [0, 8], "rows [8, 14) of xs[1] are outside the buffer's 10"
    yield "overlap", [x, r(6, 8)], buf, [0, 2], "rows [2, 8) of xs[1] overlap rows [0, 6) of xs[0]"
    yield "overlap-unordered", [r(6, 8), x], buf, [4, 0], "rows [4, 10) of xs[0] overlap rows [0, 6) of xs[1]"
    yield "int", [x, torch.ones(2, 8, dtype=torch.int32, device=d)], buf, [0, 6], \
        "xs[1] must be a floating tensor (float32, float64, float16, bfloat16), got Int"
    yield "complex", [r(2, 8, dtype=torch.complex64)], buf, [0], "complex xs[0] is not supported, got ComplexFloat"
    yield "float8", [r(2, 8).to(torch.float8_e4m3fn)], buf, [0], \
        "xs[0] must be float32, float64, float16 or bfloat16, got Float8_e4m3fn"
    yield "empty-dim", [r(2, 0)], buf, [0], "xs[0] needs a non-empty last dimension"
    yield "scalar", [torch.tensor(1.0, device=d)], buf, [0], "xs[0] needs a non-empty last dimension"


def _message(call) -> str:
    with pytest.raises(RuntimeError) as info:
        call()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c[0] for c in _grouped_errors("cpu")])
def test_every_grouped_error_has_the_ops_words_in_every_path(device, case):
    _, xs, buffer, row0s, words = next(c for c in _grouped_errors(device) if c[0] == case)
    want = f"token_stats_rows_grouped: {words}"
    assert _message(lambda: torch.ops.recon_fast.token_stats_rows_grouped(xs, buffer, row0s)) == want
    assert _message(lambda: ops.token_stats_rows_grouped_into(xs, buffer, row0s)) == want
    assert _message(lambda: ops.token_stats_rows_grouped(xs, buffer, row0s)) == want


def _rows_errors(d):
    """(name, x, buffer, row0, the message) for each argument error of token_stats_rows."""
    buf = torch.empty(10, NUM_STATS, device=d)
    x = torch.randn(2, 3, 8, device=d)
    yield "range", x, buf, 8, "token_stats_rows: rows [8, 14) are outside the buffer's 10"
    yield "negative", x, buf, -2, "token_stats_rows: rows [-2, 4) are outside the buffer's 10"
    yield "buffer-dtype", x, buf.half(), 0, "token_stats_rows: buffer must be float32, got Half"
    yield "buffer-stats", x, torch.empty(10, 6, device=d), 0, "token_stats_rows: buffer must be a contiguous [N, 5] tensor"
    yield "int", x.long(), buf, 0, \
        "token_stats_rows: x must be a floating tensor (float32, float64, float16, bfloat16), got Long"
    yield "empty-dim", torch.empty(3, 0, device=d), buf, 0, "token_stats_rows: x needs a non-empty last dimension"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c[0] for c in _rows_errors("cpu")])
def test_every_rows_error_has_the_ops_words_in_the_direct_launcher(device, case):
    _, x, buffer, row0, want = next(c for c in _rows_errors(device) if c[0] == case)
    assert _message(lambda: torch.ops.recon_fast.token_stats_rows(x, buffer, row0)) == want
    assert _message(lambda: ops.token_stats_rows_into(x, buffer, row0)) == want


@pytest.mark.cuda
def test_cuda_tensors_on_another_device_are_named():
    x, buffer = torch.randn(2, 8, device="cuda"), torch.empty(4, NUM_STATS)
    want = "token_stats_rows_grouped: xs[1] is on cuda:0 but buffer is on cpu"
    xs = [torch.randn(2, 8), x]
    assert _message(lambda: torch.ops.recon_fast.token_stats_rows_grouped(xs, buffer, [0, 2])) == want
    assert _message(lambda: ops.token_stats_rows_grouped_into(xs, buffer, [0, 2])) == want
    want = "token_stats_rows: x is on cuda:0 but buffer is on cpu"
    assert _message(lambda: torch.ops.recon_fast.token_stats_rows(x, buffer, 0)) == want
    assert _message(lambda: ops.token_stats_rows_into(x, buffer, 0)) == want


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    xs = [sample_input((3, 5), 96, dtype, device, seed=i) for i, dtype in enumerate(DTYPES)]
    row0s, n = layout(xs)
    torch.library.opcheck(torch.ops.recon_fast.token_stats_rows_grouped.default, (xs, torch.zeros(n, NUM_STATS,
                                                                                                 device=device), row0s))


def test_no_graph_break_under_torch_compile():
    def layer_stats(a, b, buffer):
        ops.token_stats_rows_grouped([torch.tanh(a), b * 2], buffer, [0, 4])
        return buffer

    a = sample_input((4,), 96, torch.float32, "cpu")
    b = sample_input((2, 3), 40, torch.bfloat16, "cpu", seed=1)
    compiled = torch.compile(layer_stats, fullgraph=True)  # a graph break would raise
    got = compiled(a, b, torch.zeros(10, NUM_STATS)).clone()
    want = layer_stats(a, b, torch.zeros(10, NUM_STATS))
    assert torch.equal(bits(got), bits(want))
    assert_stats_close(got[:4], torch.tanh(a))


@pytest.mark.cuda
def test_cuda_grouped_never_synchronises_and_runs_on_the_current_stream():
    xs = [torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(256, 2048, device="cuda"),
          torch.randn(32, 9000, device="cuda", dtype=torch.float16)]
    row0s, n = layout(xs)
    buffer = sentinel_buffer(n, "cuda")
    ops.token_stats_rows_grouped_into(xs, buffer, row0s)  # warm-up outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ops.token_stats_rows_grouped_into(xs, buffer, row0s)
            torch.ops.recon_fast.token_stats_rows_grouped(xs, buffer, row0s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = torch.cuda.Stream()
    buffer = sentinel_buffer(n, "cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(10_000_000)  # keeps the stream busy: a kernel on another stream would race
        ops.token_stats_rows_grouped_into(xs, buffer, row0s)
        result = buffer.cpu()  # ordered after the kernel on s
    for x, row0 in zip(xs, row0s):
        assert_stats_close(result[row0 : row0 + rows_of(x)], x.cpu())
