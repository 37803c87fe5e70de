"""The linear formulation (statistics on a P.V product, kernels/attention_stats_linear.py) against
the dense float64 softmax at test_attention_stats' tolerances, fp32/bf16/fp16, sharp heads: the
numerics of the CUDA linear-case kernel (csrc/cuda/attention_stats_mma_kernel.cu), and where they
stop holding.

That kernel itself has not met a GPU yet: here it runs on the CPU under the CUDA emulation of
csrc/cuda/attention_stats_mma_emulation.h (every CUDA thread a fiber; warp collectives, mma.sync
and ldmatrix with the PTX ISA's lane layouts), both variants (mma: the linear sums on the tensor
cores; fma: on the FMA pipe), against the same float64 reference. The per-score kernel, which is
proven on GPUs, runs under the same emulation first: that it passes checks the emulation."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from recon_fast.kernels.attention_stats import attention_stats
from recon_fast.kernels.attention_stats_linear import attention_stats_linear

from test_attention_stats import CASES, assert_attention_close, dense_stats, make_qk

LINEAR_CASES = {name: c for name, c in CASES.items() if "softcap" not in c[6]}
CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_route_matches_dense_float64(dtype, case):
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = LINEAR_CASES[case]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, dtype, "cpu", sharpness=sharpness,
                   seed=q_len + dim)
    got = attention_stats_linear(q, k, **options)
    assert_attention_close(got, q, k, scaling=dim ** -0.5, **options)


def test_linear_route_very_sharp_heads_and_padding():
    q, k = make_qk(2, 4, 2, 96, 96, 64, torch.bfloat16, "cpu", sharpness=12.0, seed=3)
    keep = torch.ones(2, 96, dtype=torch.bool)
    keep[0, :10] = False
    got = attention_stats_linear(q, k, key_padding_mask=keep)
    assert_attention_close(got, q, k, scaling=0.125, key_padding_mask=keep)


def _the_sharpest_heads(dtype):
    # |q| |k| scaling ~ 100 nats over 600 keys: entropies of 1e-4..1e-2.
    return make_qk(1, 2, 1, 600, 600, 64, dtype, "cpu", sharpness=12.0, seed=11)


@pytest.mark.xfail(strict=True, reason="the limit of route (a): E_w[s2] = q.(P K) rounds at "
                   "|q| |k| scaling, not at s2 - m (module docstring)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_limit_of_the_linear_route(dtype):
    q, k = _the_sharpest_heads(dtype)
    assert_attention_close(attention_stats_linear(q, k), q, k, scaling=0.125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_per_score_route_holds_where_the_linear_one_does_not(dtype):
    q, k = _the_sharpest_heads(dtype)
    assert_attention_close(attention_stats(q, k), q, k, scaling=0.125)


# --- the CUDA kernels under emulation -------------------------------------------------------------

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    """An executable running the CUDA kernels on the CPU: `prog score|mma|fma DIR`."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the CUDA emulation")
    work = tmp_path_factory.mktemp("cuda_emulation")
    stubs = work / "stubs"
    stubs.mkdir()
    for header in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h"):
        (stubs / header).write_text('#include "attention_stats_mma_emulation.h"\n')
    # The per-score kernel, untouched but for two lines: its shared memory and its launch go to
    # the emulation (its mma does through warp_primitives.cuh, which both kernels share).
    source = (CUDA_DIR / "attention_stats_kernel.cu").read_text()
    for old, new in [
        ("extern __shared__ __align__(16) unsigned char smem_raw[];",
         "unsigned char* smem_raw = emu::dynamic_smem();"),
        ("kernel<<<grid, kThreads, smem, stream>>>(p, vec_ok);",
         "emu::launch(kernel, grid, kThreads, smem, p, vec_ok);"),
    ]:
        assert source.count(old) == 1, f"attention_stats_kernel.cu changed: {old!r} not found once"
        source = source.replace(old, new)
    score_source = work / "attention_stats_kernel_emulated.cu"
    score_source.write_text(source)
    flags = [compiler, "-std=c++20", "-O1", "-DRECON_FAST_CUDA_EMULATION", f"-I{stubs}", f"-I{CUDA_DIR}",
             "-x", "c++", "-c"]
    objects = []
    for src, extra in ((CUDA_DIR / "attention_stats_mma_kernel.cu", ["-DRECON_FAST_CUDA_EMULATION_MAIN"]),
                       (score_source, [])):
        obj = work / (src.stem + ".o")
        subprocess.run(flags + extra + [str(src), "-o", str(obj)], check=True, capture_output=True, text=True)
        objects.append(str(obj))
    exe = work / "attention_stats_emulated"
    subprocess.run([compiler, *objects, "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


def run_emulated(exe, kernel, q, k, *, scaling, causal=True, window=None, softcap=None,
                 key_padding_mask=None, sink_tokens=4, workdir):
    """attention_stats by one CUDA kernel under emulation; q, k contiguous [B, H, T, D]."""
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]

    def raw(x):
        x = x.contiguous()
        return (x.view(torch.int16) if x.element_size() == 2 else x).numpy().tobytes()

    (workdir / "q.bin").write_bytes(raw(q))
    (workdir / "k.bin").write_bytes(raw(k))
    if key_padding_mask is not None:
        (workdir / "padding.bin").write_bytes(key_padding_mask.contiguous().numpy().astype(np.uint8).tobytes())
    qs, ks = q.contiguous().stride(), k.contiguous().stride()
    fields = [_DTYPE_CODES[q.dtype], batch, heads, kv_heads, q_len, k_len, dim, repr(float(scaling)),
              int(causal), window or 0, softcap or 0.0, sink_tokens, int(key_padding_mask is not None),
              *qs[:3], *ks[:3]]
    (workdir / "problem.txt").write_text(" ".join(map(str, fields)))
    proc = subprocess.run([str(exe), kernel, str(workdir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = np.fromfile(workdir / "out.bin", dtype=np.float32).reshape(batch, heads, q_len, 8)
    return torch.from_numpy(out.copy())


# Under emulation a CTA's threads run one after another: ~2 minutes in all, CPU only (a GPU run
# tests the kernels themselves), hence slow.
@pytest.mark.slow
@pytest.mark.parametrize("case", ["gqa3-causal-130", "softcap-sharp", "window-bidirectional-9"])
def test_emulation_runs_the_proven_per_score_kernel(emulated_kernels, tmp_path, case):
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = CASES[case]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, torch.bfloat16, "cpu",
                   sharpness=sharpness, seed=q_len + dim)
    got = run_emulated(emulated_kernels, "score", q, k, scaling=dim ** -0.5, workdir=tmp_path, **options)
    assert_attention_close(got, q, k, scaling=dim ** -0.5, **options)


# float16 on the cases where its narrow exponent range matters (sharp heads) and two layouts.
EMULATED = [(case, torch.bfloat16) for case in LINEAR_CASES] + [
    (case, torch.float16) for case in ("sharp-128", "gqa3-causal-130", "kv-cache-70-of-257-d32")]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["mma", "fma"])
@pytest.mark.parametrize("case, dtype", EMULATED, ids=[f"{c}-{str(d)[6:]}" for c, d in EMULATED])
def test_emulated_linear_kernel_matches_dense_float64(emulated_kernels, tmp_path, kernel, case, dtype):
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = CASES[case]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, dtype, "cpu", sharpness=sharpness,
                   seed=q_len + dim)
    got = run_emulated(emulated_kernels, kernel, q, k, scaling=dim ** -0.5, workdir=tmp_path, **options)
    assert_attention_close(got, q, k, scaling=dim ** -0.5, **options)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["mma", "fma"])
