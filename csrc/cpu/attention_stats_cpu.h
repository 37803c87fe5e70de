// Entry points of the per-capability attention_stats CPU kernels (plain data in, no torch types)
// and the layout of the workspace the registration allocates for them.
#pragma once

#include <cstdint>

#include "../attention_stats_problem.h"

namespace recon_fast::cpu {

// Keys per packed block: the unit of the causal/window skip and of the score tile's width.
constexpr int64_t kAttnKeyBlock = 64;
// Queries per work item (a multiple of every capability's micro-tile height: 6 and 12). The
// item's key blocks are read once from L2/L3 and then serve all its queries from L1.
constexpr int64_t kAttnItemRows = 48;

struct AttentionStatsWorkspace {
  // k as float32, transposed per block: [batch, kv_heads, key_blocks, head_dim, kAttnKeyBlock],
  // zero beyond k_len, so a micro-kernel loads a vector of keys for one channel at a time.
  float* keys = nullptr;
  int64_t key_blocks = 0;
  // Key padding as an additive row per batch (0 = keep, -inf = padding), key_blocks *
  // kAttnKeyBlock long; null without a key padding mask.
  const float* key_bias = nullptr;
  int64_t key_bias_stride_b = 0;
};

// Work item w of the pack: (batch, kv_head, key block), w in [0, batch * kv_heads * key_blocks).
void attention_pack_keys_default(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                                 int64_t begin, int64_t end);
void attention_pack_keys_avx2(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                              int64_t begin, int64_t end);
// Work item w of the statistics: (batch, head, block of kAttnItemRows queries). q_local is the
// calling thread's scratch of kAttnItemRows * head_dim floats.
void attention_stats_items_default(const AttentionStatsProblem& p,
                                   const AttentionStatsWorkspace& ws, float* q_local, int64_t begin,
                                   int64_t end);
void attention_stats_items_avx2(const AttentionStatsProblem& p, const AttentionStatsWorkspace& ws,
                                float* q_local, int64_t begin, int64_t end);

}  // namespace recon_fast::cpu
