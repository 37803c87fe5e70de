// CUDA registration of recon_fast::attention_stats: the torch-facing half (checks, device guard,
// current stream, which kernel serves); the kernels live in attention_stats_kernel.cu (per score:
// every case) and attention_stats_mma_kernel.cu (the linear case) without torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../attention_stats_plan.h"
#include "../check_text.h"
#include "attention_stats_launch.h"

namespace recon_fast::cuda {
namespace {

// The kernel for the linear case (16-bit q and k, no soft-cap, no general mask), from
// RECON_FAST_ATTENTION_KERNEL, read once per process: "fma" (the default: the linear kernel with
// those sums on the FMA pipe), "mma" (route a as issue 18 writes it: the sums on the tensor cores;
// its entropy of very sharp heads misses the float64 tolerance, the xfail in
// tests/test_attention_stats_linear.py, and it needs ~206 registers to fma's 128) or "score" (the
// per-score kernel, which also serves every other case). The GPU run tests and times each; the
// default stays fma unless mma is both faster there and made exact.
enum class LinearKernel { Mma, Fma, Score };

LinearKernel linear_kernel() {
  // A bad value raises here on every call (a throwing initialiser leaves the static unset).
  static const LinearKernel kernel = [] {
    const char* env = std::getenv("RECON_FAST_ATTENTION_KERNEL");
    const std::string value = env == nullptr ? "" : env;
    if (value == "mma") return LinearKernel::Mma;
    if (value.empty() || value == "fma") return LinearKernel::Fma;
    TORCH_CHECK(value == "score", "attention_stats: RECON_FAST_ATTENTION_KERNEL must be mma, fma or "
                "score, got '", value, "'");
    return LinearKernel::Score;
  }();
  return kernel;
}

at::Tensor attention_stats_cuda(const at::Tensor& q, const at::Tensor& k, double scaling,
                                bool causal, std::optional<int64_t> window,
                                std::optional<double> softcap,
                                const std::optional<at::Tensor>& key_padding_mask,
                                const std::optional<at::Tensor>& mask, int64_t sink_tokens) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionStatsPlan plan = plan_attention_stats(q, k, scaling, causal, window, softcap,
                                                 key_padding_mask, mask, sink_tokens);
  TORCH_CHECK(plan.problem.head_dim <= kAttentionMaxHeadDim, "attention_stats: head_dim ",
              num(plan.problem.head_dim), " is above the CUDA kernel's limit of ",
              num(kAttentionMaxHeadDim));
  // Cached by torch: no device query, no sync.
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "attention_stats: the CUDA kernel needs compute capability 8.0+ "
              "(mma.sync bf16/fp16, cp.async); ", props->name, " is ", num(props->major), ".",
              num(props->minor));
  // The current stream, never a sync: hooks enqueue this behind the layer that produced q and k.
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const LinearKernel kernel = linear_kernel();
  if (kernel != LinearKernel::Score && attention_stats_mma_applies(plan.problem)) {
    C10_CUDA_CHECK(launch_attention_stats_mma(plan.problem, kernel == LinearKernel::Mma, stream));
  } else {
    C10_CUDA_CHECK(launch_attention_stats(plan.problem, stream));
  }
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recon_fast, CUDA, m) { m.impl("attention_stats", &attention_stats_cuda); }

}  // namespace recon_fast::cuda
