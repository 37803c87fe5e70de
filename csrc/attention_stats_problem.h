// The attention_stats problem as plain data: pointers, sizes, strides and options, free of torch
// types, so that the CPU kernels (compiled once per instruction set) and the CUDA kernels
// (compiled by nvcc without torch headers) share one description of the work.
//
// Positions. Query i (0 <= i < q_len) sits at absolute position i' = i + (k_len - q_len): the
// queries are the last q_len tokens of the k_len keys, as with a KV cache (lower-right aligned).
// Key j is visible to query i when every one of these holds:
//   causal:            j <= i'
//   window w (>= 1):   j >  i' - w           (w keys: i' itself and the w - 1 before it; HF's
//                                             sliding_window_overlay, flash window (w - 1, 0))
//                      and, when not causal, j < i' + w  (|i' - j| < w: flash (w - 1, w - 1))
//   key padding:       key_padding[b, j]     (true = keep)
//   bool mask:         mask[b, h, i, j]      (true = keep; size-1 dims broadcast)
// An additive mask is added to the (soft-capped) score instead: -inf hides a key.
#pragma once

#include <cstdint>

#include "token_stats_problem.h"  // StatsDtype (the element type of q and k), RECON_HOST_DEVICE

namespace recon_fast {

// Channels of one output row, in this order. Their names, in index order, must be the rows of
// recon_fast/kernels/stats_tables.py: ATTENTION_STATS_TABLE (checked as token_stats' are).
enum AttentionStat : int {
  kStatEntropy = 0,       // -sum p log p (nats)
  kStatMaxWeight = 1,     // max p
  kStatArgmax = 2,        // key index of the max p (first one at ties), as a float
  kStatSinkMass = 3,      // sum of p over keys j < sink_tokens
  kStatMeanDistance = 4,  // sum p_j (i' - j), in tokens
  kStatSelfWeight = 5,    // p at j = i'
  kStatPrevWeight = 6,    // p at j = i' - 1
  kStatLse = 7,           // log sum exp of the scores
};
constexpr int kNumAttentionStats = 8;
constexpr const char* kAttentionStatNames[] = {
    "entropy", "max_weight", "argmax", "sink_mass", "mean_distance", "self_weight", "prev_weight", "lse"};
static_assert(sizeof(kAttentionStatNames) / sizeof(kAttentionStatNames[0]) == kNumAttentionStats &&
                  kStatLse + 1 == kNumAttentionStats,
              "attention_stats: a channel without its name, or a name without its channel");

enum class AttentionMaskKind : int { None = 0, Bool = 1, Additive = 2 };

struct AttentionStatsProblem {
  const void* q = nullptr;  // [batch, heads, q_len, head_dim] of `dtype`, last dim contiguous
  const void* k = nullptr;  // [batch, kv_heads, k_len, head_dim] of `dtype`, last dim contiguous
  StatsDtype dtype = StatsDtype::Float32;
  int64_t batch = 0, heads = 0, kv_heads = 0, q_len = 0, k_len = 0, head_dim = 0;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;  // in elements
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_t = 0;

  float scaling = 1.f;
  bool causal = true;
  int64_t window = 0;    // 0: no sliding window
  float softcap = 0.f;   // 0: no soft-cap; else s = softcap * tanh(s / softcap)
  int64_t sink_tokens = 0;

  const bool* key_padding = nullptr;  // [batch, k_len], true = keep; null: none
  int64_t key_padding_stride_b = 0, key_padding_stride_t = 0;

  AttentionMaskKind mask_kind = AttentionMaskKind::None;
  const void* mask = nullptr;  // bool (true = keep) or float32 (added); stride 0 on broadcast dims
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_q = 0, mask_stride_k = 0;

  float* out = nullptr;  // contiguous [batch, heads, q_len, kNumAttentionStats]

  // Absolute position of query 0 (negative when there are more queries than keys).
  RECON_HOST_DEVICE int64_t query_offset() const { return k_len - q_len; }
  RECON_HOST_DEVICE int64_t group_size() const { return heads / kv_heads; }

  // The keys [lo, hi) that query position `pos` (absolute) may see before masks; empty when
  // hi <= lo.
  RECON_HOST_DEVICE void key_range(int64_t pos, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = k_len;
    if (causal && pos + 1 < hi) hi = pos + 1;
    if (window > 0) {
      if (pos - window + 1 > lo) lo = pos - window + 1;
      if (!causal && pos + window < hi) hi = pos + window;
    }
  }
};

}  // namespace recon_fast
