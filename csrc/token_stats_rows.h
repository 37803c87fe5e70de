// The tracer's row writes: token_stats of an activation into rows [row0, row0 + rows) of a
// contiguous float32 [N, 5] buffer (an arena chunk), one tensor at a time (token_stats_rows) or a
// group of them in one launch (token_stats_rows_grouped). The checks and the plans are written
// once here; the backends' functions declared below serve both the registered ops and the direct
// launchers (token_stats_direct.cpp), so every path rejects bad input with the same words.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "token_stats_plan.h"

namespace recon_fast {

// A group's work: one problem per tensor that has rows (in the order given), whose out rows lie
// back to back in the buffer (out_rows.offset(r) == r * kNumStats, out_stat_stride == 1).
struct TokenStatsGroupPlan {
  std::vector<TokenStatsProblem> problems;
  std::vector<at::Tensor> storage;  // contiguous copies of xs whose last dim was strided
  int64_t rows = 0;                 // of all problems
  int64_t elements = 0;             // rows x D, summed
};

// Checks x, buffer and row0 (errors begin "token_stats_rows: "), then describes the work. Never
// copies unless x's last dimension is not contiguous.
TokenStatsPlan plan_token_stats_rows(const at::Tensor& x, const at::Tensor& buffer, int64_t row0);

// The same for every xs[i] at row0s[i] (errors begin "token_stats_rows_grouped: " and name
// xs[i]), and that no two tensors' rows overlap, which would make the result depend on the order
// threads ran in.
TokenStatsGroupPlan plan_token_stats_rows_grouped(at::TensorList xs, const at::Tensor& buffer,
                                                  at::IntArrayRef row0s);

// The backends' implementations: plan, then one launch (CPU: one at::parallel_for; CUDA: on the
// current stream of buffer's device, never a sync).
namespace cpu {
void token_stats_rows_cpu(const at::Tensor& x, at::Tensor& buffer, int64_t row0);
// A problem already checked and described (the Recorder's contiguous CPU writes): one launch.
void token_stats_problem_cpu(const TokenStatsProblem& p);
void token_stats_rows_grouped_cpu(at::TensorList xs, at::Tensor& buffer, at::IntArrayRef row0s);
}  // namespace cpu

#if defined(RECON_FAST_WITH_CUDA)
namespace cuda {
void token_stats_rows_cuda(const at::Tensor& x, at::Tensor& buffer, int64_t row0);
void token_stats_rows_grouped_cuda(at::TensorList xs, at::Tensor& buffer, at::IntArrayRef row0s);
}  // namespace cuda
#endif

}  // namespace recon_fast
