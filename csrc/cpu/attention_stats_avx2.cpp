// attention_stats CPU kernel compiled for AVX2 + FMA (see avx2_target.h), chosen at run time.
#include "avx2_target.h"

#include "attention_stats_cpu.h"

#if defined(RECON_FAST_AVX2_TARGET)
#include "attention_stats_kernel.h"

namespace recon_fast::cpu {
void attention_pack_keys_avx2(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                              int64_t begin, int64_t end) {
  AVX2::attention_pack_keys(p, ws, begin, end);
}
void attention_stats_items_avx2(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                                float* q_local, int64_t begin, int64_t end) {
  AVX2::attention_stats_items(p, ws, q_local, begin, end);
}
}  // namespace recon_fast::cpu

#else  // not x86-64 GCC/Clang: the default kernel serves alone

namespace recon_fast::cpu {
void attention_pack_keys_avx2(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                              int64_t begin, int64_t end) {
  attention_pack_keys_default(p, ws, begin, end);
}
void attention_stats_items_avx2(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                                float* q_local, int64_t begin, int64_t end) {
  attention_stats_items_default(p, ws, q_local, begin, end);
}
}  // namespace recon_fast::cpu
#endif
