// Host entry point of the CUDA token_stats kernels: plain pointers, sizes and a stream, so the
// .cu files need no torch headers (the CPU build of torch ships none for CUDA, and CI compiles
// every kernel with nvcc alone).
#pragma once

#include <cuda_runtime.h>

#include "../token_stats_problem.h"

namespace recon_fast::cuda {

// Enqueues the reduction of every row of p on `stream`; never synchronises. Returns the launch
// error, if any.
cudaError_t launch_token_stats(const TokenStatsProblem& p, cudaStream_t stream);

}  // namespace recon_fast::cuda
