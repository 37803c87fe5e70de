// attention_stats CPU kernel for the baseline instruction set; used where no wider capability is
// available (or ATEN_CPU_CAPABILITY=default asks for it).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "attention_stats_kernel.h"

namespace recon_fast::cpu {
void attention_pack_keys_default(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                                 int64_t begin, int64_t end) {
  DEFAULT::attention_pack_keys(p, ws, begin, end);
}
void attention_stats_items_default(const AttentionStatsProblem& p,
                                   const AttentionStatsWorkspace& ws, float* q_local, int64_t begin,
                                   int64_t end) {
  DEFAULT::attention_stats_items(p, ws, q_local, begin, end);
}
}  // namespace recon_fast::cpu
