"""token_stats against torch eager, torch.compile of the same computation, and x.sum(-1) (one read
of x: the bandwidth ceiling). Every group's baseline is x.sum(-1).

On CUDA a timing enqueues many calls before one synchronize (a call is ~10-100 us), and inputs
that would fit in L2 rotate through enough copies that every call reads device memory."""

import itertools
import math

import pytest
import torch

from recon_fast.kernels.token_stats import token_stats

CASES = [
    ("cpu", (8192, 4096), torch.float32),
    ("cpu", (8192, 4096), torch.bfloat16),
    ("cpu", (32768, 576), torch.float32),
    # One hook's output of SmolLM2-135M at T=512 (k/v_proj, hidden, MLP): in cache, as at the hook.
    ("cpu", (512, 192), torch.float32),
    ("cpu", (512, 576), torch.float32),
    ("cpu", (512, 1536), torch.float32),
    ("cuda", (32768, 4096), torch.bfloat16),
    ("cuda", (8192, 4096), torch.float32),
    ("cuda", (32768, 576), torch.float32),
    ("cuda", (32768, 576), torch.bfloat16),
    ("cuda", (32768, 1024), torch.bfloat16),
    ("cuda", (131072, 2048), torch.bfloat16),
    ("cuda", (8192, 16384), torch.bfloat16),
    ("cuda", (1, 4096), torch.bfloat16),
    ("cuda", (512, 2048), torch.bfloat16),
]

# Bytes of distinct input each CUDA timing cycles through: several times an H100/H200's L2.
ROTATE_BYTES = 512 * 2**20


def eager_stats(x):
    """What users write today: norm, std_mean and aminmax, each a pass over x."""
    std, mean = torch.std_mean(x, dim=-1)
    lo, hi = torch.aminmax(x, dim=-1)
    return torch.stack((x.norm(dim=-1), mean, std, lo, hi), dim=-1)


_compiled = {}


def compiled_stats(x):
    key = (x.device.type, x.dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(eager_stats, dynamic=False)
    return _compiled[key](x)


IMPLS = {
    "x.sum(-1) [one read]": lambda x, out: x.sum(-1),
    "token_stats": lambda x, out: token_stats(x, out=out),
    "torch eager": lambda x, out: eager_stats(x),
    "torch.compile": lambda x, out: compiled_stats(x),
}


def _inputs(device, shape, dtype):
    """One input on the CPU; on CUDA enough copies that the rotation outgrows the L2 cache."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    copies = 1 if device == "cpu" else max(1, min(64, math.ceil(ROTATE_BYTES / nbytes)))
    return [torch.randn(*shape, device=device).to(dtype) for _ in range(copies)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device, shape, dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_token_stats_throughput(record, impl, device, shape, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    xs = _inputs(device, shape, dtype)
    x = xs[0]
    out = torch.empty(shape[0], 5, device=device)
    fn = IMPLS[impl]
    rotation = itertools.cycle(xs)
    slow = impl == "torch eager" and device == "cpu"
    nbytes = x.numel() * x.element_size()
    record(
        f"token_stats {device} {list(shape)} {str(dtype).removeprefix('torch.')}",
        impl,
        lambda: fn(next(rotation), out),
        device=device,
        nbytes=nbytes,
        baseline=impl.startswith("x.sum"),
        rounds=5 if slow else None,
        inner=1 if device == "cpu" else max(20, min(1000, int(2e9 // max(nbytes, 1)))),
    )
