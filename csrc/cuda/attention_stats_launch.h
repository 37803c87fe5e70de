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

// The linear-case kernel (attention_stats_mma_kernel.cu): 16-bit q and k, no soft-cap, no general
// mask, scaling > 0. Where it applies it gives the per-score kernel's statistics within the same
// tolerances and is meant to be faster (not yet measured on a GPU); elsewhere
// launch_attention_stats serves.
bool attention_stats_mma_applies(const AttentionStatsProblem& p);

// Enqueues the linear-case kernel for p (attention_stats_mma_applies(p) must hold). on_mma: the
// linear statistics on the tensor cores (P~ [K | j - j0 | 1]) up to head_dim 128, beyond which
// the FMA variant serves; false: the FMA variant (two FFMA's per score) for every head_dim.
cudaError_t launch_attention_stats_mma(const AttentionStatsProblem& p, bool on_mma,
                                       cudaStream_t stream);

}  // namespace recon_fast::cuda