def test_emulated_linear_kernel_edges(emulated_kernels, tmp_path, kernel):
    def check(q, k, scaling=None, **options):
        scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
        got = run_emulated(emulated_kernels, kernel, q, k, scaling=scaling, workdir=tmp_path, **options)
        assert_attention_close(got, q, k, scaling=scaling, **options)
        return got

    # Key padding: left (rows that see nothing are NaN), right, holes among the sink keys.
    q, k = make_qk(3, 6, 3, 100, 100, 64, torch.bfloat16, "cpu", sharpness=2.0)
    keep = torch.ones(3, 100, dtype=torch.bool)
    keep[0, :37] = False
    keep[1, 60:] = False
    keep[2, ::3] = False
    got = check(q, k, key_padding_mask=keep)
    assert torch.isnan(got[0, :, :37]).all() and not torch.isnan(got[0, :, 37:]).any()
    # More queries than keys: the first rows see nothing.
    q, k = make_qk(1, 2, 1, 10, 6, 32, torch.float16, "cpu")
    assert torch.isnan(check(q, k)[:, :, :4]).all()
    # Sink counts and a scaling other than 1 / sqrt(D).
    q, k = make_qk(1, 3, 3, 90, 90, 64, torch.bfloat16, "cpu", sharpness=2.0)
    for sink_tokens in (0, 70):
        check(q, k, sink_tokens=sink_tokens, scaling=0.3)
    # head_dim padded (36: the element-wise loads; 8) and beyond the second product's 128 (256).
    for dim in (8, 36, 256):
        q, k = make_qk(1, 4, 2, 130, 200, dim, torch.bfloat16, "cpu", sharpness=2.0)
        check(q, k, window=90)
    # Exact ties (duplicated keys): the first index wins; a KV cache with padding and a window.
    q, k = make_qk(1, 2, 1, 140, 140, 64, torch.bfloat16, "cpu", sharpness=4.0, seed=5)
    k[:, :, 70:] = k[:, :, :70]
    check(q, k, causal=False)
    q, k = make_qk(2, 4, 2, 150, 300, 64, torch.float16, "cpu", sharpness=5.0, seed=4)
    keep = torch.rand(2, 300, generator=torch.Generator().manual_seed(2)) > 0.3
    check(q, k, key_padding_mask=keep, window=120)


@pytest.mark.slow
def test_emulated_kernels_at_the_sharpest_heads(emulated_kernels, tmp_path):
    """The fma variant sums w (s2 - m) per score and holds; the mma variant shares route (a)'s
    limit (test_the_limit_of_the_linear_route): its entropy is off by a few 1e-5 (absolute) on
    entropies below 1e-2, every other channel holds."""
    q, k = _the_sharpest_heads(torch.bfloat16)
    assert_attention_close(run_emulated(emulated_kernels, "fma", q, k, scaling=0.125, workdir=tmp_path),
                           q, k, scaling=0.125)
    got = run_emulated(emulated_kernels, "mma", q, k, scaling=0.125, workdir=tmp_path)
    ref, _ = dense_stats(q, k, scaling=0.125)
    assert float((got[..., 0].double() - ref[..., 0]).abs().max()) < 1e-4
    got[..., 0] = ref[..., 0].float()
    assert_attention_close(got, q, k, scaling=0.125)
