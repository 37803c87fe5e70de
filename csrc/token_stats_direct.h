// The eager hot path's launchers: token_stats_rows and token_stats_rows_grouped called without
// the dispatcher (ops.cpp binds them into the Python module recon_fast._C).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace recon_fast::direct {

// The same checks, words and kernels as the ops; the CUDA kernels run on the current stream of
// buffer's device under a device guard. Tensors the dispatcher would first have to rewrite
// (negative views, zero tensors) are handed to the op instead.
void token_stats_rows_into(const at::Tensor& x, at::Tensor& buffer, int64_t row0);
void token_stats_rows_grouped_into(const std::vector<at::Tensor>& xs, at::Tensor& buffer,
                                   const std::vector<int64_t>& row0s);

// Whether the CUDA kernels were compiled in (the direct launchers serve "cuda" tensors).
bool with_cuda();

}  // namespace recon_fast::direct
