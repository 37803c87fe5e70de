// Entry points of the per-capability CPU kernels (plain data in, no torch types).
#pragma once

#include <cstdint>

#include "../token_stats_problem.h"

namespace recon_fast::cpu {
void token_stats_rows_default(const TokenStatsProblem& p, int64_t begin, int64_t end);
void token_stats_rows_avx2(const TokenStatsProblem& p, int64_t begin, int64_t end);
bool avx2_kernel_compiled();
}  // namespace recon_fast::cpu
