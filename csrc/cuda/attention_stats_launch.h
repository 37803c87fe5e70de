// Host entry point of the CUDA attention_stats kernels: plain data and a stream, so the .cu file
// needs no torch headers (CI compiles every kernel with nvcc alone).
#pragma once

#include <cuda_runtime.h>

#include "../attention_stats_problem.h"

namespace recon_fast::cuda {

// Largest head_dim the kernels are instantiated for (head dims are padded up to a multiple of
// 16: the k-step of the tensor-core MMA).
constexpr int64_t kAttentionMaxHeadDim = 256;

// Enqueues attention_stats for p on `stream`; never synchronises. Needs compute capability 8.0+
// (bf16/fp16 mma.sync and cp.async) and head_dim <= kAttentionMaxHeadDim; returns the launch
// error, if any.
cudaError_t launch_attention_stats(const AttentionStatsProblem& p, cudaStream_t stream);

}  // namespace recon_fast::cuda
