// Host entry points of the CUDA token_stats kernels: plain pointers, sizes and a stream, so the
// .cu files need no torch headers (the CPU build of torch ships none for CUDA, and CI compiles
// every kernel with nvcc alone).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../token_stats_problem.h"

namespace recon_fast::cuda {

// Enqueues the reduction of every row of p on `stream`; never synchronises. Returns the launch
// error, if any.
cudaError_t launch_token_stats(const TokenStatsProblem& p, cudaStream_t stream);

// The rows of `count` problems in as few launches as their shapes allow (token_stats_grouped.cu):
// one per kind of row (element type, alignment, lanes or threads per row) and per
// kGroupEntries problems of a kind. Each problem's out rows must lie back to back
// (out_rows.offset(r) == r * kNumStats, out_stat_stride == 1), as plan_token_stats_rows_grouped
// makes them. Never synchronises; returns the first launch error.
cudaError_t launch_token_stats_grouped(const TokenStatsProblem* problems, int64_t count, cudaStream_t stream);

}  // namespace recon_fast::cuda
