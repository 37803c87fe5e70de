// CUDA registration of recon_fast::token_stats: the torch-facing half (checks, device guard,
// current stream); the kernels themselves live in token_stats_kernel.cu without torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../token_stats_plan.h"
#include "token_stats_launch.h"

namespace recon_fast::cuda {
namespace {

void token_stats_cuda(const at::Tensor& x, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TokenStatsPlan plan = plan_token_stats(x, out);
  // The current stream, never a sync: the tracer's hooks enqueue this behind the layer that
  // produced x, and results reach the host only when the caller asks for them.
  C10_CUDA_CHECK(launch_token_stats(plan.problem, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(recon_fast, CUDA, m) { m.impl("token_stats", &token_stats_cuda); }

}  // namespace recon_fast::cuda
