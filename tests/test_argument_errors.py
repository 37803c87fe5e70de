"""Every argument error of the compiled ops (token_stats, token_stats_rows, token_stats_rows_grouped,
attention_stats) and of the direct launchers (token_stats_rows_into, token_stats_rows_grouped_into)
raises RuntimeError with its whole message, word for word, and never kills the process.

The cases run in one child process (`python tests/test_argument_errors.py DEVICE`), which prints
one line per case: a crash (the SIGSEGV the H100's CUDA build showed, benchmarks/gpu_diagnostics/)
then fails the test naming the case that was running, instead of taking pytest down with it. The
messages are those of csrc/token_stats_plan.cpp, csrc/token_stats_rows.cpp and
csrc/attention_stats_plan.cpp, whose numbers go through csrc/check_text.h (no number is streamed
into TORCH_CHECK)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICES

ROOT = Path(__file__).resolve().parents[1]


def _cases(d: str):
    """(name, call, the whole message) for each argument error reachable from Python on `d`."""
    ops = torch.ops.recon_fast
    r = lambda *shape, **kw: torch.randn(*shape, device=d, **kw)  # noqa: E731

    def attn(q, k, scaling=0.125, causal=True, window=None, softcap=None, kpm=None, mask=None, sink=4):
        return lambda: ops.attention_stats(q, k, scaling, causal, window, softcap, kpm, mask, sink)

    def ts(x, out):
        return lambda: ops.token_stats(x, out)

    q, k = r(1, 4, 4, 8), r(1, 4, 4, 8)
    yield "attn-heads", attn(r(1, 12, 4, 8), r(1, 5, 4, 8)), \
        "attention_stats: q has 12 heads, not a multiple of k's 5"
    yield "attn-q-dims", attn(r(12, 4, 8), k), \
        "attention_stats: q must be 4-D [batch, heads, q_len, head_dim], got shape [12, 4, 8]"
    yield "attn-k-dims", attn(q, r(4, 4, 8, 1, 1)), \
        "attention_stats: k must be 4-D [batch, kv_heads, k_len, head_dim], got shape [4, 4, 8, 1, 1]"
    yield "attn-dtypes", attn(q, k.half()), "attention_stats: q is Float but k is Half"
    yield "attn-int", attn(q.int(), k.int()), \
        "attention_stats: q and k must be float32, float64, float16 or bfloat16, got Int"
    yield "attn-batch", attn(r(2, 4, 4, 8), k), "attention_stats: q has batch 2 but k has batch 1"
    yield "attn-head-dim", attn(q, r(1, 4, 4, 16)), \
        "attention_stats: q has head_dim 8 but k has head_dim 16"
    yield "attn-head-dim-empty", attn(r(1, 4, 4, 0), r(1, 4, 4, 0)), \
        "attention_stats: head_dim is empty (size 0)"
    yield "attn-scaling", attn(q, k, scaling=float("inf")), \
        "attention_stats: scaling must be finite, got inf"
    yield "attn-window", attn(q, k, window=0), \
        "attention_stats: window must be at least 1 (keys a query sees, itself included), got 0"
    yield "attn-softcap", attn(q, k, softcap=-1.5), \
        "attention_stats: softcap must be positive and finite, got -1.5"
    yield "attn-sink", attn(q, k, sink=-1), "attention_stats: sink_tokens must be >= 0, got -1"
    yield "attn-padding-dtype", attn(q, k, kpm=torch.ones(1, 4, device=d)), \
        "attention_stats: key_padding_mask must be bool (true = keep), got Float"
    yield "attn-padding-shape", attn(q, k, kpm=torch.ones(1, 5, dtype=torch.bool, device=d)), \
        "attention_stats: key_padding_mask must have shape [1, 4] ([batch, k_len]), got [1, 5]"
    yield "attn-mask-dtype", attn(q, k, mask=torch.ones(1, 1, 4, 4, dtype=torch.int64, device=d)), \
        "attention_stats: mask must be bool (true = keep) or floating (added to the scores), got Long"
    yield "attn-mask-shape", attn(q, k, mask=torch.ones(1, 3, 4, 4, dtype=torch.bool, device=d)), \
        "attention_stats: mask must have shape [1 or 1, 4 or 1, 4, 4], got [1, 3, 4, 4]"

    out = torch.empty(4, 5, device=d)
    yield "ts-empty-dim", ts(r(4, 0), out), "token_stats: the last dimension of x is empty (size 0)"
    yield "ts-int", ts(torch.ones(4, 8, dtype=torch.int32, device=d), out), \
        "token_stats: x must be a floating tensor (float32, float64, float16, bfloat16), got Int"
    yield "ts-complex", ts(r(4, 8, dtype=torch.complex64), out), \
        "token_stats: complex x is not supported, got ComplexFloat"
    yield "ts-scalar", ts(torch.tensor(1.0, device=d), torch.empty(5, device=d)), \
        "token_stats: x must have at least one dimension (the one reduced)"
    yield "ts-out-stats-dim", ts(r(4, 8), torch.empty(4, 4, device=d)), \
        "token_stats: out must have shape [4] + [5] for x of shape [4, 8], got [4, 4]"
    yield "ts-out-rows", ts(r(4, 8), torch.empty(3, 5, device=d)), \
        "token_stats: out must have shape [4] + [5] for x of shape [4, 8], got [3, 5]"
    yield "ts-out-dtype", ts(r(4, 8), torch.empty(4, 5, dtype=torch.float64, device=d)), \
        "token_stats: out must be float32, got Double"

    # token_stats_rows and token_stats_rows_grouped, each through the op and its direct launcher.
    from recon_fast.kernels.token_stats import token_stats_rows_grouped_into, token_stats_rows_into

    buf, x = torch.empty(10, 5, device=d), r(2, 3, 8)
    tangled = r(*[2] * 9, 4).permute(8, 7, 6, 5, 4, 3, 2, 1, 0, 9)  # 9 leading dims that cannot merge
    rows_cases = [
        ("range", (x, buf, 8), "token_stats_rows: rows [8, 14) are outside the buffer's 10"),
        ("negative", (x, buf, -1), "token_stats_rows: rows [-1, 5) are outside the buffer's 10"),
        ("buffer-shape", (x, torch.empty(10, 4, device=d), 0), "token_stats_rows: buffer must be a contiguous [N, 5] tensor"),
        ("buffer-dtype", (x, buf.double(), 0), "token_stats_rows: buffer must be float32, got Double"),
        ("int", (torch.ones(2, 8, dtype=torch.int32, device=d), buf, 0),
         "token_stats_rows: x must be a floating tensor (float32, float64, float16, bfloat16), got Int"),
        ("complex", (r(2, 8, dtype=torch.complex64), buf, 0), "token_stats_rows: complex x is not supported, got ComplexFloat"),
        ("empty-dim", (r(2, 0), buf, 0), "token_stats_rows: x needs a non-empty last dimension"),
        ("row-dims", (tangled, torch.empty(512, 5, device=d), 0),
         "token_stats_rows: x has too many non-mergeable leading dimensions (9 > 8); call .contiguous() first"),
    ]
    grouped_cases = [
        ("lengths", ([x, x], buf, [0]), "token_stats_rows_grouped: xs has 2 tensors but row0s has 1 rows"),
        ("buffer-shape", ([x], torch.empty(10, 4, device=d), [0]),
         "token_stats_rows_grouped: buffer must be a contiguous [N, 5] tensor"),
        ("buffer-dtype", ([x], buf.double(), [0]), "token_stats_rows_grouped: buffer must be float32, got Double"),
        ("range", ([r(2, 8), x], buf, [0, 8]), "token_stats_rows_grouped: rows [8, 14) of xs[1] are outside the buffer's 10"),
        ("overlap", ([x, r(6, 8)], buf, [0, 2]),
         "token_stats_rows_grouped: rows [2, 8) of xs[1] overlap rows [0, 6) of xs[0]"),
        ("int", ([x, torch.ones(2, 8, dtype=torch.int32, device=d)], buf, [0, 6]),
         "token_stats_rows_grouped: xs[1] must be a floating tensor (float32, float64, float16, bfloat16), got Int"),
        ("complex", ([r(2, 8, dtype=torch.complex64)], buf, [0]),
         "token_stats_rows_grouped: complex xs[0] is not supported, got ComplexFloat"),
        ("empty-dim", ([r(2, 0)], buf, [0]), "token_stats_rows_grouped: xs[0] needs a non-empty last dimension"),
        ("row-dims", ([tangled], torch.empty(512, 5, device=d), [0]),
         "token_stats_rows_grouped: xs[0] has too many non-mergeable leading dimensions (9 > 8); call .contiguous() first"),
    ]
    for path, call in (("op", ops.token_stats_rows), ("direct", token_stats_rows_into)):
        for name, args, want in rows_cases:
            yield f"rows-{path}-{name}", (lambda call=call, args=args: call(*args)), want
    for path, call in (("op", ops.token_stats_rows_grouped), ("direct", token_stats_rows_grouped_into)):
        for name, args, want in grouped_cases:
            yield f"grouped-{path}-{name}", (lambda call=call, args=args: call(*args)), want


def _child(device: str) -> None:
    """Runs every case, one JSON line each, flushed before the call (so a crash names it)."""
    import recon_fast.kernels.token_stats  # noqa: F401  (loads the library, registers the ops)

    for name, call, want in _cases(device):
        print(json.dumps({"start": name}), flush=True)
        try:
            call()
            got = None
        except RuntimeError as exc:
            got = str(exc).splitlines()[0]
        print(json.dumps({"case": name, "got": got, "want": want}), flush=True)


@pytest.mark.parametrize("device", DEVICES)
def test_every_argument_error_raises_its_whole_message(device):
    from recon_fast.kernels import attention_stats, token_stats

    if token_stats.backend(device) == "torch" or attention_stats.backend(device) == "torch":
        pytest.skip(f"the compiled ops are not built for {device}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, device], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [x["start"] for x in lines if "start" in x]
    assert proc.returncode == 0, (
        f"the child died (exit {proc.returncode}) during case {started[-1] if started else '?'}:\n"
        f"{proc.stderr[-2000:]}")
    results = [x for x in lines if "case" in x]
    assert len(results) == len(list(_cases("cpu"))), proc.stdout
    wrong = [f"{x['case']}: got {x['got']!r}, want {x['want']!r}" for x in results if x["got"] != x["want"]]
    assert not wrong, "\n".join(wrong)


if __name__ == "__main__":
    _child(sys.argv[1])
