// token_stats CPU kernel compiled for AVX2 + FMA (see avx2_target.h), chosen at run time when
// the processor has them.
#include "avx2_target.h"

#if defined(RECON_FAST_AVX2_TARGET)
#include "token_stats_kernel.h"

#include "token_stats_cpu.h"

namespace recon_fast::cpu {
bool avx2_kernel_compiled() { return true; }
void token_stats_rows_avx2(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  AVX2::token_stats_rows(p, begin, end);
}
}  // namespace recon_fast::cpu

#else  // not x86-64 GCC/Clang: the default kernel serves alone

#include "token_stats_cpu.h"

namespace recon_fast::cpu {
bool avx2_kernel_compiled() { return false; }
void token_stats_rows_avx2(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  token_stats_rows_default(p, begin, end);
}
}  // namespace recon_fast::cpu
#endif
