"""attention_stats against a dense float64 softmax built here (independent of the op's online
math): GQA, causal or not, KV-cache alignment, windows, soft-cap, key padding, general masks, odd
lengths, every input dtype, strided views, NaN rows, errors, opcheck, torch.compile and the
fallback. CPU always; CUDA where a device is present."""

import math
import warnings

import pytest
import torch

from recon_fast.kernels import attention_stats as attn_module
from recon_fast.kernels.attention_stats import ATTENTION_STATS, attention_stats, attention_stats_ref

from conftest import DEVICES

WEIGHTS = ("max_weight", "sink_mass", "self_weight", "prev_weight")


def dense_stats(q, k, *, scaling, causal=True, window=None, softcap=None, key_padding_mask=None,
                mask=None, sink_tokens=4):
    """The statistics from the whole float64 softmax matrix, written from their definitions."""
    q, k = q.double().cpu(), k.double().cpu()
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)  # head h reads kv head h // group
    s = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(q_len)[:, None] + (k_len - q_len)  # absolute position of each query
    j = torch.arange(k_len)[None, :]
    keep = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j < window) if causal else ((i - j).abs() < window)
    if key_padding_mask is not None:
        keep &= key_padding_mask.cpu()[:, None, None, :]
    if mask is not None:
        if mask.dtype == torch.bool:
            keep &= mask.cpu()
        else:
            s = s + mask.cpu().double()
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, dim=-1)
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    stats = torch.stack((
        -plogp.sum(-1),
        p.amax(-1),
        p.argmax(-1).double(),
        p[..., :sink_tokens].sum(-1),
        (p * (i - j)).sum(-1),
        (p * (j == i)).sum(-1),
        (p * (j == i - 1)).sum(-1),
        torch.logsumexp(s, -1),
    ), dim=-1)
    sees_nothing = torch.isneginf(s).all(-1)  # no distribution: every statistic is NaN
    return stats.masked_fill(sees_nothing[..., None], math.nan), p


def assert_attention_close(got, q, k, **kw):
    """Tolerances (the issue's): weights within 1e-4 absolute; entropy and lse within 1e-4
    relative (plus 1e-5 absolute: float32 scores carry ~1e-6 absolute error, so a relative bound
    alone cannot hold for values near 0); mean_distance within 1e-3 tokens; argmax equal except at
    ties, i.e. the reference weight at the returned index equals the max weight. NaN exactly where
    the reference has NaN (rows that see no key)."""
    ref, p = dense_stats(q, k, **kw)
    got = got.detach().cpu().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    problems = []
    nan_ref = torch.isnan(ref[..., 0])
    for c, name in enumerate(ATTENTION_STATS):
        nan_mismatch = torch.isnan(got[..., c]) != nan_ref
        if nan_mismatch.any():
            problems.append(f"{name}: NaN pattern differs at {nan_mismatch.nonzero()[:4].tolist()}")
    ok = ~nan_ref
    for c, name in enumerate(ATTENTION_STATS):
        g, r = got[..., c][ok], ref[..., c][ok]
        if name == "argmax":
            idx = got[..., c].nan_to_num(0).long().clamp(0, p.shape[-1] - 1)
            at_idx = p.nan_to_num(0).gather(-1, idx[..., None])[..., 0][ok]
            err, tol = (ref[..., 1][ok] - at_idx).abs(), 1e-5
        elif name in WEIGHTS:
            err, tol = (g - r).abs(), 1e-4
        elif name == "mean_distance":
            err, tol = (g - r).abs(), 1e-3
        else:  # entropy, lse
            err, tol = (g - r).abs() / (r.abs() + 0.1), 1e-4
        if err.numel() and err.max() > tol:
            w = int(err.argmax())
            problems.append(f"{name}: {int((err > tol).sum())} of {err.numel()} beyond {tol:g}, "
                            f"worst {float(err[w]):.3g} (got {float(g[w])!r}, want {float(r[w])!r})")
    assert not problems, f"q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype} {kw}:\n  " + "\n  ".join(problems)


