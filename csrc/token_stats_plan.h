// Validation of token_stats arguments and their translation into a TokenStatsProblem. Shared by
// the CPU and CUDA registrations so that both reject bad input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "token_stats_problem.h"

namespace recon_fast {

struct TokenStatsPlan {
  // Holds a contiguous copy of x when its last dim was strided (the slow path); empty otherwise.
  at::Tensor x_storage;
  TokenStatsProblem problem;
};

// The element type token_stats reads for `type`, or none (other floating types: the float8s).
std::optional<StatsDtype> stats_dtype(at::ScalarType type);

// The element type of a floating tensor; otherwise an error "<what> must be float32, float64,
// float16 or bfloat16, got <dtype>" (what: e.g. "token_stats: x"). Shared by every op's plan.
StatsDtype stats_dtype_of(const at::Tensor& t, const char* what);

// Fills the row indexers of x and out (whose leading dims both have `sizes`), merging adjacent
// dims that are contiguous with each other in both; returns how many dims are left, and leaves
// the indexers unset when that is more than kMaxRowDims (the caller names the error).
int build_row_indexers(at::IntArrayRef sizes, at::IntArrayRef x_strides, at::IntArrayRef out_strides,
                       RowIndexer& x_rows, RowIndexer& out_rows);

// Checks x and out (dtype, shape, device) with errors that name the problem, then describes the
// work. Never copies unless x's last dimension is not contiguous.
TokenStatsPlan plan_token_stats(const at::Tensor& x, const at::Tensor& out);

}  // namespace recon_fast
