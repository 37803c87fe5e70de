// CPU registration of recon_fast::attention_stats: checks arguments, packs k once into the
// kernels' transposed float32 blocks, then splits (batch, head, query block) items across
// threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../attention_stats_plan.h"
#include "../token_stats_problem.h"
#include "attention_stats_cpu.h"
#include "cpu_capability.h"

namespace recon_fast::cpu {

bool avx2_kernel_compiled();  // token_stats_avx2.cpp: whether this build has AVX2 kernels at all

namespace {

at::Tensor attention_stats_cpu(const at::Tensor& q, const at::Tensor& k, double scaling, bool causal,
                               std::optional<int64_t> window, std::optional<double> softcap,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& mask, int64_t sink_tokens) {
  AttentionStatsPlan plan = plan_attention_stats(q, k, scaling, causal, window, softcap,
                                                 key_padding_mask, mask, sink_tokens);
  const AttentionStatsProblem& p = plan.problem;
  if (plan.out.numel() == 0) return plan.out;

  const bool avx2 = avx2_kernel_compiled() && processor_has_avx2() && !baseline_requested_now();  // once per call
  const auto pack = avx2 ? attention_pack_keys_avx2 : attention_pack_keys_default;
  const auto items = avx2 ? attention_stats_items_avx2 : attention_stats_items_default;

  AttentionStatsWorkspace ws;
  ws.key_blocks = (p.k_len + kAttnKeyBlock - 1) / kAttnKeyBlock;
  // O(k_len * head_dim) per kv head: the size of k itself in float32.
  const at::Tensor keys = at::empty({p.batch * p.kv_heads * ws.key_blocks * p.head_dim * kAttnKeyBlock},
                                    q.options().dtype(at::kFloat));
  ws.keys = keys.data_ptr<float>();
  at::Tensor key_bias;
  if (p.key_padding != nullptr) {
    key_bias = at::full({p.batch, ws.key_blocks * kAttnKeyBlock},
                        -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
    key_bias.narrow(1, 0, p.k_len).masked_fill_(*key_padding_mask, 0.f);
    ws.key_bias = key_bias.data_ptr<float>();
    ws.key_bias_stride_b = key_bias.stride(0);
  }

  at::parallel_for(0, p.batch * p.kv_heads * ws.key_blocks, 16,
                   [&](int64_t begin, int64_t end) { pack(p, ws, begin, end); });
  const int64_t row_blocks = (p.q_len + kAttnItemRows - 1) / kAttnItemRows;
  at::parallel_for(0, p.batch * p.heads * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_local(kAttnItemRows * p.head_dim);
    items(p, ws, q_local.data(), begin, end);
  });
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recon_fast, CPU, m) { m.impl("attention_stats", &attention_stats_cpu); }

}  // namespace recon_fast::cpu
