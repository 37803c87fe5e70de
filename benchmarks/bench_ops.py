"""token_stats against torch eager, torch.compile of the same computation, and x.sum(-1) (one read
of x: the bandwidth ceiling). Every group's baseline is x.sum(-1)."""

import pytest
import torch

from recon_fast.ops import token_stats

CASES = [
    ("cpu", (8192, 4096), torch.float32),
    ("cpu", (8192, 4096), torch.bfloat16),
    ("cpu", (32768, 576), torch.float32),
    ("cuda", (32768, 4096), torch.bfloat16),
    ("cuda", (8192, 4096), torch.float32),
    ("cuda", (32768, 576), torch.float32),
]


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


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device, shape, dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_token_stats_throughput(record, impl, device, shape, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = torch.randn(*shape, device=device).to(dtype)
    out = torch.empty(shape[0], 5, device=device)
    fn = IMPLS[impl]
    slow = impl == "torch eager" and device == "cpu"
    record(
        f"token_stats {device} {list(shape)} {str(dtype).removeprefix('torch.')}",
        impl,
        lambda: fn(x, out),
        device=device,
        nbytes=x.numel() * x.element_size(),
        baseline=impl.startswith("x.sum"),
        rounds=5 if slow else None,
    )
