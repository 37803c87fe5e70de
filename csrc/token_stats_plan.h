// Validation of token_stats arguments and their translation into a TokenStatsProblem. Shared by
// the CPU and CUDA registrations so that both reject bad input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include "token_stats_problem.h"

namespace recon_fast {

struct TokenStatsPlan {
  // Holds a contiguous copy of x when its last dim was strided (the slow path); empty otherwise.
  at::Tensor x_storage;
  TokenStatsProblem problem;
};

// The element type of a floating tensor; otherwise an error "<what> must be float32, float64,
// float16 or bfloat16, got <dtype>" (what: e.g. "token_stats: x"). Shared by every op's plan.
StatsDtype stats_dtype_of(const at::Tensor& t, const char* what);

// Checks x and out (dtype, shape, device) with errors that name the problem, then describes the
// work. Never copies unless x's last dimension is not contiguous.
TokenStatsPlan plan_token_stats(const at::Tensor& x, const at::Tensor& out);

}  // namespace recon_fast
