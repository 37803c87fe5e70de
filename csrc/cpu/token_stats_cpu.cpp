// CPU registration of recon_fast::token_stats: checks arguments, picks the widest kernel the
// processor runs, and splits rows across threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "../token_stats_plan.h"
#include "cpu_capability.h"
#include "token_stats_cpu.h"

namespace recon_fast::cpu {
namespace {

using RowsKernel = void (*)(const TokenStatsProblem&, int64_t, int64_t);

RowsKernel select_kernel() {
  static const bool avx2 = avx2_kernel_compiled() && processor_has_avx2();
  return avx2 && !baseline_requested() ? token_stats_rows_avx2 : token_stats_rows_default;
}

void token_stats_cpu(const at::Tensor& x, at::Tensor& out) {
  const TokenStatsPlan plan = plan_token_stats(x, out);
  const TokenStatsProblem& p = plan.problem;
  const RowsKernel kernel = select_kernel();
  // Enough rows per task that a task reads at least ~64 KiB, so threads are not started for
  // a handful of short rows.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / p.dim);
  at::parallel_for(0, p.rows, grain,
                   [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

std::string cpu_kernel_name() {
  return select_kernel() == token_stats_rows_avx2 && avx2_kernel_compiled() ? "avx2" : "default";
}

}  // namespace

TORCH_LIBRARY_IMPL(recon_fast, CPU, m) { m.impl("token_stats", &token_stats_cpu); }

// Which CPU kernel would run now; exposed for tests and `recon_fast.ops.backend`.
TORCH_LIBRARY_FRAGMENT(recon_fast, m) {
  m.def("cpu_kernel() -> str", &cpu_kernel_name);
}

}  // namespace recon_fast::cpu
