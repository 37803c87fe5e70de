// token_stats CPU kernel for the baseline instruction set (whatever the compiler targets by
// default); used where no wider capability is available.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "token_stats_kernel.h"

#include "token_stats_cpu.h"

namespace recon_fast::cpu {
void token_stats_rows_default(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  DEFAULT::token_stats_rows(p, begin, end);
}
}  // namespace recon_fast::cpu
