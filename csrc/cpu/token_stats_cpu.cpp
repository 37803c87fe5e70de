// CPU registration of recon_fast::token_stats, token_stats_rows and token_stats_rows_grouped:
// checks arguments, picks the widest kernel the processor runs, and splits rows across threads
// with at::parallel_for (a group's rows, of all its tensors, in one).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/SmallVector.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../token_stats_plan.h"
#include "../token_stats_rows.h"
#include "cpu_capability.h"
#include "token_stats_cpu.h"

namespace recon_fast::cpu {
namespace {

using RowsKernel = void (*)(const TokenStatsProblem&, int64_t, int64_t);

RowsKernel select_kernel() {
  static const bool avx2 = avx2_kernel_compiled() && processor_has_avx2();
  return avx2 && !baseline_requested() ? token_stats_rows_avx2 : token_stats_rows_default;
}

// Enough rows per task that a task reads at least ~64 KiB (of float32), so threads are not
// started for a handful of short rows; `dim`: the (mean) row length.
int64_t grain_for(int64_t dim) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(dim, 1)); }

void run_rows(const TokenStatsProblem& p) {
  const RowsKernel kernel = select_kernel();
  at::parallel_for(0, p.rows, grain_for(p.dim), [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

void token_stats_cpu(const at::Tensor& x, at::Tensor& out) { run_rows(plan_token_stats(x, out).problem); }

// The op reads ATEN_CPU_CAPABILITY again, so that a change to it takes effect (see baseline_requested).
std::string cpu_kernel_name() {
  reread_baseline_request();
  return select_kernel() == token_stats_rows_avx2 && avx2_kernel_compiled() ? "avx2" : "default";
}

}  // namespace

void token_stats_problem_cpu(const TokenStatsProblem& p) { run_rows(p); }

void token_stats_rows_cpu(const at::Tensor& x, at::Tensor& buffer, int64_t row0) {
  run_rows(plan_token_stats_rows(x, buffer, row0).problem);
}

// One at::parallel_for over the rows of every tensor of the group, numbered tensor after tensor:
// a task finds the tensor of its first row by binary search over the running row counts, then
// walks on through the table. Each row is reduced by the same kernel as token_stats', so a group
// gives bit for bit the numbers of its tensors taken one at a time.
void token_stats_rows_grouped_cpu(at::TensorList xs, at::Tensor& buffer, at::IntArrayRef row0s) {
  const TokenStatsGroupPlan plan = plan_token_stats_rows_grouped(xs, buffer, row0s);
  const std::vector<TokenStatsProblem>& problems = plan.problems;
  if (problems.empty()) return;
  c10::SmallVector<int64_t, 33> first_row(problems.size() + 1);  // running row counts
  first_row[0] = 0;
  for (size_t i = 0; i < problems.size(); ++i) first_row[i + 1] = first_row[i] + problems[i].rows;
  const RowsKernel kernel = select_kernel();
  at::parallel_for(0, plan.rows, grain_for(plan.elements / plan.rows), [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(first_row.begin(), first_row.end(), begin) - first_row.begin() - 1;
    for (; begin < end; ++i) {
      const int64_t stop = std::min(end, first_row[i + 1]);
      kernel(problems[i], begin - first_row[i], stop - first_row[i]);
      begin = stop;
    }
  });
}

TORCH_LIBRARY_IMPL(recon_fast, CPU, m) {
  m.impl("token_stats", &token_stats_cpu);
  m.impl("token_stats_rows", &token_stats_rows_cpu);
  m.impl("token_stats_rows_grouped", &token_stats_rows_grouped_cpu);
}

// Which CPU kernel would run now (the op is declared in ops.cpp).
TORCH_LIBRARY_IMPL(recon_fast, CompositeImplicitAutograd, m) { m.impl("cpu_kernel", &cpu_kernel_name); }

}  // namespace recon_fast::cpu