def make_qk(batch, heads, kv_heads, q_len, k_len, dim, dtype, device, *, sharpness=1.0, seed=0):
    """Random q and k; `sharpness` > 1 makes peaked rows (large scores) as trained heads have."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g) * sharpness
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    return q.to(dtype).to(device), k.to(dtype).to(device)


# (batch, heads, kv_heads, q_len, k_len, dim, options, sharpness): lengths are chosen to be
# multiples of no block size (CPU: 48 queries x 64 keys; CUDA: 64 x 64) or to straddle one.
CASES = {
    "mha-causal-17": (1, 2, 2, 17, 17, 64, {}, 1.0),
    "gqa3-causal-130": (2, 6, 2, 130, 130, 64, {}, 2.0),
    "gqa8-causal-257-d128": (1, 8, 1, 257, 257, 128, {}, 1.0),
    "gqa3-bidirectional-130-d80": (1, 3, 1, 130, 130, 80, {"causal": False}, 1.0),
    "kv-cache-70-of-257-d32": (1, 4, 2, 70, 257, 32, {}, 1.0),
    "decode-1-of-130": (2, 6, 2, 1, 130, 64, {}, 3.0),
    "window-24": (1, 3, 1, 200, 200, 64, {"window": 24}, 1.0),
    "window-100-kv-cache": (1, 2, 1, 65, 300, 64, {"window": 100}, 1.0),
    "window-bidirectional-9": (1, 2, 2, 70, 70, 32, {"window": 9, "causal": False}, 1.0),
    "softcap-sharp": (1, 4, 2, 129, 129, 64, {"softcap": 5.0}, 4.0),
    "sharp-128": (1, 2, 1, 128, 128, 64, {"sink_tokens": 7}, 6.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_float64_softmax(device, dtype, case):
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = CASES[case]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, dtype, device, sharpness=sharpness,
                   seed=q_len + dim)
    got = attention_stats(q, k, **options)
    assert got.shape == (batch, heads, q_len, 8) and got.dtype == torch.float32
    assert got.device == q.device
    assert_attention_close(got, q, k, scaling=dim ** -0.5, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_inputs(device):
    q, k = make_qk(1, 4, 2, 33, 90, 64, torch.float64, device)
    assert_attention_close(attention_stats(q, k), q, k, scaling=0.125)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding_mask(device, dtype):
    q, k = make_qk(3, 6, 3, 100, 100, 64, dtype, device, sharpness=2.0)
    keep = torch.ones(3, 100, dtype=torch.bool)
    keep[0, :37] = False          # left padding: the first 37 queries of row 0 see nothing
    keep[1, 60:] = False          # right padding
    keep[2, ::3] = False          # holes, sink keys among them
    keep = keep.to(device)
    got = attention_stats(q, k, key_padding_mask=keep)
    assert torch.isnan(got[0, :, :37]).all() and not torch.isnan(got[0, :, 37:]).any()
    assert_attention_close(got, q, k, scaling=0.125, key_padding_mask=keep)


@pytest.mark.parametrize("device", DEVICES)
def test_general_bool_and_additive_masks(device):
    q, k = make_qk(2, 4, 2, 70, 150, 64, torch.float32, device, sharpness=2.0)
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(2, 1, 70, 150, generator=g) > 0.3          # broadcast over heads
    additive = torch.randn(1, 4, 70, 150, generator=g) * 2          # broadcast over batch
    additive[..., 10:20] = -math.inf
    for options in ({"mask": keep.to(device)}, {"mask": additive.to(device)},
                    {"mask": additive.to(device).to(torch.bfloat16)},
                    {"mask": keep.to(device), "causal": False, "softcap": 3.0}):
        got = attention_stats(q, k, **options)
        assert_attention_close(got, q, k, scaling=0.125, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_nan(device):
    q, k = make_qk(1, 2, 1, 10, 6, 32, torch.float32, device)  # 4 more queries than keys
    got = attention_stats(q, k)  # causal, lower-right: queries 0..3 see no key
    assert torch.isnan(got[:, :, :4]).all()
    assert not torch.isnan(got[:, :, 4:]).any()
    mask = torch.ones(1, 1, 10, 6, dtype=torch.bool, device=device)
    mask[..., 7, :] = False
    got = attention_stats(q, k, causal=False, mask=mask)
    assert torch.isnan(got[:, :, 7]).all() and not torch.isnan(got[:, :, :7]).any()
    assert torch.isnan(attention_stats(q, k[:, :, :0])).all()  # no keys at all


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views(device, dtype):
    # HF projections give [B, T, H, D] viewed as [B, H, T, D]; a sliced head_dim (stride 2 in the
    # last dim) takes the documented copy.
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 77, 6, 64, generator=g).to(dtype).to(device).transpose(1, 2)
    kv = torch.randn(2, 77, 2, 2, 64, generator=g).to(dtype).to(device)
    k = kv[:, :, :, 0].transpose(1, 2)  # a slice of a fused k/v projection
    assert not q.is_contiguous() and not k.is_contiguous()
    assert_attention_close(attention_stats(q, k), q, k, scaling=0.125)
    q2 = torch.randn(1, 3, 40, 64, 2, generator=g).to(dtype).to(device)[..., 1]
    k2 = torch.randn(1, 1, 40, 64, 2, generator=g).to(dtype).to(device)[..., 0]
    assert q2.stride(-1) == 2
    assert_attention_close(attention_stats(q2, k2), q2, k2, scaling=0.125)


@pytest.mark.parametrize("device", DEVICES)
def test_sink_tokens_and_scaling(device):
    q, k = make_qk(1, 3, 3, 90, 90, 64, torch.float32, device, sharpness=2.0)
    for sink_tokens in (0, 1, 70):
        got = attention_stats(q, k, sink_tokens=sink_tokens, scaling=0.3)
        assert_attention_close(got, q, k, scaling=0.3, sink_tokens=sink_tokens)
    assert (attention_stats(q, k, sink_tokens=0)[..., 3] == 0).all()


def test_reference_matches_dense_softmax():
    # The fallback's own correctness, with blocks smaller than the sequence.
    q, k = make_qk(2, 6, 2, 50, 130, 32, torch.float32, "cpu", sharpness=2.0)
    keep = torch.rand(2, 130, generator=torch.Generator().manual_seed(1)) > 0.2
    for options in ({}, {"window": 17, "softcap": 4.0}, {"causal": False, "key_padding_mask": keep}):
        got = attention_stats_ref(q, k, key_block=48, **options)
        assert_attention_close(got, q, k, scaling=32 ** -0.5, **options)


def test_both_cpu_kernels_agree_with_dense(monkeypatch):
    q, k = make_qk(1, 6, 2, 100, 140, 80, torch.float32, "cpu", sharpness=2.0)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    baseline = attention_stats(q, k, window=50)
    assert_attention_close(baseline, q, k, scaling=80 ** -0.5, window=50)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert_attention_close(attention_stats(q, k, window=50), q, k, scaling=80 ** -0.5, window=50)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (torch.randn(1, 12, 4, 8, device=d), torch.randn(1, 5, 4, 8, device=d), {}),
         "q has 12 heads, not a multiple of k's 5"),
        (lambda d: (torch.randn(12, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d), {}),
         "q must be 4-D"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 16, device=d), {}),
         "q has head_dim 8 but k has head_dim 16"),
        (lambda d: (torch.randn(2, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d), {}),
         "q has batch 2 but k has batch 1"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d).half(), {}),
         "q is torch.float32 but k is torch.float16|q is Float but k is Half"),
        (lambda d: (torch.ones(1, 4, 4, 8, dtype=torch.int32, device=d),) * 2 + ({"scaling": 1.0},),
         "must be float32, float64, float16 or bfloat16"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"window": 0}), "window must be at least 1"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"softcap": -1.0}), "softcap must be positive"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool, device=d)}),
         r"key_padding_mask must have shape \[1, 4\]"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"key_padding_mask": torch.ones(1, 4, device=d)}), "key_padding_mask must be bool"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"mask": torch.ones(1, 3, 4, 4, dtype=torch.bool, device=d)}),
         r"mask must have shape \[1 or 1, 4 or 1, 4, 4\]"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"mask": torch.ones(1, 1, 4, 4, dtype=torch.int64, device=d)}),
         "mask must be bool"),
        (lambda d: (torch.randn(1, 4, 4, 8, device=d), torch.randn(1, 4, 4, 8, device=d),
                    {"sink_tokens": -1}), "sink_tokens must be >= 0"),
    ],
    ids=["gqa-heads", "q-dims", "head-dim", "batch", "dtypes", "int", "window", "softcap",
         "padding-shape", "padding-dtype", "mask-shape", "mask-dtype", "sink"],
)
def test_errors_name_what_failed(device, make, message):
    q, k, options = make(device)
    with pytest.raises(RuntimeError, match=message):
        attention_stats(q, k, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    keep = torch.ones(2, 40, dtype=torch.bool, device=device)
    keep[0, :5] = False
    for dtype in (torch.float32, torch.bfloat16):
        q, k = make_qk(2, 4, 2, 30, 40, 32, dtype, device)
        for args in ((0.2, True, None, None, None, None, 4),
                     (0.2, False, 7, 3.0, keep, None, 2),
                     (0.2, True, None, None, None, torch.zeros(1, 1, 30, 40, device=device), 4)):
            torch.library.opcheck(torch.ops.recon_fast.attention_stats.default, (q, k, *args))


def test_works_under_torch_compile():
    def layer_stats(q, k):
        return attention_stats(torch.tanh(q) * 3, k, window=20)

    q, k = make_qk(1, 6, 2, 50, 50, 64, torch.float32, "cpu")
    compiled = torch.compile(layer_stats, fullgraph=True)
    assert_attention_close(compiled(q, k), torch.tanh(q) * 3, k, scaling=0.125, window=20)


def test_fallback_warns_once_and_still_answers(monkeypatch):
    monkeypatch.setitem(attn_module._COMPILED.registered, "CPU", False)
    monkeypatch.setattr(attn_module._COMPILED, "warned", set())
    q, k = make_qk(1, 4, 2, 20, 20, 32, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="plain-PyTorch fallback on cpu"):
        got = attention_stats(q, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_stats(q, k)  # second call: silent
    assert attn_module.backend("cpu") == "torch"
    assert_attention_close(got, q, k, scaling=32 ** -0.5)
    with pytest.raises(RuntimeError, match="not a multiple of k's 3"):
        attention_stats(q, k[:, :1].expand(1, 3, 20, 32))


def test_compiled_backend_is_the_one_running():
    assert attn_module.backend("cpu") == "cpp", attn_module._library.load_error


@pytest.mark.cuda
def test_cuda_backend_never_synchronises_and_uses_the_current_stream():
    assert attn_module.backend("cuda") == "cuda"
    q, k = make_qk(1, 8, 2, 300, 300, 64, torch.bfloat16, "cuda")
    attention_stats(q, k)  # warm-up outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(10_000_000)  # a kernel on another stream would race and read garbage
            got = attention_stats(q, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s.synchronize()
    assert_attention_close(got, q, k, scaling=0.125)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [96, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_other_head_dims(dim, dtype):
    q, k = make_qk(1, 4, 2, 130, 200, dim, dtype, "cuda", sharpness=2.0)
    assert_attention_close(attention_stats(q, k, window=90), q, k, scaling=dim ** -0.5, window=90)
