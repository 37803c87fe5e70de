// CUDA registration of recon_fast::attention_stats: the torch-facing half (checks, device guard,
// current stream); the kernels live in attention_stats_kernel.cu without torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../attention_stats_plan.h"
#include "../check_text.h"
#include "attention_stats_launch.h"

namespace recon_fast::cuda {
namespace {

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
  C10_CUDA_CHECK(launch_attention_stats(plan.problem, at::cuda::getCurrentCUDAStream()));
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recon_fast, CUDA, m) { m.impl("attention_stats", &attention_stats_cuda); }

}  // namespace recon_fast::cuda
