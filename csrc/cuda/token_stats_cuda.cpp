// CUDA registration of recon_fast::token_stats, token_stats_rows and token_stats_rows_grouped:
// the torch-facing half (checks, device guard, current stream); the kernels themselves live in
// token_stats_kernel.cu and token_stats_grouped.cu without torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../token_stats_plan.h"
#include "../token_stats_rows.h"
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

// The rows ops are planned first: the checks name a buffer or x on the wrong device before a
// guard is asked for a device that may not be a CUDA one. Every tensor is on buffer's device then.
void token_stats_rows_cuda(const at::Tensor& x, at::Tensor& buffer, int64_t row0) {
  const TokenStatsPlan plan = plan_token_stats_rows(x, buffer, row0);
  const c10::cuda::CUDAGuard guard(buffer.device());
  C10_CUDA_CHECK(launch_token_stats(plan.problem, at::cuda::getCurrentCUDAStream()));
}

void token_stats_rows_grouped_cuda(at::TensorList xs, at::Tensor& buffer, at::IntArrayRef row0s) {
  const TokenStatsGroupPlan plan = plan_token_stats_rows_grouped(xs, buffer, row0s);
  if (plan.problems.empty()) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  C10_CUDA_CHECK(launch_token_stats_grouped(plan.problems.data(), static_cast<int64_t>(plan.problems.size()),
                                            at::cuda::getCurrentCUDAStream()));
}

TORCH_LIBRARY_IMPL(recon_fast, CUDA, m) {
  m.impl("token_stats", &token_stats_cuda);
  m.impl("token_stats_rows", &token_stats_rows_cuda);
  m.impl("token_stats_rows_grouped", &token_stats_rows_grouped_cuda);
}

}  // namespace recon_fast::cuda
